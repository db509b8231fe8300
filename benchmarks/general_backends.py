"""The two general-ability backends on a real model: do they agree, and what does each cost?

1. Tokenisation at the answer boundary, over every (context, choice) pair of HellaSwag and CommonsenseQA: our
   separate encoding of context and " " + choice (`slicelora.eval.generate`) against lm_eval's (HFLM's
   `_encode_pair`, which encodes the two in one piece and splits after the context's tokens).
2. Scores and seconds of `general.backend` native and lm_eval on the same settings: HellaSwag and CommonsenseQA
   zero-shot and 5-shot (`--mc-items` items), Alpaca and BBH object counting zero-shot (`--gen-items` items).

    python benchmarks/general_backends.py                     # the embedded SmolLM2-135M-Instruct, float32
    python benchmarks/general_backends.py --json out.json     # also write the figures

Needs the lm_eval extra (pip install "slicelora[lm_eval]").
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from lm_eval.models.huggingface import HFLM

from slicelora.eval import general as ev
from slicelora.eval.generate import _score_ids
from slicelora.eval.lm_eval_backend import run_setting
from slicelora.models import DEFAULT_MODEL, load_model


def boundary_agreement(model, tokenizer) -> dict[str, str]:
    """Per multiple-choice benchmark: "equal/total" (context, choice) pairs whose token ids are the same both ways."""
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", max_length=10**6)
    out = {}
    for name in ("hellaswag", "commonsenseqa"):
        pairs = [(d.text, ev.TARGET_DELIMITER + c) for d in ev.benchmark_setting(name, 0).docs for c in d.choices]
        equal = 0
        for context, choice in pairs:
            ids, n = _score_ids(tokenizer, context, choice, 10**6)
            theirs, continuation = lm._encode_pair(context, choice)
            equal += theirs + continuation == ids and len(continuation) == n
        out[name] = f"{equal}/{len(pairs)}"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--mc-items", type=int, default=20)
    parser.add_argument("--gen-items", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_model(args.model)
    figures: dict = {"boundary_tokens_equal": boundary_agreement(model, tokenizer)}
    print(figures, flush=True)
    runs = [("hellaswag", 0), ("hellaswag", 5), ("commonsenseqa", 0), ("commonsenseqa", 5), ("alpaca", 0),
            ("bbh_object_counting", 0)]
    for name, shots in runs:
        setting = ev.benchmark_setting(name, shots)
        common = dict(limit=args.gen_items if setting.max_new_tokens else args.mc_items, seed=42,
                      batch_size=args.batch_size, max_length=1024)
        start = time.perf_counter()
        native = ev._native_scores(model, tokenizer, setting, desc=None, **common)
        middle = time.perf_counter()
        harness, _ = run_setting(model, tokenizer, setting, **common)
        end = time.perf_counter()
        figures[f"{name}_{shots}shot"] = {"items": common["limit"], "native": native, "lm_eval": harness,
                                          "native_s": round(middle - start, 1), "lm_eval_s": round(end - middle, 1)}
        print(name, shots, figures[f"{name}_{shots}shot"], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
