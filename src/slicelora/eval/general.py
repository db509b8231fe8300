"""General performance (GP, zero-shot) and in-context performance (IP, few-shot) of a model (docs/method.md, Metrics).

Benchmarks and scores, each in 0..100:
- HellaSwag: log-likelihood of each " " + ending after the context, raw text (no chat template), as lm-eval-harness
  does: `acc` picks the highest sum, `acc_norm` the highest sum divided by the ending's length in characters.
- CommonsenseQA: lm-eval-harness's `commonsense_qa` layout: "Question: ...\nA. ...\n...\nE. ...\nAnswer:", scored by
  the log-likelihood of the five LETTERS " A" .. " E" (not of the answer texts); `acc`.
- BBH object counting: greedy generation in the chat template. Zero-shot: the question and a request for a single
  number; the first integer of the answer is compared with the target. Few-shot: the official 3-shot
  chain-of-thought prompt, "Q: ...\nA: Let's think step by step.", up to 128 new tokens; the number after the last
  "So the answer is" (else the last integer) is compared. Exact match.
- Alpaca: greedy generation (at most 64 new tokens) in the chat template, ROUGE-L F1 against the reference output.

Each benchmark scores a seeded fixed subset of `limit` items. Few-shot examples come from a separate seeded pool of
POOL_SIZE items that are never scored (BBH's shots are the fixed CoT prompt), so the scored items of GP and IP are
the same, and a smaller limit scores a prefix of a larger one's items.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..data import general as data
from ..errors import ConfigError
from .generate import choice_logprobs, generate
from .scoring import score

BENCHMARKS = ("hellaswag", "commonsenseqa", "bbh_object_counting", "alpaca")
POOL_SIZE = 25           # items per benchmark reserved for few-shot examples
SHOT_SEPARATOR = "\n\n"
TARGET_DELIMITER = " "   # between a multiple-choice context and its answer, as lm-eval-harness


@dataclass(frozen=True)
class Request:
    """One scored item as the model sees it: the prompt (a log-likelihood context or a generation prompt), the
    gold (choice index, integer or reference text), the answer choices (multiple choice only; each is scored as
    TARGET_DELIMITER + choice), and the dataset indices of the item and of its few-shot examples."""

    prompt: str
    gold: int | str
    choices: tuple[str, ...] = ()
    item: int = -1
    shots: tuple[int, ...] = ()


@dataclass(frozen=True)
class GeneralConfig:
    """Settings of `general_scores`: `shots` is the IP setting (GP is always zero-shot)."""

    limit: int = 200
    shots: int = 5
    seed: int = 42
    batch_size: int = 16
    max_length: int = 1024
    benchmarks: tuple[str, ...] = BENCHMARKS


def split_items(n: int, limit: int, seed: int, pool_size: int) -> tuple[list[int], list[int]]:
    """(scored, pool): a seeded permutation of range(n); its first `pool_size` indices are the few-shot pool, the
    next `limit` are scored."""
    if limit < 1:
        raise ConfigError(f"general evaluation: limit={limit} must be at least 1.")
    if n <= pool_size:
        raise ConfigError(f"general evaluation: {n} items cannot hold a few-shot pool of {pool_size}.")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order[pool_size:pool_size + limit], order[:pool_size]


def _with_shots(
    items: Sequence, limit: int, shots: int, seed: int, pool_size: int, build: Callable[[Any, list], Request]
) -> list[Request]:
    """Requests for the scored items; each draws its own `shots` examples from the pool (one seeded stream)."""
    scored, pool = split_items(len(items), limit, seed, pool_size)
    if shots > len(pool):
        raise ConfigError(f"general evaluation: shots={shots} exceeds the few-shot pool of {len(pool)} items.")
    rng = random.Random(seed + 1)
    requests = []
    for i in scored:
        chosen = rng.sample(pool, shots) if shots else []
        requests.append(replace(build(items[i], [items[j] for j in chosen]), item=i, shots=tuple(chosen)))
    return requests


def hellaswag_requests(items: Sequence[data.HellaSwagItem], limit: int, shots: int, seed: int) -> list[Request]:
    """Context = the shots' "context ending" blocks, then the item's context; choices = its endings."""
    def build(item: data.HellaSwagItem, examples: list[data.HellaSwagItem]) -> Request:
        demos = [ex.context + TARGET_DELIMITER + ex.endings[ex.label] for ex in examples]
        return Request(SHOT_SEPARATOR.join([*demos, item.context]), item.label, item.endings)

    return _with_shots(items, limit, shots, seed, POOL_SIZE, build)


def _csqa_question(item: data.MultipleChoiceItem) -> str:
    options = "\n".join(f"{label}. {text}" for label, text in zip(item.labels, item.texts))
    return f"Question: {item.question}\n{options}\nAnswer:"


def commonsenseqa_requests(
    items: Sequence[data.MultipleChoiceItem], limit: int, shots: int, seed: int
) -> list[Request]:
    """Context = the shots' answered questions, then "Question: ...\nA. ...\nAnswer:"; choices = the letters."""
    def build(item: data.MultipleChoiceItem, examples: list[data.MultipleChoiceItem]) -> Request:
        demos = [_csqa_question(ex) + TARGET_DELIMITER + ex.labels[ex.answer] for ex in examples]
        return Request(SHOT_SEPARATOR.join([*demos, _csqa_question(item)]), item.answer, item.labels)

    return _with_shots(items, limit, shots, seed, POOL_SIZE, build)


