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

Two backends run the same items, prompts and scorers: "native" (this module: `choice_logprobs` and `generate`) and
"lm_eval" (`lm_eval_backend`: lm-evaluation-harness, an optional extra). Each item is a `Doc` (its text, answer,
gold and choices) and each benchmark a `Setting`; both backends build their prompts from these.
"""

from __future__ import annotations

import importlib.util
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..data import general as data
from ..errors import ConfigError
from .generate import choice_logprobs, generate
from .scoring import score

BENCHMARKS = ("hellaswag", "commonsenseqa", "bbh_object_counting", "alpaca")
METRICS = {"hellaswag": ("acc_norm", "acc"), "commonsenseqa": ("acc",), "bbh_object_counting": ("em",),
           "alpaca": ("rouge_l",)}  # each score's key is "{benchmark}_{metric}"
BACKENDS = ("native", "lm_eval")
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
class Doc:
    """One item as both backends lay it out: `text` is its prompt without few-shot examples; as a few-shot example
    it reads `text` + TARGET_DELIMITER + `answer`; `gold` is what it is scored against (choice index, integer or
    reference text) and `choices` its answer choices (multiple choice only)."""

    text: str
    answer: str
    gold: int | str
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class Setting:
    """A benchmark in the GP or IP setting, as both backends run it: the docs of every item, how many of them (the
    first of a seeded permutation, see `split_items`) form the few-shot pool, the few-shot examples per scored item,
    and the new tokens of a generation benchmark (0: multiple choice)."""

    name: str
    docs: list[Doc]
    pool_size: int
    shots: int
    max_new_tokens: int = 0
    chain_of_thought: bool = False


@dataclass(frozen=True)
class GeneralConfig:
    """Settings of `general_scores`: `shots` is the IP setting (GP is always zero-shot); `backend` runs the
    benchmarks here ("native") or through lm-evaluation-harness ("lm_eval", the `slicelora[lm_eval]` extra)."""

    limit: int = 200
    shots: int = 5
    seed: int = 42
    batch_size: int = 16
    max_length: int = 1024
    benchmarks: tuple[str, ...] = BENCHMARKS
    backend: str = "native"


def check_backend(backend: str) -> None:
    """Refuse an unknown backend, and the lm_eval backend when lm-evaluation-harness is not installed."""
    if backend not in BACKENDS:
        raise ConfigError(f"general evaluation: backend={backend!r} is unknown; choose one of {', '.join(BACKENDS)}.")
    if backend == "lm_eval" and importlib.util.find_spec("lm_eval") is None:
        raise ConfigError('general.backend=lm_eval needs lm-evaluation-harness: pip install "slicelora[lm_eval]" '
                          "(or set general.backend=native).")


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


def scored_and_pool(setting: Setting, limit: int, seed: int) -> tuple[list[int], list[int]]:
    """`split_items` of the setting's docs, checked to hold its few-shot examples."""
    scored, pool = split_items(len(setting.docs), limit, seed, setting.pool_size)
    if setting.shots > len(pool):
        raise ConfigError(f"general evaluation: shots={setting.shots} exceeds the few-shot pool of {len(pool)} items.")
    return scored, pool


def setting_requests(setting: Setting, limit: int, seed: int) -> list[Request]:
    """Requests for the scored items: `shots` few-shot examples (each "text answer"), then the item's text, joined
    by SHOT_SEPARATOR. Each item draws its examples from the pool in turn, from one stream seeded with seed + 1:
    lm-evaluation-harness's sampler, given the pool's docs in pool order and that seed, draws the same ones."""
    docs = setting.docs
    scored, pool = scored_and_pool(setting, limit, seed)
    rng = random.Random(seed + 1)
    requests = []
    for i in scored:
        chosen = rng.sample(pool, setting.shots) if setting.shots else []
        demos = [docs[j].text + TARGET_DELIMITER + docs[j].answer for j in chosen]
        requests.append(Request(SHOT_SEPARATOR.join([*demos, docs[i].text]), docs[i].gold, docs[i].choices, i,
                                tuple(chosen)))
    return requests


def hellaswag_doc(item: data.HellaSwagItem) -> Doc:
    """Text = the context; choices = the endings."""
    return Doc(item.context, item.endings[item.label], item.label, item.endings)


def _csqa_question(item: data.MultipleChoiceItem) -> str:
    options = "\n".join(f"{label}. {text}" for label, text in zip(item.labels, item.texts))
    return f"Question: {item.question}\n{options}\nAnswer:"


def commonsenseqa_doc(item: data.MultipleChoiceItem) -> Doc:
    """Text = "Question: ...\nA. ...\nAnswer:"; choices = the letters."""
    return Doc(_csqa_question(item), item.labels[item.answer], item.answer, item.labels)


def bbh_doc(item: data.CountingItem, cot_prompt: str | None) -> Doc:
    """Zero-shot when `cot_prompt` is None (the question and a request for a single number), else the CoT prompt
    followed by the question."""
    if cot_prompt is None:
        return Doc(f"{item.input}\nAnswer with a single number.", str(item.target), item.target)
    return Doc(f"{cot_prompt}{SHOT_SEPARATOR}Q: {item.input}\nA: Let's think step by step.", str(item.target),
               item.target)


def _alpaca_task(item: data.InstructionItem) -> str:
    return f"{item.instruction}\n\n{item.input}" if item.input else item.instruction


def _alpaca_block(item: data.InstructionItem) -> str:
    text = f"Instruction: {item.instruction}"
    return f"{text}\nInput: {item.input}" if item.input else text


