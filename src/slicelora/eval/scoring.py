"""Per-example scorers: each maps (prediction, references, source) to a score in 0..100.

A task's score is the mean of its per-example scores. Every scorer takes the best score over the references,
except SARI, whose definition uses all references together. An empty (or whitespace-only) reference is no answer:
`score` ignores it, and refuses an example without any other, so that an empty prediction never earns a perfect
score against nothing (the task loaders drop such examples).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np
from rapidfuzz import fuzz
from rouge_score import rouge_scorer
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from slicelora.errors import ConfigError, DataError

Scorer = Callable[[str, Sequence[str], str], float]


def _best(fn: Callable[[str, str], float], prediction: str, references: Sequence[str]) -> float:
    return max(fn(prediction, ref) for ref in references)


# --- exact match -------------------------------------------------------------------------------------------------

def normalize_simple(text: str) -> str:
    """Lowercase, collapse whitespace runs to one space, strip (the paper's exact-match normalisation)."""
    return " ".join(text.lower().split())


_PUNCT = set(string.punctuation)


def normalize_superni(text: str) -> str:
    """The official Super-NI evaluation's normalisation (SQuAD v1.1's without its article removal): lowercase, drop
    ASCII punctuation (not replaced by a space), collapse whitespace. Articles stay: "the cat" is not "cat"."""
    return " ".join("".join(ch for ch in text.lower() if ch not in _PUNCT).split())


def exact_match(prediction: str, references: Sequence[str], source: str = "") -> float:
    return _best(lambda p, r: 100.0 * (normalize_simple(p) == normalize_simple(r)), prediction, references)


def official_exact_match(prediction: str, references: Sequence[str], source: str = "") -> float:
    return _best(lambda p, r: 100.0 * (normalize_superni(p) == normalize_superni(r)), prediction, references)


# --- ROUGE-L -----------------------------------------------------------------------------------------------------

@lru_cache(maxsize=2)
def _rouge(stem: bool) -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=stem)


def _rouge_l(scorer: rouge_scorer.RougeScorer, prediction: str, reference: str) -> float:
    return 100.0 * scorer.score(target=reference, prediction=prediction)["rougeL"].fmeasure  # empty side -> 0


def rouge_l(prediction: str, references: Sequence[str], source: str = "") -> float:
    """ROUGE-L F1 on rouge_score's default tokens: lowercased runs of [a-z0-9]; every other character separates
    tokens, so non-ASCII letters are dropped ("schön" -> "sch", Chinese text has no tokens and scores 0)."""
    return _best(lambda p, r: _rouge_l(_rouge(stem=False), p, r), prediction, references)


def official_rouge_l(prediction: str, references: Sequence[str], source: str = "") -> float:
    """ROUGE-L F1 of the official Super-NI evaluation's default (English) track: `rouge_l`'s tokens, Porter-stemmed
    when longer than 3 characters."""
    return _best(lambda p, r: _rouge_l(_rouge(stem=True), p, r), prediction, references)


XLINGUAL_TOKENIZER = "gpt2"  # the Hugging Face tokenizer that the official evaluation uses for its xlingual track


class _XlingualWords:
    """The official Super-NI evaluation's xlingual-track tokens: GPT-2's byte-level BPE pieces with the leading-space
    mark "Ġ" stripped (a lone space piece, "Ġ", becomes an empty token, as there). Case is kept and nothing is
    stemmed. Non-ASCII characters become byte-level pieces, so text in any script has tokens."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer

    def tokenize(self, text: str) -> list[str]:
        return [piece.lstrip("Ġ") for piece in self._tokenizer.tokenize(text)]


@lru_cache(maxsize=1)
def _xlingual_rouge() -> rouge_scorer.RougeScorer:
    try:
        try:  # the cached copy, without asking the Hub
            tokenizer = AutoTokenizer.from_pretrained(XLINGUAL_TOKENIZER, local_files_only=True)
        except OSError:
            tokenizer = AutoTokenizer.from_pretrained(XLINGUAL_TOKENIZER)
    except OSError as e:
        raise ConfigError(
            f"metric 'official_rouge_l_xlingual' (non-English Super-NI tasks, eval.scoring: native) needs the "
            f"Hugging Face tokenizer {XLINGUAL_TOKENIZER!r}, which could not be loaded ({e}). Fix: run once with "
            "access to the Hugging Face Hub so that it is cached, or score with eval.scoring: paper."
        ) from e
    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_XlingualWords(tokenizer))


def official_rouge_l_xlingual(prediction: str, references: Sequence[str], source: str = "") -> float:
    """ROUGE-L F1 of the official Super-NI evaluation's xlingual track (tasks whose input or output is not English):
    tokens from GPT-2's tokenizer (`_XlingualWords`), no stemming."""
    return _best(lambda p, r: _rouge_l(_xlingual_rouge(), p, r), prediction, references)


