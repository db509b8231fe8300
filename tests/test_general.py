"""General-ability sets: loaders on the shipped and on malformed files, few-shot prompts, GP/IP end to end."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from slicelora.data import general as data
from slicelora.errors import ConfigError, DataError
from slicelora.eval import general as ev
from slicelora.eval.generate import sequence_logprobs
from slicelora.models import tiny_llama

# --- loaders on the shipped files --------------------------------------------------------------------------------


def test_shipped_files_load():
    hs = data.load_hellaswag()
    assert len(hs) == 1000 and all(len(x.endings) == 4 and 0 <= x.label < 4 for x in hs)
    assert hs[0].context.startswith("Roof shingle removal: ")
    csqa = data.load_commonsenseqa()
    assert len(csqa) == 1221 and all(x.labels == ("A", "B", "C", "D", "E") for x in csqa)
    bbh = data.load_bbh_object_counting()
    assert len(bbh) == 250 and bbh[0].target == 8
    alpaca = data.load_alpaca()
    assert len(alpaca) == 200 and alpaca[1].output.startswith("The three primary colors")
    cot = data.load_bbh_cot_prompt()
    assert cot.count("Q: ") == 3 and "canary" not in cot and cot.startswith("Questions that involve")


# --- loaders on malformed files ----------------------------------------------------------------------------------

HS_GOOD = {"query": "A: b", "endings": ["w", "x", "y", "z"], "label": 1}
CSQA_GOOD = {"question": "q?", "choices": {"label": ["A", "B"], "text": ["a", "b"]}, "answerKey": "B"}


def _write(root: Path, name: str, text: str, gz: bool = False) -> Path:
    path = root / (name + ".gz" if gz else name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    return path


def _lines(*objs) -> str:
    return "\n".join(o if isinstance(o, str) else json.dumps(o) for o in objs) + "\n"


@pytest.mark.parametrize(
    ("loader", "name", "text", "expected"),
    [
        (data.load_hellaswag, data.HELLASWAG_FILE, _lines(HS_GOOD, "{oops"), r"line 2.*not valid JSON"),
        (data.load_hellaswag, data.HELLASWAG_FILE, _lines(HS_GOOD, {**HS_GOOD, "label": 7}), r"line 2.*'label'"),
        (data.load_hellaswag, data.HELLASWAG_FILE, _lines({"query": "q", "label": 0}), r"line 1.*'endings'"),
        (data.load_hellaswag, data.HELLASWAG_FILE, _lines([1, 2]), r"line 1.*JSON object"),
        (data.load_hellaswag, data.HELLASWAG_FILE, "\n\n", r"empty"),
        (data.load_commonsenseqa, data.COMMONSENSEQA_FILE,
         _lines({**CSQA_GOOD, "answerKey": "E"}), r"line 1.*answerKey"),
        (data.load_commonsenseqa, data.COMMONSENSEQA_FILE,
         _lines({**CSQA_GOOD, "choices": {"label": ["A", "B"], "text": ["a"]}}), r"line 1.*choices"),
        (data.load_commonsenseqa, data.COMMONSENSEQA_FILE,
         _lines(CSQA_GOOD, {"choices": CSQA_GOOD["choices"], "answerKey": "A"}), r"line 2.*'question'"),
        (data.load_bbh_object_counting, data.BBH_OBJECT_COUNTING_FILE,
         json.dumps({"examples": [{"input": "x", "target": "three"}]}), r"examples\[0\].*'target'"),
        (data.load_bbh_object_counting, data.BBH_OBJECT_COUNTING_FILE, json.dumps([]), r"'examples'"),
        (data.load_bbh_cot_prompt, data.BBH_COT_PROMPT_FILE, "just text", r"chain-of-thought"),
        (data.load_alpaca, data.ALPACA_FILE, json.dumps([{"instruction": "i", "input": ""}]), r"item 0.*'output'"),
        (data.load_alpaca, data.ALPACA_FILE, json.dumps([{"instruction": 3, "output": "o"}]), r"item 0.*'instruction'"),
        (data.load_alpaca, data.ALPACA_FILE, '[{"instruction": "i",', r"not valid JSON"),
    ],
)
def test_malformed_files_raise_data_error_naming_the_place(tmp_path, loader, name, text, expected):
    path = _write(tmp_path, name, text)
    with pytest.raises(DataError, match=expected) as info:
        loader(tmp_path)
    assert str(path) in str(info.value)


def test_gzipped_and_missing_and_corrupt_files(tmp_path):
    _write(tmp_path, data.HELLASWAG_FILE, _lines(HS_GOOD), gz=True)
    assert data.load_hellaswag(tmp_path) == [data.HellaSwagItem("A: b", ("w", "x", "y", "z"), 1)]
    _write(tmp_path, data.ALPACA_FILE, json.dumps([{"instruction": "i", "output": "o"}]))
    assert data.load_alpaca(tmp_path)[0].input == ""
    with pytest.raises(DataError, match="not found"):
        data.load_commonsenseqa(tmp_path)
    (tmp_path / (data.COMMONSENSEQA_FILE + ".gz")).parent.mkdir(parents=True)
    (tmp_path / (data.COMMONSENSEQA_FILE + ".gz")).write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot be read"):
        data.load_commonsenseqa(tmp_path)


def test_hellaswag_raw_layout_builds_the_query(tmp_path):
    raw = {"activity_label": "Tennis", "ctx": "She serves.", "endings": ["a", "b"], "label": "0"}
    _write(tmp_path, data.HELLASWAG_FILE, _lines(raw))
    assert data.load_hellaswag(tmp_path)[0] == data.HellaSwagItem("Tennis: She serves.", ("a", "b"), 0)


# --- prompts -----------------------------------------------------------------------------------------------------


def _requests(name: str, shots: int, limit: int, seed: int = 42) -> list[ev.Request]:
    return ev.setting_requests(ev.benchmark_setting(name, shots), limit, seed)


def _check_shots(requests, shots: int, limit: int, n: int):
    scored = {r.item for r in requests}
    assert len(requests) == limit == len(scored)
    for r in requests:
        assert len(r.shots) == len(set(r.shots)) == shots
        assert not scored & set(r.shots) and 0 <= r.item < n


def test_few_shot_prompts_hold_k_shots_and_never_a_scored_item():
    hs = data.load_hellaswag()
    reqs = _requests("hellaswag", 5, 30)
    _check_shots(reqs, 5, 30, len(hs))
    for r in reqs:
        assert r.prompt.split(ev.SHOT_SEPARATOR) == [
            *(hs[j].context + " " + hs[j].endings[hs[j].label] for j in r.shots), hs[r.item].context
        ]
        assert r.choices == hs[r.item].endings and r.gold == hs[r.item].label

    csqa = data.load_commonsenseqa()
    reqs = _requests("commonsenseqa", 5, 30)
    _check_shots(reqs, 5, 30, len(csqa))
    for r in reqs:
        assert r.prompt.count("Question: ") == 6 and r.prompt.endswith(ev._csqa_question(csqa[r.item]))
        assert r.choices == ("A", "B", "C", "D", "E")
        for j in r.shots:
            assert f"{ev._csqa_question(csqa[j])} {csqa[j].labels[csqa[j].answer]}" in r.prompt

    alpaca = data.load_alpaca()
    reqs = _requests("alpaca", 5, 20)
    _check_shots(reqs, 5, 20, len(alpaca))
    for r in reqs:
        assert r.prompt.count("Instruction: ") == 6 and r.prompt.endswith("\nResponse:")
        assert r.gold == alpaca[r.item].output and f"Response: {r.gold}" not in r.prompt

    reqs = _requests("bbh_object_counting", 3, 10)
    assert all(r.prompt.count("Q: ") == 4 and r.prompt.endswith("A: Let's think step by step.") for r in reqs)


def test_zero_shot_prompts_and_the_scored_subset():
    alpaca = data.load_alpaca()
    zero = _requests("alpaca", 0, 20)
    few = _requests("alpaca", 5, 20)
    assert [r.item for r in zero] == [r.item for r in few]  # GP and IP score the same items
    assert [r.item for r in _requests("alpaca", 0, 5)] == [r.item for r in zero][:5]
    assert [r.item for r in _requests("alpaca", 0, 20, 7)] != [r.item for r in zero]
    for r in zero:
        item = alpaca[r.item]
        assert r.shots == () and r.prompt == (f"{item.instruction}\n\n{item.input}" if item.input else item.instruction)
    bbh = _requests("bbh_object_counting", 0, 250)
    assert sorted(r.item for r in bbh) == list(range(250))  # BBH needs no pool: every item can be scored
    with pytest.raises(ConfigError):
        _requests("alpaca", ev.POOL_SIZE + 1, 10)


@pytest.mark.parametrize(
    ("text", "cot", "expected"),
    [
        ("You have 7 fruits.", False, 7),
        ("7, or maybe 8", False, 7),
        ("seven", False, None),
        ("1 + 2 + 3 = 6. So the answer is 6.", True, 6),
        ("So the answer is 5. Wait: So the answer is 1,200.", True, 1200),
        ("1 + 1 = 2, then 3", True, 3),
        ("no idea", True, None),
    ],
)
def test_extract_count(text, cot, expected):
    assert ev.extract_count(text, chain_of_thought=cot) == expected


# --- multiple choice: each context once, the same picks as one forward per (context, choice) ---------------------


@pytest.mark.parametrize(("shots", "max_length"), [(0, 1024), (2, 1024), (2, 192)])
def test_multiple_choice_picks_equal_the_pair_by_pair_route(tokenizer, shots, max_length):
    model = tiny_llama(tokenizer, seed=3, initializer_range=0.2)
    for requests in (_requests("hellaswag", shots, 4), _requests("commonsenseqa", shots, 4)):
        flat = iter(sequence_logprobs(model, tokenizer, [r.prompt for r in requests for _ in r.choices],
                                      [ev.TARGET_DELIMITER + c for r in requests for c in r.choices], 3,
                                      max_length=max_length))
        pairwise = ev.multiple_choice_picks(requests, [[next(flat) for _ in r.choices] for r in requests])
        assert ev._multiple_choice(model, tokenizer, requests, 3, max_length, "test") == pairwise


# --- end to end --------------------------------------------------------------------------------------------------

KEYS = {"hellaswag_acc_norm", "hellaswag_acc", "commonsenseqa_acc", "bbh_object_counting_em", "alpaca_rouge_l"}


def test_general_scores_end_to_end(model, tokenizer):
    model.train()
    scores = ev.general_scores(model, tokenizer, ev.GeneralConfig(limit=2, shots=2, batch_size=4, max_length=192))
    assert set(scores) == {"GP", "IP"}
    for values in scores.values():
        assert set(values) == KEYS and all(0.0 <= v <= 100.0 for v in values.values())
    assert model.training


def test_evaluate_general_subset_and_errors(model, tokenizer, tmp_path):
    got = ev.evaluate_general(model, tokenizer, limit=2, shots=None, benchmarks=("commonsenseqa",), max_length=128)
    assert set(got) == {"commonsenseqa_acc"}
    with pytest.raises(ConfigError, match="unknown benchmarks"):
        ev.evaluate_general(model, tokenizer, limit=2, shots=0, benchmarks=("mmlu",))
    shutil.copytree(data.general_data_dir(), tmp_path / "general")
    (tmp_path / "general" / (data.ALPACA_FILE + ".gz")).write_bytes(gzip.compress(b"[{}]"))
    with pytest.raises(DataError, match="'instruction'"):
        ev.evaluate_general(model, tokenizer, limit=2, shots=0, benchmarks=("alpaca",), data_dir=tmp_path / "general")
