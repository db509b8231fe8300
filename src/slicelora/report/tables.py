"""Comparison tables of several runs (one row per method): Markdown and CSV files, and a rich table for the terminal."""

from __future__ import annotations

import csv
import io as _io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rich.table

from slicelora import io
from slicelora.eval.metrics import LOSS_METRIC_NAMES, METRIC_NAMES
from slicelora.loop.runfolder import Run, general_summary

Cell = str | float | None

LEGEND = ("Scores are 0..100. AP = mean score on each task right after learning it; FP = mean final score; "
          "Forget = AP - FP (lower is better); BWT = mean over past tasks of final - just-learned score "
          "(BWT_trace divides the sum by N instead of N - 1); max_forgetting = mean over past tasks of best earlier "
          "score - final score. loss_learned / loss_final = mean per-token NLL of the reference answers right after "
          "learning each task / after the last stage; loss_increase = mean over past tasks of final - just-learned "
          "loss (positive: the past tasks got worse). GP/IP = general ability zero-/few-shot, mean over benchmarks, "
          "for the base model and after the last stage; delta = final - base. Runs that are not complete report the "
          "tasks learned so far.")


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Cell]]

    def select(self, keep: list[str], title: str) -> Table:
        """The same rows with only the named columns, in that order."""
        idx = [self.columns.index(c) for c in keep]
        return Table(title, keep, [[row[i] for i in idx] for row in self.rows])


def run_labels(runs: list[Run]) -> list[str]:
    """Row labels: the method name, with the folder name added where two runs share a method."""
    methods = [r.method for r in runs]
    return [r.method if methods.count(r.method) == 1 else f"{r.method} ({r.path.name})" for r in runs]


def comparison_table(runs: list[Run]) -> Table:
    """All numbers per run: stages done, the CL metrics, the loss metrics (when any run records losses), GP/IP means
    (base, final, delta) and per benchmark."""
    summaries = [general_summary(r.general) for r in runs]
    losses = [r.loss_metrics() for r in runs]
    loss_cols = [m for m in LOSS_METRIC_NAMES if any(m in x for x in losses)]
    present = {k for s in summaries for k in s}
    means = [f"{kind}_{when}" for kind in ("GP", "IP") for when in ("base", "final", "delta")]
    benches = sorted({k[k.index("[") + 1:-1] for k in present if "[" in k})
    per_bench = [f"{kind}_{when}[{b}]" for kind in ("GP", "IP") for b in benches for when in ("base", "final")]
    general_cols = [c for c in means + per_bench if c in present]
    rows: list[list[Cell]] = []
    for label, run, summary, loss in zip(run_labels(runs), runs, summaries, losses):
        metrics, stages = run.metrics(), 1 if run.multitask else len(run.tasks)
        rows.append([label, f"{run.stages_done}/{stages}", *(metrics.get(m) for m in METRIC_NAMES),
                     *(loss.get(m) for m in loss_cols), *(summary.get(c) for c in general_cols)])
    return Table("Continual-learning metrics", ["method", "stages", *METRIC_NAMES, *loss_cols, *general_cols], rows)


def final_scores_table(runs: list[Run]) -> Table:
    """Each task's score after the last finished stage (a column per task, in order of first appearance)."""
    tasks = list(dict.fromkeys(t for r in runs for t in r.tasks))
    rows: list[list[Cell]] = []
    for label, run in zip(run_labels(runs), runs):
        last = dict(zip(run.tasks, run.R[-1]))
        rows.append([label, *(None if np.isnan(last.get(t, np.nan)) else float(last[t]) for t in tasks)])
    return Table("Score per task after the last finished stage", ["method", *tasks], rows)


def _fmt(cell: Cell, digits: int) -> str:
    if cell is None:
        return "-"
    return f"{cell:.{digits}f}" if isinstance(cell, float) else str(cell)


def to_markdown(table: Table, digits: int = 2) -> str:
    lines = [f"### {table.title}", "", "| " + " | ".join(table.columns) + " |",
             "|" + "|".join(" --- " if i == 0 else " ---: " for i in range(len(table.columns))) + "|"]
    lines += ["| " + " | ".join(_fmt(c, digits) for c in row) + " |" for row in table.rows]
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    """CSV with full-precision numbers and empty cells for missing values."""
    buf = _io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(table.columns)
    for row in table.rows:
        writer.writerow(["" if c is None else repr(c) if isinstance(c, float) else c for c in row])
    return buf.getvalue()


def to_rich(table: Table, digits: int = 2) -> rich.table.Table:
    out = rich.table.Table(title=table.title)
    for i, col in enumerate(table.columns):
        out.add_column(col, justify="left" if i == 0 else "right")
    for row in table.rows:
        out.add_row(*(_fmt(c, digits) for c in row))
    return out


def main_columns(table: Table) -> list[str]:
    """The columns without a per-benchmark breakdown: what fits a terminal."""
    return [c for c in table.columns if "[" not in c]


def report_markdown(runs: list[Run]) -> str:
    """metrics.md: the metrics table, GP/IP per benchmark (when any run has general.json) and final task scores."""
    table = comparison_table(runs)
    parts = ["# Comparison", "", LEGEND, "", to_markdown(table.select(main_columns(table), table.title))]
    bench = [c for c in table.columns if "[" in c]
    if bench:
        parts.append(to_markdown(table.select(["method", *bench], "General ability per benchmark")))
    parts.append(to_markdown(final_scores_table(runs)))
    return "\n".join(parts)


def rich_table(runs: list[Run]) -> rich.table.Table:
    """The metrics table (without per-benchmark columns) for printing with rich."""
    table = comparison_table(runs)
    return to_rich(table.select(main_columns(table), table.title))


def write_tables(runs: list[Run], out_dir: Path) -> list[Path]:
    """Write OUT/metrics.md and OUT/metrics.csv (the full comparison table) atomically; return their paths."""
    md, csv_path = out_dir / "metrics.md", out_dir / "metrics.csv"
    io.write_text(md, report_markdown(runs))
    io.write_text(csv_path, to_csv(comparison_table(runs)))
    return [md, csv_path]