# --- TRACE accuracy ----------------------------------------------------------------------------------------------

# An option answer: an optional "(", one capital letter, then the end or a non-alphanumeric character
# ("B", "B.", "(C) text", "B\nexplanation").
_OPTION = re.compile(r"\s*\(?([A-Z])(?![A-Za-z0-9])")
_NUMBER_ONLY = re.compile(r"\s*[-+]?(\d[\d,]*(\.\d*)?|\.\d+)\s*")
_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")


def _to_float(text: str) -> float:
    return float(text.replace(",", ""))


def _accuracy_one(prediction: str, reference: str) -> float:
    option = _OPTION.match(reference)
    if option:
        got = _OPTION.match(prediction)
        return 100.0 * (got is not None and got.group(1) == option.group(1))
    if _NUMBER_ONLY.fullmatch(reference):
        found = _NUMBER.search(prediction)
        if found is None:
            return 0.0
        want, have = _to_float(reference.strip()), _to_float(found.group(0))
        return 100.0 * bool(abs(want - have) <= 1e-6 * max(1.0, abs(want)))
    return 100.0 * (normalize_simple(prediction) == normalize_simple(reference))


def accuracy(prediction: str, references: Sequence[str], source: str = "") -> float:
    """TRACE accuracy (C-STANCE, FOMC, ScienceQA on the option letter; NumGLUE on the number).

    The rule depends on the reference's form:
    - option reference (a leading option letter: "B", "B.", "(B) ..." or ScienceQA's "B", newline, explanation):
      100 iff the prediction's leading option letter (same pattern, after leading whitespace) is the same letter;
    - numeric reference (the whole reference is one number): 100 iff the first number in the prediction equals it
      (thousands commas dropped; floats compared with a relative tolerance of 1e-6);
    - otherwise: exact match after lowercasing and whitespace normalisation.
    """
    return _best(_accuracy_one, prediction, references)


# --- code similarity (TRACE Py150) ------------------------------------------------------------------------------

_LITERAL = re.compile(r"<(STR|NUM|CHAR)_LIT:(.*?)>", re.S)


def trace_code_text(code: str) -> str:
    """TRACE's handling of Py150's literal placeholders: bare <NUM_LIT> -> "0", <STR_LIT> and <CHAR_LIT> -> "",
    and <KIND_LIT:value> -> value."""
    code = code.replace("<NUM_LIT>", "0").replace("<STR_LIT>", "").replace("<CHAR_LIT>", "")
    return _LITERAL.sub(lambda m: m.group(2), code)


def _fuzz_ratio_one(prediction: str, reference: str) -> float:
    a, b = trace_code_text(prediction), trace_code_text(reference)
    if not a or not b:  # TRACE skips these in its sum and divides by all examples: they count 0
        return 0.0
    return float(round(fuzz.ratio(a, b)))  # fuzzywuzzy's fuzz.ratio: the rounded Indel similarity


def fuzz_ratio(prediction: str, references: Sequence[str], source: str = "") -> float:
    """TRACE Py150's score, as TRACE computes it: fuzzywuzzy's fuzz.ratio (0..100, an integer) between the
    prediction and the reference after TRACE's literal-placeholder handling; an empty one scores 0."""
    return _best(_fuzz_ratio_one, prediction, references)


# --- SARI --------------------------------------------------------------------------------------------------------

_SARI_TOKEN = re.compile(r"\d+(?:[.,]\d+)+|\w+|[^\w\s]")


