"""Reading run folders (layout in the architecture brief) and writing their summary files (R.csv, metrics.json).

The score matrix is rebuilt from `stages/*/scores.json`, the record the stage loop writes per stage, so the
metrics of a run can be recomputed even when R.csv is missing or stale.
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

from slicelora import io
from slicelora.errors import DataError
from slicelora.report.metrics import cl_metrics


@dataclass
class Run:
    """One run folder, read.

    R has shape (stages_done, len(tasks)): row i is the scores after stage i + 1, NaN where a task is not learned
    yet. init[i] is stages/<i+1>/init.json, or None when that file is missing.
    """

    path: Path
    method: str
    config: dict[str, Any]
    tasks: list[str]
    R: np.ndarray
    init: list[dict[str, Any] | None]
    general: dict[str, Any] | None

    @property
    def stages_done(self) -> int:
        return self.R.shape[0]

    @property
    def complete(self) -> bool:
        return self.stages_done == len(self.tasks)

    def metrics(self) -> dict[str, float]:
        """CL metrics over the tasks learned so far (all tasks once the run is complete)."""
        t = self.stages_done
        return cl_metrics(self.R[:t, :t])


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e}); rewrite or delete the file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e})") from None


def _method_name(config: dict[str, Any], path: Path) -> str:
    method = config.get("method") or (config.get("init") or {}).get("method")  # RunConfig keeps it in init
    if isinstance(method, dict):
        method = method.get("name")
    if not isinstance(method, str) or not method:
        raise DataError(f"{path}: field 'method' must be a method name (or an object with a 'name'), "
                        f"got {config.get('method')!r}")
    return method


def _task_names(run_dir: Path, config: dict[str, Any]) -> list[str]:
    tasks_file = run_dir / "tasks.json"
    if tasks_file.exists():
        tasks, where = _read_json(tasks_file), str(tasks_file)
    else:
        sequence = config.get("sequence")
        tasks = sequence.get("tasks") if isinstance(sequence, dict) else None
        where = f"{run_dir / 'config.json'} field sequence.tasks"
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise DataError(f"{where}: expected a non-empty list of task names, got {tasks!r}")
    if len(set(tasks)) != len(tasks):
        raise DataError(f"{where}: task names repeat ({tasks}); each task may appear once in a sequence")
    return tasks


def _stage_dirs(run_dir: Path) -> list[Path]:
    """Stage folders that hold scores.json, in stage order; they must be stages 1..t without gaps."""
    stages = sorted((int(p.name), p) for p in (run_dir / "stages").glob("*")
                    if p.is_dir() and p.name.isdigit() and (p / "scores.json").exists())
    for expected, (number, p) in enumerate(stages, start=1):
        if number != expected:
            raise DataError(f"{p}: stage {number} has scores but stage {expected} has none; "
                            "finished stages must be 1..t without gaps")
    return [p for _, p in stages]


def _score(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
        raise DataError(f"{where}: expected a score in 0..100, got {value!r}")
    return float(value)


def scores_matrix(run_dir: Path, tasks: list[str]) -> np.ndarray:
    """R from stages/*/scores.json: row i = stage i + 1, column j = tasks[j], NaN where j > i."""
    stage_dirs = _stage_dirs(run_dir)
    if len(stage_dirs) > len(tasks):
        raise DataError(f"{run_dir / 'stages'}: {len(stage_dirs)} finished stages but only {len(tasks)} tasks")
    R = np.full((len(stage_dirs), len(tasks)), np.nan)
    for i, stage_dir in enumerate(stage_dirs):
        path = stage_dir / "scores.json"
        scores = _read_json(path)
        scores = scores.get("scores") if isinstance(scores, dict) else None
        if not isinstance(scores, dict):
            raise DataError(f"{path}: expected {{\"stage\": n, \"scores\": {{task: score}}}}")
        for j, task in enumerate(tasks[:i + 1]):
            if task not in scores:
                raise DataError(f"{path}: no score for task {task!r} (learned at stage {j + 1}); "
                                "rescore the stage or delete its scores.json to rerun it")
            R[i, j] = _score(scores[task], f"{path} field scores.{task}")
    return R


def write_r_csv(path: Path, R: np.ndarray, tasks: list[str]) -> None:
    """R.csv: a header `stage,<task>...`, then one row per stage, empty cells where the task is not learned yet."""
    buf = _io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["stage", *tasks])
    for i, row in enumerate(R, start=1):
        writer.writerow([i, *("" if math.isnan(v) else repr(float(v)) for v in row)])
    io.write_text(path, buf.getvalue())


def read_r_csv(path: Path) -> tuple[np.ndarray, list[str]]:
    """Read an R.csv written by write_r_csv back into (R, tasks)."""
    try:
        rows = list(csv.reader(path.read_text(encoding="utf-8").splitlines()))
        tasks = rows[0][1:]
        R = np.array([[float(v) if v.strip() else np.nan for v in row[1:]] for row in rows[1:]], dtype=float)
    except (OSError, IndexError, ValueError) as e:
        raise DataError(f"{path}: not a score matrix written by slicelora ({e}); delete it and rerun the summary")
    if not tasks or R.shape != (len(rows) - 1, len(tasks)):
        raise DataError(f"{path}: expected a header and rows with one cell per task in the header {tasks}")
    return R, tasks


def _general(run_dir: Path) -> dict[str, Any] | None:
    """general.json, checked to be {"base"|"final": {"GP"|"IP": {benchmark: score}}}."""
    path = run_dir / "general.json"
    if not path.exists():
        return None
    general = _read_json(path)
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
    """Read a run folder. R comes from stages/*/scores.json, or from R.csv when no stage has scores."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise DataError(f"{run_dir} is not a run folder: it has no config.json "
                        "(give the folder that `slicelora run` created, with config.json and stages/)")
    config = _read_json(config_path)
    if not isinstance(config, dict):
        raise DataError(f"{config_path}: expected a JSON object")
    method = _method_name(config, config_path)
    tasks = _task_names(run_dir, config)
    R = scores_matrix(run_dir, tasks)
    if R.shape[0] == 0 and (run_dir / "R.csv").exists():
        R, csv_tasks = read_r_csv(run_dir / "R.csv")
        if csv_tasks != tasks:
            raise DataError(f"{run_dir / 'R.csv'}: its tasks {csv_tasks} differ from the run's tasks {tasks}")
    if R.shape[0] == 0:
        raise DataError(f"{run_dir}: no finished stage (no stages/NN/scores.json); nothing to report yet")
    init = []
    for stage in range(1, R.shape[0] + 1):
        path = run_dir / "stages" / f"{stage:02d}" / "init.json"
        init.append(_read_json(path) if path.exists() else None)
    return Run(path=run_dir, method=method, config=config, tasks=tasks, R=R, init=init, general=_general(run_dir))


def find_run_dirs(folder: str | Path) -> list[Path]:
    """[folder] if it is a run folder, else its immediate subfolders that are run folders (a comparison folder
    COMPARE/<method>/...), sorted by name."""
    folder = Path(folder)
    if (folder / "config.json").is_file():
        return [folder]
    runs = sorted(p for p in folder.glob("*") if (p / "config.json").is_file()) if folder.is_dir() else []
    if not runs:
        raise DataError(f"{folder} is neither a run folder (with config.json) nor a folder of run folders")
    return runs


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
    """metrics.json content: the CL metrics, GP/IP summaries, and how many stages they cover."""
    return {"method": run.method, "stages_done": run.stages_done, "tasks": len(run.tasks), **run.metrics(),
            **general_summary(run.general)}


def write_run_summary(run_dir: str | Path) -> dict[str, Any]:
    """Recompute R and the metrics of a run folder and write RUN/R.csv and RUN/metrics.json (atomically)."""
    run = read_run(run_dir)
    summary = run_summary(run)
    write_r_csv(run.path / "R.csv", run.R, run.tasks)
    io.write_json(run.path / "metrics.json", summary)
    return summary
