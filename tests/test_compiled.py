"""torch --compile: a static-cache decode step through torch.compile gives the eager path's tokens."""

from __future__ import annotations

import shutil

import pytest

from backends.types import GenerationConfig
from backends.types import UserError

GREEDY = GenerationConfig(max_tokens=12, temperature=0.0, ignore_eos=True)


def compiled_backend(folder, monkeypatch, compiler):
    import backends
    from backends.torch_engine import compiled

    monkeypatch.setattr(compiled, "COMPILER", compiler)
    return backends.get("torch").load(folder, device="cpu", dtype="float32", compile=True)


@pytest.mark.parametrize("alias", ["tinyllama", "pythia-1b"])
def test_static_cache_step_gives_eager_tokens(tiny_folder, tiny_model, monkeypatch, alias):
    # dynamo's graph capture without inductor ("eager"): the cache, positions and cache length
    # logic of the compiled path, checked on two families in seconds
    eager = tiny_model("torch", alias)
    b = compiled_backend(tiny_folder(alias), monkeypatch, "eager")
    prompts = [list(range(5, 25)), list(range(40, 43))]  # two lengths: a fresh cache each, one shape
    for prompt in prompts:
        assert b.generate(prompt, GREEDY) == eager.generate(prompt, GREEDY)
    assert list(b.compiled.compile_seconds) == [256]
    assert "compiled in" in b.info().compiled and eager.info().compiled is None
    seeded = GenerationConfig(max_tokens=8, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True)
    assert b.generate(prompts[0], seeded) == eager.generate(prompts[0], seeded)


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")),
                    reason="no C++ compiler: inductor builds its CPU kernels with one")
def test_inductor_compiled_step_gives_eager_tokens(tiny_folder, tiny_model, monkeypatch):
    # the real compiler once, on the smallest model: generated C++ kernels, same greedy tokens
    b = compiled_backend(tiny_folder("tinyllama"), monkeypatch, "inductor")
    prompt = list(range(7, 30))
    assert b.generate(prompt, GREEDY) == tiny_model("torch").generate(prompt, GREEDY)
    assert "inductor" in b.info().compiled


def test_cache_length_rounds_up_to_powers_of_two_within_context(tiny_folder, monkeypatch):
    b = compiled_backend(tiny_folder("tinyllama"), monkeypatch, "eager")
    step = b.compiled
    step.context_length = 1000
    assert [step.cache_length(n) for n in (1, 256, 257, 600, 1000)] == [256, 256, 512, 1000, 1000]


def test_bench_warms_a_compiled_decode_up_at_the_timed_length(tiny_folder, tiny_model, monkeypatch):
    # a shorter warm-up could land in a smaller cache and leave the compile to the first timed run
    from billion.tasks.bench import warmup_config

    b = compiled_backend(tiny_folder("tinyllama"), monkeypatch, "eager")
    assert warmup_config(b, 300).max_tokens == 300 and warmup_config(tiny_model("torch"), 300).max_tokens == 8


def test_compile_on_an_engine_without_it_is_a_clear_error(tiny_folder):
    from billion.loading import LoadOptions, load, resolve

    with pytest.raises(UserError, match="the mlx engine does not support a compiled decode step"):
        load("mlx", resolve(str(tiny_folder("tinyllama"))), LoadOptions(compile=True))