def alpaca_doc(item: data.InstructionItem, few_shot: bool) -> Doc:
    """Zero-shot: the instruction (and input) as the user message. Few-shot: an "Instruction: / Input: /
    Response:" block, which a few-shot example completes with its output."""
    text = f"{_alpaca_block(item)}\nResponse:" if few_shot else _alpaca_task(item)
    return Doc(text, item.output, item.output)


def benchmark_setting(name: str, shots: int, data_dir: str | Path | None = None) -> Setting:
    """A benchmark's setting with `shots` few-shot examples (0: GP); BBH's IP setting is its fixed 3-shot CoT prompt
    in every item's text, with no pool."""
    if name == "hellaswag":
        return Setting(name, [hellaswag_doc(x) for x in data.load_hellaswag(data_dir)], POOL_SIZE, shots)
    if name == "commonsenseqa":
        return Setting(name, [commonsenseqa_doc(x) for x in data.load_commonsenseqa(data_dir)], POOL_SIZE, shots)
    if name == "bbh_object_counting":
        cot = data.load_bbh_cot_prompt(data_dir) if shots else None
        docs = [bbh_doc(x, cot) for x in data.load_bbh_object_counting(data_dir)]
        return Setting(name, docs, 0, 0, max_new_tokens=128 if cot else 32, chain_of_thought=cot is not None)
    if name == "alpaca":
        docs = [alpaca_doc(x, few_shot=shots > 0) for x in data.load_alpaca(data_dir)]
        return Setting(name, docs, POOL_SIZE, shots, max_new_tokens=64)
    raise ConfigError(f"general evaluation: unknown benchmark {name!r}; choose from {list(BENCHMARKS)}.")


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


def generated_score(setting: Setting, text: str, gold: int | str) -> float:
    """One generated answer's score, 0..100: exact match of the extracted count (BBH) or ROUGE-L F1 (Alpaca)."""
    if setting.name == "bbh_object_counting":
        return 100.0 * (extract_count(text, chain_of_thought=setting.chain_of_thought) == gold)
    return score("rouge_l", text, [gold])


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


def _native_scores(model, tokenizer, setting: Setting, *, limit: int, seed: int, batch_size: int, max_length: int,
                   desc: str) -> dict[str, float]:
    """The setting's METRICS, each the mean of its per-item scores (0..100)."""
    reqs = setting_requests(setting, limit, seed)
    if setting.max_new_tokens:
        texts = generate(model, tokenizer, [r.prompt for r in reqs], max_new_tokens=setting.max_new_tokens,
                         batch_size=batch_size, max_prompt_length=max_length, desc=desc)
        per_item = {METRICS[setting.name][0]: [generated_score(setting, t, r.gold) for r, t in zip(reqs, texts)]}
    else:
        picks = _multiple_choice(model, tokenizer, reqs, batch_size, max_length, desc)
        per_item = {"acc": [100.0 * (raw == r.gold) for r, (raw, _) in zip(reqs, picks)],
                    "acc_norm": [100.0 * (norm == r.gold) for r, (_, norm) in zip(reqs, picks)]}
    return {f"{setting.name}_{m}": sum(per_item[m]) / len(reqs) for m in METRICS[setting.name]}


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
    backend: str = "native",
) -> dict[str, float]:
    """Scores (0..100) on the general benchmarks: GP with `shots` None or 0, IP with `shots` = k > 0 (k-shot;
    BBH then uses its fixed 3-shot CoT prompt). Keys: hellaswag_acc_norm, hellaswag_acc, commonsenseqa_acc,
    bbh_object_counting_em, alpaca_rouge_l (those of the chosen `benchmarks`). `max_length` bounds every prompt
    in tokens (cut from the left). `backend` "lm_eval" runs the same items and prompts through
    lm-evaluation-harness (slicelora.eval.lm_eval_backend)."""
    check_backend(backend)
    unknown = [b for b in benchmarks if b not in BENCHMARKS]
    if unknown:
        raise ConfigError(f"general evaluation: unknown benchmarks {unknown}; choose from {list(BENCHMARKS)}.")
    shots = shots or 0
    if shots < 0:
        raise ConfigError(f"general evaluation: shots={shots} must be None or at least 0.")
    mode = f"IP {shots}-shot" if shots else "GP"
    out: dict[str, float] = {}
    for name in (b for b in BENCHMARKS if b in benchmarks):
        setting = benchmark_setting(name, shots, data_dir)
        common = dict(limit=limit, seed=seed, batch_size=batch_size, max_length=max_length)
        if backend == "lm_eval":
            from .lm_eval_backend import run_setting  # the optional extra, imported only when chosen

            out.update(run_setting(model, tokenizer, setting, **common)[0])
        else:
            out.update(_native_scores(model, tokenizer, setting, desc=f"{mode} {name}", **common))
    return out


def general_scores(model, tokenizer, cfg: GeneralConfig = GeneralConfig()) -> dict[str, dict[str, float]]:
    """{"GP": zero-shot scores, "IP": `cfg.shots`-shot scores} on the same scored items."""
    common = dict(limit=cfg.limit, seed=cfg.seed, batch_size=cfg.batch_size, benchmarks=cfg.benchmarks,
                  max_length=cfg.max_length, backend=cfg.backend)
    return {
        "GP": evaluate_general(model, tokenizer, shots=None, **common),
        "IP": evaluate_general(model, tokenizer, shots=cfg.shots, **common),
    }
