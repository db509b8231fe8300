"""Training throughput: our `train_adapter` against transformers' Trainer + PEFT, same model, data and settings,
and the cost of the training-time continual-learning methods.

    python benchmarks/train_throughput.py --examples 48 --json train_throughput.json

Both train a fresh rsLoRA adapter (rank 8 on every projection) for one epoch over the same tokenised examples
(task363 from the shipped data) with AdamW, a linear schedule (1 warmup step, as ceil(0.01 * steps)) and the same batch size, with bf16 autocast where
the CPU supports it. Reported: training tokens (non-padding) per second for each, and ours / Trainer. Then ours
again with O-LoRA's loss term against `--past-stages` past adapters (goal: within 5% of plain training): plain and
O-LoRA runs alternate for `--rounds` rounds, each on a fresh adapter, and the ratio is the median of the rounds'
ratios (adjacent runs see the same machine load); the penalty's own forward + backward is also timed alone, as a
fraction of a plain step. Last, InfLoRA's after-stage covariance pass (its only cost besides one eigendecomposition
per layer at the next init) in seconds and as a fraction of the plain training time.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

from slicelora.data.prompts import collate, encode_example
from slicelora.data.tasks import load_task
from slicelora.loop.config import TrainSection
from slicelora.loop.train import bf16_supported, train_adapter
from slicelora.models import LLAMA_TARGETS, load_model


def fresh_peft(model_path: str | None, rank: int):
    model, tokenizer = load_model(model_path)
    config = LoraConfig(r=rank, lora_alpha=16, use_rslora=True, target_modules=list(LLAMA_TARGETS))
    return get_peft_model(model, config), tokenizer


def olora_with_anchors(args, run_config, model):
    """O-LoRA with random anchors standing in for `--past-stages` past stages' A's."""
    from slicelora.loop.continual import OLoRA, Stage, lora_a_weights

    olora = OLoRA(run_config)
    g = torch.Generator().manual_seed(0)
    for t in range(args.past_stages):
        olora.after_stage(Stage(t + 1, [], []), {f"{name}.A": torch.randn(a.shape, generator=g) * 0.02
                                                   for name, a in lora_a_weights(model).items()})
    return olora


def olora_costs(args, examples, cfg: TrainSection) -> dict[str, float]:
    """Plain and O-LoRA training alternately, `--rounds` times on fresh adapters; then the penalty alone."""
    from statistics import median

    from slicelora.loop.config import load_config

    run_config = load_config(None, ["cl.method=olora", f"adapter.rank={args.rank}"])
    out: dict[str, float] = {"past_stages": args.past_stages, "rounds": args.rounds}
    model, tokenizer = fresh_peft(args.model, args.rank)  # warm-up: the first training in a process is slower
    train_adapter(model, tokenizer, examples[:cfg.batch_size], cfg, Accelerator(cpu=True), seed=0)
    plain, olora_times = [], []
    for k in range(args.rounds):
        times = {}
        for kind in ("plain", "olora") if k % 2 == 0 else ("olora", "plain"):  # alternate which goes first
            model, tokenizer = fresh_peft(args.model, args.rank)
            olora = olora_with_anchors(args, run_config, model)
            start = time.perf_counter()
            train_adapter(model, tokenizer, examples, cfg, Accelerator(cpu=True), seed=0,
                          penalty=(lambda: olora.penalty(model)) if kind == "olora" else None)
            times[kind] = time.perf_counter() - start
        plain.append(times["plain"])
        olora_times.append(times["olora"])
        out[f"round{k + 1}_ratio_olora_over_plain"] = plain[-1] / olora_times[-1]
    out["ours_seconds"], out["olora_seconds"] = median(plain), median(olora_times)
    out["ratio_olora_over_plain"] = median(p / o for p, o in zip(plain, olora_times))
    steps = -(-len(examples) // cfg.batch_size) * cfg.epochs
    start = time.perf_counter()
    for _ in range(steps * 4):  # the term and its backward alone, as many times as 4 epochs of steps
        olora.penalty(model).backward()
    out["olora_penalty_ms_per_step"] = (time.perf_counter() - start) / (steps * 4) * 1e3
    out["olora_penalty_fraction_of_step"] = out["olora_penalty_ms_per_step"] / 1e3 / (out["ours_seconds"] / steps)
    return out


def inflora_cost(args, task, plain_seconds: float) -> dict[str, float]:
    """InfLoRA's covariance pass over the task (its default 32 batches of 8) on a merged model."""
    from slicelora.loop.config import load_config
    from slicelora.loop.continual import InfLoRA, Stage

    model, tokenizer = fresh_peft(args.model, args.rank)
    merged = model.merge_and_unload()
    inflora = InfLoRA(load_config(None, ["cl.method=inflora", f"adapter.rank={args.rank}"]))
    start = time.perf_counter()
    inflora.after_merge(Stage(1, [task], []), merged, tokenizer)
    seconds = time.perf_counter() - start
    return {"inflora_seconds": seconds, "inflora_fraction_of_training": seconds / plain_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="local model folder (default: embedded SmolLM2-135M)")
    parser.add_argument("--task", default="363")
    parser.add_argument("--examples", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--past-stages", type=int, default=3, help="O-LoRA: past adapters whose A's are anchors")
    parser.add_argument("--rounds", type=int, default=3, help="O-LoRA: alternating plain / O-LoRA rounds")
    parser.add_argument("--skip-inflora", action="store_true", help="leave out InfLoRA's covariance pass")
    parser.add_argument("--json", default=None, help="write the figures here as flat keys")
    args = parser.parse_args()

    task = load_task(args.task)
    examples = task.train[: args.examples]
    cfg = TrainSection(epochs=1, lr=1e-4, batch_size=args.batch_size, grad_accum=1, max_length=args.max_length)
    figures: dict[str, float] = {"examples": len(examples), "batch_size": args.batch_size, "max_length": args.max_length}

    model, tokenizer = fresh_peft(args.model, args.rank)
    encoded = [encode_example(tokenizer, ex, args.max_length, "full") for ex in examples]
    tokens = sum(len(e.input_ids) for e in encoded)
    figures["bf16"] = float(cfg.bf16 and bf16_supported(torch.device("cpu")))

    figures.update(olora_costs(args, examples, cfg))
    if not args.skip_inflora:
        figures.update(inflora_cost(args, task, figures["ours_seconds"]))

    pad = tokenizer.pad_token_id
    training_args = TrainingArguments(
        output_dir="/tmp/slicelora-trainer-bench", per_device_train_batch_size=args.batch_size, num_train_epochs=1,
        learning_rate=1e-4, lr_scheduler_type="linear", warmup_steps=1, max_grad_norm=1.0, use_cpu=True,
        bf16=bool(figures["bf16"]), report_to=[], save_strategy="no", logging_strategy="no",
        dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=encoded,
                      data_collator=lambda rows: collate(rows, pad))
    start = time.perf_counter()
    trainer.train()
    figures["trainer_seconds"] = time.perf_counter() - start

    figures["tokens"] = tokens
    figures["ours_tokens_per_s"] = tokens / figures["ours_seconds"]
    figures["trainer_tokens_per_s"] = tokens / figures["trainer_seconds"]
    figures["ratio_ours_over_trainer"] = figures["ours_tokens_per_s"] / figures["trainer_tokens_per_s"]
    figures["olora_tokens_per_s"] = tokens / figures["olora_seconds"]
    print(f"O-LoRA ({args.past_stages} past stages): {figures['olora_tokens_per_s']:.1f} tok/s, "
          f"x{figures['ratio_olora_over_plain']:.3f} of plain (median of {args.rounds} alternating rounds); its term "
          f"alone: {figures['olora_penalty_ms_per_step']:.2f} ms per step, "
          f"{100 * figures['olora_penalty_fraction_of_step']:.2f}% of a plain step")
    if "inflora_seconds" in figures:
        print(f"InfLoRA covariance pass: {figures['inflora_seconds']:.1f} s "
              f"({figures['inflora_fraction_of_training']:.2f} of the training time)")
    print(f"tokens: {tokens}  ours: {figures['ours_tokens_per_s']:.1f} tok/s  "
          f"Trainer+PEFT: {figures['trainer_tokens_per_s']:.1f} tok/s  ratio ours/Trainer: "
          f"{figures['ratio_ours_over_trainer']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
