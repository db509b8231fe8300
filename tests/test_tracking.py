"""Experiment tracking: TensorBoard logs of a run hold its loss curve and per-stage scores, equal to the run
folder's files; a tracker that is not installed is refused before anything runs."""

from __future__ import annotations

import importlib.util
import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import small_config
from slicelora.errors import ConfigError
from slicelora.loop.stages import run


def test_tensorboard_logs_equal_the_run_folder(tiny_folder, tmp_path):
    out = run(small_config(tiny_folder, "init.method=slice", "cl.method=olora", "track.tensorboard=true"),
              tmp_path / "run")
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    trains = [json.loads((out / "stages" / f"0{t}" / "train.json").read_text()) for t in (1, 2, 3)]
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 1 + sum(t["steps"] for t in trains)))
    assert [e.value for e in loss] == pytest.approx([v for t in trains for v in t["losses"]], rel=1e-6)
    assert len(events.Scalars("train/penalty")) == trains[1]["steps"] + trains[2]["steps"]  # O-LoRA from stage 2
    tasks = json.loads((out / "tasks.json").read_text())
    final = json.loads((out / "stages" / "03" / "scores.json").read_text())["scores"]
    first = events.Scalars(f"score/{tasks[0]}")
    assert [e.step for e in first] == [1, 2, 3] and first[-1].value == pytest.approx(final[tasks[0]])
    assert [e.step for e in events.Scalars("init/cosine")] == [2, 3]
    metrics = json.loads((out / "metrics.json").read_text())
    assert events.Scalars("metrics/AP")[-1].value == pytest.approx(metrics["AP"])


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_a_tracker_that_is_not_installed_is_refused(tiny_folder):
    with pytest.raises(ConfigError, match="track.wandb=true needs the wandb package: pip install wandb"):
        small_config(tiny_folder, "track.wandb=true")
