"""Label transforms: the remapped data, the rewritten instruction, names and references, and every refusal."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import toy_examples

from slicelora.data.sequences import load_sequence
from slicelora.data.tasks import SHIPPED_DATA_DIR, Task, load_task
from slicelora.data.transforms import transform_task
from slicelora.errors import DataError

SHIPPED = [SHIPPED_DATA_DIR]
SAFE_NAME = re.compile(r"[A-Za-z0-9_.~%+=;()-]+")  # no "/", "\", ":", "*", "?", quotes, spaces or control characters
EMOTIONS = "anger=anger;fear=fear;joy=sadness;love=love;sadness=joy;surprise=surprise"


def write_task(folder: Path, labels: list[str], n: int = 12) -> Path:
    data = {"Definition": ["Pick the label."],
            "Instances": [{"input": f"text {i}", "output": [labels[i % len(labels)]]} for i in range(n)]}
    path = folder / "task007_toy.json"
    path.write_text(json.dumps(data))
    return path


def check_remapped(original: Task, new: Task, mapping: dict[str, str]) -> None:
    """Both splits: same sizes and inputs, every answer and reference mapped, prompts = new instruction + input."""
    assert (new.family, new.metric, new.native_metric, new.path) == (
        original.family, original.metric, original.native_metric, original.path)
    for old_split, new_split in ((original.train, new.train), (original.heldout, new.heldout)):
        assert len(new_split) == len(old_split)
        for old, ex in zip(old_split, new_split):
            assert ex.source == old.source
            assert ex.answer == mapping[old.answer] and ex.references == tuple(mapping[r] for r in old.references)
            assert ex.prompt == f"{new.definition}\n\nInput: {ex.source}"


def test_swap_labels_on_shipped_binary_tasks() -> None:
    sst2 = load_task("363", SHIPPED)
    swapped = load_task("363+swap_labels", SHIPPED)
    assert swapped.name == "task363_sst2_polarity_classification+swap_labels"
    check_remapped(sst2, swapped, {"POS": "NEG", "NEG": "POS"})
    assert swapped.definition == (
        f"{sst2.definition}\n\nNote: in this variant the labels are remapped: answer \"POS\" where the instructions "
        "above call for \"NEG\", and \"NEG\" where they call for \"POS\"."
    )
    assert load_task("363+Swap_Labels", SHIPPED) == swapped  # transform names in any case; labels as written
    tweets = load_task("1687", SHIPPED)
    check_remapped(tweets, load_task("task1687+swap_labels", SHIPPED), {"positive": "negative", "negative": "positive"})


def test_relabel_permutation_names_resolve_back() -> None:
    emotions = load_task("875", SHIPPED)
    shuffled = "surprise=surprise;sadness=joy;joy=sadness;love=love;fear=fear;anger=anger"  # any order
    new = load_task(f"875+relabel({shuffled})", SHIPPED)
    assert new.name == f"task875_emotion_classification+relabel({EMOTIONS})"  # pairs sorted
    mapping = dict(pair.split("=") for pair in EMOTIONS.split(";"))
    check_remapped(emotions, new, mapping)
    assert new.definition.endswith(
        'answer "sadness" where the instructions above call for "joy", and "joy" where they call for "sadness". '
        "Every other label keeps its meaning."
    )
    assert load_task(new.name, SHIPPED) == new
    assert SAFE_NAME.fullmatch(new.name)


def test_trace_task_keeps_its_header_and_metric() -> None:
    fomc = load_task("FOMC", SHIPPED)
    new = load_task("FOMC+relabel(A=B;B=C;C=A)", SHIPPED)
    assert new.name == "FOMC+relabel(A=B;B=C;C=A)" and (new.metric, new.native_metric) == ("rouge_l", "accuracy")
    note = ('Note: in this variant the labels are remapped: answer "B" where the instructions above call for "A", '
            '"C" where they call for "B", and "A" where they call for "C".')
    for old, ex in zip(fomc.heldout, new.heldout):
        assert ex.prompt == f"TRACE task: FOMC\n\n{note}\n\n{old.source}"
        assert ex.answer == {"A": "B", "B": "C", "C": "A"}[old.answer]


def test_labels_outside_the_safe_set_are_percent_encoded(tmp_path: Path) -> None:
    write_task(tmp_path, ["not sure", "a/b"])
    new = load_task("7+relabel(not sure=a/b;a/b=not sure)", [tmp_path])
    assert new.name == "task007_toy+relabel(a%2Fb=not%20sure;not%20sure=a%2Fb)" and SAFE_NAME.fullmatch(new.name)
    assert {ex.answer for ex in new.train} == {"not sure", "a/b"}
    assert load_task(new.name, [tmp_path]) == new


def test_references_survive_yaml_and_comma_lists(tmp_path: Path) -> None:
    refs = ["363", "363+swap_labels", "363+relabel(NEG=POS;POS=NEG)", f"875+relabel({EMOTIONS})"]
    (tmp_path / "seq.yaml").write_text(f"tasks: [{', '.join(refs)}]\n")  # unquoted flow list
    assert load_sequence(tmp_path / "seq.yaml").tasks == refs
    assert ",".join(refs).split(",") == refs  # how the CLI splits its task lists
    names = [load_task(ref, SHIPPED).name for ref in refs]
    assert names[1] == "task363_sst2_polarity_classification+swap_labels"
    assert names[2] == "task363_sst2_polarity_classification+relabel(NEG=POS;POS=NEG)"


def test_paths_and_chains(tmp_path: Path) -> None:
    path = write_task(tmp_path, ["yes", "no"]).rename(tmp_path / "task007_a+b.json")
    assert load_task(str(path)).name == "task007_a+b"  # an existing path is never split at "+"
    assert load_task(f"{path}+swap_labels").name == "task007_a+b+swap_labels"
    twice = load_task("363+swap_labels+swap_labels", SHIPPED)
    assert twice.name == "task363_sst2_polarity_classification+swap_labels+swap_labels"
    assert [ex.answer for ex in twice.train] == [ex.answer for ex in load_task("363", SHIPPED).train]
    assert twice.definition.count("Note:") == 2
    rotated = load_task("FOMC+relabel(A=B;B=C;C=A)+relabel(A=C;B=A;C=B)", SHIPPED)  # a TRACE chain
    assert [ex.answer for ex in rotated.heldout] == [ex.answer for ex in load_task("FOMC", SHIPPED).heldout]
    assert rotated.heldout[0].prompt.startswith(f"{rotated.definition}\n\n") and rotated.definition.count("Note:") == 2


def test_keep_instruction_is_refused_unless_allowed() -> None:
    with pytest.raises(DataError) as err:
        load_task("363+swap_labels(keep_instruction)", SHIPPED)
    assert "contradiction that no method can keep" in str(err.value) and "drop keep_instruction" in str(err.value)
    sst2 = load_task("363", SHIPPED)
    same = transform_task(sst2, "swap_labels(keep_instruction)", allow_same_instruction=True)
    assert same.name == "task363_sst2_polarity_classification+swap_labels(keep_instruction)"
    assert same.definition == sst2.definition
    check_remapped(sst2, same, {"POS": "NEG", "NEG": "POS"})
    relabelled = transform_task(sst2, "relabel(POS=NEG;NEG=POS;keep_instruction)", allow_same_instruction=True)
    assert relabelled.name == "task363_sst2_polarity_classification+relabel(NEG=POS;POS=NEG;keep_instruction)"


BAD = [
    ("363+swap", ["task363_sst2_polarity_classification: unknown transform 'swap'", "Did you mean swap_labels?"]),
    ("1290+swap_labels", ["task1290_xsum_summarization+swap_labels", "not a classification task", "e.g. 363"]),
    ("875+swap_labels", ["exactly two labels", "the task has 6", "relabel(anger=fear;"]),
    ("363+relabel(POS=NEG)", ["not every label is mapped (missing: NEG)", "add NEG=NEG"]),
    ("363+relabel(POS=POS;NEG=POS)", ["POS and NEG are each mapped to 'POS'", "permutation"]),
    ("363+relabel(POS=pos;NEG=NEG)", ["'pos' (did you mean 'POS'?) is not one of the task's labels: NEG, POS"]),
    ("363+relabel(POS=NEG;POS=NEG;NEG=POS)", ["label 'POS' is mapped twice"]),
    ("363+relabel(POS=POS;NEG=NEG)", ["keeps every label as it is"]),
    ("363+relabel(POS=NEG,NEG=POS)", ["separate the arguments with ';', not ','"]),
    ("363+relabel(POS=NEG", ["parentheses do not close", "separate the pairs with ';'"]),
    ("363+swap_labels(POS)", ["swap_labels takes no arguments apart from keep_instruction"]),
    ("363+relabel", ["relabel needs a map"]),
    ("363+relabel(POS;NEG=POS)", ["'POS' is not a pair OLD=NEW"]),
    ("618+swap_labels", ["'618' was not found"]),
]


@pytest.mark.parametrize(("ref", "fragments"), BAD)
def test_bad_transforms(ref: str, fragments: list[str]) -> None:
    with pytest.raises(DataError) as err:
        load_task(ref, SHIPPED)
    for fragment in fragments:
        assert fragment in str(err.value), f"{fragment!r} not in {str(err.value)!r}"


def test_prompt_without_the_instruction_is_refused() -> None:
    examples = toy_examples("sentiment", 8)
    task = Task("toy", "superni", examples, examples[:2], "exact_match", "official_exact_match", Path("."), "Other.")
    with pytest.raises(DataError, match="does not start with the task's instruction"):
        transform_task(task, "swap_labels")


def test_toy_swap_differs_only_in_instruction_and_label() -> None:
    """The toy pair that a tiny-model gradient test would use; no gradient cosine sign is asserted, on purpose.

    The mean answer-only gradient of a two-label task is a shared label-bias term (the model's current over- or
    under-prediction of each label, times the mean hidden state at the answer, identical for the task and its swap on
    the same balanced inputs) plus a class-difference term (times the hidden-state difference between the classes),
    which alone flips sign under the swap, and the continuation tokens after the label ("OS<|im_end|>" after "P"),
    which both tasks share. In the tiny random Llama (2 layers, hidden 48, byte-level) the answer position's hidden
    state hardly depends on the input's class, so the shared terms dominate and the cosine's sign follows the
    optimiser's momentary label bias. Measured on these 24 toy examples (full model, AdamW 3e-3, answer-only loss):
    stopped as soon as every label was predicted, cos(original, swap) was +0.80, +0.50, +0.68, +0.89, +0.57, -0.03,
    +0.02, +0.96 for seeds 0-7; trained on, it flipped sign between checkpoints 10 epochs apart. A negative value
    asserted on one seed would be luck; benchmarks/conflict_cosines.py measures it on SmolLM2-135M instead."""
    examples = toy_examples("sentiment")
    task = Task("toy", "superni", examples, examples[:4], "exact_match", "official_exact_match", Path("."),
                "Classify the review.")
    swapped = transform_task(task, "swap_labels")
    assert swapped.name == "toy+swap_labels"
    for old, new in zip(task.train, swapped.train):
        assert new.prompt == old.prompt.replace("Classify the review.", swapped.definition, 1)
        assert {old.answer, new.answer} == {"POS", "NEG"}
    same = transform_task(task, "swap_labels(keep_instruction)", allow_same_instruction=True)
    assert [ex.prompt for ex in same.train] == [ex.prompt for ex in task.train]
