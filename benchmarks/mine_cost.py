"""Cost of mining adversarial sequences (docs/method.md).

1. The exhaustive search for the `size` most opposed of `tasks` tasks (paper: 5 of 46, 1,370,754 subsets) from a
   random symmetric cosine matrix with a fixed seed. Goal: under 10 s on 2 cores. Beam and greedy are timed too.
2. A task signature's gradient pass (4 batches of 4, length 256) with the CountSketch transform, against the same
   pass without it, on a random Llama model of SmolLM2-135M's width ("small": 4 layers; "smollm2": all 30 layers).

    python benchmarks/mine_cost.py --json mine_cost.json [--threads 1] [--model small|smollm2] [--device cuda]

Figures and ratios go to --json as flat keys; the ratios are printed.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable
from math import comb
from pathlib import Path

import numpy as np
import torch

from slicelora.data.prompts import make_batches
from slicelora.data.tasks import Example
from slicelora.io import write_json
from slicelora.init.gradients import accumulate_gradients, target_layers
from slicelora.mining import CountSketch, rank_subsets
from slicelora.models import tiny_llama, tiny_tokenizer

SEARCH_GOAL_SECONDS = 10.0
SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3)
LAYERS = {"small": 4, "smollm2": 30}


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Best wall time of `repeats` calls, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, result


def random_cosines(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cos = rng.uniform(-1, 1, (n, n))
    cos = (cos + cos.T) / 2
    np.fill_diagonal(cos, 1.0)
    return cos


def search_figures(n: int, size: int, top: int, seed: int, repeats: int) -> dict[str, float]:
    cos = random_cosines(n, seed)
    seconds, lowest = timed(lambda: rank_subsets(cos, size, top), repeats)
    beam_seconds, beam = timed(lambda: rank_subsets(cos, size, top, method="beam"), repeats)
    greedy_seconds, greedy = timed(lambda: rank_subsets(cos, size, top, method="greedy"), repeats)
    return {
        "search_tasks": n,
        "search_size": size,
        "search_subsets": comb(n, size),
        "search_exhaustive_seconds": seconds,
        "search_goal_seconds": SEARCH_GOAL_SECONDS,
        "search_ratio_to_goal": seconds / SEARCH_GOAL_SECONDS,
        "search_best_mean_cosine": lowest[0][1],
        "search_beam_seconds": beam_seconds,
        "search_beam_top_found": sum(s in [t for t, _ in lowest] for s, _ in beam) / top,
        "search_greedy_seconds": greedy_seconds,
        "search_greedy_top_found": sum(s in [t for t, _ in lowest] for s, _ in greedy) / top,
    }


def synthetic_examples(n: int, chars: int, seed: int) -> list[Example]:
    """Examples of about `chars` bytes (the tiny tokenizer is byte-level, so about as many tokens)."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    out = []
    for i in range(n):
        text = " ".join(rng.choice(words) for _ in range(chars // 6))
        out.append(Example(f"Summarise.\n\nInput: {text}", f"answer {i % 3}", (f"answer {i % 3}",)))
    return out


def signature_figures(model_kind: str, device: str, batches: int, batch_size: int, max_length: int, k: int,
                      repeats: int) -> dict[str, float]:
    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer, num_hidden_layers=LAYERS[model_kind], **SMOLLM2_SHAPE).to(device)
    data = make_batches(synthetic_examples(batches * batch_size, max_length, 0), tokenizer, batch_size, max_length,
                        seed=42, num_batches=batches)
    sketch = CountSketch(k, seed=0)
    accumulate_gradients(model, data[:1])  # warm-up: first-call allocations and kernels
    plain_seconds, grads = timed(lambda: accumulate_gradients(model, data), repeats)
    sketch_seconds, _ = timed(lambda: accumulate_gradients(model, data, transform=sketch.sketch_layer), repeats)
    sketch_only_seconds, _ = timed(lambda: sketch.sketch_layers(grads), repeats)
    params = sum(layer.weight.numel() for layer in target_layers(model).values())
    return {
        "model": model_kind,
        "device": device,
        "threads": torch.get_num_threads(),
        "target_params": params,
        "batches": batches,
        "batch_size": batch_size,
        "max_length": max_length,
        "tokens_per_batch": int(data[0]["attention_mask"].sum()),
        "k": k,
        "plain_pass_seconds": plain_seconds,
        "sketch_pass_seconds": sketch_seconds,
        "one_batch_seconds": plain_seconds / batches,
        "sketch_all_layers_once_seconds": sketch_only_seconds,
        "sketch_coords_per_second": params / sketch_only_seconds,
        "signature_to_plain_pass_ratio": sketch_seconds / plain_seconds,
        "signature_to_one_batch_ratio": sketch_seconds / (plain_seconds / batches),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the figures here as one flat JSON object")
    parser.add_argument("--tasks", type=int, default=46)
    parser.add_argument("--size", type=int, default=5)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", choices=sorted(LAYERS), default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--k", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    figures = search_figures(args.tasks, args.size, args.top, args.seed, args.repeats)
    figures |= signature_figures(args.model, args.device, args.batches, args.batch_size, args.max_length, args.k,
                                 args.repeats)
    print(f"exhaustive search, {args.size} of {args.tasks} ({figures['search_subsets']:,} subsets): "
          f"{figures['search_exhaustive_seconds']:.2f} s, ratio to the {SEARCH_GOAL_SECONDS:.0f} s goal "
          f"{figures['search_ratio_to_goal']:.3f}; beam {figures['search_beam_seconds']:.2f} s "
          f"(found {figures['search_beam_top_found']:.0%} of the top {args.top}), greedy "
          f"{figures['search_greedy_seconds'] * 1000:.1f} ms (found {figures['search_greedy_top_found']:.0%})")
    print(f"signature ({args.model}, {figures['target_params']:,} target weights, {args.device}, "
          f"{figures['threads']} threads, k={args.k}): plain pass {figures['plain_pass_seconds']:.2f} s, "
          f"sketched pass {figures['sketch_pass_seconds']:.2f} s; ratio to the plain pass "
          f"{figures['signature_to_plain_pass_ratio']:.2f}, to one batch's pass "
          f"{figures['signature_to_one_batch_ratio']:.2f}; sketch alone "
          f"{figures['sketch_coords_per_second'] / 1e6:.0f} M coordinates/s")
    if args.json:
        write_json(args.json, figures)


if __name__ == "__main__":
    main()
