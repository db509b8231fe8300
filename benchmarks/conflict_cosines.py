"""Gradient cosines of constructed conflicts: a task against its label-transformed copy, before and after learning it.

    OMP_NUM_THREADS=1 python benchmarks/conflict_cosines.py --json runs/bench/conflict_cosines.json

For each task (default 363 and 1687) and --transform (default swap_labels), on the embedded SmolLM2-135M-Instruct
(or --model) in float32 on the CPU:

  * original   the task as shipped;
  * new        the transformed task, whose instruction states the new mapping (what a sequence may hold);
  * same       the transform with keep_instruction: the same prompts with the other answers (a contradiction,
               measured for comparison only).

The global cosine over every target weight's mean gradient (the inner product summed over layers) between the
original and each variant, with the loss on the answer tokens and on the full text, on --grad-batches batches of
--batch-size examples of at most --max-length tokens; each variant uses the same inputs (the same seeded shuffle of
the train split). It is measured (i) on the base model and (ii) after a LoRA (rank --rank, alpha 2, rsLoRA) trained
on --train-examples other examples of the original (lr --lr, --epochs epochs, batches of --batch-size, loss on
--train-loss-on: the full text by default) and merged. The mean answer-token loss of each task on the gradient
batches shows whether the original was learned. `--json PATH` writes every figure as flat keys,
"<task>.<base|trained>.<answer|full>.<new|same>" for cosines and "<task>.<base|trained>.loss.<original|new|same>" for
losses.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time

import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model

from slicelora.data.prompts import make_batches
from slicelora.data.tasks import Example, Task, load_task
from slicelora.data.transforms import keep_instruction, transform_task
from slicelora.init import accumulate_gradients
from slicelora.loop.config import TrainSection
from slicelora.loop.train import train_adapter
from slicelora.models import LLAMA_TARGETS, load_model

VARIANTS = ("new", "same")
LOSSES = ("answer", "full")


def global_cosine(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Cosine of the two gradient sets as one vector over every layer."""
    dot = sum(float((a[k].double() * b[k].double()).sum()) for k in a)
    norm_a = math.sqrt(sum(float(a[k].double().square().sum()) for k in a))
    norm_b = math.sqrt(sum(float(b[k].double().square().sum()) for k in b))
    return dot / (norm_a * norm_b)


def answer_loss(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """Mean over batches of the answer-token loss."""
    with torch.no_grad():
        return sum(float(model(**b).loss) for b in batches) / len(batches)


def measure(model: torch.nn.Module, tokenizer, tasks: dict[str, list[Example]], args: argparse.Namespace,
            prefix: str, figures: dict[str, float]) -> None:
    """Cosines original-vs-variant for each loss, and answer losses, into `figures` under `prefix`."""
    for loss_on in LOSSES:
        batches = {name: make_batches(examples, tokenizer, args.batch_size, args.max_length, loss_on,
                                      seed=None) for name, examples in tasks.items()}
        if loss_on == "answer":
            for name, task_batches in batches.items():
                figures[f"{prefix}.loss.{name}"] = answer_loss(model, task_batches)
                print(f"  {prefix}.loss.{name} = {figures[f'{prefix}.loss.{name}']:.3f}", flush=True)
        original = accumulate_gradients(model, batches["original"])
        for variant in VARIANTS:
            name = f"{prefix}.{loss_on}.{variant}"
            figures[name] = global_cosine(original, accumulate_gradients(model, batches[variant]))
            print(f"  {name} = {figures[name]:+.3f}", flush=True)


def run_task(ref: str, args: argparse.Namespace, figures: dict[str, float]) -> str:
    """Measure one task and its variants into `figures`; return the transformed task's name (the figures' prefix)."""
    task = load_task(ref)
    variants: dict[str, Task] = {
        "original": task,
        "new": transform_task(task, args.transform),
        "same": transform_task(task, keep_instruction(args.transform), allow_same_instruction=True),
    }
    order = list(range(len(task.train)))
    random.Random(args.seed).shuffle(order)
    n_grad = args.grad_batches * args.batch_size
    if len(order) < n_grad + args.train_examples:
        raise SystemExit(f"{task.name} has {len(order)} train examples; {n_grad + args.train_examples} are needed.")
    grad_idx, train_idx = order[:n_grad], order[n_grad:n_grad + args.train_examples]
    tasks = {name: [t.train[i] for i in grad_idx] for name, t in variants.items()}
    key = variants["new"].name
    figures[f"{key}.grad_examples"] = n_grad
    print(f"{key}: {n_grad} gradient examples", flush=True)

    model, tokenizer = load_model(args.model)
    measure(model, tokenizer, tasks, args, f"{key}.base", figures)
    config = LoraConfig(r=args.rank, lora_alpha=2.0, use_rslora=True, target_modules=list(LLAMA_TARGETS),
                        lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    cfg = TrainSection(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, grad_accum=1,
                       max_length=args.max_length, loss_on=args.train_loss_on, bf16=False)
    start = time.perf_counter()
    stats = train_adapter(peft_model, tokenizer, [task.train[i] for i in train_idx], cfg, Accelerator(cpu=True),
                          seed=args.seed)
    figures[f"{key}.train_seconds"] = time.perf_counter() - start
    figures[f"{key}.train_first_loss"], figures[f"{key}.train_last_loss"] = stats["losses"][0], stats["losses"][-1]
    merged = peft_model.merge_and_unload()
    measure(merged, tokenizer, tasks, args, f"{key}.trained", figures)
    return key


def table(figures: dict[str, float], keys: list[str]) -> str:
    header = f"{'pair':58} {'model':8} {'loss':7} {'new':>7} {'same':>7}   answer-loss orig / new / same"
    lines = [header, "-" * len(header)]
    for key in keys:
        for stage in ("base", "trained"):
            losses = " / ".join(f"{figures[f'{key}.{stage}.loss.{n}']:.3f}" for n in ("original", *VARIANTS))
            for loss_on in LOSSES:
                cos = " ".join(f"{figures[f'{key}.{stage}.{loss_on}.{v}']:+7.3f}" for v in VARIANTS)
                lines.append(f"{key:58} {stage:8} {loss_on:7} {cos}   {losses if loss_on == 'answer' else ''}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tasks", nargs="*", default=["363", "1687"], help="task references (default: 363 1687)")
    parser.add_argument("--transform", default="swap_labels", help="e.g. swap_labels or 'relabel(POS=NEG;NEG=POS)'")
    parser.add_argument("--model", default=None, help="local model folder (default: embedded SmolLM2-135M)")
    parser.add_argument("--grad-batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--train-examples", type=int, default=96)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-loss-on", choices=LOSSES, default="full", help="the LoRA's training loss")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", default=None, help="write the figures here as flat keys")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    figures: dict[str, float] = {}
    keys = [run_task(ref, args, figures) for ref in args.tasks]
    print(table(figures, keys))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
