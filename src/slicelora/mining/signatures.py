"""Task gradient signatures on the base model, their cache, and `mine`: from tasks to ranked sequences.

A task's signature is the mean full-weight gradient of the target layers over its first `batches` batches (seeded
shuffle), flattened over all layers. In "sketch" mode each batch's per-layer gradient is CountSketched to k numbers
as it arrives (the same seeded hash for every task) and the per-layer sketches are summed; in "exact" mode (small
models) the per-layer gradients are kept, which gives exact cosines and, sketched afterwards, the sketch's error.

Signatures are cached as safetensors files under `cache_dir() / "signatures"`, one per task, named by a hash of
everything they depend on: the model (config and a fingerprint of every weight), the task's token batches (so the
data, tokenizer, chat template, loss mode, length, batch size and seed are all covered) and the settings. Any change
gives a new key, so a stale file is never read; files of other keys stay for when their settings come back.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import io
from ..data.prompts import LossOn, make_batches
from ..data.tasks import Task
from ..errors import ConfigError, DataError
from ..init.gradients import accumulate_gradients
from ..models import LLAMA_TARGETS, cache_dir
from .search import DEFAULT_BEAM_WIDTH, EXHAUSTIVE_LIMIT, Method, check_search, pairwise_cosine, rank_subsets
from .sketch import CountSketch, sketch_error

CACHE_VERSION = 1  # bump when the content or meaning of a cached signature changes
FINGERPRINT_SAMPLES = 64  # strided weight values hashed per parameter, besides its sums
Mode = Literal["sketch", "exact"]


@dataclass(frozen=True)
class SignatureSettings:
    """How signatures are computed (paper: 4 batches of 4, max length 256, seed 42, k = 200,000)."""

    batches: int = 4
    batch_size: int = 4
    max_length: int = 256
    seed: int = 42
    loss_on: LossOn = "full"
    k: int = 200_000
    mode: Mode = "sketch"
    sketch_seed: int = 0
    targets: tuple[str, ...] = LLAMA_TARGETS

    def __post_init__(self) -> None:
        for name in ("batches", "batch_size", "k"):
            if getattr(self, name) < 1:
                raise ConfigError(f"signature setting {name}: {getattr(self, name)} must be at least 1.")
        if self.max_length < 2:
            raise ConfigError(f"signature setting max_length: {self.max_length} must be at least 2.")
        if self.loss_on not in ("full", "answer"):
            raise ConfigError(f"signature setting loss_on: {self.loss_on!r} is not one of 'full', 'answer'.")
        if self.mode not in ("sketch", "exact"):
            raise ConfigError(f"signature setting mode: {self.mode!r} is not one of 'sketch', 'exact'.")
        if not self.targets:
            raise ConfigError("signature setting targets: give at least one target layer name.")
        object.__setattr__(self, "targets", tuple(self.targets))

    def cache_fields(self) -> dict:
        """The settings a cached signature depends on (an exact signature does not depend on the sketch)."""
        fields = asdict(self)
        if self.mode == "exact":
            del fields["k"], fields["sketch_seed"]
        return fields


@dataclass
class MiningResult:
    """Cosines among the pool's tasks and the ranked subsets; subsets list task names sorted by name."""

    names: list[str]
    cosine: np.ndarray
    size: int
    method: str
    settings: SignatureSettings
    lowest: list[tuple[tuple[str, ...], float]]
    highest: list[tuple[tuple[str, ...], float]]
    sketch_error: dict | None = None  # exact mode: the k-sketch's cosine error against the exact cosines
    reused: list[str] = field(default_factory=list)  # tasks whose signatures came from the cache


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of the model's config and weights (per parameter: shape, dtype, sum, norm and strided samples)."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        settings = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
        digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, param in model.named_parameters():
            flat = param.detach().reshape(-1)
            step = max(1, flat.numel() // FINGERPRINT_SAMPLES)
            values = [
                flat.sum(dtype=torch.float64).item(),
                torch.linalg.vector_norm(flat, dtype=torch.float64).item(),
                *flat[::step][:FINGERPRINT_SAMPLES].double().tolist(),
            ]
            digest.update(f"{name}|{tuple(param.shape)}|{param.dtype}|{values}".encode())
    return digest.hexdigest()


def signature_batches(tokenizer, task: Task, settings: SignatureSettings) -> list[dict[str, torch.Tensor]]:
    """The task's first `batches` training batches of `batch_size` (seeded shuffle, as for training)."""
    _check_examples(task, settings)
    return make_batches(
        task.train, tokenizer, settings.batch_size, settings.max_length, settings.loss_on, settings.seed,
        settings.batches,
    )


def signature_key(fingerprint: str, task_name: str, batches: list[dict[str, torch.Tensor]],
                  settings: SignatureSettings) -> str:
    """The cache key: a hash of the model fingerprint, the task's token batches and the settings."""
    digest = hashlib.sha256()
    header = {"version": CACHE_VERSION, "model": fingerprint, "task": task_name, "settings": settings.cache_fields()}
    digest.update(json.dumps(header, sort_keys=True).encode())
    for batch in batches:
        for name in sorted(batch):
            digest.update(name.encode())
            digest.update(batch[name].to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def signature_path(folder: Path, task_name: str, key: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", task_name)
    return folder / f"{slug}-{key[:24]}.safetensors"


def task_signature(model: torch.nn.Module, tokenizer, task: Task, settings: SignatureSettings = SignatureSettings(),
                   *, cache: Path | None = None) -> torch.Tensor:
    """The task's signature (float32, CPU): k numbers in "sketch" mode, every target weight's gradient in "exact"
    mode (layers in name order). Read from the cache folder `cache` (default: cache_dir() / "signatures") when its
    key matches, else computed and written there."""
    tensors, _ = _cached_gradients(model, tokenizer, task, settings, _folder(cache), model_fingerprint(model))
    return _signature(tensors, settings)


def mine(
    model: torch.nn.Module,
    tokenizer,
    tasks: list[Task],
    settings: SignatureSettings = SignatureSettings(),
    size: int = 5,
    top: int = 10,
    *,
    method: Method = "exhaustive",
    limit: int = EXHAUSTIVE_LIMIT,
    beam_width: int = DEFAULT_BEAM_WIDTH,
    cache: Path | None = None,
) -> MiningResult:
    """Signatures of every task on `model` (the base model), their cosines, and the `top` most opposed and
    most aligned subsets of `size` tasks. Inputs are checked before any gradient is computed."""
    names = [task.name for task in tasks]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise DataError(f"the task pool lists {', '.join(duplicates)} more than once; give each task once.")
    check_search(len(tasks), size, top, method, limit, beam_width)
    for task in tasks:
        _check_examples(task, settings)
    folder = _folder(cache)
    fingerprint = model_fingerprint(model)
    signatures, sketches, reused = {}, {}, []
    for task in tasks:
        tensors, from_cache = _cached_gradients(model, tokenizer, task, settings, folder, fingerprint)
        signatures[task.name] = _signature(tensors, settings)
        if settings.mode == "exact":
            sketches[task.name] = CountSketch(settings.k, settings.sketch_seed).sketch_layers(tensors)
        if from_cache:
            reused.append(task.name)
    names, cosine = pairwise_cosine(signatures)
    error = sketch_error(names, cosine, pairwise_cosine(sketches)[1], settings.k) if sketches else None

    def ranked(lowest: bool) -> list[tuple[tuple[str, ...], float]]:
        found = rank_subsets(cosine, size, top, lowest=lowest, method=method, limit=limit, beam_width=beam_width)
        return [(tuple(names[i] for i in subset), score) for subset, score in found]

    return MiningResult(names, cosine, size, method, settings, ranked(True), ranked(False), error, reused)


def write_mining_outputs(result: MiningResult, out_dir: str | Path) -> dict[str, Path]:
    """Write cosine.csv, cosine.png (heatmap), sequences.md, sequences.json and sequences.yaml (the sequence-file
    schema, `sequences: {mined-low-1: [tasks], ..., mined-high-1: [...]}`) atomically; return them by kind."""
    out = Path(out_dir)
    sequences = [(f"mined-low-{i}", "lowest", tasks, score) for i, (tasks, score) in enumerate(result.lowest, 1)]
    sequences += [(f"mined-high-{i}", "highest", tasks, score) for i, (tasks, score) in enumerate(result.highest, 1)]
    paths = {kind: out / name for kind, name in (
        ("csv", "cosine.csv"), ("png", "cosine.png"), ("markdown", "sequences.md"), ("json", "sequences.json"),
        ("yaml", "sequences.yaml"),
    )}
    rows = [",".join(["task", *result.names])]
    rows += [",".join([name, *(f"{v:.6f}" for v in row)]) for name, row in zip(result.names, result.cosine)]
    io.write_text(paths["csv"], "\n".join(rows) + "\n")
    _write_heatmap(result, paths["png"])
    io.write_text(paths["markdown"], _markdown(result, sequences))
    io.write_json(paths["json"], {
        "size": result.size,
        "method": result.method,
        "settings": asdict(result.settings),
        "tasks": result.names,
        "sequences": [
            {"name": name, "kind": kind, "tasks": list(tasks), "mean_cosine": score}
            for name, kind, tasks, score in sequences
        ],
        "sketch_error": result.sketch_error,
        "reused_from_cache": result.reused,
    })
    io.write_text(paths["yaml"], yaml.safe_dump(
        {"sequences": {name: list(tasks) for name, _, tasks, _ in sequences}}, sort_keys=False, width=1000,
    ))
    return paths


def _folder(cache: Path | None) -> Path:
    return Path(cache) if cache is not None else cache_dir() / "signatures"


def _check_examples(task: Task, settings: SignatureSettings) -> None:
    needed = settings.batches * settings.batch_size
    if len(task.train) < needed:
        raise DataError(
            f"task {task.name!r} ({task.path}) has {len(task.train)} training examples, but its gradient signature "
            f"needs batches x batch_size = {settings.batches} x {settings.batch_size} = {needed}: "
            "lower the batches or batch size, or leave the task out of the pool."
        )


def _cached_gradients(model: torch.nn.Module, tokenizer, task: Task, settings: SignatureSettings, folder: Path,
                      fingerprint: str) -> tuple[dict[str, torch.Tensor], bool]:
    """What is cached for the task ({"signature": k-vector} or per-layer gradients) and whether it was reused."""
    batches = signature_batches(tokenizer, task, settings)
    key = signature_key(fingerprint, task.name, batches, settings)
    path = signature_path(folder, task.name, key)
    if path.is_file():
        try:
            return load_file(path), True
        except (OSError, SafetensorError):
            pass  # unreadable (e.g. a truncated copy): compute it again and replace it
    sketch = CountSketch(settings.k, settings.sketch_seed) if settings.mode == "sketch" else None
    grads = accumulate_gradients(
        model, batches, targets=settings.targets, transform=sketch.sketch_layer if sketch else None,
        desc=f"signature {task.name}",
    )
    if sketch:
        parts = iter(grads.values())
        total = next(parts).clone()
        for part in parts:
            total += part
        grads = {"signature": total}
    tensors = {name: t.detach().float().cpu().contiguous() for name, t in grads.items()}
    metadata = {"key": key, "task": task.name, "settings": json.dumps(asdict(settings))}
    io.write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return tensors, False


def _signature(tensors: dict[str, torch.Tensor], settings: SignatureSettings) -> torch.Tensor:
    if settings.mode == "sketch":
        return tensors["signature"]
    return torch.cat([tensors[name].reshape(-1) for name in sorted(tensors)])


def _short(name: str) -> str:
    match = re.match(r"(task\d+)_", name)
    return match.group(1) if match else name[:20]


def _write_heatmap(result: MiningResult, path: Path) -> None:
    n = len(result.names)
    side = min(4 + 0.28 * n, 24)
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(result.cosine, cmap="RdBu_r", vmin=-1, vmax=1)
    labels = [_short(name) for name in result.names]
    ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    ax.set_title(f"Task gradient cosines ({result.settings.mode}, loss on {result.settings.loss_on})")
    fig.colorbar(image, ax=ax, shrink=0.8, label="cosine")
    io.write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def _markdown(result: MiningResult, sequences: list[tuple[str, str, tuple[str, ...], float]]) -> str:
    s = result.settings
    lines = [
        f"# Mined sequences: {result.size} of {len(result.names)} tasks",
        "",
        f"Signatures: {s.mode} (k = {s.k}), {s.batches} batches of {s.batch_size}, max length {s.max_length}, "
        f"seed {s.seed}, loss on {s.loss_on}. Search: {result.method}. Tasks in a sequence are ordered by name.",
    ]
    if result.sketch_error:
        e = result.sketch_error
        lines += ["", f"Sketch error against exact cosines over {e['pairs']} pairs: max {e['max_abs_error']:.4f}, "
                      f"RMS {e['rms_error']:.4f} (1/sqrt(k) = {e['scale']:.4f})."]
    for kind, title in (("lowest", "Most opposed (lowest mean pairwise cosine)"),
                        ("highest", "Most aligned (highest mean pairwise cosine; controls)")):
        lines += ["", f"## {title}", "", "| name | mean cosine | tasks |", "|---|---:|---|"]
        lines += [f"| {name} | {score:+.4f} | {', '.join(tasks)} |"
                  for name, of_kind, tasks, score in sequences if of_kind == kind]
    return "\n".join(lines) + "\n"
