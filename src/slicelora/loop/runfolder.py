"""The run folder: its layout, written by the stage loop and read by the report, the study and export.

    RUN/config.json                 the run's settings (RunConfig.to_dict)
    RUN/tasks.json                  the task names of the sequence, in order
    RUN/general.json                GP/IP scores: {"base"|"final": {"GP"|"IP": {benchmark: score}}}
    RUN/R.csv, R_loss.csv           the summary, rewritten from the stage folders after every stage: the score and
    RUN/metrics.json                answer-NLL matrices, the CL and loss metrics, GP/IP
    RUN/stages/NN/                  stage NN (01, 02, ...), its files in the order they are written:
        init.json                   the init's record (method, cosines, decisions; OSF: the preserved fraction and
                                    each layer's preserved rank)
        init_factors.safetensors    the adapter's initial A and B per layer ("<layer>.A", "<layer>.B"); OSF: each
                                    layer's preserved rank ("<layer>.preserved_rank"), all its start depends on
                                    beyond the weights
        key.json                    the stage's sharing key before and after it (sharing.py)
        adapter/                    the trained adapter (PEFT format: LoRA or OSF)
        timing.json                 wall seconds of each step (the only file that differs between two runs)
        cl_state.safetensors        the continual-learning methods' state (only when methods are active)
        train.json                  the loss curve; its presence marks the stage trained
        generations.jsonl           every scored example: prediction, references, score, answer NLL
        scores.json                 scores, answer NLLs and cut prompts per seen task; marks the stage finished

Reading recomputes everything from `stages/*/scores.json`, so a run's metrics never depend on a stale summary.
Stages written before answer NLLs were recorded give no loss matrix.
"""

from __future__ import annotations

import csv
import io as _io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import io
from ..errors import ConfigError, DataError
from ..eval.metrics import cl_metrics, loss_metrics
from .adapters import method_name

CONFIG_FILE = "config.json"
TASKS_FILE = "tasks.json"
GENERAL_FILE = "general.json"
R_FILE = "R.csv"
R_LOSS_FILE = "R_loss.csv"
METRICS_FILE = "metrics.json"
STAGES_DIR = "stages"
INIT_FILE = "init.json"
FACTORS_FILE = "init_factors.safetensors"
KEY_FILE = "key.json"
ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # PEFT's name for the weights inside adapter/
TIMING_FILE = "timing.json"
CL_STATE_FILE = "cl_state.safetensors"
TRAIN_FILE = "train.json"
GENERATIONS_FILE = "generations.jsonl"
SCORES_FILE = "scores.json"


def stage_dir(run_dir: Path, stage: int) -> Path:
    return Path(run_dir) / STAGES_DIR / f"{stage:02d}"


