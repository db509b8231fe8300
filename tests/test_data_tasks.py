"""Task loaders: the shipped data, each supported layout, reference forms, the held-out split, and bad input."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from slicelora.data.tasks import (
    SHIPPED_DATA_DIR,
    Example,
    default_data_dirs,
    list_tasks,
    load_task,
    search_dirs,
    split_heldout,
)
from slicelora.errors import ConfigError, DataError

SHIPPED = [SHIPPED_DATA_DIR]
# (train, held-out) instance counts from the shipped superni/README.md and trace/README.md
SUPERNI_COUNTS = {
    "task002_quoref_answer_generation": (1000, 100),
    "task073_commonsenseqa_answer_generation": (975, 100),
    "task1290_xsum_summarization": (1000, 100),
    "task1510_evalution_relation_extraction": (1000, 100),
    "task1572_samsum_summary": (160, 20),
    "task1590_diplomacy_text_generation": (126, 16),
    "task1687_sentiment140_classification": (1000, 100),
    "task1729_personachat_generate_next": (1000, 100),
    "task181_outcome_extraction": (338, 43),
    "task363_sst2_polarity_classification": (1000, 100),
    "task511_reddit_tifu_long_text_summarization": (994, 100),  # 6 train instances with an empty output dropped
    "task591_sciq_answer_generation": (1000, 100),
    "task639_multi_woz_user_utterance_generation": (142, 18),
    "task748_glucose_reverse_cause_event_detection": (1000, 100),
    "task875_emotion_classification": (1000, 100),
}
CLASSIFICATION = {
    "task073_commonsenseqa_answer_generation",
    "task1687_sentiment140_classification",
    "task363_sst2_polarity_classification",
    "task875_emotion_classification",
}
TRACE_COUNTS = {  # name: (train, test, native metric)
    "C-STANCE": (500, 100, "accuracy"),
    "FOMC": (500, 100, "accuracy"),
    "Py150": (500, 100, "fuzz_ratio"),
    "ScienceQA": (500, 100, "accuracy"),
    "NumGLUE-cm": (500, 81, "accuracy"),
    "NumGLUE-ds": (500, 100, "accuracy"),
    "20Minuten": (500, 100, "sari"),
}


def write_json(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data)
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def superni(n: int = 8, definition: object = ["Say the label."], output_as_list: bool = True) -> dict:
    labels = ["yes", "no"]
    return {
        "Definition": definition,
        "Instances": [
            {"id": f"i{i}", "input": f"text {i}", "output": [labels[i % 2]] if output_as_list else labels[i % 2]}
            for i in range(n)
        ],
    }


def trace(n: int = 4) -> list[dict]:
    return [{"prompt": f"Question {i}\nAnswer:", "answer": str(i)} for i in range(n)]


# ---------------------------------------------------------------- shipped data


@pytest.mark.parametrize("name", sorted(SUPERNI_COUNTS))
def test_shipped_superni_counts_metrics_and_prompts(name: str) -> None:
    task = load_task(name, SHIPPED)
    assert task.name == name and task.family == "superni"
    assert (len(task.train), len(task.heldout)) == SUPERNI_COUNTS[name]
    assert task.path == SHIPPED_DATA_DIR / "superni" / name
    if name in CLASSIFICATION:
        assert (task.metric, task.native_metric) == ("exact_match", "official_exact_match")
    else:
        assert (task.metric, task.native_metric) == ("rouge_l", "official_rouge_l")
    ex = task.train[0]
    assert task.definition and ex.prompt == f"{task.definition}\n\nInput: {ex.source}"
    assert ex.answer == ex.references[0]


def test_shipped_output_forms_and_all_references_kept() -> None:
    sst2 = load_task("363", SHIPPED)  # outputs are plain strings in this file
    assert {ex.answer for ex in sst2.train} == {"POS", "NEG"}
    assert sst2.train[0].prompt.startswith("In this task, you are given sentences from movie reviews.")
    glucose = load_task("748", SHIPPED)  # 213 train instances list two outputs, 10 list three
    sizes = [len(ex.references) for ex in glucose.train]
    assert sizes.count(2) == 213 and sizes.count(3) == 10
    samsum = load_task("1572", SHIPPED)  # the original outputs carry surrounding spaces
    assert all(ex.answer == ex.answer.strip() for ex in samsum.train)


@pytest.mark.parametrize("name", sorted(TRACE_COUNTS))
def test_shipped_trace_counts_metrics_and_prompts(name: str) -> None:
    task = load_task(name.lower(), SHIPPED)
    train_n, test_n, native = TRACE_COUNTS[name]
    assert task.name == name and task.family == "trace"
    assert (len(task.train), len(task.heldout)) == (train_n, test_n)
    assert (task.metric, task.native_metric) == ("rouge_l", native)
    ex = task.heldout[0]
    assert ex.prompt == f"TRACE task: {name}\n\n{ex.source}"
    assert ex.references == (ex.answer,)


def test_meetingbank_needs_reasoning_variant_opt_in() -> None:
    with pytest.raises(DataError) as err:
        load_task("MeetingBank", SHIPPED)
    msg = str(err.value)
    assert "MeetingBank/train.json is missing" in msg
    assert "allow_reasoning_variant=True" in msg and "train_reasoning_variant.json.gz" in msg
    assert "drop MeetingBank" in msg
    task = load_task("MeetingBank", SHIPPED, allow_reasoning_variant=True)
    assert (len(task.train), len(task.heldout), task.native_metric) == (376, 100, "rouge_l")
    assert "Give your reasoning first" in task.train[0].prompt


def test_list_tasks_and_default_dirs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    names = list_tasks(SHIPPED)
    assert len(names) == 23 and set(SUPERNI_COUNTS) | set(TRACE_COUNTS) | {"MeetingBank"} == set(names)
    assert names[0] == "task002_quoref_answer_generation" and names[14] == "task1729_personachat_generate_next"
    monkeypatch.setenv("SLICELORA_DATA", f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'b'}")
    assert default_data_dirs() == [tmp_path / "a", tmp_path / "b", SHIPPED_DATA_DIR]
    monkeypatch.delenv("SLICELORA_DATA")
    assert default_data_dirs() == [SHIPPED_DATA_DIR]


def test_env_dir_comes_first_and_is_searched(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    write_json(tmp_path / "tasks" / "task363_sst2_polarity_classification.json", superni(8))
    write_json(tmp_path / "tasks" / "task618_new_task.json", superni(8))
    monkeypatch.setenv("SLICELORA_DATA", str(tmp_path))
    assert load_task("363").path == tmp_path / "tasks" / "task363_sst2_polarity_classification.json"
    assert load_task("618").name == "task618_new_task"
    assert load_task("1687").path.parent == SHIPPED_DATA_DIR / "superni"


def test_data_dirs_add_to_the_defaults_unless_data_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--data-dir / config data_dirs come first and add to $SLICELORA_DATA and the shipped data; --data-only
    (data_only) searches them alone; the CLI's `tasks` listing follows the same rule."""
    from typer.testing import CliRunner

    from slicelora.cli import app
    from slicelora.loop.config import load_config

    extra, env = tmp_path / "extra", tmp_path / "env"
    write_json(extra / "task618_new_task.json", superni(8))
    write_json(extra / "task363_sst2_polarity_classification.json", superni(8))
    env.mkdir()  # an empty folder: a missing one is refused by `slicelora tasks`
    monkeypatch.setenv("SLICELORA_DATA", str(env))
    assert search_dirs() == [env, SHIPPED_DATA_DIR]
    assert search_dirs([str(extra), extra]) == [extra, env, SHIPPED_DATA_DIR]
    assert search_dirs([extra], only=True) == [extra]
    with pytest.raises(ConfigError, match="needs at least one data folder"):
        search_dirs([], only=True)
    assert load_task("363", search_dirs([extra])).path.parent == extra  # the given folder wins a name clash
    write_json(tmp_path / "other" / "task875_my_emotions.json", superni(8))  # and a number clash (other name)
    assert load_task("875", search_dirs([tmp_path / "other"])).name == "task875_my_emotions"
    assert load_task("1687", search_dirs([extra])).path.parent == SHIPPED_DATA_DIR / "superni"
    with pytest.raises(DataError, match="'1687' was not found"):
        load_task("1687", search_dirs([extra], only=True))
    with pytest.raises(ConfigError, match="data_only=true needs data_dirs"):
        load_config(None, ["data_only=true"])

    runner = CliRunner()
    added = runner.invoke(app, ["tasks", "--data-dir", str(extra)])
    assert added.exit_code == 0 and {"task618_new_task", "task1687_sentiment140_classification"} <= set(
        added.output.split())
    only = runner.invoke(app, ["tasks", "--data-dir", str(extra), "--data-only"])
    assert only.exit_code == 0 and only.output.split() == ["task363_sst2_polarity_classification", "task618_new_task"]
    refused = runner.invoke(app, ["tasks", "--data-only"])
    assert refused.exit_code == 2 and "needs at least one data folder" in refused.output


