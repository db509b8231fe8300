"""Experiment tracking: TensorBoard logs (and Weights & Biases, when installed and asked for) of every stage a
process finishes, written from the stage's own files, which stay the source of truth.

Per optimisation step: the training loss (and a continual-learning method's loss term), on one step axis across
stages. Per stage: every seen task's score and answer NLL, the CL metrics so far, the init's diagnostics (the
surgery's cosine and decision) and the step times. A resumed run logs the stages it finishes itself.
"""

from __future__ import annotations

import json
from pathlib import Path

from .config import RunConfig
from .runfolder import INIT_FILE, METRICS_FILE, SCORES_FILE, TIMING_FILE, TRAIN_FILE, stage_dir


class Tracker:
    """Writes each finished stage to the trackers the config turns on (none, or not `enabled`, e.g. on every process
    but the main one: every call does nothing). Whether they are installed is checked with the settings."""

    def __init__(self, run_dir: Path, config: RunConfig, enabled: bool = True) -> None:
        self.run_dir, self.tensorboard, self.wandb = run_dir, None, None
        if enabled and config.track.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        if enabled and config.track.wandb:
            import wandb

            self.wandb = wandb.init(project=config.track.wandb_project, name=run_dir.name, dir=str(run_dir),
                                    config=config.to_dict(), reinit="create_new")
            self.wandb.define_metric("stage")
            for prefix in ("score", "answer_nll", "metrics", "init", "seconds"):
                self.wandb.define_metric(f"{prefix}/*", step_metric="stage")

    def log_stage(self, stage: int) -> None:
        if self.tensorboard is None and self.wandb is None:
            return
        folder = stage_dir(self.run_dir, stage)
        train = _read(folder / TRAIN_FILE)
        first = sum(_read(stage_dir(self.run_dir, t) / TRAIN_FILE).get("steps", 0) for t in range(1, stage)) + 1
        per_step = {"train/loss": train.get("losses", []), "train/penalty": train.get("penalties", [])}
        scores, init = _read(folder / SCORES_FILE), _read(folder / INIT_FILE)
        surgery = init.get("surgery") or {}
        per_stage = {
            **{f"score/{task}": v for task, v in scores.get("scores", {}).items()},
            **{f"answer_nll/{task}": v for task, v in scores.get("losses", {}).items()},
            **{f"metrics/{k}": v for k, v in _read(self.run_dir / METRICS_FILE).items() if _number(v)},
            **({"init/cosine": surgery["cosine"], "init/fired": float(surgery["fired"])} if surgery else {}),
            **{f"seconds/{k}": v for k, v in _read(folder / TIMING_FILE).items() if _number(v)},
        }
        for name, values in per_step.items():
            for i, value in enumerate(values):
                if self.tensorboard is not None:
                    self.tensorboard.add_scalar(name, value, first + i)
                if self.wandb is not None:
                    self.wandb.log({name: value}, step=first + i)
        if self.tensorboard is not None:
            for name, value in per_stage.items():
                self.tensorboard.add_scalar(name, value, stage)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log({"stage": stage, **per_stage}, step=first + len(per_step["train/loss"]) - 1)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
