"""general.backend=lm_eval: lm-evaluation-harness runs the same items with the same prompts and gives the native
backend's scores (checked per item: the prompts lm_eval built, its choice log-likelihoods, its generated texts); the
backend is refused up front, naming the extra, when lm_eval is not installed."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
from dataclasses import replace

import pytest

from conftest import SMALL, small_config
from slicelora.data.prompts import _prompt_text
from slicelora.errors import ConfigError
from slicelora.eval import general as ev
from slicelora.eval.generate import choice_logprobs, generate
from slicelora.loop.config import load_config
from slicelora.loop.stages import run
from slicelora.models import tiny_llama

needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason='lm_eval is not installed: pip install "slicelora[lm_eval]"')
LIMIT, BATCH, MAX_LENGTH, SEED = 4, 3, 192, 42  # BBH's CoT prompt (1417 bytes, one token each) gets cut


@pytest.fixture(scope="module")
def spread_model(tokenizer):
    """A tiny random Llama with larger weights, so that choices' log-likelihoods are far apart."""
    return tiny_llama(tokenizer, seed=3, initializer_range=0.2)


def _run(model, tokenizer, setting):
    from slicelora.eval.lm_eval_backend import run_setting

    return run_setting(model, tokenizer, setting, limit=LIMIT, seed=SEED, batch_size=BATCH, max_length=MAX_LENGTH)


def _native(model, tokenizer, setting):
    return ev._native_scores(model, tokenizer, setting, limit=LIMIT, seed=SEED, batch_size=BATCH,
                             max_length=MAX_LENGTH, desc=None)


@needs_lm_eval
@pytest.mark.parametrize("shots", [0, 2])
@pytest.mark.parametrize("name", ["hellaswag", "commonsenseqa"])
def test_multiple_choice_same_requests_log_likelihoods_and_scores(spread_model, tokenizer, name, shots):
    setting = ev.benchmark_setting(name, shots)
    scores, samples = _run(spread_model, tokenizer, setting)
    requests = ev.setting_requests(setting, LIMIT, SEED)
    # lm_eval drew the same few-shot examples and built the same (context, " " + choice) pairs
    assert [s["arguments"] for s in samples] == [[(r.prompt, " " + c) for c in r.choices] for r in requests]
    native = choice_logprobs(spread_model, tokenizer, [r.prompt for r in requests],
                             [[" " + c for c in r.choices] for r in requests], BATCH, max_length=MAX_LENGTH)
    theirs = [[resp[0][0] for resp in s["resps"]] for s in samples]
    # float32 sums over up to ~80 tokens, batched differently (right padding, no KV cache): equal up to rounding
    assert theirs == [pytest.approx([v for v, _, _ in row], rel=1e-5) for row in native]
    gaps = [sorted(v)[-1] - sorted(v)[-2] for v in theirs]
    assert min(gaps) > 1e-2  # no near-tie, so both backends must pick the same choices
    assert scores == _native(spread_model, tokenizer, setting)
    assert set(scores) == {f"{name}_{m}" for m in ev.METRICS[name]}


@needs_lm_eval
@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("shots", [0, 2])
@pytest.mark.parametrize("name", ["bbh_object_counting", "alpaca"])
def test_generation_same_prompts_texts_and_scores(spread_model, tokenizer, name, shots, chat):
    if not chat:  # a tokenizer without a chat template: the prompt + "\n", as training formats it
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.chat_template = None
    setting = ev.benchmark_setting(name, shots)
    scores, samples = _run(spread_model, tokenizer, setting)
    requests = ev.setting_requests(setting, LIMIT, SEED)
    assert [s["arguments"][0][0] for s in samples] == [_prompt_text(tokenizer, r.prompt) for r in requests]
    texts = generate(spread_model, tokenizer, [r.prompt for r in requests], max_new_tokens=setting.max_new_tokens,
                     batch_size=BATCH, max_prompt_length=MAX_LENGTH)
    assert [s["resps"][0][0].strip() for s in samples] == texts and all(texts)
    assert scores == _native(spread_model, tokenizer, setting)