# ---------------------------------------------------------------- layouts


@pytest.mark.parametrize("definition", ["Say the label.", ["Say the label.", "An alternative definition."]])
@pytest.mark.parametrize("output_as_list", [True, False])
@pytest.mark.parametrize("suffix", [".json", ".json.gz"])
def test_superni_single_file(tmp_path: Path, definition: object, output_as_list: bool, suffix: str) -> None:
    path = write_json(tmp_path / "tasks" / f"task007_toy{suffix}", superni(40, definition, output_as_list))
    task = load_task("7", [tmp_path], heldout_size=200)
    assert task.name == "task007_toy" and task.path == path and task.family == "superni"
    assert task.definition == "Say the label."
    assert (len(task.train), len(task.heldout)) == (30, 10)  # small task: a quarter held out
    assert task.metric == "exact_match" and task.native_metric == "official_exact_match"
    ex = task.heldout[0]
    assert ex.prompt == f"Say the label.\n\nInput: {ex.source}" and ex.answer in ("yes", "no")


def test_superni_generation_detected(tmp_path: Path) -> None:
    data = {"Definition": "Echo.", "Instances": [{"input": f"w{i}", "output": [f"w{i}", f"W{i}"]} for i in range(20)]}
    task = load_task(write_json(tmp_path / "task900_echo.json", data), heldout_size=5)
    assert (task.metric, task.native_metric) == ("rouge_l", "official_rouge_l")
    assert (len(task.train), len(task.heldout)) == (15, 5)
    assert all(ex.references == (ex.source, ex.source.upper()) for ex in task.train)


