"""Per-example scorers on hand-worked examples."""

from __future__ import annotations

import pytest
from rouge_score import rouge_scorer
from transformers import AutoTokenizer

from slicelora.errors import ConfigError, DataError
from slicelora.eval import scoring
from slicelora.eval.scoring import METRICS, XLINGUAL_TOKENIZER, load_metric, normalize_superni, sari_tokens, score


class CharPieces:
    """A stand-in for GPT-2's tokenizer: one piece per non-space character, marked "Ġ" after a space."""

    def tokenize(self, text: str) -> list[str]:
        return [("Ġ" if i and text[i - 1] == " " else "") + ch for i, ch in enumerate(text) if ch != " "]


@pytest.fixture
def xlingual_stub(monkeypatch: pytest.MonkeyPatch) -> None:
    """The xlingual ROUGE-L on CharPieces, so that it runs without GPT-2's tokenizer files."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=scoring._XlingualWords(CharPieces()))
    monkeypatch.setattr(scoring, "_xlingual_rouge", lambda: scorer)


def test_metric_names_match_the_brief():
    assert set(METRICS) == {"exact_match", "rouge_l", "official_exact_match", "official_rouge_l",
                            "official_rouge_l_xlingual", "accuracy", "fuzz_ratio", "sari"}


def test_unknown_metric_lists_valid_names():
    with pytest.raises(ConfigError, match="valid metrics: exact_match, rouge_l"):
        score("bleu", "a", ["a"])


def test_no_references_is_a_data_error():
    with pytest.raises(DataError, match="no references"):
        score("exact_match", "a", [])


def test_single_string_counts_as_one_reference():
    assert score("exact_match", "yes", "Yes") == 100.0


@pytest.mark.parametrize("pred, refs, want", [
    ("  The  Cat\n", ["the cat"], 100.0),
    ("cat.", ["cat"], 0.0),                   # punctuation is kept by the paper's exact match
    ("the cat", ["cat"], 0.0),                # and articles too
    ("positive", ["negative", "Positive"], 100.0),  # max over references
])
def test_exact_match(pred, refs, want):
    assert score("exact_match", pred, refs) == want


# Computed by the official Super-NI evaluation script, allenai/natural-instructions eval/automatic/evaluation.py at
# commit 8540acd3faaea51b4a379570b542e9123904cac2: its functions (normalize_answer .. compute_metrics) saved unchanged
# outside this repository, with rouge_score 0.1.2 as its `rouge` module and GPT-2's tokenizer files (vocab.json
# sha256 196139668be6..., merges.txt 1ce1664773c5...) as its "gpt2". Each row: prediction, references, then
# 100 * metric_max_over_ground_truths(f, prediction, references) for f = exact_match, rouge, rouge with xlingual=True.
NI_VALUES = [
    ("the cat", ["cat"], 0.0, 66.66666666666666, 66.66666666666666),  # articles are kept
    ("A dog barked.", ["dog barked"], 0.0, 80.0, 74.99999999999999),
    ("  The  Cat!\n", ["the cat"], 100.0, 100.0, 0.0),  # case, whitespace, punctuation; xlingual keeps case
    ("don't stop", ["dont stop"], 100.0, 40.0, 33.33333333333333),  # punctuation dropped, not a space, in EM
    ("A-B c", ["ab c"], 100.0, 40.0, 33.33333333333333),
    ("\u201cquoted\u201d", ["quoted"], 0.0, 100.0, 50.0),  # curly quotes are not ASCII punctuation
    ("no", ["yes", "The no."], 0.0, 66.66666666666666, 50.0),  # max over references
    ("", ["cat"], 0.0, 0.0, 0.0),
    ("", ["..."], 100.0, 0.0, 0.0),  # a punctuation-only reference normalises to "", as an empty prediction does
    ("cats running", ["cat runs"], 0.0, 100.0, 0.0),  # stemming (default track only)
    ("The cats are running fast", ["cat runs"], 0.0, 57.14285714285715, 0.0),
    ("generously given", ["generous gift"], 0.0, 50.0, 33.33333333333333),
    ("the cat sat on the mat", ["the cat lay on the mat"], 0.0, 83.33333333333334, 83.33333333333334),
    ("HELLO World", ["hello world"], 100.0, 100.0, 0.0),
    ("3.14", ["314"], 100.0, 0.0, 0.0),  # numbers: EM drops the point, ROUGE splits on it
    ("1,000 apples", ["1000 apples"], 100.0, 40.0, 33.33333333333333),
    ("12 apples", ["twelve apples"], 0.0, 50.0, 40.0),
    ("Die Straße ist schön", ["die straße ist schön"], 100.0, 100.0, 75.0),  # German: EM lowercases Unicode,
    ("Die Straße ist schön", ["Die Strasse ist schön"], 0.0, 72.72727272727272, 66.66666666666666),  # ROUGE drops ß
    ("Über den Wolken", ["über den wolken"], 100.0, 100.0, 50.0),
    ("我爱北京", ["我爱北京"], 100.0, 0.0, 100.0),  # Chinese: no default-track tokens at all
    ("我爱北京天安门", ["我爱北京"], 0.0, 0.0, 78.26086956521739),
    ("北京", ["上海", "北京。"], 0.0, 0.0, 88.8888888888889),
    ("Ich habe 3 Äpfel gegessen", ["Ich habe drei Äpfel gegessen"], 0.0, 80.00000000000001, 85.71428571428571),
]
# The same script's compute_metrics over all rows (mean x 100, rounded to 4 places), default and xlingual track.
NI_MEANS = {"default": (41.6667, 55.2724), "xlingual": (41.6667, 43.4527)}


@pytest.mark.parametrize("pred, refs, em, rouge, _", NI_VALUES)
def test_official_metrics_equal_superni_script(pred, refs, em, rouge, _):
    assert score("official_exact_match", pred, refs) == em
    assert score("official_rouge_l", pred, refs) == pytest.approx(rouge, abs=1e-9)


def test_official_means_equal_superni_compute_metrics():
    em = [score("official_exact_match", p, r) for p, r, *_ in NI_VALUES]
    rouge = [score("official_rouge_l", p, r) for p, r, *_ in NI_VALUES]
    assert (round(sum(em) / len(em), 4), round(sum(rouge) / len(rouge), 4)) == NI_MEANS["default"]


@pytest.fixture
def gpt2_cached() -> None:
    try:
        AutoTokenizer.from_pretrained(XLINGUAL_TOKENIZER, local_files_only=True)
    except OSError:
        pytest.skip(f"the Hugging Face tokenizer {XLINGUAL_TOKENIZER!r} is not cached here (no network to fetch it)")


def test_official_xlingual_rouge_equals_superni_script(gpt2_cached):
    got = [score("official_rouge_l_xlingual", p, r) for p, r, *_ in NI_VALUES]
    assert got == pytest.approx([row[4] for row in NI_VALUES], abs=1e-9)
    assert round(sum(got) / len(got), 4) == NI_MEANS["xlingual"][1]


def test_xlingual_rouge_mechanics(xlingual_stub):
    """On one-piece-per-character tokens (CharPieces): the space mark is stripped, case is kept, nothing is stemmed,
    and non-ASCII text has tokens."""
    assert score("official_rouge_l_xlingual", "a b", ["ab"]) == 100.0  # [a, Ġb] -> [a, b]
    # C a t s vs c a t s: LCS "ats" = 3, P = R = 3/4; the default track lowercases.
    assert score("official_rouge_l_xlingual", "Cats", ["cats"]) == pytest.approx(75.0)
    assert score("official_rouge_l", "Cats", ["cats"]) == 100.0
    # 7 pieces vs 4, LCS 4: P = 4/7, R = 1, F = (8/7)/(11/7) = 8/11; the default track has no tokens here.
    assert score("official_rouge_l_xlingual", "我爱北京天安门", ["上海", "我爱北京"]) == pytest.approx(800 / 11)
    assert score("official_rouge_l", "我爱北京天安门", ["我爱北京"]) == 0.0


def test_xlingual_rouge_without_its_tokenizer_is_a_config_error(monkeypatch: pytest.MonkeyPatch):
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", offline)
    scoring._xlingual_rouge.cache_clear()
    try:
        with pytest.raises(ConfigError, match=r"needs the Hugging Face tokenizer 'gpt2'.*no network.*scoring: paper"):
            load_metric("official_rouge_l_xlingual")
    finally:
        scoring._xlingual_rouge.cache_clear()


# normalize_answer of the script above on each text.
@pytest.mark.parametrize("text, want", [
    ("The Cat!", "the cat"),
    ("an apple, please.", "an apple please"),
    ("A-B  c", "ab c"),                       # punctuation removed, not replaced by a space
    ("theory of the anthem", "theory of the anthem"),  # articles kept (SQuAD's normalisation drops them)
    ("Straße, ÜBER!", "straße über"),
    ("\u201cquoted\u201d", "\u201cquoted\u201d"),  # only ASCII punctuation goes
])
def test_superni_normalisation(text, want):
    assert normalize_superni(text) == want


def test_rouge_l_hand_worked():
    # 6 tokens each, LCS "the cat on the mat" = 5: P = R = 5/6.
    assert score("rouge_l", "the cat sat on the mat", ["the cat lay on the mat"]) == pytest.approx(500 / 6)
    # pred a b c d (4), ref b d e (3), LCS "b d" = 2: P = 1/2, R = 2/3, F = 2PR/(P+R) = (2/3)/(7/6) = 4/7.
    assert score("rouge_l", "a b c d", ["b d e"]) == pytest.approx(400 / 7)
    # The tokenizer lowercases and splits on punctuation.
    assert score("rouge_l", "Hello, world!", ["hello world"]) == pytest.approx(100.0)
    # Max over references; an empty prediction scores 0.
    assert score("rouge_l", "a b c d", ["x", "b d e"]) == pytest.approx(400 / 7)
    assert score("rouge_l", "", ["a"]) == 0.0


def test_official_rouge_l_stems_and_rouge_l_does_not():
    # Porter stemming of tokens longer than 3 characters: cats -> cat, running -> run, runs -> run.
    assert score("rouge_l", "cats running", ["cat runs"]) == 0.0
    assert score("official_rouge_l", "cats running", ["cat runs"]) == pytest.approx(100.0)
    # Stemmed: pred [the, cat, are, run, fast] vs ref [cat, run], LCS 2: P = 2/5, R = 1, F = (4/5)/(7/5) = 4/7.
    assert score("official_rouge_l", "The cats are running fast", ["cat runs"]) == pytest.approx(400 / 7)
    assert score("rouge_l", "The cats are running fast", ["cat runs"]) == 0.0


@pytest.mark.parametrize("pred, ref, want", [
    ("B", "B", 100.0),
    ("B.", "B", 100.0),
    ("(B) hawkish", "B", 100.0),
    ("  B\nbecause ...", "B", 100.0),
    ("C", "B", 0.0),
    ("b", "B", 0.0),                          # option letters are capitals
    ("Bad", "B", 0.0),                        # a word, not an option
    ("Answer: B", "B", 0.0),                  # only the leading option counts
    ("B", "B\nA clause is a group of words ...", 100.0),  # ScienceQA: letter then explanation
    ("884", "884", 100.0),
    ("The answer is 884.", "884", 100.0),     # first number in the prediction
    ("884.0", "884", 100.0),
    ("1,000", "1000", 100.0),
    ("13.50 minutes", "13.5", 100.0),
    ("-2.5", "-2.5", 100.0),
    ("88", "884", 0.0),
    ("no idea", "884", 0.0),
    (" friday ", "Friday", 100.0),            # neither option nor number: normalised exact match
    ("Friday.", "Friday", 0.0),
])
def test_accuracy(pred, ref, want):
    assert score("accuracy", pred, [ref]) == want


# Computed by TRACE's own code (its postprocess and fuzzywuzzy 0.18's fuzz.ratio with python-Levenshtein)
TRACE_VALUES = [("self.assertEqual(x, <NUM_LIT>)", "self.assertEqual(y, 0)", 95),
                ("return <STR_LIT:hello>", "return hello world", 80), ("kitten", "sitting", 62),
                ("def f(a):", "def f(a, b):", 86), ("x = <NUM_LIT:3>", "x = <NUM_LIT:3>", 100),
                ("import os", "import sys", 84), ("for i in range(<NUM_LIT>):", "for i in range(10):", 97)]


@pytest.mark.parametrize("prediction, reference, expected", TRACE_VALUES)
def test_fuzz_ratio_equals_trace_code(prediction, reference, expected):
    assert score("fuzz_ratio", prediction, [reference]) == expected


def test_fuzz_ratio_empty_prediction_and_best_reference():
    assert score("fuzz_ratio", "", ["abc"]) == 0.0  # TRACE counts it 0
    assert score("fuzz_ratio", "<STR_LIT>", ["abc"]) == 0.0  # empty after the placeholder handling
    assert score("fuzz_ratio", "kitten", ["x", "sitting"]) == 62.0


def test_sari_hand_worked_single_reference():
    # source [a b c], output [a c d], reference [a d]; k = 1. A precision/recall over an empty set is 1.
    # n=1: kept {a, c}, of which the reference keeps a: P = (1 + 0)/2, R = 1/1 -> F = 2/3;
    #      deleted {b}, not in the reference -> del P = 1; added {d}, reference adds {d} -> add F = 1.
    # n=2: src {ab, bc}, out {ac, cd}, ref {ad}: keep P = R = 1 (empty) -> 1; deletions {ab, bc} good -> 1;
    #      added {ac, cd} none good: P = 0, R = 0 -> 0.
    # n=3: src {abc}, out {acd}, ref {}: keep 1, del 1, add P = 0, R = 1 (empty) -> F = 0.
    # n=4: nothing anywhere -> 1, 1, 1.
    # keep = (2/3 + 3)/4 = 11/12, del = 1, add = (1 + 0 + 0 + 1)/4 = 1/2; SARI = (11/12 + 1 + 1/2)/3 = 29/36.
    assert score("sari", "a c d", ["a d"], source="a b c") == pytest.approx(2900 / 36)


def test_sari_hand_worked_two_references():
    # source [a b], output [a], references [a], [b]; k = 2: source/output counts x2, reference counts summed.
    # n=1: src {a:2, b:2}, out {a:2}, ref {a:1, b:1}. kept {a:2}, correct min(2, 1) = 1: P = 1/2;
    #      the references keep {a:1, b:1} (2 in all): R = 1/2 -> F = 1/2.
    #      deleted {b:2}, correct max(2 - 1, 0) = 1: del P = 1/2. Nothing added anywhere -> add F = 1.
    # n=2: src {ab:2} deleted, in no reference -> del 1; keep and add over empty sets -> 1.   n=3, 4: 1, 1, 1.
    # keep = (1/2 + 3)/4 = 7/8, del = 7/8, add = 1; SARI = (7/8 + 7/8 + 1)/3 = 11/12.
    assert score("sari", "a", ["a", "b"], source="a b") == pytest.approx(1100 / 12)


def test_sari_documented_example():
    # The worked example in the Hugging Face `evaluate` SARI metric card (three references), the SARI TRACE calls.
    got = score("sari", "About 95 you now get in.",
                ["About 95 species are currently known.", "About 95 species are now accepted.",
                 "95 species are now accepted."], source="About 95 species are currently accepted.")
    assert got == pytest.approx(26.953601953601954)


def test_sari_tokens_are_case_and_punctuation_aware():
    assert sari_tokens("Es kostet 3,50 Fr. oder 1.5?") == ["es", "kostet", "3,50", "fr", ".", "oder", "1.5", "?"]
    assert score("sari", "A, D", ["a d"], source="a b c") == score("sari", "a , d", ["a d"], source="a b c")


@pytest.mark.parametrize("metric", sorted(METRICS))
def test_scores_lie_in_0_100(metric, xlingual_stub):
    for pred, refs, src in [("", ["x"], "y"), ("x y z", ["x y z"], "x y z"), ("1", ["2", "1"], "")]:
        assert 0.0 <= score(metric, pred, refs, source=src) <= 100.0


@pytest.mark.parametrize("metric", sorted(METRICS))
def test_an_empty_reference_earns_no_perfect_score(metric, xlingual_stub):
    """An empty prediction against an empty reference is refused, not scored 100; blank references are ignored."""
    for references in ([""], ["  ", "\n"]):
        with pytest.raises(DataError, match="no references"):
            score(metric, "", references)
    assert score(metric, "", ["", "yes"]) == score(metric, "", ["yes"])
