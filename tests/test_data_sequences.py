"""Sequence registry and user sequence files."""

from __future__ import annotations

from pathlib import Path

import pytest

from slicelora.data.sequences import Sequence, list_sequences, load_sequence
from slicelora.data.tasks import SHIPPED_DATA_DIR, load_task
from slicelora.errors import DataError

SHIPPED = [SHIPPED_DATA_DIR]
PAPER = {  # the paper's sequences, in order
    "ni-seq-g1": ["618", "1290", "589", "511", "1357"],
    "ni-seq-g2": ["1355", "141", "619", "163", "002"],
    "trace": ["C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm"],
    "trace-full": ["C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds", "20Minuten"],
    "opp-v1": ["141", "1510", "360", "363", "611"],
    "opp-v2": ["088", "090", "1510", "363", "611"],
    "opp-v3": ["088", "1510", "181", "243", "363"],
    "opp-v4": ["088", "1510", "243", "363", "611"],
    "opp-v5": ["088", "141", "181", "243", "363"],
    "opp-v6": ["088", "1429", "181", "243", "363"],
    "opp-v7": ["086", "088", "1510", "181", "243"],
    "sapt-order1": "1572 363 1290 181 002 1510 639 1729 073 1590 748 511 591 1687 875".split(),
    "sapt-order2": "748 073 1590 639 1572 1687 591 363 1510 1729 181 511 002 1290 875".split(),
}


def test_registry_matches_spec() -> None:
    names = list_sequences()
    assert names[: len(PAPER) + 1] == [*PAPER, "demo"]
    for name, tasks in PAPER.items():
        assert load_sequence(name) == Sequence(name, tasks)


def test_mined_sequences_resolve_to_shipped_tasks() -> None:
    mined = [n for n in list_sequences() if n.startswith("smollm2-")]
    assert len(mined) == 8
    for name in mined:
        tasks = [load_task(ref, SHIPPED, allow_reasoning_variant=True).name for ref in load_sequence(name).tasks]
        assert len(set(tasks)) == 5


def test_names_are_case_and_separator_insensitive() -> None:
    assert load_sequence("NI-Seq-G1") == load_sequence("ni_seq_g1") == Sequence("ni-seq-g1", PAPER["ni-seq-g1"])


def test_sapt_orders_and_demo_resolve_to_shipped_tasks() -> None:
    order1 = [load_task(ref, SHIPPED).name for ref in load_sequence("sapt-order1").tasks]
    order2 = [load_task(ref, SHIPPED).name for ref in load_sequence("sapt-order2").tasks]
    assert len(set(order1)) == 15 and set(order1) == set(order2)
    demo = [load_task(ref, SHIPPED) for ref in load_sequence("demo").tasks]
    assert [t.name for t in demo] == [
        "task363_sst2_polarity_classification",
        "task1687_sentiment140_classification",
        "task591_sciq_answer_generation",
    ]
    for task in demo:  # short enough for a CPU demo with a 135M model
        assert max(len(ex.prompt) for ex in task.train) < 600
        assert max(len(ex.answer) for ex in task.train) < 80


def test_trace_sequences_resolve_to_shipped_tasks() -> None:
    for ref in load_sequence("trace-full").tasks:
        task = load_task(ref, SHIPPED, allow_reasoning_variant=True)
        assert task.family == "trace" and task.name == ref


def test_unshipped_paper_tasks_say_where_to_get_them() -> None:
    with pytest.raises(DataError) as err:
        load_task(load_sequence("opp-v2").tasks[0], SHIPPED)
    assert "'088' was not found" in str(err.value) and "natural-instructions" in str(err.value)


def test_unknown_name_suggests_nearest() -> None:
    with pytest.raises(DataError) as err:
        load_sequence("ni-seq-g3")
    msg = str(err.value)
    assert "Did you mean: ni-seq-g2, ni-seq-g1?" in msg or "Did you mean: ni-seq-g1, ni-seq-g2?" in msg
    assert "Known sequences:" in msg and "sapt-order2" in msg and "path.yaml:name" in msg
    with pytest.raises(DataError, match="Did you mean: opp-v7"):
        load_sequence("opp-v8")


def test_user_file_with_several_sequences(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(
        "sequences:\n  First: [002, 088, 363, C-STANCE]\n  second_one:\n    - task591_sciq_answer_generation\n"
    )
    assert load_sequence(f"{path}:first") == Sequence("first", ["002", "088", "363", "C-STANCE"])  # 002 stays text
    assert load_sequence(f"{path}:second-one").tasks == ["task591_sciq_answer_generation"]
    with pytest.raises(DataError, match=r"holds 2 sequences \(first, second-one\); pick one with .*mine.yaml:<name>"):
        load_sequence(path)
    with pytest.raises(DataError, match="has no sequence 'firts'. Did you mean: first"):
        load_sequence(f"{path}:firts")


def test_user_file_with_one_sequence(tmp_path: Path) -> None:
    named = tmp_path / "a.yml"
    named.write_text("name: short\ntasks: [363, '1687']\n")
    assert load_sequence(str(named)) == Sequence("short", ["363", "1687"])
    unnamed = tmp_path / "my_run.yaml"
    unnamed.write_text("tasks:\n  - 010\n  - 1.5\n")
    assert load_sequence(unnamed) == Sequence("my-run", ["010", "1.5"])  # no octal or float conversion


BAD_FILES = [
    ("tasks: [363, [1]]\n", ["item [1] ['1'] is not a task reference"]),
    ("tasks: [363, null]\n", ["item [1] None is not a task reference"]),
    ("tasks: []\n", ["must be a non-empty list"]),
    ("tasks: 363\n", ["must be a non-empty list"]),
    ("tasks: [363, task363, '363']\n", ["'363' is listed twice"]),
    ("sequences: [363]\n", ["'sequences' must map names to task lists"]),
    ("sequences: {a: [1], A: [2]}\n", ["sequence 'A' is defined twice"]),
    ("order: [363]\n", ["neither a 'sequences' nor a 'tasks' key", "expected"]),
    ("- 363\n", ["expected \"sequences:", "got list"]),
    ("tasks: [363\n", ["not valid YAML"]),
]


@pytest.mark.parametrize(("text", "fragments"), BAD_FILES)
def test_bad_user_file(tmp_path: Path, text: str, fragments: list[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(DataError) as err:
        load_sequence(path)
    msg = str(err.value)
    assert str(path) in msg
    for fragment in fragments:
        assert fragment in msg


def test_missing_file_and_bad_argument(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot be read .*Check the path"):
        load_sequence(str(tmp_path / "none.yaml"))
    with pytest.raises(DataError, match="a sequence is a name or a YAML path"):
        load_sequence(5)  # type: ignore[arg-type]
