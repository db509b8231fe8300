"""Run a study's grid into one folder: one run folder per cell, work shared between cells, resumable.

    STUDY/study.json                         the study (refused if a different one is asked for later)
    STUDY/cells/<sequence>/<variant>/seed<s>  each cell's run folder (the `slicelora run` format)
    STUDY/.shared/                           keys of finished stages and general scores; the gradient cache

Cells run grouped by (sequence, seed): the cells of a group start from the same base model and data, so that is
where stages and gradients are shared. With `workers > 1` each worker process (one CPU thread each) claims whole
groups in turn; the claims belong to one invocation, so a resumed study reassigns unfinished groups.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

from tqdm.auto import tqdm

from ..data.sequences import load_sequence
from ..errors import RunStateError, SliceLoraError
from ..io import write_json
from ..loop.runfolder import GENERAL_FILE, stage_finished
from ..loop.sharing import SharedWork
from ..loop.stages import check_collection_dir, run
from .spec import Cell, Study, differing_keys, parse_study

STUDY_FILE = "study.json"


def prepare_study_dir(out: Path, study: Study, resume: bool) -> None:
    """Refuse a folder that is a run, holds another study, or holds this study's results without --resume; then
    write study.json."""
    check_collection_dir(out, "study")
    saved = out / STUDY_FILE
    if saved.is_file():
        try:
            previous = json.loads(saved.read_text())["spec"]
        except (ValueError, KeyError, OSError) as exc:
            raise RunStateError(f"{saved} cannot be read ({exc}); choose another --output folder.") from None
        differ = differing_keys(previous, study.to_dict())
        if differ:
            raise RunStateError(f"{out} holds another study: {', '.join(differ)} differ from this study file. "
                                "Choose another --output folder, or run the study file that made it.")
        if not resume and (out / "cells").exists():
            raise RunStateError(f"{out} already has results of this study; pass --resume to continue it.")
    elif out.exists() and any(out.iterdir()):
        raise RunStateError(f"{out} is not empty and holds no study; choose an empty or new --output folder.")
    write_json(saved, {"spec": study.to_dict(), "cells": [{"sequence": c.sequence, "variant": c.variant,
                                                           "seed": c.seed, "dir": c.dir} for c in study.cells()]})


def read_study(out: Path) -> Study:
    """The study a folder holds (from its study.json)."""
    path = Path(out) / STUDY_FILE
    if not path.is_file():
        raise RunStateError(f"{out} is not a study folder: it has no {STUDY_FILE}.")
    return parse_study(json.loads(path.read_text())["spec"], str(path))


def cell_done(study: Study, out: Path, cell: Cell) -> bool:
    """Whether a cell's run finished (last stage scored, and final GP/IP when they are on)."""
    folder = out / cell.dir
    config = study.config(cell)
    stages = 1 if config.train.multitask else len(load_sequence(config.sequence).tasks)
    if not stage_finished(folder, stages):
        return False
    general = folder / GENERAL_FILE
    return not config.general.enabled or (general.is_file() and "final" in json.loads(general.read_text()))


def finished_cells(study: Study, out: Path) -> int:
    return sum(cell_done(study, out, c) for c in study.cells())


def run_cells(study: Study, out: Path, *, session: str | None = None, accelerator=None, log=print) -> list[str]:
    """Run every unfinished cell, group by group. With `session`, only groups this process claims first (other
    workers of the same session take the rest). A cell that stops with our error (a diverging stage, memory, ...)
    is logged and left for --resume while the other cells go on; returns the failed cells' folders."""
    failed = []
    for seq, seed in study.groups():
        cells = [c for c in study.cells() if (c.sequence, c.seed) == (seq, seed)]
        if all(cell_done(study, out, c) for c in cells) or (session and not _claim(out, session, seq, seed)):
            continue
        shared = SharedWork(out / ".shared", out / ".shared" / "gradients" / f"{seq}-seed{seed}")
        for cell in cells:
            if cell_done(study, out, cell):
                continue
            start = time.perf_counter()
            try:
                run(study.config(cell), out / cell.dir, resume=True, accelerator=accelerator, shared=shared)
            except SliceLoraError as exc:
                failed.append(cell.dir)
                log(f"{cell.dir}: FAILED after {time.perf_counter() - start:.0f} s: {exc}")
                continue
            log(f"{cell.dir}: {time.perf_counter() - start:.0f} s")
        shutil.rmtree(shared.gradients, ignore_errors=True)  # no later group starts from these models
    return failed


def _claim(out: Path, session: str, seq: str, seed: int) -> bool:
    claims = out / ".claims" / session
    claims.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(claims / f"{seq}-seed{seed}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def run_study(study: Study, out: str | Path, *, resume: bool = False, workers: int = 1, accelerator=None,
              log=print) -> Path:
    """Run the grid into `out` (see the module docstring) and return it. The summary is the report layer's job."""
    out = Path(out)
    prepare_study_dir(out, study, resume)
    if workers <= 1:
        failed = run_cells(study, out, accelerator=accelerator, log=log)
        if failed:
            raise RunStateError(f"{len(failed)} cell(s) failed: {', '.join(failed)} (the log says why); fix the cause "
                                "and rerun with --resume: finished stages are kept.")
        return out
    session = uuid.uuid4().hex[:8]
    (out / "logs").mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    procs = []
    for k in range(workers):
        with open(out / "logs" / f"worker-{k}.log", "ab") as logfile:
            procs.append(subprocess.Popen([sys.executable, "-m", "slicelora.study.worker", str(out), session],
                                          stdout=logfile, stderr=subprocess.STDOUT, env=env))
    with tqdm(total=len(study.cells()), desc="study cells", unit="cell") as bar:
        while any(p.poll() is None for p in procs):
            time.sleep(30)  # the workers need the CPU; counting finished cells is cheap but not free
            bar.n = finished_cells(study, out)
            bar.refresh()
        bar.n = finished_cells(study, out)
        bar.refresh()
    failed = [k for k, p in enumerate(procs) if p.returncode != 0]
    if failed:
        raise RunStateError(f"study worker(s) {failed} had failed cells or stopped; see {out / 'logs'}/worker-K.log. "
                            "Fix the cause and rerun with --resume: finished stages are kept.")
    return out
