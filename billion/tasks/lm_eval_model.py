"""billion's `lm_eval.api.model.LM`: a loaded billion Backend answering lm-eval's requests.

The request semantics (those of lm-eval's own Hugging Face model) are described in
billion.tasks.eval's docstring. This module imports lm_eval at its top, so it is imported only
once lm_eval is known to be there: billion.tasks.eval imports it inside `lm_class()`, after
`require_lm_eval()`, which keeps `billion --help` (and `import billion.tasks.eval`) working
without `pip install billion[eval]`.

Importing it registers the class with lm-eval's model registry as billion-mlx, billion-torch and
billion-llama.cpp, so `lm_eval.simple_evaluate(model="billion-torch",
model_args="pretrained=<spec>")` works too. Registering imports no engine.
"""

from __future__ import annotations

import hashlib
import json

import jinja2
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

import backends
from backends.batching import generate_all
from backends.scoring import score_batched, score_encoded
from backends.types import GenerationConfig, UserError
from billion.tasks.eval import rolling_windows

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HF model


class BillionLM(LM):
    """A loaded billion Backend answering lm-eval's requests (see billion.tasks.eval)."""

    engine: str | None = None  # set by the registered names: billion-mlx / billion-torch

    def __init__(self, backend=None, pretrained: str | None = None, batch_size=1, device=None,
                 dtype: str | None = None, quantize: str | None = None, trust_remote_code: bool = False,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, max_length: int | None = None, checkpoint=None,
                 **_ignored):
        super().__init__()
        # resume: answers already computed by an interrupted run, keyed by request (as lm-eval's
        # CachingLM keys them), in billion's one checkpoint format (billion/records/checkpoint.py)
        self.checkpoint = checkpoint
        self.answered = {d["key"]: d["answer"] for d in checkpoint.load()} if checkpoint else {}
        if backend is None:
            if pretrained is None or self.engine is None:
                raise UserError("BillionLM needs a loaded backend, or pretrained=<model spec> through "
                                "billion-mlx / billion-torch")
            # billion.loading is imported here, not at the top: it is only needed when lm-eval
            # builds the model from a spec, and the registry must stay cheap to import.
            from billion.loading import LoadOptions, load, resolve

            options = LoadOptions(device=device, dtype=dtype, quantize=quantize,
                                  trust_remote_code=bool(trust_remote_code))
            backend = load(self.engine, resolve(str(pretrained)), options)
        self.backend = backend
        self.tokenizer = backend.tokenizer
        self._batch_size = int(batch_size) if str(batch_size).isdigit() else 1  # "auto": 1
        self._max_gen_toks = int(max_gen_toks)
        self._max_length = min(int(max_length), backend.context_length) if max_length else backend.context_length

    # -- what lm-eval asks of a model ------------------------------------

    @property
    def max_length(self) -> int:
        return self._max_length

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        def answer(args):
            return self.backend.score(args, batch_size=self._batch_size, truncate=self.max_length)

        return [tuple(a) for a in self._answer("loglikelihood", requests, answer)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return self._answer("loglikelihood_rolling", requests, lambda args: [self._rolling(*a) for a in args])

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        return self._answer("generate_until", requests, self._generate)

    def _answer(self, kind: str, requests, compute, chunk: int = 32) -> list:
        """Each request's answer: from the checkpoint when an earlier run computed it, else
        computed `chunk` requests at a time and appended to the checkpoint as each chunk ends."""
        keys = [request_key(kind, req.args) for req in requests]
        missing = [i for i, k in enumerate(keys) if k not in self.answered]
        for start in range(0, len(missing), chunk):
            part = missing[start:start + chunk]
            answers = compute([tuple(requests[i].args) for i in part])
            fresh = [{"key": keys[i], "answer": a} for i, a in zip(part, answers)]
            self.answered.update((d["key"], d["answer"]) for d in fresh)
            if self.checkpoint:
                self.checkpoint.append(fresh)
        return [self.answered[k] for k in keys]

    def _rolling(self, text: str) -> float:
        wins = rolling_windows(self.backend.encode_scored(text), self.backend.prefix_token_id, self.max_length, 1)
        scored = (score_batched(self.backend, wins, self._batch_size) if self._batch_size > 1
                  else score_encoded(self.backend, wins))
        return float(sum(lp for lp, _ in scored))

    def _generate(self, args: list[tuple]) -> list[str]:
        """A chunk of generate_until requests, decoded together --batch-size at a time (the engine's
        batch generator), each until EOS, its max_gen_toks or one of its stop strings."""
        from lm_eval.models.utils import postprocess_generated_text

        prepared = [self._prepare(context, gen_kwargs) for context, gen_kwargs in args]
        texts = []
        for (ids, gen, until), got in zip(prepared, self._generate_batch(prepared)):
            texts.append(postprocess_generated_text(self.backend.detokenize(got.tokens), until, None))
        return texts

    def _generate_batch(self, prepared):
        stops = [tuple(s for s in until if s) for _, _, until in prepared]
        return generate_all(self.backend, [p[0] for p in prepared], [p[1] for p in prepared],
                            max_batch=self._batch_size, stop_when=lambda i, text: any(s in text for s in stops[i]))

    def _prepare(self, context: str, gen_kwargs: dict) -> tuple[list[int], GenerationConfig, list[str]]:
        """(prompt ids, generation settings, stop strings) of one request, as lm-eval's HF model
        reads them."""
        # Imported here, not at the top: some lm-eval 0.4 releases import torch in
        # lm_eval.models.utils, and registering (importing this module) must import no engine.
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

        b = self.backend
        kwargs = normalize_gen_kwargs(dict(gen_kwargs or {}), self._max_gen_toks)
        eos = b.tokenizer.decode([b.tokenizer.eos_token_id], skip_special_tokens=False) \
            if b.tokenizer.eos_token_id is not None else None
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
        max_gen = int(kwargs.pop("max_gen_toks"))
        room = self.max_length - max_gen
        if room <= 0:
            raise UserError(f"max_gen_toks {max_gen} leaves no room for a prompt in {self.max_length} tokens")
        bos = getattr(b.tokenizer, "bos_token", None)
        ids = b.tokenize(context, add_special_tokens=not (bos and context.startswith(bos)))[-room:]
        temperature = float(kwargs.get("temperature") or 0.0)
        sample = bool(kwargs.get("do_sample")) and temperature > 0
        gen = GenerationConfig(max_tokens=max_gen, temperature=temperature if sample else 0.0,
                               top_p=float(kwargs.get("top_p") or 1.0) if sample else 1.0,
                               seed=kwargs.get("seed"))
        return ids, gen, until

    # -- chat templates ----------------------------------------------------

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        def render(history):
            return self.tokenizer.apply_chat_template(history, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt,
                                                      continue_final_message=not add_generation_prompt)

        if not self.backend.has_chat_template:
            raise UserError("--apply-chat-template: this model has no chat template")
        try:
            return render(chat_history)
        except jinja2.exceptions.TemplateError:  # lm-eval's HF model: retry without the system role
            return render([m for m in chat_history if m["role"] != "system"])

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if chat_template is False or chat_template is None:
            return None
        template = getattr(self.tokenizer, "chat_template", None)
        if isinstance(template, dict):
            name = chat_template if isinstance(chat_template, str) else "default"
            if name not in template:
                raise UserError(f"no chat template {name!r}; the model has {', '.join(sorted(template))}")
            return template[name]
        return template


def request_key(kind: str, args) -> str:
    """A request's identity: its kind and arguments (the context, the continuation or the
    generation settings), hashed."""
    text = json.dumps([kind, list(args)], sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()


def _register_engines() -> None:
    """One subclass per engine, its `engine` set, registered as billion-<engine>; backends.ENGINES
    holds only "module:Class" strings, so this imports no engine."""
    for engine in backends.ENGINES:  # billion-mlx, billion-torch, billion-llama.cpp (the peer)
        cls_name = f"Billion{engine.replace('.', '').upper()}LM"
        register_model(f"billion-{engine}")(type(cls_name, (BillionLM,), {"engine": engine}))


# At import, not in lm_class(): Python imports a module once, so the names are registered once
# however many times lm_class() is called, and importing this module alone registers them too.
_register_engines()
