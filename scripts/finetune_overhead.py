"""Fine-tuning overhead: `billion finetune`'s training against mlx-lm's tuner and trl called directly.

For each engine, the same model folder, the same tokenized examples (made once by
billion/tasks/finetune_data.py), the same LoRA settings (rank, scale, targets, dropout) and the
same number of optimiser steps, batch size and gradient accumulation run twice:

  billion  Backend.lora_train (backends/mlx_engine/train.py, backends/torch_engine/train.py),
           without validation, as `billion finetune` runs it;
  direct   MLX: `mlx_lm.tuner.trainer.train` on `linear_to_lora_layers`, its own
           batching (length-sorted, the prompt masked through (ids, offset) pairs);
           torch: trl's `SFTTrainer` with a peft `LoraConfig`, the pre-tokenized
           `input_ids` + `completion_mask`, trl's defaults otherwise (random order,
           no gradient checkpointing, float32).

Each side loads its own fresh model and is timed from adding the LoRA layers to
the saved adapter; reported: wall seconds, training tokens/s (non-padding tokens
processed; identical work on both sides) and the ratio billion / direct (> 1:
billion is slower). After one untimed warm-up run of each side (imports,
first allocations, the kernels MLX compiles for mlx-lm's `mx.compile`d step), the
order alternates billion/direct over --reps repetitions and the medians are
compared.

    .venv/bin/python scripts/finetune_overhead.py --model tiny:tinyllama --backend all --steps 8 --reps 3

Writes one `finetune-overhead` record per engine under --results-dir.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import backends
from backends.training import TrainConfig, default_targets, plan_steps, step_tokens
from billion.tasks import finetune_data
from billion.loading import LoadOptions, load, resolve
from billion.records.store import make_record, write_record

CPU_FLOAT32 = LoadOptions(device="cpu", dtype="float32")


def billion_run(engine, model, examples, cfg, out):
    b = load(engine, model, CPU_FLOAT32)
    t = time.perf_counter()
    b.lora_train(examples, [], cfg, out)
    return time.perf_counter() - t


def mlx_direct(model, examples, cfg, out):
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import TrainingArgs, train
    from mlx_lm.tuner.utils import linear_to_lora_layers

    b = load("mlx", model, CPU_FLOAT32)
    t = time.perf_counter()
    mx.random.seed(cfg.seed)
    b.model.freeze()
    targets = cfg.targets or default_targets(b.config["model_type"])
    keys = [n for n, _ in b.model.layers[0].named_modules() if n.rsplit(".", 1)[-1] in targets]
    linear_to_lora_layers(b.model, len(b.model.layers),
                          {"rank": cfg.rank, "scale": cfg.scale, "dropout": cfg.dropout, "keys": keys})
    # mlx-lm's dataset items: (ids, offset of the first target): the prompt is masked
    dataset = [(list(e.ids), e.mask.index(1) - 1) for e in examples]
    args = TrainingArgs(batch_size=cfg.batch_size, iters=cfg.steps * cfg.grad_accum, val_batches=0,
                        steps_per_report=10**9, steps_per_eval=10**9, steps_per_save=10**9,
                        max_seq_length=cfg.max_seq_len, adapter_file=str(out / "adapters.safetensors"),
                        grad_accumulation_steps=cfg.grad_accum)
    out.mkdir(parents=True, exist_ok=True)
    opt = optim.AdamW(learning_rate=optim.linear_schedule(cfg.learning_rate, 0.0, cfg.steps), weight_decay=0.0,
                      bias_correction=True)
    train(b.model, opt, dataset, None, args)
    return time.perf_counter() - t


def trl_direct(model, examples, cfg, out):
    import warnings

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import PrinterCallback, ProgressCallback
    from trl import SFTConfig, SFTTrainer

    b = load("torch", model, CPU_FLOAT32)
    t = time.perf_counter()
    warnings.simplefilter("ignore", FutureWarning)
    targets = list(cfg.targets or default_targets(b.model.config.model_type))
    peft_config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                             task_type="CAUSAL_LM")
    ds = Dataset.from_dict({"input_ids": [list(e.ids) for e in examples],
                            "completion_mask": [list(e.mask) for e in examples]})
    args = SFTConfig(output_dir=str(out), max_steps=cfg.steps, per_device_train_batch_size=cfg.batch_size,
                     gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.learning_rate, seed=cfg.seed,
                     logging_steps=10**9, save_strategy="no", report_to="none", disable_tqdm=True,
                     gradient_checkpointing=False, bf16=False, use_cpu=True, max_length=None,
                     completion_only_loss=True)
    trainer = SFTTrainer(model=b.model, args=args, train_dataset=ds, processing_class=b.tokenizer,
                         peft_config=peft_config)
    for printer in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(printer)
    trainer.train()
    trainer.model.save_pretrained(str(out))
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny:tinyllama")
    p.add_argument("--backend", default="all")
    p.add_argument("--data", default="sample")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--results-dir", default="results")
    a = p.parse_args()
    cfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, grad_accum=a.grad_accum)
    names = backends.engine_names(a.backend)
    model = resolve(a.model, progress=False)
    tok = load(names[0], model, CPU_FLOAT32)
    examples, _ = finetune_data.encode(tok, finetune_data.read_rows(a.data), cfg.max_seq_len,
                                       finetune_data.use_chat(tok, None))
    del tok
    # both sides process the same number of examples of the same lengths (in another order for mlx-lm/trl)
    tokens = sum(step_tokens(s, examples) for s in plan_steps(len(examples), cfg))
    direct = {"mlx": mlx_direct, "torch": trl_direct}
    for engine in names:
        started = time.time()
        times = {"billion": [], "direct": []}
        with tempfile.TemporaryDirectory() as tmp:
            # untimed warm-up of both sides: imports, first-call allocations, MLX's compiled kernels
            billion_run(engine, model, examples, cfg, Path(tmp) / "warm-b")
            direct[engine](model, examples, cfg, Path(tmp) / "warm-d")
            for rep in range(a.reps):
                times["billion"].append(billion_run(engine, model, examples, cfg, Path(tmp) / f"b{rep}"))
                times["direct"].append(direct[engine](model, examples, cfg, Path(tmp) / f"d{rep}"))
        med = {k: statistics.median(v) for k, v in times.items()}
        metrics = {"billion_s": med["billion"], "direct_s": med["direct"],
                   "billion_tokens_per_s": tokens / med["billion"], "direct_tokens_per_s": tokens / med["direct"],
                   "ratio_billion_over_direct": med["billion"] / med["direct"], "tokens": tokens,
                   "all_times_s": times}
        direct_name = "mlx_lm.tuner.trainer.train" if engine == "mlx" else "trl SFTTrainer + peft"
        print(f"{engine}: billion {med['billion']:.2f} s ({tokens / med['billion']:,.0f} tok/s) vs {direct_name} "
              f"{med['direct']:.2f} s ({tokens / med['direct']:,.0f} tok/s): ratio {metrics['ratio_billion_over_direct']:.2f}")
        rec = make_record("finetune-overhead", engine, str(model),
                          {"steps": a.steps, "batch_size": a.batch_size, "grad_accum": a.grad_accum, "reps": a.reps,
                           "data": a.data, "direct": direct_name}, metrics, started=started,
                          source=model.source)
        print(f"  record: {write_record(rec, a.results_dir)}")


if __name__ == "__main__":
    main()