def is_run_folder(path: Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def stage_finished(run_dir: Path, stage: int) -> bool:
    return (stage_dir(run_dir, stage) / SCORES_FILE).is_file()


def finished_stages(run_dir: Path) -> list[Path]:
    """Stage folders that hold scores.json, in stage order; they must be stages 1..t without gaps."""
    stages = sorted((int(p.name), p) for p in (Path(run_dir) / STAGES_DIR).glob("*")
                    if p.is_dir() and p.name.isdigit() and (p / SCORES_FILE).exists())
    for expected, (number, p) in enumerate(stages, start=1):
        if number != expected:
            raise DataError(f"{p}: stage {number} has scores but stage {expected} has none; "
                            "finished stages must be 1..t without gaps")
    return [p for _, p in stages]


# --- reading -------------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """One run folder, read.

    R has shape (stages_done, len(tasks)): row i is the scores after stage i + 1, NaN where a task is not learned
    yet. R_loss has the same layout with the mean answer NLLs, or is None when the stages do not record losses (run
    folders written before they did). init[i] and timing[i] are stages/<i+1>/init.json and timing.json, or None
    when that file is missing.
    """

    path: Path
    method: str
    config: dict[str, Any]
    tasks: list[str]
    R: np.ndarray
    init: list[dict[str, Any] | None]
    general: dict[str, Any] | None
    R_loss: np.ndarray | None = None
    timing: list[dict[str, Any] | None] | None = None

    @property
    def multitask(self) -> bool:
        """One stage that learned every task jointly (train.multitask): R is one row, only final values exist."""
        return bool((self.config.get("train") or {}).get("multitask", False))

    @property
    def stages_done(self) -> int:
        return self.R.shape[0]

    @property
    def complete(self) -> bool:
        return self.stages_done == (1 if self.multitask else len(self.tasks))

    def metrics(self) -> dict[str, float]:
        """CL metrics over the tasks learned so far (all tasks once the run is complete); a multi-task run has FP."""
        if self.multitask:
            return {"FP": float(self.R[-1].mean())}
        t = self.stages_done
        return cl_metrics(self.R[:t, :t])

    def loss_metrics(self) -> dict[str, float]:
        """Loss metrics over the tasks learned so far; empty when the run has no complete loss matrix."""
        if self.multitask:
            return {"loss_final": float(self.R_loss[-1].mean())} if self.R_loss is not None else {}
        t = self.stages_done
        if self.R_loss is None or not np.isfinite(self.R_loss[np.tril_indices(t)]).all():
            return {}
        return loss_metrics(self.R_loss[:t, :t])


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e}); rewrite or delete the file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e})") from None


def _method_name(config: dict[str, Any], path: Path) -> str:
    """The run's name: its init method for LoRA runs, its adapter type otherwise (adapters.method_name)."""
    try:
        method = method_name(config)
    except ConfigError as exc:
        raise DataError(f"{path}: field {exc}") from None
    if not isinstance(method, str) or not method:
        raise DataError(f"{path}: field 'init.method' must be a method name, got {method!r}")
    return method


def _task_names(run_dir: Path) -> list[str]:
    path = run_dir / TASKS_FILE
    tasks = read_json(path)
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise DataError(f"{path}: expected a non-empty list of task names, got {tasks!r}")
    if len(set(tasks)) != len(tasks):
        raise DataError(f"{path}: task names repeat ({tasks}); each task may appear once in a sequence")
    return tasks


def _score(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
        raise DataError(f"{where}: expected a score in 0..100, got {value!r}")
    return float(value)


def _loss(value: Any, where: str) -> float:
    """A recorded mean NLL; null (or NaN) means not measured and becomes NaN."""
    if value is None:
        return np.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or math.isinf(value):
        raise DataError(f"{where}: expected a mean answer NLL >= 0 (or null), got {value!r}")
    return float(value)


def _matrices(run_dir: Path, tasks: list[str], multitask: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """(R, R_loss) from stages/*/scores.json: row i = stage i + 1, column j = tasks[j], NaN where j > i (a
    multi-task run: one row, every task). R_loss is None unless every finished stage records "losses"."""
    stage_dirs = finished_stages(run_dir)
    if len(stage_dirs) > len(tasks):
        raise DataError(f"{run_dir / STAGES_DIR}: {len(stage_dirs)} finished stages but only {len(tasks)} tasks")
    R = np.full((len(stage_dirs), len(tasks)), np.nan)
    L: np.ndarray | None = np.full_like(R, np.nan)
    for i, folder in enumerate(stage_dirs):
        path = folder / SCORES_FILE
        record = read_json(path)
        scores = record.get("scores") if isinstance(record, dict) else None
        if not isinstance(scores, dict):
            raise DataError(f"{path}: expected {{\"stage\": n, \"scores\": {{task: score}}}}")
        losses = record.get("losses")
        if losses is not None and not isinstance(losses, dict):
            raise DataError(f"{path} field losses: expected {{task: mean answer NLL}}, got {losses!r}")
        if losses is None:
            L = None
        for j, task in enumerate(tasks if multitask else tasks[:i + 1]):
            if task not in scores:
                raise DataError(f"{path}: no score for task {task!r} (learned at stage {j + 1}); "
                                "rescore the stage or delete its scores.json to rerun it")
            R[i, j] = _score(scores[task], f"{path} field scores.{task}")
            if L is not None:
                L[i, j] = _loss(losses.get(task), f"{path} field losses.{task}")
    return R, (L if stage_dirs else None)


def _general(run_dir: Path) -> dict[str, Any] | None:
    """general.json, checked to be {"base"|"final": {"GP"|"IP": {benchmark: score}}}."""
    path = run_dir / GENERAL_FILE
    if not path.exists():
        return None
    general = read_json(path)
    if not isinstance(general, dict):
        raise DataError(f"{path}: expected {{\"base\": {{\"GP\": {{...}}, \"IP\": {{...}}}}, \"final\": {{...}}}}")
    for when, kinds in general.items():
        if not isinstance(kinds, dict):
            raise DataError(f"{path} field {when}: expected {{\"GP\": {{bench: score}}, \"IP\": {{...}}}}")
        for kind, benches in kinds.items():
            if not isinstance(benches, dict):
                raise DataError(f"{path} field {when}.{kind}: expected {{benchmark: score}}")
            for bench, value in benches.items():
                _score(value, f"{path} field {when}.{kind}.{bench}")
    return general


def read_run(run_dir: str | Path) -> Run:
    """Read a run folder: its settings, tasks, R and R_loss from stages/*/scores.json, the init and timing records
    and the GP/IP scores."""
    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG_FILE
    if not config_path.is_file():
        raise DataError(f"{run_dir} is not a run folder: it has no {CONFIG_FILE} "
                        "(give the folder that `slicelora run` created, with config.json and stages/)")
    config = read_json(config_path)
    if not isinstance(config, dict):
        raise DataError(f"{config_path}: expected a JSON object")
    method = _method_name(config, config_path)
    tasks = _task_names(run_dir)
    R, R_loss = _matrices(run_dir, tasks, bool((config.get("train") or {}).get("multitask")))
    if R.shape[0] == 0:
        raise DataError(f"{run_dir}: no finished stage (no stages/NN/scores.json); nothing to report yet")
    init, timing = [], []
    for stage in range(1, R.shape[0] + 1):
        folder = stage_dir(run_dir, stage)
        init.append(read_json(folder / INIT_FILE) if (folder / INIT_FILE).exists() else None)
        timing.append(read_json(folder / TIMING_FILE) if (folder / TIMING_FILE).exists() else None)
    return Run(path=run_dir, method=method, config=config, tasks=tasks, R=R, init=init, general=_general(run_dir),
               R_loss=R_loss, timing=timing)


@dataclass
class Examples:
    """The scored examples of one task after one stage, sorted by example index: score (0..100) and nll (mean
    per-token answer NLL, NaN where not recorded) per example."""

    index: np.ndarray
    score: np.ndarray
    nll: np.ndarray


def read_examples(run_dir: str | Path, stages: int | None = None) -> dict[tuple[int, str], Examples]:
    """Per-example results from stages/NN/generations.jsonl, keyed by (stage, task) with stages 1-based; stages
    without the file are absent. `stages` limits the reading to stages 1..stages."""
    out: dict[tuple[int, str], Examples] = {}
    for folder in finished_stages(Path(run_dir))[:stages]:
        path = folder / GENERATIONS_FILE
        if not path.is_file():
            continue
        rows: dict[str, list[tuple[int, float, float]]] = {}
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise DataError(f"{path}: cannot be read ({e})") from None
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                record = json.loads(line)
                task, index = record["task"], record["index"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"{where}: expected a JSON object with task, index and score ({e})") from None
            if not isinstance(task, str) or isinstance(index, bool) or not isinstance(index, int):
                raise DataError(f"{where}: task must be a name and index an integer, got {task!r}, {index!r}")
            nll = _loss(record.get("nll"), f"{where} field nll")
            rows.setdefault(task, []).append((index, _score(record.get("score"), f"{where} field score"), nll))
        for task, items in rows.items():
            items.sort()
            index = np.array([i for i, _, _ in items], dtype=np.int64)
            if len(np.unique(index)) != len(index):
                raise DataError(f"{path}: task {task!r} has an example index more than once")
            out[(int(folder.name), task)] = Examples(index, np.array([v for _, v, _ in items]),
                                                     np.array([v for _, _, v in items]))
    return out


def find_run_dirs(folder: str | Path) -> list[Path]:
    """[folder] if it is a run folder, else its immediate subfolders that are run folders (a comparison folder
    COMPARE/<method>/...), sorted by name."""
    folder = Path(folder)
    if is_run_folder(folder):
        return [folder]
    runs = sorted(p for p in folder.glob("*") if is_run_folder(p)) if folder.is_dir() else []
    if not runs:
        raise DataError(f"{folder} is neither a run folder (with config.json) nor a folder of run folders")
    return runs


# --- the summary ---------------------------------------------------------------------------------------------------

def general_summary(general: dict[str, Any] | None) -> dict[str, float]:
    """Flat GP/IP numbers: "<kind>_<when>" = mean over benchmarks and "<kind>_<when>[<bench>]" per benchmark,
    plus "<kind>_delta" = final - base mean when both are present."""
    out: dict[str, float] = {}
    for when in ("base", "final"):
        for kind, benches in sorted((general or {}).get(when, {}).items()):
            if benches:
                out[f"{kind}_{when}"] = float(np.mean(list(benches.values())))
                out.update({f"{kind}_{when}[{b}]": float(v) for b, v in benches.items()})
    for kind in sorted({k.split("_")[0] for k in out}):
        if f"{kind}_base" in out and f"{kind}_final" in out:
            out[f"{kind}_delta"] = out[f"{kind}_final"] - out[f"{kind}_base"]
    return out


def run_summary(run: Run) -> dict[str, Any]:
    """metrics.json content: the CL metrics, the loss metrics (when recorded), GP/IP summaries, and how many stages
    they cover."""
    return {"method": run.method, "stages_done": run.stages_done, "tasks": len(run.tasks), **run.metrics(),
            **run.loss_metrics(), **general_summary(run.general)}


def write_r_csv(path: Path, R: np.ndarray, tasks: list[str]) -> None:
    """R.csv (or R_loss.csv): a header `stage,<task>...`, then one row per stage, empty cells where the task is not
    learned yet (or its value is not measured)."""
    buf = _io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["stage", *tasks])
    for i, row in enumerate(R, start=1):
        writer.writerow([i, *("" if math.isnan(v) else repr(float(v)) for v in row)])
    io.write_text(path, buf.getvalue())


def write_run_summary(run_dir: str | Path) -> dict[str, Any]:
    """Recompute R (and R_loss) and the metrics of a run folder from its stage folders and write R.csv, R_loss.csv
    (when the stages record losses) and metrics.json (atomically)."""
    run = read_run(run_dir)
    summary = run_summary(run)
    write_r_csv(run.path / R_FILE, run.R, run.tasks)
    if run.R_loss is not None:
        write_r_csv(run.path / R_LOSS_FILE, run.R_loss, run.tasks)
    io.write_json(run.path / METRICS_FILE, summary)
    return summary
