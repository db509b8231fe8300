"""The stage loop end to end on a tiny model: every method, resume after a crash at each step, saved adapters,
config and run-folder errors."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel

from conftest import RESUME_SCRIPT, SMALL, assert_same_run, crash_at, kill_at, probe, small_config
from slicelora.errors import ConfigError, RunStateError, TrainingDiverged
from slicelora.loop.config import load_config
from slicelora.loop.runfolder import read_run
from slicelora.loop.stages import run, stage_base_model
from slicelora.models import tiny_tokenizer


@pytest.mark.parametrize("method", ["vanilla", "lora_ga", "loram", "slice"])
def test_three_stage_run_for_each_method(tiny_folder, tmp_path, method):
    out = run(small_config(tiny_folder, f"init.method={method}"), tmp_path / method)
    result = read_run(out)
    assert result.method == method and result.R.shape == (3, 3)
    lower = result.R[torch.tril(torch.ones(3, 3)).bool().numpy()]
    assert ((lower >= 0) & (lower <= 100)).all()
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"AP", "FP", "Forget", "BWT", "max_forgetting"} <= set(metrics)
    generations = [json.loads(line) for line in (out / "stages" / "03" / "generations.jsonl").read_text().splitlines()]
    assert len(generations) == 9 and {"prediction", "references", "score", "metric"} <= set(generations[0])
    scores = json.loads((out / "stages" / "03" / "scores.json").read_text())
    cut = {task: sum(g["prompt_truncated"] for g in generations if g["task"] == task) for task in result.tasks}
    assert scores["truncated_prompts"] == cut and sum(cut.values()) > 0  # byte-level prompts: many are cut
    init = json.loads((out / "stages" / "02" / "init.json").read_text())
    assert init["method"] == method
    if method == "slice":
        assert init["surgery"] is not None and init["replay_batches"] == 2  # each_task: 2 batches of 1 past task
    assert (out / "stages" / "01" / "adapter" / "adapter_config.json").is_file()
    train = json.loads((out / "stages" / "01" / "train.json").read_text())
    assert train["examples"] == 12 and 0 <= train["truncated_prompts"] <= 12  # byte-level prompts: many are cut


def test_saved_adapter_reproduces_the_stage_model(tiny_folder, tmp_path):
    live = {}
    out = run(small_config(tiny_folder, "init.method=slice"), tmp_path / "run",
              on_stage=lambda t, m: live.__setitem__(t, probe(m)))
    for t in (1, 2):
        base = stage_base_model(out, t)
        loaded = PeftModel.from_pretrained(base, out / "stages" / f"{t:02d}" / "adapter")
        torch.testing.assert_close(probe(loaded), live[t], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def reference_run(tiny_folder, tmp_path_factory) -> Path:
    return run(small_config(tiny_folder, "init.method=slice"), tmp_path_factory.mktemp("reference") / "run")


def run_command(tiny_folder: Path, out: Path) -> list[str]:
    return [sys.executable, "-c", RESUME_SCRIPT, str(out), f"model={tiny_folder}", *SMALL, "init.method=slice"]


@pytest.mark.slow
@pytest.mark.parametrize("step", ["2:init", "2:train", "3:eval"])
def test_resume_after_a_crash_gives_the_same_results(tiny_folder, reference_run, tmp_path, step):
    crash_at(step, run_command(tiny_folder, tmp_path / "resumed"))
    assert not (tmp_path / "resumed" / "stages" / "03" / "scores.json").exists()
    run(small_config(tiny_folder, "init.method=slice"), tmp_path / "resumed", resume=True)
    assert_same_run(reference_run, tmp_path / "resumed")


@pytest.mark.slow
def test_resume_after_kills_at_random_moments(tiny_folder, reference_run, tmp_path):
    """SIGKILL at seeded random moments (in imports, gradient passes, training, evaluation or writing), resume each
    time, and end with exactly the uninterrupted results; no half-written file is ever left."""
    rng = random.Random(7)
    out = tmp_path / "killed"
    def readable() -> None:  # whatever a reader can see is complete (temp files are hidden)
        for written in out.rglob("*.json"):
            if not written.name.startswith("."):
                json.loads(written.read_text())

    # a fresh process needs ~3 s for its imports and several more for the run: the first kill always lands
    kills = kill_at(run_command(tiny_folder, out), [rng.uniform(2, 5), rng.uniform(3, 8), rng.uniform(3, 8)], readable)
    run(small_config(tiny_folder, "init.method=slice"), out, resume=True)
    assert kills >= 1
    assert_same_run(reference_run, out)


def test_run_folder_guards(tiny_folder, tmp_path):
    out = run(small_config(tiny_folder, "init.method=loram"), tmp_path / "run")
    with pytest.raises(RunStateError, match="pass --resume"):
        run(small_config(tiny_folder, "init.method=loram"), out)
    with pytest.raises(RunStateError, match="holds a different run"):
        run(small_config(tiny_folder, "init.method=vanilla"), out, resume=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(RunStateError, match="not empty"):
        run(small_config(tiny_folder), tmp_path / "other")


def test_divergence_keeps_finished_stages_and_the_run_resumes(tiny_folder, reference_run, tmp_path, monkeypatch):
    """A NaN loss in stage 2 stops the run with TrainingDiverged; stage 1 stays as it was, nothing of stage 2 is
    marked trained or finished, and resuming (here without the fault) ends with the uninterrupted results."""
    import slicelora.loop.stages as stages

    def poisoned(model, *args, desc, **kwargs):
        def nan_loss(module, inputs, output):
            output.loss = output.loss * float("nan")
            return output

        handle = model.register_forward_hook(nan_loss) if desc.startswith("stage 2") else None
        try:
            return train_adapter(model, *args, desc=desc, **kwargs)
        finally:
            if handle is not None:
                handle.remove()

    train_adapter = stages.train_adapter
    monkeypatch.setattr(stages, "train_adapter", poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"stage 2 train: training diverged at optimiser step 1 of 2: the loss "
                                               r"is nan.*Lower train.lr \(now 0.0001\)"):
        run(small_config(tiny_folder, "init.method=slice"), out)
    assert (out / "stages" / "01" / "scores.json").is_file() and not (out / "stages" / "02" / "train.json").exists()
    assert not (out / "stages" / "02" / "scores.json").exists()
    monkeypatch.undo()
    run(small_config(tiny_folder, "init.method=slice"), out, resume=True)
    assert_same_run(reference_run, out)


def test_resume_may_change_eval_batch_size_and_general_settings(tiny_folder, tmp_path):
    """Settings that cannot change finished work may change on resume; newly enabled GP/IP are computed (the base
    model's too), and the folder's config.json records the new settings. Eval settings that change scores may not."""
    one = ["init.method=vanilla", "sequence=[363]"]
    out = run(small_config(tiny_folder, *one), tmp_path / "run")
    before = read_run(out).R
    general = ["general.enabled=true", "general.limit=2", "general.shots=1", "general.max_length=256",
               "general.benchmarks=commonsenseqa", "eval.batch_size=2"]
    run(small_config(tiny_folder, *one, *general), out, resume=True)
    np.testing.assert_array_equal(read_run(out).R, before)
    scores = json.loads((out / "general.json").read_text())
    assert set(scores) == {"base", "final"} and set(scores["base"]) == {"GP", "IP"}
    saved = json.loads((out / "config.json").read_text())
    assert saved["general"]["enabled"] and saved["eval"]["batch_size"] == 2
    with pytest.raises(RunStateError, match=r"differs in eval.examples: 3 -> 4\. "):
        run(small_config(tiny_folder, *one, *general, "eval.examples=4"), out, resume=True)


def test_no_warnings_users_cannot_act_on(tiny_folder, tmp_path):
    """peft's read of transformers' deprecated is_gradient_checkpointing is hidden; other warnings still show."""
    import warnings

    from slicelora.models import peft_wrapping

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = run(small_config(tiny_folder, "init.method=vanilla", "sequence=[363, 1687]"), tmp_path / "run")
        run(small_config(tiny_folder, "init.method=vanilla", "sequence=[363, 1687]"), out, resume=True)  # rebuilds
        with peft_wrapping():
            warnings.warn("a real one", FutureWarning)
    assert [str(w.message) for w in caught] == ["a real one"]


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="Did you mean train.lr"):
        load_config(None, ["train.lrr=1e-4"])
    with pytest.raises(ConfigError, match="choose one of vanilla"):
        load_config(None, ["init.method=dora"])
    with pytest.raises(ConfigError, match="not a valid int"):
        load_config(None, ["adapter.rank=big"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epoch: 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'train.epoch'.*train.epochs"):
        load_config(bad)
    good = tmp_path / "good.yaml"
    good.write_text("init:\n  method: lora_ga\ntrain:\n  lr: 0.0003\n")
    config = load_config(good, ["train.epochs=2"])
    assert (config.init.method, config.train.lr, config.train.epochs) == ("lora_ga", 3e-4, 2)


def test_a_metric_that_cannot_load_stops_the_run_before_training(tiny_folder, tmp_path, monkeypatch):
    """A German generation task scored natively needs GPT-2's tokenizer (the xlingual ROUGE-L): without it the run
    stops before anything is trained or written."""
    from transformers import AutoTokenizer

    from slicelora.eval import scoring

    task = tmp_path / "data" / "task900_german_echo.json"
    task.parent.mkdir()
    task.write_text(json.dumps({"Definition": "Echo.", "Output_language": ["German"],
                                "Instances": [{"input": f"Wort {i}", "output": [f"Wort {i}"]} for i in range(20)]}))

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", offline)
    scoring._xlingual_rouge.cache_clear()
    config = small_config(tiny_folder, "sequence=[900]", f"data_dirs=[{task.parent}]", "eval.scoring=native")
    try:
        with pytest.raises(ConfigError, match="official_rouge_l_xlingual"):
            run(config, tmp_path / "run")
    finally:
        scoring._xlingual_rouge.cache_clear()
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_multitask_reference_learns_every_task_in_one_stage(tiny_folder, tmp_path):
    from slicelora.report.plots import write_report

    out = run(small_config(tiny_folder, "init.method=lora_ga", "train.multitask=true"), tmp_path / "joint")
    result = read_run(out)
    assert result.multitask and result.complete and result.R.shape == (1, 3) and np.isfinite(result.R).all()
    assert sorted(p.name for p in (out / "stages").iterdir()) == ["01"]
    train = json.loads((out / "stages" / "01" / "train.json").read_text())
    assert train["examples"] == 3 * 12  # train.max_examples per task, all three tasks
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["FP"] == pytest.approx(result.R[0].mean()) and "AP" not in metrics
    assert metrics["loss_final"] == pytest.approx(result.R_loss[0].mean())
    assert write_report([out], tmp_path / "report")


def test_loss_matrix_equals_a_direct_answer_nll(tiny_folder, tmp_path):
    """R_loss[t, j] is the mean over task j's scored examples of the answer tokens' mean NLL on the model merged
    after stage t, computed here one example at a time with cross_entropy."""
    from slicelora.data.prompts import IGNORE_INDEX, encode_example
    from slicelora.data.sequences import load_sequence
    from slicelora.data.tasks import load_task

    config = small_config(tiny_folder, "init.method=vanilla", "sequence=[363, 591]")
    tokenizer = tiny_tokenizer()
    direct = {}

    def measure(t, model):
        tasks = [load_task(ref, seed=config.seed) for ref in load_sequence(config.sequence).tasks]
        for j, task in enumerate(tasks[:t]):
            nlls = []
            for example in task.heldout[:config.eval.examples]:
                enc = encode_example(tokenizer, example, config.train.max_length, loss_on="answer")
                ids, labels = torch.tensor([enc.input_ids]), torch.tensor([enc.labels])
                with torch.no_grad():
                    logits = model(input_ids=ids).logits.float()
                nlls.append(torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:],
                                                              ignore_index=IGNORE_INDEX).item())
            direct[t - 1, j] = sum(nlls) / len(nlls)

    out = run(config, tmp_path / "run", on_stage=measure)
    R_loss = read_run(out).R_loss
    assert R_loss.shape == (2, 2) and np.isnan(R_loss[0, 1])
    for (i, j), value in direct.items():
        assert R_loss[i, j] == pytest.approx(value, rel=1e-4)