@pytest.mark.parametrize("languages, native", [
    ({}, "official_rouge_l"),  # no language fields: English, the default track
    ({"Input_language": ["English"], "Output_language": "English"}, "official_rouge_l"),
    ({"Input_language": ["English"], "Output_language": ["German"]}, "official_rouge_l_xlingual"),
    ({"Input_language": ["Chinese", "English"], "Output_language": ["English"]}, "official_rouge_l_xlingual"),
])
def test_superni_track_follows_the_languages(tmp_path: Path, languages: dict, native: str) -> None:
    """Like the official evaluation, a task whose input or output is not only English is scored on the xlingual
    track; classification tasks keep exact match, which has no track of its own."""
    data = {"Definition": "Echo.", **languages,
            "Instances": [{"input": f"w{i}", "output": [f"w{i}"]} for i in range(20)]}
    assert load_task(write_json(tmp_path / "task900_echo.json", data), heldout_size=5).native_metric == native
    folder = tmp_path / "split" / "task901_labels"
    write_json(folder / "train.json", {**superni(12), **languages})
    write_json(folder / "test.json", superni(3))
    assert load_task(folder).native_metric == "official_exact_match"


def test_superni_language_field_must_name_languages(tmp_path: Path) -> None:
    data = {**superni(12), "Output_language": {"name": "German"}}
    with pytest.raises(DataError, match=r"task902_bad.json: field 'Output_language' must be a language name or a list"):
        load_task(write_json(tmp_path / "task902_bad.json", data))


