"""Figures of one or more runs (PNG, Agg canvas, no pyplot state) and `write_report`, the entry point of the
`report` and `compare` commands."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from slicelora import io
from slicelora.errors import ConfigError
from slicelora.loop.runfolder import Run, find_run_dirs, read_run
from slicelora.report.tables import run_labels, write_tables

SCORE_CMAP = matplotlib.colormaps["viridis"].with_extremes(bad="#eeeeee")  # grey: task not learned yet
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", "-.", ":")


def short_name(task: str, width: int = 24) -> str:
    """A label of about `width` characters; a Super-NI name becomes its number ("task363") when width < 16. A
    transform suffix ("+swap_labels") is always kept, so that a task and its transformed copy stay apart."""
    base, plus, transform = task.partition("+")
    m = re.match(r"(task\d+)_", base)
    if m and width < 16:
        base = m.group(1)
    elif len(base) > max(width - len(plus + transform), 8):
        base = base[:max(width - len(plus + transform), 8) - 1] + "…"
    return base + plus + transform


def series_style(k: int, n: int) -> dict[str, Any]:
    """Marker, line style and horizontal offset (in stage units) of series k of n, so that series with the same
    values stay visible side by side instead of hiding each other."""
    spread = min(0.08, 0.4 / max(n, 1))
    return {"marker": MARKERS[k % len(MARKERS)], "linestyle": LINESTYLES[(k // 2) % len(LINESTYLES)],
            "offset": (k - (n - 1) / 2) * spread}


def new_figure(n_panels: int, max_cols: int, panel_size: tuple[float, float]) -> tuple[Figure, list[Axes]]:
    cols = min(n_panels, max_cols)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(panel_size[0] * cols, panel_size[1] * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def save_png(fig: Figure, path: Path) -> Path:
    io.write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return path


def plot_r_matrices(runs: Sequence[Run], path: Path) -> Path:
    """One annotated heatmap of R per run (rows = after stage, columns = tasks), on a shared 0..100 scale."""
    n_tasks = max(len(r.tasks) for r in runs)
    side = max(3.2, 0.62 * n_tasks + 1.4)
    fig, axes = new_figure(len(runs), 3, (side, side * 0.85))
    image = None
    for ax, run, label in zip(axes, runs, run_labels(runs)):
        R = np.full((len(run.tasks), len(run.tasks)), np.nan)
        R[:run.stages_done] = run.R
        image = ax.imshow(np.ma.masked_invalid(R), vmin=0, vmax=100, cmap=SCORE_CMAP)
        for (i, j), v in np.ndenumerate(R):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8, color="white" if v < 60 else "black")
        ax.set_xticks(range(len(run.tasks)), [short_name(t, 12) for t in run.tasks], rotation=45, ha="right",
                      fontsize=8)
        ax.set_yticks(range(len(run.tasks)), [str(i + 1) for i in range(len(run.tasks))], fontsize=8)
        ax.set_ylabel("after stage")
        ax.set_title(label if run.complete else f"{label} ({run.stages_done}/{len(run.tasks)} stages)")
    fig.colorbar(image, ax=axes, shrink=0.8, label="score")
    return save_png(fig, path)


def plot_task_curves(runs: Sequence[Run], path: Path) -> Path:
    """A panel per task: its score after each stage from the one that learned it, a line per run (each run with
    its own marker and line style, shifted a little sideways, so that runs with equal scores all show)."""
    tasks = list(dict.fromkeys(t for r in runs for t in r.tasks))
    fig, axes = new_figure(len(tasks), 4, (3.4, 2.6))
    labels = run_labels(runs)
    last_stage = max(r.stages_done for r in runs)
    for ax, task in zip(axes, tasks):
        for k, (run, label) in enumerate(zip(runs, labels)):
            if task not in run.tasks or run.tasks.index(task) >= run.stages_done:
                continue
            j = run.tasks.index(task)
            style = series_style(k, len(runs))
            stages = np.arange(j + 1, run.stages_done + 1) + style["offset"]
            ax.plot(stages, run.R[j:, j], marker=style["marker"], ls=style["linestyle"], ms=4, lw=1.3,
                    color=f"C{k % 10}", mfc="none" if k % 2 else f"C{k % 10}", label=label)
        curve_axis(ax, task, last_stage)
    curve_legend(fig, axes)
    return save_png(fig, path)


def curve_axis(ax: Axes, task: str, stages: int) -> None:
    """A task-curve panel's frame: the task as title, stages 1..`stages` on x, scores 0..100 on y."""
    ax.set_title(short_name(task, 30), fontsize=9)
    ax.set_xlim(0.7, stages + 0.3)
    ax.set_xticks(range(1, stages + 1))
    ax.set_ylim(-3, 103)
    ax.set_xlabel("after stage", fontsize=8)
    ax.set_ylabel("score", fontsize=8)
    ax.grid(alpha=0.3)


def curve_legend(fig: Figure, axes: Sequence[Axes]) -> None:
    """One legend below the panels, one entry per series label."""
    handles = {h.get_label(): h for ax in axes for h in ax.get_lines()}
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=min(len(handles), 5))