def sari_tokens(text: str) -> list[str]:
    """Lowercased words, numbers (with inner "." or ",") and single punctuation marks: close to sacrebleu's 13a
    tokenisation, which `evaluate`'s SARI applies."""
    return _SARI_TOKEN.findall(text.lower())


def _ngrams(tokens: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _f1(p: float, r: float) -> float:
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def _sari_ngram(src: Counter, out: Counter, refs: list[Counter]) -> tuple[float, float, float]:
    """Keep F1, deletion precision and addition F1 for one n-gram order.

    Source and output counts are multiplied by the number of references k and compared with the reference
    counts summed over the references, so an n-gram found in only some references earns partial credit.
    As in the Hugging Face `evaluate` SARI that TRACE calls (the tensor2tensor revision of Xu et al.'s script):
    a precision or recall over an empty set is 1, and keep recall is the kept-and-correct count over the count
    that the references keep.
    """
    k = len(refs)
    ref = Counter()
    for r in refs:
        ref.update(r)
    src_k = Counter({g: c * k for g, c in src.items()})
    out_k = Counter({g: c * k for g, c in out.items()})

    keep = src_k & out_k                 # kept by the system
    keep_all = src_k & ref               # kept by the references
    keep_good = {g: min(c, ref[g]) for g, c in keep.items()}
    keep_p = sum(keep_good[g] / c for g, c in keep.items()) / len(keep) if keep else 1.0
    keep_r = sum(keep_good.values()) / sum(keep_all.values()) if keep_all else 1.0

    deleted = src_k - out_k              # deleted by the system
    del_p = sum(max(c - ref[g], 0) / c for g, c in deleted.items()) / len(deleted) if deleted else 1.0

    added = set(out) - set(src)          # added by the system
    add_all = set(ref) - set(src)        # added by the references
    add_good = len(added & add_all)
    add_p = add_good / len(added) if added else 1.0
    add_r = add_good / len(add_all) if add_all else 1.0
    return _f1(keep_p, keep_r), del_p, _f1(add_p, add_r)


def sari(prediction: str, references: Sequence[str], source: str = "") -> float:
    """SARI (Xu et al. 2016) of one output against all references together: the mean over n = 1..4 of keep F1,
    deletion precision and addition F1, averaged over the three operations, times 100. A task's SARI is the mean
    over its examples, as in `evaluate`'s corpus SARI."""
    src, out = sari_tokens(source), sari_tokens(prediction)
    refs = [sari_tokens(r) for r in references]
    parts = np.array([_sari_ngram(_ngrams(src, n), _ngrams(out, n), [_ngrams(r, n) for r in refs])
                      for n in range(1, 5)])
    return 100.0 * float(parts.mean())


# --- registry ----------------------------------------------------------------------------------------------------

METRICS: dict[str, Scorer] = {
    "exact_match": exact_match,
    "rouge_l": rouge_l,
    "official_exact_match": official_exact_match,
    "official_rouge_l": official_rouge_l,
    "official_rouge_l_xlingual": official_rouge_l_xlingual,
    "accuracy": accuracy,
    "fuzz_ratio": fuzz_ratio,
    "sari": sari,
}


def load_metric(metric: str) -> Scorer:
    """The scorer of the named metric (a key of METRICS), with what it needs loaded (the xlingual ROUGE-L's GPT-2
    tokenizer), so that a run can check its metrics before it trains. An unknown name is a ConfigError."""
    scorer = METRICS.get(metric)
    if scorer is None:
        raise ConfigError(f"unknown metric {metric!r}; valid metrics: {', '.join(METRICS)}")
    if scorer is official_rouge_l_xlingual:
        _xlingual_rouge()
    return scorer


def score(metric: str, prediction: str, references: Sequence[str], source: str = "") -> float:
    """Score one prediction with the named metric (a key of METRICS); a single string counts as one reference.
    Empty or whitespace-only references are ignored; an example with no other reference is refused (DataError)."""
    scorer = load_metric(metric)
    if isinstance(references, str):
        references = (references,)
    references = [r for r in references if r.strip()]
    if not references:
        raise DataError(f"metric {metric!r}: an example has no references (empty ones do not count: an empty "
                        "prediction would score 100 against one); every example needs a non-empty output")
    return float(scorer(prediction, references, source))
