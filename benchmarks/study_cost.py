"""Cost of a study against the same cells run as independent runs: wall time ratio and stages shared.

    python benchmarks/study_cost.py --json runs/bench/study_cost.json                 # a small random Llama
    python benchmarks/study_cost.py --shape smollm2 --json runs/bench/study_cost.json # SmolLM2-135M's shape

The grid: vanilla, lora_ga, slice c = 0.5 and slice c = 1.0, x 2 seeds, x the 3-task `demo` sequence. Both sides run
in this process, one after the other, with the same model folder, settings and thread count: first every cell as an
independent `run` (no sharing), then the same grid as a study (shared stages and gradient passes). The script also
checks that every study cell's files equal the independent run's (timing.json aside) and prints the ratio of wall
times (goal: <= 0.7).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from slicelora.io import write_json
from slicelora.loop.stages import run
from slicelora.models import tiny_llama, tiny_tokenizer
from slicelora.study import parse_study, run_study

SHAPES = {
    "small": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64),
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, rope_theta=100000.0),
}


def grid(model: Path) -> dict:
    return {
        "base": {"model": str(model), "adapter.rank": 8, "init.batches": 4, "init.batch_size": 8,
                 "init.replay_buffer": 32, "train.epochs": 1, "train.batch_size": 8, "train.grad_accum": 1,
                 "train.max_length": 128, "train.max_examples": 48, "eval.examples": 16, "eval.max_new_tokens": 8,
                 "general.enabled": False},
        "variants": {"vanilla": {"init.method": "vanilla"}, "lora_ga": {"init.method": "lora_ga"},
                     "slice-c0.5": {"init.method": "slice", "init.strength": 0.5},
                     "slice-c1": {"init.method": "slice", "init.strength": 1.0}},
        "sequences": {"demo": "demo"},
        "seeds": [1, 2],
        "reference": "lora_ga",
    }


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "timing.json"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer = tiny_tokenizer()
        tiny_llama(tokenizer, seed=0, **SHAPES[args.shape]).save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        study = parse_study(grid(tmp / "model"))

        start = time.perf_counter()
        for cell in study.cells():
            run(study.config(cell), tmp / "alone" / cell.dir)
        alone = time.perf_counter() - start

        start = time.perf_counter()
        run_study(study, tmp / "study")
        shared = time.perf_counter() - start

        same = all(files(tmp / "study" / c.dir) == files(tmp / "alone" / c.dir) for c in study.cells())
        stages = [json_of(tmp / "study" / c.dir / "stages") for c in study.cells()]
        total = sum(len(s) for s in stages)
        copied = sum(sum(t["shared"] for t in s) for s in stages)
        grads = sum(sum(len(t.get("gradient_sets_from_cache", [])) for t in s) for s in stages)
        shutil.rmtree(tmp / "study", ignore_errors=True)
    figures = {"shape": args.shape, "threads": args.threads, "cells": len(study.cells()), "stages": total,
               "stages_shared": copied, "gradient_sets_from_cache": grads, "independent_s": alone,
               "study_s": shared, "study_over_independent": shared / alone, "files_identical": same}
    for key, value in figures.items():
        print(f"{key:26s} {value:.3f}" if isinstance(value, float) else f"{key:26s} {value}")
    print(f"study / independent runs: x{shared / alone:.2f} (goal <= 0.70); {copied} of {total} stages shared; "
          f"files identical: {same}")
    if args.json:
        write_json(args.json, figures)
    return 0 if same else 1


def json_of(stages: Path) -> list[dict]:
    """Every stage's timing.json of a run folder's stages/ folder."""
    return [json.loads((d / "timing.json").read_text()) for d in sorted(stages.iterdir()) if (d / "timing.json").is_file()]


if __name__ == "__main__":
    sys.exit(main())
