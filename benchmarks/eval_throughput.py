"""Throughput of batched greedy generation (`slicelora.eval.generate.generate`) against one example at a time.

Both runs decode the same held-out prompts of shipped Super-NI tasks with the same model; the script checks that
the outputs are identical and prints examples/s of each and the speed ratio.

    python benchmarks/eval_throughput.py                      # SmolLM2-135M-shaped random model, byte tokenizer
    python benchmarks/eval_throughput.py --model smollm2      # the embedded SmolLM2-135M-Instruct (or a local folder)
    python benchmarks/eval_throughput.py --json out.json      # also write the figures as flat keys
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from slicelora.data.tasks import load_task
from slicelora.eval.generate import generate
from slicelora.io import write_json
from slicelora.models import load_model, tiny_llama, tiny_tokenizer

# SmolLM2-135M's shape (its config.json) except the vocabulary, which is the byte-level test tokenizer's.
SMOLLM2_SHAPE = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    head_dim=64, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
)


def load(name: str | None):
    if name == "random":
        tokenizer = tiny_tokenizer()
        return tiny_llama(tokenizer, seed=0, **SMOLLM2_SHAPE), tokenizer
    return load_model(name)


def task_prompts(tasks: list[str], n: int) -> list[str]:
    """`n` held-out prompts, taken round-robin from `tasks` so that lengths are mixed."""
    pools = [[ex.prompt for ex in load_task(t).heldout] for t in tasks]
    prompts = [pool[i] for i in range(n) for pool in pools if i < len(pool)]
    return prompts[:n]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random", help="'random' (default), 'smollm2', or a local model folder")
    parser.add_argument("--tasks", default="363,1290,181,1510", help="comma-separated shipped task references")
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-prompt-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load(args.model)
    prompts = task_prompts(args.tasks.split(","), args.examples)
    settings = dict(max_new_tokens=args.max_new_tokens, max_prompt_length=args.max_prompt_length)
    generate(model, tokenizer, prompts[:2], batch_size=2, **settings)  # warm-up: first-call overheads

    start = time.perf_counter()
    batched = generate(model, tokenizer, prompts, batch_size=args.batch_size, desc="batched", **settings)
    batched_s = time.perf_counter() - start
    start = time.perf_counter()
    single = [generate(model, tokenizer, [p], batch_size=1, **settings)[0] for p in prompts]
    single_s = time.perf_counter() - start

    mismatches = [i for i, (a, b) in enumerate(zip(batched, single)) if a != b]
    figures = {
        "model": args.model, "examples": len(prompts), "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens, "max_prompt_length": args.max_prompt_length,
        "threads": torch.get_num_threads(), "batched_seconds": batched_s, "single_seconds": single_s,
        "batched_examples_per_s": len(prompts) / batched_s, "single_examples_per_s": len(prompts) / single_s,
        "speedup": single_s / batched_s, "identical": not mismatches, "mismatches": len(mismatches),
    }
    for key, value in figures.items():
        print(f"{key:24s} {value:.3f}" if isinstance(value, float) else f"{key:24s} {value}")
    for i in mismatches:
        print(f"example {i} differs:\n  batched: {batched[i]!r}\n  single:  {single[i]!r}", file=sys.stderr)
    if args.json:
        write_json(args.json, figures)
    return 1 if mismatches else 0


if __name__ == "__main__":
    raise SystemExit(main())