def bbh_requests(items: Sequence[data.CountingItem], limit: int, cot_prompt: str | None, seed: int) -> list[Request]:
    """Zero-shot when `cot_prompt` is None, else the CoT prompt followed by the question."""
    def build(item: data.CountingItem, _: list) -> Request:
        if cot_prompt is None:
            return Request(f"{item.input}\nAnswer with a single number.", item.target)
        return Request(f"{cot_prompt}{SHOT_SEPARATOR}Q: {item.input}\nA: Let's think step by step.", item.target)

    return _with_shots(items, limit, 0, seed, 0, build)


def _alpaca_task(item: data.InstructionItem) -> str:
    return f"{item.instruction}\n\n{item.input}" if item.input else item.instruction


def _alpaca_block(item: data.InstructionItem) -> str:
    text = f"Instruction: {item.instruction}"
    return f"{text}\nInput: {item.input}" if item.input else text


def alpaca_requests(items: Sequence[data.InstructionItem], limit: int, shots: int, seed: int) -> list[Request]:
    """Zero-shot: the instruction (and input) as the user message. Few-shot: "Instruction: / Input: / Response:"
    blocks, the last one without its response."""
    def build(item: data.InstructionItem, examples: list[data.InstructionItem]) -> Request:
        if not examples:
            return Request(_alpaca_task(item), item.output)
        demos = [f"{_alpaca_block(ex)}\nResponse: {ex.output}" for ex in examples]
        return Request(SHOT_SEPARATOR.join([*demos, f"{_alpaca_block(item)}\nResponse:"]), item.output)

    return _with_shots(items, limit, shots, seed, POOL_SIZE, build)


_INTEGER = re.compile(r"-?\d[\d,]*")
_SO_THE_ANSWER = re.compile(r"So the answer is\s*\$?\s*(-?\d[\d,]*)", re.IGNORECASE)


def extract_count(text: str, *, chain_of_thought: bool) -> int | None:
    """The predicted number: with chain of thought the one after the last "So the answer is" (else the last
    integer), otherwise the first integer. None when there is no integer (digits only, no number words)."""
    if chain_of_thought:
        found = _SO_THE_ANSWER.findall(text) or _INTEGER.findall(text)
        number = found[-1] if found else None
    else:
        match = _INTEGER.search(text)
        number = match.group(0) if match else None
    return int(number.replace(",", "")) if number else None


def _mean(values: Sequence[float]) -> float:
    return 100.0 * sum(values) / len(values)


def multiple_choice_picks(
    requests: Sequence[Request], scores: Sequence[Sequence[tuple[float, int, int]]]
) -> list[tuple[int, int]]:
    """Per request, from its choices' (sum log-prob, tokens, characters): (index of the best sum log-prob, index of
    the best log-prob per character of the choice, the delimiter not counted, as lm-eval-harness's acc_norm)."""
    picks = []
    for r, rows in zip(requests, scores):
        raw = max(range(len(rows)), key=lambda j: rows[j][0])
        norm = max(range(len(rows)), key=lambda j: rows[j][0] / max(1, len(r.choices[j])))
        picks.append((raw, norm))
    return picks


