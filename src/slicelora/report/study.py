"""The report of a study: a grid of run folders (variant x sequence x seed) described by STUDY/study.json.

`write_study_report` writes STUDY/study.csv (means over seeds and paired differences against the reference
variants, with Student-t and bootstrap intervals), STUDY/study.md (tables, one sentence per comparison, SLICE's
gate record, the compute spent) and figures under STUDY/plots/. Cells that are missing or unfinished are listed,
not guessed: the statistics use the complete cells, the score figures every finished stage.
"""

from __future__ import annotations

import csv
import io as _io
import math
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from slicelora import io
from slicelora.errors import ConfigError, DataError
from slicelora.loop.adapters import method_name
from slicelora.loop.config import flatten
from slicelora.loop.runfolder import (Examples, Run, finished_stages, general_summary, is_run_folder, read_examples,
                                      read_json, read_run)
from slicelora.report.plots import (SCORE_CMAP, as_number, curve_axis, curve_legend, gate_tau, new_figure, save_png,
                                    series_style, short_name)
from slicelora.report.stats import (LOSS_METRICS, SCORE_METRICS, Difference, bootstrap_paired, difference,
                                    paired_differences, t_summary)

GENERAL_METRICS = ("GP_final", "GP_delta", "IP_final", "IP_delta")
STUDY_METRICS = (*SCORE_METRICS, *LOSS_METRICS, *GENERAL_METRICS)
HEADLINE = ("AP", "FP", "Forget", "BWT", "loss_increase")
TIMED_STEPS = ("init", "train", "eval")
_DIRECTION = {  # metric: (phrase when variant - reference > 0, phrase when < 0)
    "AP": ("reaches a higher AP than", "reaches a lower AP than"),
    "FP": ("ends with a higher FP than", "ends with a lower FP than"),
    "Forget": ("forgets more than", "forgets less than"),
    "BWT": ("has a higher BWT than", "has a lower BWT than"),
    "loss_increase": ("raises the past tasks' loss more than", "raises the past tasks' loss less than"),
}
LEGEND = (
    "Scores are 0..100: AP = mean score on each task right after learning it, FP = mean final score, Forget = AP - FP "
    "(lower is better), BWT = mean over past tasks of final - just-learned score. loss_learned / loss_final = mean "
    "per-token NLL of the reference answers right after learning each task / after the last stage; loss_increase = "
    "mean over past tasks of final - just-learned loss (positive: the past tasks got worse). GP/IP = general ability "
    "zero-/few-shot after the last stage (final) and its change from the base model (delta). Means are over the "
    "complete cells' seeds with a 95% Student-t interval (± its half-width). A difference is variant - reference on "
    "the same seed, averaged over the seeds both finished; its 95% intervals: Student t over those seeds, and a "
    "percentile bootstrap ({B} draws) that resamples the seeds and, within each drawn seed, the scored examples of "
    "every task (the same examples for both variants); GP/IP have no per-example data, so only their seeds are "
    "resampled. A difference counts as shown when every defined interval excludes 0 on the same side.")


@dataclass
class CellResult:
    """One grid point of the study and its run folder; `run` is None unless the folder holds a finished stage."""

    sequence: str
    variant: str
    seed: int
    path: Path
    run: Run | None
    status: str  # "complete", "unfinished (t/N stages)", "missing", "no stage finished" or "unreadable: ..."

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    @cached_property
    def values(self) -> dict[str, float]:
        """The study metrics of a complete cell (loss and GP/IP metrics only where recorded)."""
        if not self.complete or self.run is None:
            return {}
        found = {**self.run.metrics(), **self.run.loss_metrics(), **general_summary(self.run.general)}
        return {m: float(found[m]) for m in STUDY_METRICS if m in found}

    @cached_property
    def examples(self) -> dict[tuple[int, str], Examples]:
        return read_examples(self.path) if self.run is not None else {}

    def example_block(self, field: str) -> list[tuple[np.ndarray, np.ndarray]] | None:
        """Per task j: (example indices, values of shape (2, K): after learning task j, after the last stage) of
        `field` ("score" or "nll"); None when generations.jsonl lacks them or they do not average to the matrix."""
        run = self.run
        if run is None or not self.complete:
            return None
        matrix = run.R if field == "score" else run.R_loss
        last = len(run.tasks)
        block = []
        for j, task in enumerate(run.tasks):
            learned, final = self.examples.get((j + 1, task)), self.examples.get((last, task))
            if matrix is None or learned is None or final is None or not np.array_equal(learned.index, final.index):
                return None
            values = np.stack([getattr(learned, field), getattr(final, field)])
            expected = np.array([matrix[j, j], matrix[last - 1, j]])
            if not np.isfinite(values).all() or not np.allclose(values.mean(axis=1), expected, rtol=1e-6, atol=1e-6):
                return None
            block.append((learned.index, values))
        return block


