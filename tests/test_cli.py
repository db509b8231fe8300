"""The `slicelora` command on what users type: bad settings and folders refused before any work with exit code 2 and
a message naming the setting, divergence and Ctrl-C reported in one line, never a traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import SMALL
from slicelora import cli
from slicelora.loop.config import load_config
from slicelora.loop.runfolder import read_run
from slicelora.loop.stages import run

VANILLA = [*SMALL, "init.method=vanilla"]  # the small run with the cheapest init


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def invoke(*args: str):
    """Run the command in-process; returns (exit code, output with whitespace runs joined)."""
    result = CliRunner().invoke(cli.app, list(args))
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, " ".join(result.output.split())


def small_run(model: Path, out: Path, *extra: str) -> tuple[int, str]:
    return invoke("run", "-o", str(out), "--model", str(model), *sets(*VANILLA, *extra))


# --- settings ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, expected", [
    ("train.lr=nan", "train.lr=nan is not allowed: train.lr must be a finite number > 0"),
    ("train.lr=-1e-4", "train.lr=-0.0001 is not allowed"),
    ("train.lr=.inf", "train.lr=inf is not allowed"),
    ("train.lr=true", "train.lr=True is not a valid float"),
    ("adapter.rank=2.5", "adapter.rank=2.5 is not a valid int"),
    ("adapter.dropout=1", "adapter.dropout must be a number in [0, 1)"),
    ("adapter.alpha=0", "adapter.alpha must be a finite number > 0"),
    ("adapter.targets=[]", "adapter.targets must be a non-empty list"),
    ("adapter.targets=", "adapter.targets is empty; give it a value"),
    ("init.replay_buffer=0", "init.replay_buffer=0 is not allowed"),
    ("init.gate=1.5", "init.gate must be a cosine threshold in [-1, 1]"),
    ("train.weight_decay=-0.1", "train.weight_decay must be a finite number >= 0"),
    ("train.max_grad_norm=-1", "train.max_grad_norm must be a finite number >= 0"),
    ("train.replay_examples=-1", "train.replay_examples must be an integer >= 0"),
    ("train.max_examples=0", "train.max_examples must be null (no cap) or an integer >= 1"),
    ("eval.batch_size=0", "eval.batch_size=0 is not allowed"),
    ("eval.max_new_tokens=0", "eval.max_new_tokens=0 is not allowed"),
    ("eval.heldout_size=0", "eval.heldout_size=0 is not allowed"),
    ("general.limit=0", "general.limit=0 is not allowed"),
    ("general.shots=26", "general.shots must be an integer in [0, 25]"),
    ("general.batch_size=0", "general.batch_size=0 is not allowed"),
    ("general.max_length=2", "general.max_length=2 is not allowed"),
    ("general.benchmarks=hellaswag,mmlu", "general.benchmarks must be a non-empty list of distinct names from"),
    ("general.benchmarks=alpaca,alpaca", "general.benchmarks=alpaca,alpaca is not allowed"),
    ("general.backend=vllm", "general.backend='vllm'; choose one of native, lm_eval"),
    ("sequence=''", "sequence must be a sequence name or a YAML file"),
    ("train.multitask=true train.replay_examples=4", "the one joint stage has no past tasks to replay"),
])
def test_bad_settings_are_refused_before_anything_is_written(tiny_folder, tmp_path, override, expected):
    code, out = small_run(tiny_folder, tmp_path / "run", *override.split(" "))
    assert code == 2 and expected in out, out
    assert "Traceback" not in out and not (tmp_path / "run").exists()


def test_settings_checked_against_the_model_before_any_work(tiny_folder, tmp_path):
    code, out = small_run(tiny_folder, tmp_path / "a", "adapter.targets=q_proj,qkv")
    assert code == 2 and "adapter.targets: qkv name(s) no module of model" in out and "down_proj" in out, out
    code, out = small_run(tiny_folder, tmp_path / "b", "adapter.rank=40")
    assert code == 2 and "adapter.rank=40 is too large" in out and "must be <= 24" in out, out  # k_proj: 24 x 48
    code, out = small_run(tiny_folder, tmp_path / "c", "init.method=lora_ga", "init.lora_ga_variant=peft",
                          "adapter.rank=16")
    assert code == 2 and "must be <= 12" in out, out
    assert not any((tmp_path / name).exists() for name in "abc")


def test_bad_data_leaves_no_run_folder_behind(tiny_folder, tmp_path):
    code, out = small_run(tiny_folder, tmp_path / "run", "sequence=[363, task999999_nowhere]")
    assert code == 2 and "task999999_nowhere" in out, out
    assert not (tmp_path / "run").exists()
    code, out = small_run(tiny_folder, tmp_path / "run", "sequence=[363]")  # the same folder now takes a run
    assert code == 0, out


def test_error_text_in_brackets_is_kept(tmp_path):
    code, out = invoke("run", "-o", str(tmp_path / "run"), "--set", "train.lr[x]=1")
    assert code == 2 and "unknown config key 'train.lr[x]'" in out, out


# --- folders -----------------------------------------------------------------------------------------------------

def test_output_that_is_a_file_is_refused(tiny_folder, tmp_path):
    (tmp_path / "file").write_text("mine")
    for args in (["run"], ["compare", "--methods", "vanilla"]):
        for target in (tmp_path / "file", tmp_path / "file" / "run"):
            code, out = invoke(*args, "-o", str(target), "--model", str(tiny_folder), *sets(*VANILLA))
            assert code == 2 and f"{tmp_path / 'file'} is a file, not a folder" in out, out
    assert (tmp_path / "file").read_text() == "mine"


def test_compare_refuses_a_run_folder_and_duplicate_methods(tiny_folder, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    model = ["--model", str(tiny_folder), *sets(*VANILLA)]
    code, out = invoke("compare", "--methods", "vanilla", "-o", str(tmp_path / "run"), *model)
    assert code == 2 and "is a run folder (it has config.json)" in out, out
    code, out = invoke("compare", "--methods", "vanilla,slice,vanilla", "-o", str(tmp_path / "new"), *model)
    assert code == 2 and "names vanilla more than once; list each method once" in out, out
    assert not (tmp_path / "new").exists()


def test_refused_resume_lists_the_changed_settings(tiny_folder, tmp_path):
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    saved = load_config(None, [f"model={tiny_folder}", *VANILLA])
    (out_dir / "config.json").write_text(json.dumps(saved.to_dict()))
    code, out = small_run(tiny_folder, out_dir, "train.lr=2e-4", "eval.examples=4", "eval.batch_size=2")
    assert code == 2 and "differs in eval.examples: 3 -> 4; train.lr: 0.0001 -> 0.0002." in out, out
    assert "eval.batch_size: 16 -> 2" not in out  # may change on resume


def test_tasks_with_a_missing_data_dir(tmp_path):
    code, out = invoke("tasks", "--data-dir", str(tmp_path / "missing"))
    assert code == 2 and f"{tmp_path / 'missing'} do not exist" in out, out
    code, out = invoke("tasks", "--data-dir", str(tmp_path), "--data-only")  # an empty folder and nothing else
    assert code == 2 and "no tasks found" in out, out


# --- training and interruption -----------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, expected", [
    # no warmup: the first step blows the adapter up, the second step's loss is NaN
    (["train.warmup_ratio=0"], "stage 1 train: training diverged at optimiser step 2 of 2: the loss is nan"),
    # the warmup step has lr 0, the last step blows the adapter up: the stage's evaluation shows it
    ([], "stage 1: training diverged: the model it left gives non-finite losses on the held-out examples of task363"),
])
def test_divergence_stops_the_run_with_exit_code_2(tiny_folder, tmp_path, extra, expected):
    code, out = small_run(tiny_folder, tmp_path / "run", "train.lr=1e30", *extra)
    assert code == 2 and expected in out and "Lower train.lr (now 1e+30)" in out and "Traceback" not in out, out
    assert not (tmp_path / "run" / "stages" / "01" / "scores.json").exists()
    assert (tmp_path / "run" / "stages" / "01" / "train.json").exists() == (not extra)


@pytest.mark.parametrize("command", [["run"], ["compare", "--methods", "vanilla"], ["study", "s.yaml"]])
def test_ctrl_c_exits_130_with_the_resume_command(monkeypatch, tmp_path, command):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("slicelora.loop.config.load_config", interrupt)
    monkeypatch.setattr("slicelora.study.load_study", interrupt)
    args = [*command, "-o", str(tmp_path / "out")]
    monkeypatch.setattr(sys, "argv", ["slicelora", *args])
    code, out = invoke(*args)
    assert code == 130 and out == f"interrupted; resume with: slicelora {' '.join(args)} --resume", out


@pytest.mark.slow
def test_sigint_then_resume_gives_the_uninterrupted_results(tiny_folder, tmp_path):
    settings = [*VANILLA, "train.epochs=40"]  # stages of a second or more: the signal lands inside the run
    reference = run(load_config(None, [f"model={tiny_folder}", *settings]), tmp_path / "reference")
    out_dir = tmp_path / "run"
    command = [sys.executable, "-m", "slicelora.cli", "run", "-o", str(out_dir), "--model", str(tiny_folder),
               *sets(*settings)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # a shell's background job inherits SIGINT ignored, and Python then keeps it ignored: give the child the default
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (out_dir / "stages" / "01" / "scores.json").exists() and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    hint = stdout.strip().splitlines()[-1]
    assert hint.startswith("interrupted; resume with: slicelora run -o") and hint.endswith(" --resume"), stdout
    assert "Traceback" not in stderr and not (out_dir / "stages" / "03" / "scores.json").exists()
    resumed = subprocess.run([sys.executable, "-m", "slicelora.cli", *hint.split(": ", 1)[1].split()[1:]], env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    np.testing.assert_array_equal(read_run(reference).R, read_run(out_dir).R)
    for t in (1, 2, 3):
        for name in ("generations.jsonl", "adapter/adapter_model.safetensors"):
            path = Path("stages") / f"{t:02d}" / name
            assert (reference / path).read_bytes() == (out_dir / path).read_bytes(), path


@pytest.mark.parametrize("command", [["run", "--method", "slice"], ["compare", "--methods", "vanilla,slice"]])
def test_plan_prints_the_work_and_the_settings_that_differ_and_writes_nothing(tiny_folder, tmp_path, command):
    out = tmp_path / "out"
    code, output = invoke(*command, "--plan", "-o", str(out), *sets(f"model={tiny_folder}", "adapter.rank=4",
                                                                   "train.max_examples=8", "general.enabled=false"))
    assert code == 0, output
    assert "training batches: " in output and "compute: " in output
    assert "adapter.rank=4 (paper: 64)" in output and "general.enabled=False (paper: True)" in output
    assert not out.exists()


def test_a_long_cpu_run_gets_a_note_with_the_work_ahead(monkeypatch):
    import io

    from rich.console import Console

    monkeypatch.setattr(cli, "console", Console(file=io.StringIO(), width=300))
    config = load_config(None, ["sequence=demo"])  # the paper's settings: 1000 examples x 3 epochs per task
    assert cli._plan_or_warn({"slice": config}, plan=False) is False
    assert "can take hours on a CPU. `--plan` estimates the time" in cli.console.file.getvalue()


@pytest.mark.parametrize("settings, expected", [
    (["init.method=lora_ga", "init.strength=0.5"], "init.strength is read only with init.method=slice"),
    (["init.method=vanilla", "init.selection=top_r"], "init.selection is read only with init.method=lora_ga or "
                                                      "init.method=slice"),
    (["cl.method=olora", "cl.inflora_rank=8"], "cl.inflora_rank is read only with cl.method=inflora"),
    (["init.method=slice", "init.gamma=8"], "init.gamma is read only with init.method=lora_ga"),
])
def test_a_setting_for_a_method_that_is_not_selected_is_refused(tmp_path, settings, expected):
    code, output = invoke("run", "-o", str(tmp_path / "out"), *sets(*settings))
    assert code == 2 and expected in output, output
    assert not (tmp_path / "out").exists()
    load_config(None, settings)  # comparisons and studies share settings across methods: no refusal there