def test_superni_split_folder(tmp_path: Path) -> None:
    folder = tmp_path / "superni" / "task042_toy"
    write_json(folder / "train.json", superni(12))
    write_json(folder / "test.json.gz", superni(3, "Say the label.", output_as_list=False))
    for ref in ("42", "task042", "TASK042_TOY", folder, str(folder)):
        task = load_task(ref, [tmp_path])
        assert task.name == "task042_toy" and task.path == folder
        assert (len(task.train), len(task.heldout)) == (12, 3)


def test_trace_folder(tmp_path: Path) -> None:
    folder = tmp_path / "trace" / "Toy-QA"
    write_json(folder / "train.json.gz", trace(6))
    write_json(folder / "eval.json", trace(2))
    write_json(folder / "test.json", trace(3))
    task = load_task("toy-qa", [tmp_path])
    assert task.name == "Toy-QA" and task.family == "trace" and task.path == folder
    assert (len(task.train), len(task.heldout)) == (6, 3)
    assert task.native_metric == "rouge_l"  # unknown TRACE-like task: ROUGE-L for both
    assert task.heldout[2] == Example("TRACE task: Toy-QA\n\nQuestion 2\nAnswer:", "2", ("2",), "Question 2\nAnswer:")


def test_reference_forms_on_shipped_data() -> None:
    name = "task002_quoref_answer_generation"
    for ref in ("002", "2", "task002", "Task2", name, name.upper(), f" {name} "):
        assert load_task(ref, SHIPPED).name == name
    for ref in ("c-stance", "C-STANCE", "numglue-CM"):
        assert load_task(ref, SHIPPED).name.lower() == ref.lower()
    folder = SHIPPED_DATA_DIR / "trace" / "FOMC"
    assert load_task(str(folder), []).name == "FOMC"


def test_search_depth_reaches_official_layout(tmp_path: Path) -> None:
    write_json(tmp_path / "clones" / "natural-instructions" / "tasks" / "task088_toy.json", superni(8))
    assert load_task("088", [tmp_path]).name == "task088_toy"  # depth 3 folder
    write_json(tmp_path / "a" / "b" / "c" / "d" / "tasks" / "task089_deep.json", superni(8))
    with pytest.raises(DataError, match="not found"):
        load_task("089", [tmp_path])


# ---------------------------------------------------------------- held-out split


def test_heldout_split_seeded_disjoint_and_sized(tmp_path: Path) -> None:
    data = superni(1000)
    path = write_json(tmp_path / "task010_big.json", data)
    a = load_task(path, heldout_size=200, seed=1)
    b = load_task(path, heldout_size=200, seed=1)
    c = load_task(path, heldout_size=200, seed=2)
    assert (len(a.train), len(a.heldout)) == (800, 200)
    assert a.heldout == b.heldout and a.train == b.train
    assert a.heldout != c.heldout
    assert not {ex.source for ex in a.train} & {ex.source for ex in a.heldout}
    order = [inst["input"] for inst in data["Instances"]]
    assert [ex.source for ex in a.heldout] == sorted((ex.source for ex in a.heldout), key=order.index)
    assert (len(load_task(path, heldout_size=300).heldout)) == 250  # fewer than 4 * 300: a quarter


def test_split_keeps_duplicate_inputs_on_one_side() -> None:
    items = list(range(40))
    keys = [f"k{i // 4}" for i in items]  # 10 groups of 4 equal inputs
    for seed in range(5):
        train, held = split_heldout(items, keys, heldout_size=5, seed=seed)
        assert len(held) == 8 and len(train) == 32  # target 5, reached in whole groups of 4
        assert not {keys[i] for i in train} & {keys[i] for i in held}


# ---------------------------------------------------------------- bad input


def expect_error(ref: object, *fragments: str, dirs: list[Path] | None = None, **kwargs: object) -> str:
    with pytest.raises(DataError) as err:
        load_task(ref, dirs if dirs is not None else [], **kwargs)  # type: ignore[arg-type]
    msg = str(err.value)
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"
    return msg


def test_unknown_superni_number_points_at_natural_instructions() -> None:
    msg = expect_error("618", "'618' was not found", str(SHIPPED_DATA_DIR), "natural-instructions", "SLICELORA_DATA",
                       "--data-dir", dirs=SHIPPED)
    assert "Nearest names:" in msg