@dataclass
class StudyResults:
    """study.json and its cells, with the sequences, variants and references in the spec's order."""

    path: Path
    spec: dict[str, Any]
    cells: list[CellResult]
    sequences: list[str]
    variants: list[str]
    references: list[str]

    def cells_of(self, sequence: str, variant: str) -> list[CellResult]:
        return sorted((c for c in self.cells if c.sequence == sequence and c.variant == variant), key=lambda c: c.seed)

    def tasks(self, sequence: str) -> list[str]:
        return next((c.run.tasks for c in self.cells if c.sequence == sequence and c.run is not None), [])

    def method(self, variant: str) -> str:
        """The variant's method (its init method, or its adapter type when that is not LoRA), from its runs, else
        from the spec (the variant's overrides over the base)."""
        found = next((c.run.method for c in self.cells if c.variant == variant and c.run is not None), None)
        if found:
            return found
        override = (self.spec.get("variants") or {}).get(variant) or {}
        base = self.spec.get("base") or {}
        try:
            return str(method_name({**flatten(base), **flatten(override)}) or "?")
        except ConfigError:
            return "?"


def _read_cell(study_dir: Path, entry: Any, where: str) -> CellResult:
    if not isinstance(entry, dict) or not all(k in entry for k in ("sequence", "variant", "seed", "dir")):
        raise DataError(f"{where}: expected {{\"sequence\", \"variant\", \"seed\", \"dir\"}}, got {entry!r}")
    seed = entry["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"{where} field seed: expected an integer, got {seed!r}")
    path = study_dir / str(entry["dir"])
    cell = CellResult(str(entry["sequence"]), str(entry["variant"]), seed, path, None, "missing")
    if not is_run_folder(path):
        return cell
    try:
        if not finished_stages(path):
            cell.status = "no stage finished"  # running its first stage, or stopped in it
            return cell
        cell.run = read_run(path)
    except DataError as e:
        cell.status = f"unreadable: {e}"
        return cell
    done, total = cell.run.stages_done, 1 if cell.run.multitask else len(cell.run.tasks)
    cell.status = "complete" if cell.run.complete else f"unfinished ({done}/{total} stages)"
    return cell


def read_study_results(study_dir: str | Path) -> StudyResults:
    """Read STUDY/study.json and every cell's run folder; a cell whose folder is missing, has no finished stage, is
    unfinished or unreadable keeps that status (and its run, where it has finished stages) instead of failing the
    study."""
    study_dir = Path(study_dir)
    path = study_dir / "study.json"
    if not path.is_file():
        raise DataError(f"{study_dir} is not a study folder: it has no study.json")
    study = read_json(path)
    spec = study.get("spec") if isinstance(study, dict) else None
    if not isinstance(spec, dict) or not isinstance(study.get("cells"), list):
        raise DataError(f"{path}: expected {{\"spec\": {{...}}, \"cells\": [...]}}")
    for key in ("variants", "sequences"):
        if not isinstance(spec.get(key, {}), dict):
            raise DataError(f"{path} field spec.{key}: expected an object keyed by name")
    references = spec.get("reference") or []
    if isinstance(references, str):
        references = [references]
    if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
        raise DataError(f"{path} field spec.reference: expected a list of variant names, got {references!r}")
    cells = [_read_cell(study_dir, entry, f"{path} cells[{i}]") for i, entry in enumerate(study["cells"])]
    for sequence in dict.fromkeys(c.sequence for c in cells):  # the seeds of a sequence must share its tasks
        tasks = next((c.run.tasks for c in cells if c.sequence == sequence and c.run is not None), None)
        for c in cells:
            if c.sequence == sequence and c.run is not None and c.run.tasks != tasks:
                c.status = f"unreadable: its tasks {c.run.tasks} differ from the sequence's {tasks}"
                c.run = None
    sequences = list(dict.fromkeys([*spec.get("sequences", {}), *(c.sequence for c in cells)]))
    variants = list(dict.fromkeys([*spec.get("variants", {}), *(c.variant for c in cells)]))
    return StudyResults(study_dir, spec, cells, sequences, variants, references)


# --- statistics ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    """One line of study.csv. kind "mean": a variant's mean over seeds with its t interval (reference empty, no
    bootstrap); kind "difference": variant - reference, paired by seed, with t and bootstrap intervals."""

    kind: str
    sequence: str
    variant: str
    reference: str
    metric: str
    seeds: tuple[int, ...]
    mean: float
    sd: float
    ci_low: float
    ci_high: float
    boot_low: float = math.nan
    boot_high: float = math.nan
    resampled: str = ""


def _seed_values(cells: list[CellResult], metric: str) -> dict[int, float]:
    return {c.seed: c.values[metric] for c in cells if metric in c.values}


def _paired_block(v: CellResult, r: CellResult, field: str) -> list[np.ndarray] | None:
    """Per task an array (2 runs, 2 cells, K) of the examples both cells scored, or None if they lack them."""
    a, b = v.example_block(field), r.example_block(field)
    if a is None or b is None or any(not np.array_equal(ia, ib) for (ia, _), (ib, _) in zip(a, b)):
        return None
    return [np.stack([va, vb]) for (_, va), (_, vb) in zip(a, b)]


def compare(variant: list[CellResult], reference: list[CellResult], *, B: int = 2000,
            seed: int = 0) -> dict[str, tuple[list[int], Difference]]:
    """Paired differences variant - reference per study metric: (the seeds used, the Difference). Score and loss
    metrics are bootstrapped over seeds and examples when every paired seed has matching per-example data, over
    seeds only otherwise (and GP/IP always)."""
    by_seed_v, by_seed_r = {c.seed: c for c in variant}, {c.seed: c for c in reference}
    out: dict[str, tuple[list[int], Difference]] = {}
    for family, field in ((SCORE_METRICS, "score"), (LOSS_METRICS, "nll")):
        boot: dict[str, tuple[float, float]] | None = None
        tried = False  # the metrics of a family are recorded together: one bootstrap, on the same seeds, serves all
        for metric, summary in family.items():
            seeds, diffs = paired_differences(_seed_values(variant, metric), _seed_values(reference, metric))
            if not seeds:
                continue
            if not tried:
                tried = True
                pairs = [_paired_block(by_seed_v[s], by_seed_r[s], field) for s in seeds]
                if all(p is not None for p in pairs):
                    boot = bootstrap_paired(pairs, B=B, seed=seed)
            out[metric] = (seeds, difference(diffs, boot[summary] if boot else None, B=B, seed=seed))
    for metric in GENERAL_METRICS:
        seeds, diffs = paired_differences(_seed_values(variant, metric), _seed_values(reference, metric))
        if seeds:
            out[metric] = (seeds, difference(diffs, None, B=B, seed=seed))
    return out


def study_rows(study: StudyResults, *, B: int = 2000, seed: int = 0) -> list[Row]:
    """Every mean row (sequence x variant x metric) and difference row (sequence x variant x reference x metric);
    a reference is not compared again with an earlier reference (that difference is there already, reversed)."""
    rows: list[Row] = []
    for sequence in study.sequences:
        for variant in study.variants:
            cells = [c for c in study.cells_of(sequence, variant) if c.complete]
            for metric in STUDY_METRICS:
                values = _seed_values(cells, metric)
                if values:
                    s = t_summary(list(values.values()))
                    rows.append(Row("mean", sequence, variant, "", metric, tuple(values), s.mean, s.sd, s.low, s.high))
        for k, reference in enumerate(study.references):
            ref_cells = [c for c in study.cells_of(sequence, reference) if c.complete]
            for variant in study.variants:
                if variant == reference or variant in study.references[:k]:
                    continue
                cells = [c for c in study.cells_of(sequence, variant) if c.complete]
                for metric, (seeds, d) in compare(cells, ref_cells, B=B, seed=seed).items():
                    rows.append(Row("difference", sequence, variant, reference, metric, tuple(seeds), d.mean, d.sd,
                                    d.t_low, d.t_high, d.boot_low, d.boot_high, d.resampled))
    return rows


CSV_COLUMNS = ("kind", "sequence", "variant", "reference", "metric", "n", "seeds", "mean", "sd", "ci_low", "ci_high",
               "boot_low", "boot_high", "resampled")


def rows_csv(rows: list[Row]) -> str:
    """study.csv: full-precision numbers, empty cells where a value is undefined; ci_* is the Student-t interval."""
    def number(x: float) -> str:
        return repr(float(x)) if math.isfinite(x) else ""
    buf = _io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        writer.writerow([r.kind, r.sequence, r.variant, r.reference, r.metric, len(r.seeds),
                         " ".join(map(str, r.seeds)), *(number(x) for x in (r.mean, r.sd, r.ci_low, r.ci_high,
                                                                           r.boot_low, r.boot_high)), r.resampled])
    return buf.getvalue()


# --- study.md ------------------------------------------------------------------------------------------------------

def _digits(metric: str) -> int:
    return 3 if metric.startswith("loss") else 1


def _fmt(x: float, digits: int, sign: bool = False) -> str:
    if not math.isfinite(x):
        return "-"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _interval(low: float, high: float, digits: int) -> str:
    return f"{_fmt(low, digits)} to {_fmt(high, digits)}" if math.isfinite(low) else "-"


def finding(row: Row) -> str:
    """One sentence on a difference row: the direction when every defined 95% interval excludes 0 on one side,
    else that no difference is shown and why."""
    v, r, m, seq, d = row.variant, row.reference, row.metric, row.sequence, _digits(row.metric)
    n = len(row.seeds)
    intervals = [(name, lo, hi) for name, lo, hi in (("t", row.ci_low, row.ci_high),
                                                     ("bootstrap", row.boot_low, row.boot_high)) if math.isfinite(lo)]
    shown = []
    for name, lo, hi in intervals:
        if lo > 0 or hi < 0:
            shown.append((name, 1 if lo > 0 else -1))
    parts = [f"{m} {_fmt(row.mean, d, sign=True)}"]
    for name, lo, hi in intervals:
        label = "95% CI" if name == "t" else ("bootstrap" if len(intervals) > 1 else
                                              f"95% bootstrap CI over {row.resampled}")
        parts.append(f"{label} {_interval(lo, hi, d)}")
    parts.append(f"{n} seeds" if n != 1 else "1 seed, so seed-to-seed variation is not covered")
    detail = ", ".join(parts)
    signs = {s for _, s in shown}
    if intervals and len(shown) == len(intervals) and len(signs) == 1:
        phrase = _DIRECTION[m][0 if signs == {1} else 1]
        return f"{v} {phrase} {r} on {seq} ({detail})."
    if not intervals:
        reason = "no interval is defined"
    elif len(signs) > 1:
        reason = "the intervals lie on opposite sides of 0"
    elif len(intervals) == 1 or not shown:
        reason = "the interval includes 0" if len(intervals) == 1 else "both intervals include 0"
    else:
        reason = f"the {next(name for name, _, _ in intervals if name not in dict(shown))} interval includes 0"
    return f"{v} vs {r} on {seq}, {m}: no difference shown: {reason} ({detail})."


def _md_table(columns: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table: columns of numbers (every cell starting with a digit, a sign or "-") right-aligned."""
    numeric = [all(re.match(r"[-+±0-9.]", row[i]) for row in rows) for i in range(len(columns))]
    return ["| " + " | ".join(columns) + " |", "|" + "|".join(" ---: " if n else " --- " for n in numeric) + "|",
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def _cells_section(study: StudyResults) -> list[str]:
    complete = sum(c.complete for c in study.cells)
    lines = ["## Cells", "", f"{complete} of {len(study.cells)} cells complete.", ""]
    others = [c for c in study.cells if not c.complete]
    if others:
        lines += _md_table(["sequence", "variant", "seed", "status", "folder"],
                           [[c.sequence, c.variant, str(c.seed), c.status.replace("|", "/"),
                             str(c.path.relative_to(study.path)) if c.path.is_relative_to(study.path) else str(c.path)]
                            for c in others])
    return lines


def _means_table(study: StudyResults, sequence: str, rows: list[Row]) -> list[str]:
    means = {(r.variant, r.metric): r for r in rows if r.kind == "mean" and r.sequence == sequence}
    metrics = [m for m in STUDY_METRICS if any(k[1] == m for k in means)]
    table = []
    for variant in study.variants:
        cells = study.cells_of(sequence, variant)
        line = [variant, study.method(variant), f"{sum(c.complete for c in cells)}/{len(cells)}"]
        for m in metrics:
            r = means.get((variant, m))
            if r is None:
                line.append("-")
            elif math.isfinite(r.ci_low):
                line.append(f"{_fmt(r.mean, _digits(m))} ± {_fmt(r.ci_high - r.mean, _digits(m))}")
            else:
                line.append(_fmt(r.mean, _digits(m)))
        table.append(line)
    return ["### Mean ± 95% t half-width over seeds", "", *_md_table(["variant", "method", "seeds", *metrics], table)]


def _differences(study: StudyResults, sequence: str, rows: list[Row]) -> list[str]:
    lines: list[str] = []
    for k, reference in enumerate(study.references):
        if not set(study.variants) - set(study.references[:k + 1]):
            continue  # every other variant is an earlier reference, compared with this one there
        diffs = [r for r in rows if r.kind == "difference" and r.sequence == sequence and r.reference == reference]
        lines += [f"### Differences against {reference} (variant - {reference})", ""]
        if not diffs:
            lines += [f"No variant shares a complete seed with {reference} on {sequence}.", ""]
            continue
        lines += _md_table(["variant", "metric", "seeds", "difference", "95% t CI", "95% bootstrap CI", "resampled"],
                           [[r.variant, r.metric, str(len(r.seeds)), _fmt(r.mean, _digits(r.metric), sign=True),
                             _interval(r.ci_low, r.ci_high, _digits(r.metric)),
                             _interval(r.boot_low, r.boot_high, _digits(r.metric)), r.resampled or "-"]
                            for r in diffs])
    findings = [finding(r) for r in rows if r.kind == "difference" and r.sequence == sequence and r.metric in HEADLINE]
    if findings:
        lines += ["### Findings", "", *(f"- {f}" for f in findings), ""]
    return lines


def gate_record(cell: CellResult) -> list[tuple[int, float, bool | None]]:
    """(stage, global cosine, fired) at every finished stage >= 2 of a cell whose init has a gradient surgery
    (SLICE: a surgery record at some stage); fired is None at a stage without a record."""
    if cell.run is None or not any(isinstance((init or {}).get("surgery"), dict) for init in cell.run.init):
        return []
    out = []
    for stage, init in enumerate(cell.run.init[1:], start=2):
        surgery = (init or {}).get("surgery")
        if isinstance(surgery, dict):
            out.append((stage, as_number(surgery.get("cosine")), bool(np.any(surgery.get("fired")))))
        else:
            out.append((stage, math.nan, None))
    return out


def _gate_section(study: StudyResults) -> list[str]:
    lines = ["## SLICE gate record", "",
             "The global cosine between the current and replay gradients at each stage from 2 on (stage 1 has no "
             "replay), and whether the gate fired (the projection was applied).", ""]
    any_slice = False
    for sequence in study.sequences:
        for variant in study.variants:
            records = [(c, gate_record(c)) for c in study.cells_of(sequence, variant)]
            records = [(c, rec) for c, rec in records if rec]
            if not records:
                continue
            any_slice = True
            tau = next((gate_tau(c.run) for c, _ in records if c.run is not None and gate_tau(c.run) is not None), None)
            stages = sorted({s for _, rec in records for s, _, _ in rec})
            table = []
            for c, rec in records:
                by_stage = {s: (cos, fired) for s, cos, fired in rec}
                table.append([str(c.seed), *(("-" if s not in by_stage else
                                             f"{_fmt(by_stage[s][0], 3)} " + {True: "fired", False: "not",
                                                                               None: "no record"}[by_stage[s][1]])
                                            for s in stages),
                              f"{sum(f is True for _, _, f in rec)}/{len(rec)}"])
            fired = sum(f is True for _, rec in records for _, _, f in rec)
            total = sum(len(rec) for _, rec in records)
            lines += [f"### {variant} on {sequence}" + (f" (tau = {tau:g})" if tau is not None else ""), "",
                      f"The gate fired at {fired} of {total} stages (stage >= 2, all seeds).", "",
                      *_md_table(["seed", *(f"stage {s}" for s in stages), "fired"], table)]
    if not any_slice:
        lines += ["No SLICE cell has finished a stage >= 2.", ""]
    return lines


def _compute_section(study: StudyResults) -> list[str]:
    table, total = [], 0.0
    for sequence in study.sequences:
        for variant in study.variants:
            timings = [t for c in study.cells_of(sequence, variant) if c.run is not None for t in c.run.timing or []]
            if not any(timings):
                continue
            timed = [t for t in timings if t]
            seconds = [sum(as_number(t.get(step)) for t in timed if math.isfinite(as_number(t.get(step))))
                       for step in TIMED_STEPS]
            total += sum(seconds)
            table.append([sequence, variant, f"{len(timed)}/{len(timings)}", *(f"{s:.0f}" for s in seconds),
                          f"{sum(seconds):.0f}", str(sum(bool(t.get("shared")) for t in timed))])
    lines = ["## Compute", ""]
    if not table:
        return lines + ["No finished stage records its timing (timing.json).", ""]
    return lines + ["Seconds summed over seeds and finished stages (timing.json). A shared stage took its trained "
                    "adapter and scores from another cell that reached the same state, so it did not train.", "",
                    *_md_table(["sequence", "variant", "stages timed", *(f"{s} s" for s in TIMED_STEPS), "total s",
                                "shared stages"], table), f"Total: {total:.0f} s ({total / 3600:.2f} h).", ""]


def study_markdown(study: StudyResults, rows: list[Row], *, B: int = 2000) -> str:
    """study.md: the legend, the cells' state, per sequence the means, differences and findings, the SLICE gate
    record and the compute."""
    lines = [f"# Study {study.path.name}", "", LEGEND.format(B=B), ""]
    lines += _cells_section(study)
    if not study.references:
        lines += ["The spec names no reference variant, so there are no differences to report.", ""]
    for sequence in study.sequences:
        ref = study.spec.get("sequences", {}).get(sequence)
        tasks = study.tasks(sequence)
        lines += [f"## Sequence {sequence}" + (f" ({ref})" if isinstance(ref, str) else ""), ""]
        if tasks:
            lines += [f"Tasks: {', '.join(tasks)}.", ""]
        lines += _means_table(study, sequence, rows)
        lines += _differences(study, sequence, rows)
    lines += _gate_section(study)
    lines += _compute_section(study)
    return "\n".join(lines)


# --- figures -------------------------------------------------------------------------------------------------------

def _file_label(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "sequence"


def plot_forest(study: StudyResults, rows: list[Row], path: Path) -> Path | None:
    """Differences against the main reference: a panel per metric, a row per sequence x variant, the mean with its
    t interval (thick) and bootstrap interval (thin, just below), a line at 0; "n/a" where no seed pairs up. None
    without a reference or any difference."""
    if not study.references:
        return None
    reference = study.references[0]
    diffs = {(r.sequence, r.variant, r.metric): r for r in rows if r.kind == "difference" and r.reference == reference}
    metrics = [m for m in STUDY_METRICS if any(k[2] == m for k in diffs)]
    labels = [(s, v) for s in study.sequences for v in study.variants if v != reference]
    if not metrics or not labels:
        return None
    fig, axes = new_figure(len(metrics), 4, (3.2, 0.9 + 0.32 * len(labels)))
    y = np.arange(len(labels))[::-1].astype(float)
    for ax, metric in zip(axes, metrics):
        ax.axvline(0, color="grey", lw=0.8)
        for yi, (s, v) in zip(y, labels):
            r = diffs.get((s, v, metric))
            if r is None:
                ax.text(0, yi, "n/a", ha="center", va="center", fontsize=7, color="dimgrey")
                continue
            if math.isfinite(r.ci_low):
                ax.plot([r.ci_low, r.ci_high], [yi, yi], color="C0", lw=3, solid_capstyle="butt")
            if math.isfinite(r.boot_low):
                ax.plot([r.boot_low, r.boot_high], [yi - 0.22, yi - 0.22], color="C1", lw=1.2)
            ax.plot([r.mean], [yi], "o", color="black", ms=4, zorder=3)
        ax.set_yticks(y, [f"{v} | {s}" for s, v in labels], fontsize=7)
        ax.set_ylim(-0.7, len(labels) - 0.3)
        ax.set_title(f"{metric}: variant - {reference}", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    handles = [axes[0].plot([], [], color="C0", lw=3)[0], axes[0].plot([], [], color="C1", lw=1.2)[0]]
    fig.legend(handles, ["95% t interval over seeds", "95% bootstrap (seeds and examples)"], loc="outside lower center",
               ncols=2, fontsize=8)
    return save_png(fig, path)


def _stacked_r(cells: list[CellResult], n_tasks: int) -> np.ndarray:
    """The readable cells' R, padded to N x N with NaN (stages not finished): shape (cells, N, N). A multi-task
    cell's one row is its final scores: it goes in the last row."""
    out = np.full((len(cells), n_tasks, n_tasks), np.nan)
    for k, c in enumerate(cells):
        if c.run.multitask:
            out[k, -1] = c.run.R[-1]
        else:
            out[k, :c.run.stages_done] = c.run.R
    return out


def _nan_stat(stack: np.ndarray, fn) -> np.ndarray:
    """fn over axis 0 ignoring NaN; NaN where every value is NaN (no warning)."""
    present = ~np.isnan(stack).all(axis=0)
    out = np.full(stack.shape[1:], np.nan)
    out[present] = fn(stack[:, present], axis=0)
    return out


def plot_mean_r(study: StudyResults, sequence: str, path: Path) -> Path | None:
    """A heatmap per variant of R averaged over the seeds that finished each stage (grey: no seed did), with the
    number of seeds per row when it varies. None when no cell of the sequence has a finished stage."""
    tasks = study.tasks(sequence)
    panels = [(v, [c for c in study.cells_of(sequence, v) if c.run is not None]) for v in study.variants]
    panels = [(v, cells) for v, cells in panels if cells]
    if not panels:
        return None
    side = max(3.2, 0.62 * len(tasks) + 1.4)
    fig, axes = new_figure(len(panels), 3, (side, side * 0.85))
    image = None
    for ax, (variant, cells) in zip(axes, panels):
        stack = _stacked_r(cells, len(tasks))
        mean = _nan_stat(stack, np.nanmean)
        counts = (~np.isnan(stack)).sum(axis=0).max(axis=1)  # seeds per stage row
        image = ax.imshow(np.ma.masked_invalid(mean), vmin=0, vmax=100, cmap=SCORE_CMAP)
        for (i, j), v in np.ndenumerate(mean):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8, color="white" if v < 60 else "black")
        varying = len(set(counts[counts > 0])) > 1
        ax.set_xticks(range(len(tasks)), [short_name(t, 12) for t in tasks], rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(tasks)), [f"{i + 1}" + (f" (n={counts[i]})" if varying else "")
                                          for i in range(len(tasks))], fontsize=8)
        ax.set_ylabel("after stage")
        ax.set_title(f"{variant} ({len(cells)} seeds)", fontsize=10)
    fig.colorbar(image, ax=axes, shrink=0.8, label="mean score")
    fig.suptitle(f"Mean R on {sequence}", fontsize=11)
    return save_png(fig, path)


def plot_curves(study: StudyResults, sequence: str, path: Path) -> Path | None:
    """A panel per task: its score after each stage from the one that learned it, per variant the mean over the
    seeds that finished the stage and a band from their minimum to maximum; each variant with its own marker and
    line style, shifted a little sideways. None when no cell of the sequence has a finished stage."""
    tasks = study.tasks(sequence)
    variants = [(v, [c for c in study.cells_of(sequence, v) if c.run is not None]) for v in study.variants]
    variants = [(v, cells) for v, cells in variants if cells]
    if not variants:
        return None
    fig, axes = new_figure(len(tasks), 4, (3.4, 2.6))
    n = len(tasks)
    for j, (ax, task) in enumerate(zip(axes, tasks)):
        for k, (variant, cells) in enumerate(variants):
            stack = _stacked_r(cells, n)[:, j:, j]  # (seeds, stages j..N)
            if np.isnan(stack).all():
                continue
            style = series_style(k, len(variants))
            x = np.arange(j + 1, n + 1) + style["offset"]
            color = f"C{k % 10}"
            low = _nan_stat(stack, np.nanmin)
            ax.fill_between(x, low, _nan_stat(stack, np.nanmax), where=~np.isnan(low), color=color, alpha=0.15, lw=0)
            ax.plot(x, _nan_stat(stack, np.nanmean), marker=style["marker"], ls=style["linestyle"], ms=4, lw=1.3,
                    color=color, mfc="none" if k % 2 else color, label=variant)
        curve_axis(ax, task, n)
    curve_legend(fig, axes)
    fig.suptitle(f"{sequence}: mean over seeds, band = min to max", fontsize=11)
    return save_png(fig, path)


def plot_gate(study: StudyResults, path: Path) -> Path | None:
    """SLICE's gate: a panel per sequence, the global cosine at each stage >= 2 per variant (colour) and seed
    (marker), filled where the gate fired and hollow where it did not, a dashed line at each variant's tau. None
    when no SLICE cell records a cosine."""
    panels = []
    for sequence in study.sequences:
        series = [(v, c, gate_record(c)) for v in study.variants for c in study.cells_of(sequence, v)]
        series = [(v, c, rec) for v, c, rec in series if any(math.isfinite(cos) for _, cos, _ in rec)]
        if series:
            panels.append((sequence, series))
    if not panels:
        return None
    fig, axes = new_figure(len(panels), 2, (5.5, 3.6))
    variants = [v for v in study.variants if any(v == sv for _, series in panels for sv, _, _ in series)]
    seeds = sorted({c.seed for _, series in panels for _, c, _ in series})
    for ax, (sequence, series) in zip(axes, panels):
        for k, (variant, cell, rec) in enumerate(series):
            color = f"C{variants.index(variant) % 10}"
            style = series_style(k, len(series))
            marker = series_style(seeds.index(cell.seed), len(seeds))["marker"]
            stages = np.array([s for s, _, _ in rec]) + style["offset"]
            cos = np.array([c for _, c, _ in rec])
            ax.plot(stages, cos, color=color, lw=0.8, alpha=0.6)
            ax.scatter(stages, cos, s=36, zorder=3, marker=marker, edgecolors=color,
                       facecolors=[color if f else "white" for _, _, f in rec])
        for variant in dict.fromkeys(v for v, _, _ in series):
            tau = next((gate_tau(c.run) for v, c, _ in series if v == variant and gate_tau(c.run) is not None), None)
            if tau is not None:
                ax.axhline(tau, color=f"C{variants.index(variant) % 10}", ls="--", lw=1)
        last = max(s for _, _, rec in series for s, _, _ in rec)
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_xlim(1.5, last + 0.5)
        ax.set_xticks(range(2, last + 1))
        ax.set_xlabel("stage")
        ax.set_ylabel("cos(G_cur, G_rep)")
        ax.set_title(f"{sequence} (filled = gate fired, dashed = tau)", fontsize=10)
        ax.grid(alpha=0.3)
    handles = [axes[0].plot([], [], color=f"C{i % 10}", lw=2)[0] for i in range(len(variants))]
    handles += [axes[0].scatter([], [], marker=series_style(i, len(seeds))["marker"], edgecolors="black",
                                facecolors="white") for i in range(len(seeds))]
    fig.legend(handles, [*variants, *(f"seed {s}" for s in seeds)], loc="outside lower center",
               ncols=min(len(handles), 6), fontsize=8)
    return save_png(fig, path)


def write_study_report(study_dir: str | Path, *, B: int = 2000, seed: int = 0) -> list[Path]:
    """Read STUDY/study.json and its cells; write STUDY/study.csv, STUDY/study.md and the figures under
    STUDY/plots/ (forest.png, r_mean_<sequence>.png, curves_<sequence>.png, gate.png where there is data), all
    atomically. B bootstrap draws from numpy's default_rng(seed). Returns the written paths; run folders are not
    modified."""
    study = read_study_results(study_dir)
    rows = study_rows(study, B=B, seed=seed)
    csv_path, md_path, plots = study.path / "study.csv", study.path / "study.md", study.path / "plots"
    io.write_text(csv_path, rows_csv(rows))
    io.write_text(md_path, study_markdown(study, rows, B=B))
    written = [csv_path, md_path]
    figures = [(plot_forest, (study, rows, plots / "forest.png"))]
    for sequence in study.sequences:
        name = _file_label(sequence)
        figures += [(plot_mean_r, (study, sequence, plots / f"r_mean_{name}.png")),
                    (plot_curves, (study, sequence, plots / f"curves_{name}.png"))]
    figures.append((plot_gate, (study, plots / "gate.png")))
    for plot, args in figures:
        result = plot(*args)
        if result is not None:
            written.append(result)
    return written