def _multiple_choice(model, tokenizer, requests: list[Request], batch_size: int, max_length: int, desc: str):
    """`multiple_choice_picks` of the requests, each context run once for all of its choices."""
    scores = choice_logprobs(model, tokenizer, [r.prompt for r in requests],
                             [[TARGET_DELIMITER + c for c in r.choices] for r in requests], batch_size,
                             max_length=max_length, desc=desc)
    return multiple_choice_picks(requests, scores)


def evaluate_general(
    model,
    tokenizer,
    *,
    limit: int,
    shots: int | None,
    seed: int = 42,
    batch_size: int = 16,
    benchmarks: Sequence[str] = BENCHMARKS,
    max_length: int = 1024,
    data_dir: str | Path | None = None,
) -> dict[str, float]:
    """Scores (0..100) on the general benchmarks: GP with `shots` None or 0, IP with `shots` = k > 0 (k-shot;
    BBH then uses its fixed 3-shot CoT prompt). Keys: hellaswag_acc_norm, hellaswag_acc, commonsenseqa_acc,
    bbh_object_counting_em, alpaca_rouge_l (those of the chosen `benchmarks`). `max_length` bounds every prompt
    in tokens (cut from the left)."""
    unknown = [b for b in benchmarks if b not in BENCHMARKS]
    if unknown:
        raise ConfigError(f"general evaluation: unknown benchmarks {unknown}; choose from {list(BENCHMARKS)}.")
    shots = shots or 0
    if shots < 0:
        raise ConfigError(f"general evaluation: shots={shots} must be None or at least 0.")
    mode = f"IP {shots}-shot" if shots else "GP"
    out: dict[str, float] = {}
    if "hellaswag" in benchmarks:
        reqs = hellaswag_requests(data.load_hellaswag(data_dir), limit, shots, seed)
        picks = _multiple_choice(model, tokenizer, reqs, batch_size, max_length, f"{mode} hellaswag")
        out["hellaswag_acc_norm"] = _mean([norm == r.gold for r, (_, norm) in zip(reqs, picks)])
        out["hellaswag_acc"] = _mean([raw == r.gold for r, (raw, _) in zip(reqs, picks)])
    if "commonsenseqa" in benchmarks:
        reqs = commonsenseqa_requests(data.load_commonsenseqa(data_dir), limit, shots, seed)
        picks = _multiple_choice(model, tokenizer, reqs, batch_size, max_length, f"{mode} commonsenseqa")
        out["commonsenseqa_acc"] = _mean([raw == r.gold for r, (raw, _) in zip(reqs, picks)])
    if "bbh_object_counting" in benchmarks:
        cot = data.load_bbh_cot_prompt(data_dir) if shots else None
        reqs = bbh_requests(data.load_bbh_object_counting(data_dir), limit, cot, seed)
        texts = generate(model, tokenizer, [r.prompt for r in reqs], max_new_tokens=128 if cot else 32,
                         batch_size=batch_size, max_prompt_length=max_length, desc=f"{mode} bbh_object_counting")
        out["bbh_object_counting_em"] = _mean(
            [extract_count(t, chain_of_thought=cot is not None) == r.gold for r, t in zip(reqs, texts)]
        )
    if "alpaca" in benchmarks:
        reqs = alpaca_requests(data.load_alpaca(data_dir), limit, shots, seed)
        texts = generate(model, tokenizer, [r.prompt for r in reqs], max_new_tokens=64, batch_size=batch_size,
                         max_prompt_length=max_length, desc=f"{mode} alpaca")
        out["alpaca_rouge_l"] = sum(score("rouge_l", t, [r.gold]) for r, t in zip(reqs, texts)) / len(reqs)
    return out


def general_scores(model, tokenizer, cfg: GeneralConfig = GeneralConfig()) -> dict[str, dict[str, float]]:
    """{"GP": zero-shot scores, "IP": `cfg.shots`-shot scores} on the same scored items."""
    common = dict(limit=cfg.limit, seed=cfg.seed, batch_size=cfg.batch_size, benchmarks=cfg.benchmarks,
                  max_length=cfg.max_length)
    return {
        "GP": evaluate_general(model, tokenizer, shots=None, **common),
        "IP": evaluate_general(model, tokenizer, shots=cfg.shots, **common),
    }
