"""Evaluation throughput: batched generation against one example at a time, the answer-NLL pass against generation,
and multiple choice with each context run once against one forward per (context, choice).

1. Generation: `slicelora.eval.generate.generate` batched and one prompt at a time on the same held-out prompts of
   shipped Super-NI tasks; the outputs must be identical.
2. Answer NLL, two ways. Separate pass: `slicelora.eval.loss.answer_losses` on the same examples, its time as a
   fraction of the batched generation's and of the generation's prompt pass alone (one new token), which a
   teacher-forced pass over the same prompts cannot undercut. Fused (what the loop runs):
   `slicelora.eval.loss.generate_and_score`, which scores the answers on the generation's KV cache; its cost is
   (fused seconds - plain generation seconds) / plain generation seconds (the goal is at most 25%), the two timed
   alternately `--repeats` times, the fastest of each kept. Its texts must equal the plain generation's; its NLLs
   are compared with `answer_losses`'. Examples whose prompt either bound cuts take the separate pass inside it;
   that pass alone is timed too, to tell the cache route's cost (fused_cached_loss_vs_generation) from theirs.
3. Multiple choice (GP zero-shot and IP few-shot HellaSwag and CommonsenseQA items from the shipped data, built as
   `slicelora.eval.general` builds them): `sequence_logprobs` on every (context, choice) pair against
   `choice_logprobs`; the acc and acc_norm picks must be identical (the goal is a speed-up of at least 3).

    python benchmarks/eval_throughput.py                      # SmolLM2-135M-shaped random model, byte tokenizer
    python benchmarks/eval_throughput.py --model smollm2      # the embedded SmolLM2-135M-Instruct (or a local folder)
    python benchmarks/eval_throughput.py --json out.json      # also write the figures as flat keys
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from slicelora.data.prompts import encode_example, encode_prompt
from slicelora.data.tasks import Example, load_task
from slicelora.eval import general as ev
from slicelora.eval.generate import choice_logprobs, generate, sequence_logprobs
from slicelora.eval.loss import answer_losses, generate_and_score
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


def task_examples(tasks: list[str], n: int) -> list[Example]:
    """`n` held-out examples, taken round-robin from `tasks` so that lengths are mixed."""
    pools = [load_task(t).heldout for t in tasks]
    examples = [pool[i] for i in range(n) for pool in pools if i < len(pool)]
    return examples[:n]


def mc_requests(benchmark: str, n: int, shots: int) -> list[ev.Request]:
    return ev.setting_requests(ev.benchmark_setting(benchmark, shots), n, 42)


def compare_multiple_choice(model, tokenizer, requests: list[ev.Request], batch_size: int, max_length: int) -> dict:
    """Seconds of the pair-by-pair and the context-once routes, their picks and largest log-prob difference."""
    contexts = [r.prompt for r in requests]
    options = [[ev.TARGET_DELIMITER + c for c in r.choices] for r in requests]
    start = time.perf_counter()
    flat = iter(sequence_logprobs(model, tokenizer, [c for c, o in zip(contexts, options) for _ in o],
                                  [x for o in options for x in o], batch_size, max_length=max_length))
    old_s = time.perf_counter() - start
    old = [[next(flat) for _ in o] for o in options]
    start = time.perf_counter()
    new = choice_logprobs(model, tokenizer, contexts, options, batch_size, max_length=max_length)
    new_s = time.perf_counter() - start
    diff = max(abs(a[0] - b[0]) for rows_a, rows_b in zip(old, new) for a, b in zip(rows_a, rows_b))
    truncated = sum(len(tokenizer(c)["input_ids"]) + len(tokenizer(x, add_special_tokens=False)["input_ids"])
                    > max_length for c, o in zip(contexts, options) for x in o)
    return {
        "pairs": sum(len(o) for o in options), "truncated_pairs": truncated, "old_seconds": old_s,
        "new_seconds": new_s, "speedup": old_s / new_s, "max_abs_diff": diff,
        "identical": ev.multiple_choice_picks(requests, old) == ev.multiple_choice_picks(requests, new),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random", help="'random' (default), 'smollm2', or a local model folder")
    parser.add_argument("--tasks", default="363,1290,181,1510", help="comma-separated shipped task references")
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-prompt-length", type=int, default=256)
    parser.add_argument("--mc-items", type=int, default=8, help="multiple-choice items per benchmark and setting")
    parser.add_argument("--shots", type=int, default=5, help="the IP setting of the multiple-choice comparison")
    parser.add_argument("--mc-max-length", type=int, default=1024, help="token bound of a multiple-choice pair")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=2, help="timings of plain and fused generation (fastest kept)")
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load(args.model)
    examples = task_examples(args.tasks.split(","), args.examples)
    prompts = [ex.prompt for ex in examples]
    settings = dict(max_new_tokens=args.max_new_tokens, max_prompt_length=args.max_prompt_length)
    loss_length = args.max_prompt_length + args.max_new_tokens
    # Warm-up: first-call overheads of every route.
    generate(model, tokenizer, prompts[:2], batch_size=2, **settings)
    answer_losses(model, tokenizer, examples[:2], batch_size=2, max_length=loss_length)
    generate_and_score(model, tokenizer, examples[:2], batch_size=2, max_length=loss_length, **settings)
    compare_multiple_choice(model, tokenizer, mc_requests("hellaswag", 1, 0), args.batch_size, args.mc_max_length)

    batched_s = fused_s = float("inf")
    for _ in range(args.repeats):  # alternately, the fastest of each: the machine's other load varies
        start = time.perf_counter()
        batched = generate(model, tokenizer, prompts, batch_size=args.batch_size, desc="batched", **settings)
        batched_s = min(batched_s, time.perf_counter() - start)
        start = time.perf_counter()
        fused, fused_losses = generate_and_score(model, tokenizer, examples, batch_size=args.batch_size,
                                                 max_length=loss_length, desc="fused", **settings)
        fused_s = min(fused_s, time.perf_counter() - start)
    start = time.perf_counter()
    single = [generate(model, tokenizer, [p], batch_size=1, **settings)[0] for p in prompts]
    single_s = time.perf_counter() - start
    start = time.perf_counter()
    generate(model, tokenizer, prompts, batch_size=args.batch_size, max_new_tokens=1,
             max_prompt_length=args.max_prompt_length)
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    losses = answer_losses(model, tokenizer, examples, batch_size=args.batch_size, max_length=loss_length)
    loss_s = time.perf_counter() - start

    mismatches = [i for i, (a, b) in enumerate(zip(batched, single)) if a != b]
    fused_ok = fused == batched and [n for _, n in fused_losses] == [n for _, n in losses]
    separate = [ex for ex in examples if encode_example(tokenizer, ex, loss_length, loss_on="answer").truncated
                or encode_prompt(tokenizer, ex.prompt, args.max_prompt_length)[1]]
    start = time.perf_counter()
    answer_losses(model, tokenizer, separate, batch_size=args.batch_size, max_length=loss_length)
    separate_s = time.perf_counter() - start
    figures = {
        "model": args.model, "examples": len(prompts), "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens, "max_prompt_length": args.max_prompt_length,
        "threads": torch.get_num_threads(), "batched_seconds": batched_s, "single_seconds": single_s,
        "batched_examples_per_s": len(prompts) / batched_s, "single_examples_per_s": len(prompts) / single_s,
        "speedup": single_s / batched_s, "identical": not mismatches, "mismatches": len(mismatches),
        "loss_max_length": loss_length, "loss_answer_tokens": sum(n for _, n in losses), "loss_seconds": loss_s,
        "loss_vs_generation": loss_s / batched_s, "prefill_seconds": prefill_s, "loss_vs_prefill": loss_s / prefill_s,
        "fused_seconds": fused_s, "fused_loss_vs_generation": (fused_s - batched_s) / batched_s,
        "fused_separate_examples": len(separate), "fused_separate_seconds": separate_s,
        "fused_cached_loss_vs_generation": (fused_s - separate_s - batched_s) / batched_s, "fused_identical": fused_ok,
        "fused_max_abs_diff": max(abs(a[0] - b[0]) for a, b in zip(fused_losses, losses)),
        "mc_items": args.mc_items, "mc_shots": args.shots, "mc_max_length": args.mc_max_length,
    }
    old_total = new_total = 0.0
    for benchmark in ("hellaswag", "commonsenseqa"):
        for shots in (0, args.shots):
            requests = mc_requests(benchmark, args.mc_items, shots)
            result = compare_multiple_choice(model, tokenizer, requests, args.batch_size, args.mc_max_length)
            figures.update({f"mc_{benchmark}_{shots}shot_{key}": value for key, value in result.items()})
            old_total += result["old_seconds"]
            new_total += result["new_seconds"]
    figures.update({
        "mc_old_seconds": old_total, "mc_new_seconds": new_total, "mc_speedup": old_total / new_total,
        "mc_identical": all(v for k, v in figures.items() if k.startswith("mc_") and k.endswith("_identical")),
    })
    for key, value in figures.items():
        print(f"{key:36s} {value:.4g}" if isinstance(value, float) else f"{key:36s} {value}")
    for i in mismatches:
        print(f"example {i} differs:\n  batched: {batched[i]!r}\n  single:  {single[i]!r}", file=sys.stderr)
    if args.json:
        write_json(args.json, figures)
    return 1 if mismatches or not fused_ok or not figures["mc_identical"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