@needs_lm_eval
def test_generated_answers_are_scored_by_our_scorers(tmp_path):
    """The task's process_results gives the native per-item score: BBH's count after the last "So the answer is"
    (CoT), ROUGE-L F1."""
    from slicelora.eval.lm_eval_backend import task_config

    bbh = ev.benchmark_setting("bbh_object_counting", 3)
    config = task_config(bbh, LIMIT, SEED, tmp_path, chat=True)
    rows = [json.loads(line) for line in open(config["dataset_kwargs"]["data_files"]["scored"])]
    scored, _ = ev.split_items(len(bbh.docs), LIMIT, SEED, 0)
    assert rows == [{"text": bbh.docs[i].text, "answer": str(bbh.docs[i].gold), "gold": bbh.docs[i].gold}
                    for i in scored]
    gold = rows[0]["gold"]
    right, wrong = f"1 + 2 = 3, so {gold + 5}. So the answer is {gold}.", f"So the answer is {gold}. Or {gold + 1}."
    assert config["process_results"](rows[0], [f" {right} "]) == {"em": 100.0}
    assert config["process_results"](rows[0], [f"{wrong} So the answer is {gold + 1}."]) == {"em": 0.0}
    alpaca = task_config(ev.benchmark_setting("alpaca", 0), LIMIT, SEED, tmp_path, chat=True)
    doc = {"gold": "The sky is blue today"}
    assert alpaca["process_results"](doc, ["the sky is blue"]) == {"rouge_l": pytest.approx(100 * 2 * 0.8 / 1.8)}


@needs_lm_eval
def test_general_scores_through_lm_eval_equal_native(tokenizer):
    model = tiny_llama(tokenizer, seed=3, initializer_range=0.2).train()
    cfg = ev.GeneralConfig(limit=2, shots=2, batch_size=4, max_length=MAX_LENGTH)
    native = ev.general_scores(model, tokenizer, cfg)
    harness = ev.general_scores(model, tokenizer, replace(cfg, backend="lm_eval"))
    assert harness == native and set(native["GP"]) == {f"{b}_{m}" for b in ev.BENCHMARKS for m in ev.METRICS[b]}
    assert model.training  # the training mode is given back


@needs_lm_eval
def test_a_run_may_switch_to_lm_eval_on_resume(tiny_folder, tmp_path, monkeypatch):
    """general.backend may change on resume: GP/IP of the base and the final model are recomputed by lm_eval."""
    from slicelora.eval import lm_eval_backend

    one = ["init.method=vanilla", "sequence=[363]", "general.enabled=true", "general.limit=2", "general.shots=1",
           "general.max_length=256", "general.benchmarks=commonsenseqa"]
    out = run(small_config(tiny_folder, *one), tmp_path / "run")
    native = json.loads((out / "general.json").read_text())
    calls = []
    real = lm_eval_backend.run_setting
    monkeypatch.setattr(lm_eval_backend, "run_setting", lambda *a, **k: calls.append(a[2].shots) or real(*a, **k))
    run(small_config(tiny_folder, *one, "general.backend=lm_eval"), out, resume=True)
    assert calls == [0, 1, 0, 1]  # GP and IP of the base model, then of the final one
    harness = json.loads((out / "general.json").read_text())
    assert json.loads((out / "config.json").read_text())["general"]["backend"] == "lm_eval"
    assert harness == native


# --- errors (no lm_eval needed) ----------------------------------------------------------------------------------


@pytest.fixture
def without_lm_eval(monkeypatch):
    """importlib reports lm_eval as not installed."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))


def test_lm_eval_backend_without_lm_eval_is_refused_naming_the_extra(without_lm_eval, model, tokenizer):
    with pytest.raises(ConfigError, match=re.escape('pip install "slicelora[lm_eval]"')):
        load_config(None, [*SMALL, "general.enabled=true", "general.backend=lm_eval"])
    with pytest.raises(ConfigError, match="general.backend=lm_eval needs lm-evaluation-harness"):
        ev.evaluate_general(model, tokenizer, limit=2, shots=0, backend="lm_eval")
    # with the general evaluation off, the backend is never used
    assert load_config(None, [*SMALL, "general.backend=lm_eval"]).general.backend == "lm_eval"


def test_unknown_backend_is_refused_with_the_choices(model, tokenizer):
    with pytest.raises(ConfigError, match="general.backend='vllm'; choose one of native, lm_eval"):
        load_config(None, [*SMALL, "general.backend=vllm"])
    with pytest.raises(ConfigError, match="backend='vllm' is unknown; choose one of native, lm_eval"):
        ev.evaluate_general(model, tokenizer, limit=2, shots=0, backend="vllm")