def test_unknown_name_suggests_nearest(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    msg = expect_error("task363_sst2_polarity_clasification", "Nearest names: task363_sst2_polarity_classification",
                       f"{missing} (missing)", dirs=[missing, *SHIPPED])
    assert "natural-instructions" in msg
    msg = expect_error("cstance", "Nearest names: C-STANCE", dirs=SHIPPED)
    assert "natural-instructions" not in msg


def test_missing_path_and_folder_without_splits(tmp_path: Path) -> None:
    expect_error(tmp_path / "task1_x.json", "does not exist")
    expect_error(tmp_path, "no test.json or test.json.gz")


def test_ambiguous_number(tmp_path: Path) -> None:
    write_json(tmp_path / "task050_a.json", superni())
    write_json(tmp_path / "task050_b.json", superni())
    expect_error("50", "ambiguous", "task050_a", "task050_b", "full task name", dirs=[tmp_path])


def test_malformed_json_and_bad_gzip(tmp_path: Path) -> None:
    bad = tmp_path / "task001_bad.json"
    bad.write_text('{"Definition": ["x"], "Instances": [')
    expect_error(bad, str(bad), "not valid JSON", "line 1")
    gz = tmp_path / "task002_bad.json.gz"
    gz.write_bytes(gzip.compress(b'{"Definition": "x"}')[:-8])
    expect_error(gz, str(gz), "cannot be read")
    plain = tmp_path / "task003_bad.json.gz"
    plain.write_text("not gzip")
    expect_error(plain, str(plain), "cannot be read")


BAD_SUPERNI = [
    ({"Instances": superni()["Instances"]}, ["missing field 'Definition'", '"Definition": ["<instruction>"]']),
    ({"Definition": "x"}, ["missing field 'Instances'", '"Instances"']),
    ({"Definition": "x", "Instances": []}, ["'Instances' is empty", "no instances"]),
    ({"Definition": 3, "Instances": superni()["Instances"]}, ["'Definition' must be a string", "got an integer"]),
    ({"Definition": [], "Instances": superni()["Instances"]}, ["'Definition' must be a string or a non-empty list"]),
    ({"Definition": "x", "Instances": {"input": "a"}}, ["'Instances' must be a list", "got an object"]),
    ({"Definition": "x", "Instances": ["a"]}, ["Instances[0] must be an object", "got a string"]),
    ({"Definition": "x", "Instances": [{"id": "z1", "output": "a"}]}, ["Instances[0] (id z1) has no 'input'"]),
    ({"Definition": "x", "Instances": [{"input": "a"}]}, ["Instances[0] (id ?) has no 'output'"]),
    ({"Definition": "x", "Instances": [{"input": 5, "output": "a"}]}, ["Instances[0]: field 'input' must be a string"]),
    ({"Definition": "x", "Instances": [{"input": "a", "output": 1}]}, ["'output' must be a string", "got an integer"]),
    ({"Definition": "x", "Instances": [{"input": "a", "output": []}]}, ["'output'", "got an empty list"]),
    ({"Definition": "x", "Instances": [{"input": "a", "output": ["b", None]}]}, ["'output' must be a string"]),
    ({"Definition": "x", "Instances": [{"input": "a", "output": "b"}]}, ["at least 2", "Add instances"]),
    ({"Definition": "x", "Instances": [{"input": "a", "output": "b"}] * 4}, ["share one input"]),
    (["a list"], ["holds a JSON list", "pass its folder"]),
    ("a string", ["must hold a JSON object", "got a string"]),
]


@pytest.mark.parametrize(("data", "fragments"), BAD_SUPERNI)
def test_bad_superni_file(tmp_path: Path, data: object, fragments: list[str]) -> None:
    path = write_json(tmp_path / "task001_bad.json", data)
    expect_error(path, str(path), *fragments)


def test_bad_superni_folder(tmp_path: Path) -> None:
    folder = tmp_path / "task004_toy"
    write_json(folder / "test.json", superni(2))
    expect_error(folder, "no train.json or train.json.gz")
    write_json(folder / "train.json", {"Definition": "x", "Instances": [{"input": "a", "output": ["b"]}, {}]})
    expect_error(folder, f"{folder / 'train.json'}: Instances[1] (id ?) has no 'input'")
    write_json(folder / "test.json", 7)
    expect_error(folder, "expected a JSON object (Super-NI task schema) or a JSON list", "got an integer")


BAD_TRACE = [
    ({"prompt": "p", "answer": "a"}, ["must be a JSON list of {prompt, answer}", "got an object"]),
    ([], ["the split is empty", "no instances"]),
    (["p"], ["item [0] must be an object", "got a string"]),
    ([{"answer": "a"}], ["item [0] has no 'prompt' field"]),
    ([{"prompt": "p", "answer": "a"}, {"prompt": "p"}], ["item [1] has no 'answer' field"]),
    ([{"prompt": "p", "answer": 3}], ["item [0]: field 'answer' must be a string", "got an integer"]),
    ([{"prompt": None, "answer": "a"}], ["field 'prompt' must be a string", "got null"]),
]


@pytest.mark.parametrize(("train", "fragments"), BAD_TRACE)
def test_bad_trace_split(tmp_path: Path, train: object, fragments: list[str]) -> None:
    folder = tmp_path / "Toy"
    write_json(folder / "test.json", trace(2))
    path = write_json(folder / "train.json", train)
    expect_error(folder, str(path), *fragments)


def test_trace_without_train(tmp_path: Path) -> None:
    folder = tmp_path / "Toy"
    write_json(folder / "test.json", trace(2))
    msg = expect_error(folder, "Toy/train.json is missing", "drop Toy")
    assert "allow_reasoning_variant" not in msg  # no variant file here, so the option would not help
    expect_error(folder, "Toy/train.json is missing", allow_reasoning_variant=True)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_heldout_size(bad: object) -> None:
    with pytest.raises(ConfigError, match="heldout_size must be a positive integer"):
        load_task("363", SHIPPED, heldout_size=bad)  # type: ignore[arg-type]


def test_bad_reference_type() -> None:
    expect_error(363, "must be a string or a path", "got an integer")


# ---------------------------------------------------------------- degenerate data


def test_empty_outputs_are_dropped_with_a_count_and_all_empty_is_refused(tmp_path: Path) -> None:
    data = superni(8)
    data["Instances"][3]["output"] = ["  "]
    data["Instances"][5]["output"] = ["", "no"]  # a blank reference beside a real one: the real one is the answer
    write_json(tmp_path / "task900_gaps" / "train.json", data)
    write_json(tmp_path / "task900_gaps" / "test.json", superni(4))
    with pytest.warns(UserWarning, match=r"train.json: 1 of 8 instances have an empty output and were dropped"):
        task = load_task(tmp_path / "task900_gaps")
    assert len(task.train) == 7 and all(ex.references and all(ex.references) for ex in task.train)
    assert ("no", ("no",)) in {(ex.answer, ex.references) for ex in task.train if ex.source == "text 5"}

    for instance in data["Instances"]:
        instance["output"] = [" "]
    write_json(tmp_path / "task901_blank.json", data)
    with pytest.raises(DataError, match=r"task901_blank.json \(train split\): all 6 instances have an empty output"
                                        r".*Fill in the outputs"):
        load_task(tmp_path / "task901_blank.json")
    write_json(tmp_path / "Blank" / "test.json", [{"prompt": "Q", "answer": " "}])
    write_json(tmp_path / "Blank" / "train.json", trace(4))
    with pytest.raises(DataError, match=r"Blank/test.json: all 1 instances have an empty output"):
        load_task(tmp_path / "Blank")


def test_duplicate_ids_are_counted(tmp_path: Path) -> None:
    data = superni(8)
    data["Instances"][4]["id"] = data["Instances"][6]["id"] = "i1"
    write_json(tmp_path / "task902_dups.json", data)
    with pytest.warns(UserWarning, match=r"task902_dups.json: 2 instance\(s\) repeat the id of an earlier one"):
        load_task(tmp_path / "task902_dups.json")


def test_missing_data_dir_is_refused_when_listing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"{tmp_path / 'missing'} do not exist"):
        list_tasks([tmp_path / "missing"])
    assert list_tasks([tmp_path]) == []
