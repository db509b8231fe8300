"""Work shared between runs (the cells of a study): finished stages and general-ability scores, found by key.

A stage's key is a hash of everything its results depend on: the key of the model it starts from (the base model's
weights, or the previous stage's key), the adapter's initial factors (the init's whole effect on the stage: the
absorbed base weight is W - s B0 A0; for OSF, each layer's preserved rank), every run setting outside `init.*`,
`osf.*` and `adapter.type` (stages.stage_settings), the tasks seen so far (their data), and the stage number. Two
runs that reach the same key would train and score bitwise the same, so the second one copies the first one's trained adapter, loss curve, generations and scores instead of computing them. Keys are computed from
tensors and data, not from method names: SLICE's first stage (no replay yet) finds LoRA-GA's, and a SLICE stage whose
gate did not fire finds the same stage of another gate or strength.

The gradient passes are shared one level lower, through the init library's gradient cache (a folder of files keyed
by the model's weights and the batches), so SLICE variants that differ only in c, tau or surgery mode compute their
gradients once.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..data.tasks import Task
from ..io import write_json
from .runfolder import SCORES_FILE


def _hash(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """A hash of named tensors' exact bytes (names sorted)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def task_digest(task: Task) -> str:
    """A hash of a task's examples (train and held-out) and scorers."""
    examples = [[asdict(ex) for ex in task.train], [asdict(ex) for ex in task.heldout]]
    return _hash(task.name, task.metric, task.native_metric, examples)


def model_key(model_ref: str, model: torch.nn.Module) -> str:
    """The key of a freshly loaded base model: its reference and a digest of every parameter's bytes."""
    return _hash("model", __version__, model_ref, tensor_digest(dict(model.state_dict())))


def stage_key(previous: str, settings: dict[str, Any], seen: list[Task], stage: int,
              factors: dict[str, torch.Tensor], absorbing: bool) -> str:
    """The key of stage `stage` (1-based) after which `seen` are the tasks learned: see the module docstring.
    `settings` is the run config without `init`, `osf`, `general` and `sequence` (the start acts only through
    `factors`; the tasks stand for the sequence)."""
    return _hash("stage", __version__, previous, settings, [task_digest(t) for t in seen], stage,
                 tensor_digest(factors), absorbing)


def general_key(previous: str, settings: dict[str, Any]) -> str:
    """The key of general-ability scores of the model with key `previous` under the `general` settings."""
    return _hash("general", __version__, previous, settings)


@dataclass
class SharedWork:
    """Where shared results are found: `root/stages/<key>.json` points at a finished stage folder,
    `root/general/<key>.json` holds GP/IP scores, `gradients` is the init's gradient cache folder."""

    root: Path
    gradients: Path

    def find_stage(self, key: str) -> Path | None:
        """A finished stage folder with this key, or None."""
        pointer = self.root / "stages" / f"{key}.json"
        if not pointer.is_file():
            return None
        folder = self.root.parent / json.loads(pointer.read_text())["folder"]
        return folder if (folder / SCORES_FILE).is_file() else None

    def publish_stage(self, key: str, folder: Path) -> None:
        write_json(self.root / "stages" / f"{key}.json",
                   {"folder": str(Path(folder).resolve().relative_to(self.root.parent.resolve()))})

    def find_general(self, key: str) -> dict | None:
        path = self.root / "general" / f"{key}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def publish_general(self, key: str, scores: dict) -> None:
        write_json(self.root / "general" / f"{key}.json", scores)

    def gradient_cache(self) -> str:
        self.gradients.mkdir(parents=True, exist_ok=True)
        return str(self.gradients)


def copy_tree(source: Path, target: Path) -> None:
    """Copy a folder so that `target` appears whole or not at all."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