def plot_general(runs: Sequence[Run], path: Path) -> Path | None:
    """GP and IP panels: per benchmark, a pair of bars (base, hatched; final, solid) per run that has
    general.json. A score of 0 is marked "0" on a tick at the axis, a missing score "n/a", so neither looks like the
    other. None if no run has one. Colours follow the run order, as in the other figures."""
    shown = [(k, run, label) for k, (run, label) in enumerate(zip(runs, run_labels(runs))) if run.general]
    kinds = sorted({kind for _, run, _ in shown for when in run.general.values() for kind in when})
    if not kinds:
        return None
    fig, axes = new_figure(len(kinds), 2, (5.0, 3.4))
    width = 0.8 / (2 * len(shown))
    for ax, kind in zip(axes, kinds):
        benches = sorted({b for _, run, _ in shown for when in run.general.values() for b in when.get(kind, {})})
        x = np.arange(len(benches))
        for slot, (k, run, label) in enumerate(shown):
            for w, when in enumerate(("base", "final")):
                values = np.array([run.general.get(when, {}).get(kind, {}).get(b, np.nan) for b in benches])
                positions = x + (2 * slot + w + 0.5) * width - 0.4
                ax.bar(positions, values, width, color=f"C{k % 10}",
                       alpha=0.45 if when == "base" else 1.0, hatch="//" if when == "base" else None,
                       edgecolor="white", label=f"{label} ({when})")
                mark_zero_and_missing(ax, positions, values, f"C{k % 10}", width)
        ax.set_xticks(x, benches, rotation=20, ha="right", fontsize=8)
        ax.set_ylim(-4, 100)
        ax.set_ylabel("score")
        ax.set_title(f"{kind}: base model (hatched) vs after the last stage", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncols=min(len(names), 3 * min(len(kinds), 2)), fontsize=8)
    return save_png(fig, path)


def mark_zero_and_missing(ax: Axes, positions: np.ndarray, values: np.ndarray, color: str, width: float) -> None:
    """Bars of height 0 get a thick tick at the axis and a "0"; missing values (NaN) an "n/a": neither draws a
    bar."""
    for x, v in zip(positions, values):
        if np.isnan(v):
            ax.text(x, 1, "n/a", rotation=90, ha="center", va="bottom", fontsize=6, color="dimgrey")
        elif v == 0:
            ax.plot([x - width / 2, x + width / 2], [0, 0], color=color, lw=2.5, solid_capstyle="butt")
            ax.text(x, 1, "0", ha="center", va="bottom", fontsize=7, color=color)


def as_number(value: Any) -> float:
    """A scalar diagnostic; a per-layer list is summarised by its mean; anything else is NaN."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
        return float(np.mean(value))
    return np.nan


def gate_tau(run: Run) -> float | None:
    """The SLICE gate tau: from init.json ("tau"), else config.json ("tau" at the top or in its "init" section)."""
    for init in run.init:
        tau = as_number((init or {}).get("tau"))
        if np.isfinite(tau):
            return tau
    for section in (run.config, run.config.get("init")):
        if isinstance(section, dict) and isinstance(section.get("tau"), (int, float)):
            return float(section["tau"])
    return None


def plot_init(runs: Sequence[Run], path: Path) -> Path | None:
    """SLICE diagnostics: the cosine between current and replay gradients at each stage, a line per run (own marker,
    shifted a little sideways), filled markers where the gate fired (projection applied), dashed lines at the gate
    tau. None if no run records a cosine."""
    series = []
    for run, label in zip(runs, run_labels(runs)):
        # init.json keeps SLICE's diagnostics under "surgery" (InitReport); a flat record is read as well
        records = [(d or {}).get("surgery") or (d or {}) for d in run.init]
        cos = np.array([as_number(r.get("cosine")) for r in records])
        fired = [bool(np.any(r.get("fired"))) for r in records]
        if np.isfinite(cos).any():
            series.append((run, label, cos, fired))
    if not series:
        return None
    fig, (ax,) = new_figure(1, 1, (6.0, 3.6))
    for k, (run, label, cos, fired) in enumerate(series):
        style = series_style(k, len(series))
        stages = np.arange(1, len(cos) + 1) + style["offset"]
        color = f"C{k % 10}"
        ax.plot(stages, cos, color=color, ls=style["linestyle"], label=label)
        ax.scatter(stages, cos, s=36, zorder=3, marker=style["marker"], edgecolors=color,
                   facecolors=[color if f else "white" for f in fired])
        tau = gate_tau(run)
        if tau is not None:
            ax.axhline(tau, color=color, ls="--", lw=1, label=f"{label} gate tau = {tau:g}")
    last_stage = max(len(cos) for _, _, cos, _ in series)
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_xlim(0.7, last_stage + 0.3)
    ax.set_xticks(range(1, last_stage + 1))
    ax.set_xlabel("stage")
    ax.set_ylabel("cos(G_cur, G_rep)")
    ax.set_title("SLICE gradient conflict per stage (filled = gate fired)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, path)


def write_report(run_dirs: list[Path], out_dir: Path) -> list[Path]:
    """Read the runs (each path a run folder or a folder of run folders) and write metrics.md, metrics.csv and the
    figures (r_matrix.png, task_curves.png, general.png and init_cosine.png when there is data) into out_dir.
    Returns the written paths; the run folders are not modified."""
    if not run_dirs:
        raise ConfigError("write_report: no run folders given; pass at least one run folder")
    runs = [read_run(p) for d in run_dirs for p in find_run_dirs(d)]
    out_dir = Path(out_dir)
    written = write_tables(runs, out_dir)
    written.append(plot_r_matrices(runs, out_dir / "r_matrix.png"))
    written.append(plot_task_curves(runs, out_dir / "task_curves.png"))
    for plot, name in ((plot_general, "general.png"), (plot_init, "init_cosine.png")):
        result = plot(runs, out_dir / name)
        if result is not None:
            written.append(result)
    return written
