"""CL metrics on hand-computed matrices, reading run folders, comparison tables and figures."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from slicelora.errors import ConfigError, DataError
from slicelora.eval.metrics import cl_metrics, loss_metrics
from slicelora.report.plots import mark_zero_and_missing, new_figure, series_style, write_report
from slicelora.loop.runfolder import find_run_dirs, read_examples, read_run, write_run_summary
from slicelora.report.tables import comparison_table, final_scores_table, report_markdown, rich_table, to_csv

NAN = np.nan
TASKS = ["task363_sst2_polarity_classification", "task1510_evalution_relation_extraction", "FOMC"]
# Hand-worked 3 x 3 example (rows = after stage, columns = tasks):
#   AP = (80 + 90 + 75)/3 = 81.667          FP = (60 + 85 + 75)/3 = 73.333        Forget = 25/3 = 8.333
#   BWT = ((60 - 80) + (85 - 90))/2 = -12.5  BWT_trace = -25/3 = -8.333
#   max_forgetting: task 1 best before the end = max(80, 88) = 88 -> 88 - 60 = 28; task 2: 90 - 85 = 5; mean 16.5
R3 = np.array([[80, NAN, NAN],
               [88, 90, NAN],
               [60, 85, 75]])
R3_METRICS = {"AP": 245 / 3, "FP": 220 / 3, "Forget": 25 / 3, "BWT": -12.5, "BWT_trace": -25 / 3,
              "max_forgetting": 16.5}
PNG = b"\x89PNG\r\n\x1a\n"


def write_run(root: Path, method: str, tasks: list[str], R: np.ndarray, *, general=None, init=None,
              L: np.ndarray | None = None) -> Path:
    """A run folder written by hand in the stage loop's layout (one stage folder per row of R; with L, scores.json
    records losses as well)."""
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"model": "tiny", "sequence": "test", "init": {"method": method}}))
    (root / "tasks.json").write_text(json.dumps(tasks))
    for i, row in enumerate(R):
        stage = root / "stages" / f"{i + 1:02d}"
        stage.mkdir(parents=True)
        scores = {t: float(v) for t, v in zip(tasks, row) if not np.isnan(v)}
        record = {"stage": i + 1, "scores": scores}
        if L is not None:
            record["losses"] = {t: float(v) for t, v in zip(tasks, L[i]) if not np.isnan(v)}
        (stage / "scores.json").write_text(json.dumps(record))
        if init is not None:
            (stage / "init.json").write_text(json.dumps(init[i]))
    if general is not None:
        (root / "general.json").write_text(json.dumps(general))
    return root


def read_csv(path: Path) -> list[list[str]]:
    return list(csv.reader(path.read_text().splitlines()))


GENERAL = {"base": {"GP": {"hellaswag": 50.0, "csqa": 60.0}, "IP": {"hellaswag": 52.0, "csqa": 64.0}},
           "final": {"GP": {"hellaswag": 40.0, "csqa": 58.0}, "IP": {"hellaswag": 50.0, "csqa": 60.0}}}
INIT = [{"method": "slice", "cosine": None, "fired": False, "tau": 0.0},
        {"method": "slice", "cosine": -0.2, "fired": True, "scalar": 0.3, "tau": 0.0},
        {"method": "slice", "cosine": 0.4, "fired": False, "scalar": 0.0, "tau": 0.0}]


# --- cl_metrics -------------------------------------------------------------------------------------------------

def test_cl_metrics_hand_worked_3x3():
    assert cl_metrics(R3) == pytest.approx(R3_METRICS)


def test_cl_metrics_backward_transfer_2x2():
    # Learning task 2 improved task 1 (50 -> 70): AP = 45, FP = 55, Forget = -10, BWT = 20, BWT_trace = 20/2,
    # max_forgetting = 50 - 70 = -20.
    got = cl_metrics([[50, NAN], [70, 40]])
    assert got == pytest.approx({"AP": 45, "FP": 55, "Forget": -10, "BWT": 20, "BWT_trace": 10,
                                 "max_forgetting": -20})


def test_forget_is_minus_bwt_trace():
    rng = np.random.default_rng(0)
    R = np.where(np.tril(np.ones((5, 5), bool)), rng.uniform(0, 100, (5, 5)), NAN)
    m = cl_metrics(R)
    assert m["Forget"] == pytest.approx(-m["BWT_trace"])
    assert m["BWT_trace"] == pytest.approx(m["BWT"] * 4 / 5)


def test_cl_metrics_single_task_has_no_forgetting():
    assert cl_metrics([[42.0]]) == {"AP": 42.0, "FP": 42.0, "Forget": 0.0, "BWT": 0.0, "BWT_trace": 0.0,
                                    "max_forgetting": 0.0}


@pytest.mark.parametrize("R, match", [
    (np.zeros((2, 3)), "square"),
    (np.zeros((0, 0)), "square"),
    (np.zeros(3), "square"),
    ([[50, NAN], [NAN, 40]], r"R\[1, 0\].*0\.\.100"),
    ([[50, NAN], [120, 40]], r"R\[1, 0\] .* = 120"),
    ([[50, 10], [70, 40]], "above the diagonal"),
    ([["a", NAN], [1, 2]], "not numeric"),
])
def test_cl_metrics_rejects_bad_matrices(R, match):
    with pytest.raises(DataError, match=match):
        cl_metrics(R)


# --- run folders -------------------------------------------------------------------------------------------------

def test_read_run(tmp_path):
    run = read_run(write_run(tmp_path / "slice", "slice", TASKS, R3, general=GENERAL, init=INIT))
    assert run.method == "slice" and run.tasks == TASKS and run.complete and run.stages_done == 3
    np.testing.assert_array_equal(run.R, R3)
    assert run.init[1]["cosine"] == -0.2 and run.general == GENERAL
    assert run.metrics() == pytest.approx(R3_METRICS)


def test_unfinished_run_reports_tasks_learned_so_far(tmp_path):
    run = read_run(write_run(tmp_path / "lora", "lora", TASKS, R3[:2]))
    assert run.stages_done == 2 and not run.complete and run.init == [None, None]
    assert run.metrics() == pytest.approx(cl_metrics(R3[:2, :2]))


def test_write_run_summary(tmp_path):
    run_dir = write_run(tmp_path / "run", "slice", TASKS, R3, general=GENERAL)
    summary = write_run_summary(run_dir)
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert on_disk == summary
    assert on_disk == pytest.approx({"method": "slice", "stages_done": 3, "tasks": 3, **R3_METRICS,
                                     "GP_base": 55.0, "GP_final": 49.0, "GP_delta": -6.0, "IP_base": 58.0,
                                     "IP_final": 55.0, "IP_delta": -3.0, "GP_base[hellaswag]": 50.0,
                                     "GP_base[csqa]": 60.0, "GP_final[hellaswag]": 40.0, "GP_final[csqa]": 58.0,
                                     "IP_base[hellaswag]": 52.0, "IP_base[csqa]": 64.0,
                                     "IP_final[hellaswag]": 50.0, "IP_final[csqa]": 60.0})
    assert read_csv(run_dir / "R.csv") == [["stage", *TASKS], ["1", "80.0", "", ""], ["2", "88.0", "90.0", ""],
                                           ["3", "60.0", "85.0", "75.0"]]
    assert not list(run_dir.glob(".*.tmp"))
    assert read_run(run_dir).R_loss is None and not (run_dir / "R_loss.csv").exists()  # no losses recorded


# Hand-worked loss matrix (mean per-token answer NLL):
#   loss_learned = (1.0 + 0.8 + 0.5)/3 = 0.766667   loss_final = (2.0 + 1.2 + 0.5)/3 = 1.233333
#   loss_increase = ((2.0 - 1.0) + (1.2 - 0.8))/2 = 0.7
L3 = np.array([[1.0, NAN, NAN],
               [1.5, 0.8, NAN],
               [2.0, 1.2, 0.5]])
L3_METRICS = {"loss_learned": 2.3 / 3, "loss_final": 3.7 / 3, "loss_increase": 0.7}


def test_loss_metrics_hand_worked():
    assert loss_metrics(L3) == pytest.approx(L3_METRICS)
    assert loss_metrics([[0.9]]) == {"loss_learned": 0.9, "loss_final": 0.9, "loss_increase": 0.0}


@pytest.mark.parametrize("L, match", [([[1.0, NAN], [-0.1, 2.0]], r"L\[1, 0\].*loss >= 0"),
                                      ([[1.0, 0.5], [1.0, 2.0]], "above the diagonal"),
                                      (np.zeros((2, 3)), "square")])
def test_loss_metrics_reject_bad_matrices(L, match):
    with pytest.raises(DataError, match=match):
        loss_metrics(L)


def test_loss_matrix_from_scores_json(tmp_path):
    run_dir = write_run(tmp_path / "run", "slice", TASKS, R3, L=L3)
    run = read_run(run_dir)
    np.testing.assert_array_equal(run.R_loss, L3)
    summary = write_run_summary(run_dir)
    assert {k: summary[k] for k in L3_METRICS} == pytest.approx(L3_METRICS)
    assert read_csv(run_dir / "R_loss.csv") == [["stage", *TASKS], ["1", "1.0", "", ""], ["2", "1.5", "0.8", ""],
                                                ["3", "2.0", "1.2", "0.5"]]


def test_loss_matrix_unfinished_and_partial(tmp_path):
    run = read_run(write_run(tmp_path / "two", "slice", TASKS, R3[:2], L=L3[:2]))
    assert run.loss_metrics() == pytest.approx(loss_metrics(L3[:2, :2]))
    run_dir = write_run(tmp_path / "mixed", "slice", TASKS, R3, L=L3)
    (run_dir / "stages/01/scores.json").write_text(json.dumps({"stage": 1, "scores": {TASKS[0]: 80.0}}))
    assert read_run(run_dir).R_loss is None  # a stage from before losses were recorded: no loss matrix
    assert "loss_final" not in write_run_summary(run_dir) and not (run_dir / "R_loss.csv").exists()


def test_bad_loss_value(tmp_path):
    run_dir = write_run(tmp_path / "run", "slice", TASKS, R3, L=L3)
    (run_dir / "stages/01/scores.json").write_text(json.dumps({"stage": 1, "scores": {TASKS[0]: 80.0},
                                                               "losses": {TASKS[0]: "low"}}))
    with pytest.raises(DataError, match=r"losses\.task363.*mean answer NLL"):
        read_run(run_dir)


def test_read_examples(tmp_path):
    run_dir = write_run(tmp_path / "run", "slice", TASKS[:2], R3[:2, :2])
    lines = [{"task": TASKS[0], "index": 3, "score": 100.0, "nll": 0.25},
             {"task": TASKS[0], "index": 1, "score": 0.0, "nll": 2.0},
             {"task": TASKS[1], "index": 0, "score": 50.0}]  # older record: no nll
    (run_dir / "stages/02/generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    examples = read_examples(run_dir)
    assert set(examples) == {(2, TASKS[0]), (2, TASKS[1])}  # stage 1 has no generations.jsonl
    first = examples[(2, TASKS[0])]
    assert first.index.tolist() == [1, 3] and first.score.tolist() == [0.0, 100.0] and first.nll.tolist() == [2.0, 0.25]
    assert np.isnan(examples[(2, TASKS[1])].nll).all()
    assert read_examples(run_dir, stages=1) == {}
    (run_dir / "stages/02/generations.jsonl").write_text(json.dumps({"task": TASKS[0], "index": 0, "score": 101}))
    with pytest.raises(DataError, match=r"line 1 field score"):
        read_examples(run_dir)
    (run_dir / "stages/02/generations.jsonl").write_text('{"task": "a", "index": 0, "score": 1}\n' * 2)
    with pytest.raises(DataError, match="more than once"):
        read_examples(run_dir)


def test_not_a_run_folder(tmp_path):
    with pytest.raises(DataError, match="not a run folder"):
        read_run(tmp_path)
    with pytest.raises(DataError, match="neither a run folder"):
        find_run_dirs(tmp_path)


@pytest.mark.parametrize("breakage, match", [
    (lambda d: (d / "config.json").write_text("{oops"), r"config\.json: not valid JSON"),
    (lambda d: (d / "config.json").write_text('{"init": {}}'), r"field 'init\.method'"),
    (lambda d: (d / "tasks.json").write_text("[]"), "non-empty list of task names"),
    (lambda d: (d / "tasks.json").unlink(), r"tasks\.json: cannot be read"),
    (lambda d: (d / "stages/02/scores.json").write_text('{"stage": 2, "scores": {"FOMC": 1}}'),
     "no score for task 'task363"),
    (lambda d: (d / "stages/02/scores.json").unlink(), "stage 3 has scores but stage 2 has none"),
    (lambda d: (d / "stages/01/scores.json").write_text('{"stage": 1, "scores": {"%s": "high"}}' % TASKS[0]),
     "expected a score in 0..100"),
    (lambda d: (d / "general.json").write_text('{"final": {"GP": {"hellaswag": 500}}}'),
     r"final\.GP\.hellaswag: expected a score"),
])
def test_bad_run_folders_raise_data_errors(tmp_path, breakage, match):
    run_dir = write_run(tmp_path / "run", "slice", TASKS, R3)
    breakage(run_dir)
    with pytest.raises(DataError, match=match):
        read_run(run_dir)


def test_no_finished_stage(tmp_path):
    run_dir = write_run(tmp_path / "run", "slice", TASKS, R3[:0])
    with pytest.raises(DataError, match="no finished stage"):
        read_run(run_dir)


# --- tables ------------------------------------------------------------------------------------------------------

R3_LORA = np.array([[70, NAN, NAN],
                    [40, 95, NAN],
                    [20, 50, 90]])


def two_runs(tmp_path: Path) -> Path:
    compare = tmp_path / "compare"
    write_run(compare / "lora", "lora", TASKS, R3_LORA, general=GENERAL)
    write_run(compare / "slice", "slice", TASKS, R3, init=INIT)
    return compare


def test_comparison_table_numbers_match_cl_metrics(tmp_path):
    runs = [read_run(p) for p in find_run_dirs(two_runs(tmp_path))]
    table = comparison_table(runs)
    rows = list(csv.DictReader(io.StringIO(to_csv(table))))
    assert [r["method"] for r in rows] == ["lora", "slice"] and rows[0]["stages"] == "3/3"
    for row, R in zip(rows, (R3_LORA, R3)):
        for name, value in cl_metrics(R).items():
            assert float(row[name]) == pytest.approx(value, abs=1e-12)
    assert float(rows[0]["GP_delta"]) == pytest.approx(-6.0) and rows[1]["GP_delta"] == ""
    assert float(rows[0]["IP_final[csqa]"]) == 60.0
    assert table.columns.index("GP_base[csqa]") < table.columns.index("GP_final[csqa]") \
        < table.columns.index("GP_base[hellaswag]")
    assert final_scores_table(runs).rows == [["lora", 20.0, 50.0, 90.0], ["slice", 60.0, 85.0, 75.0]]


def test_loss_columns_only_when_recorded(tmp_path):
    lora = read_run(write_run(tmp_path / "lora", "lora", TASKS, R3_LORA))
    assert "loss_final" not in comparison_table([lora]).columns
    table = comparison_table([lora, read_run(write_run(tmp_path / "slice", "slice", TASKS, R3, L=L3))])
    i = table.columns.index("loss_increase")
    assert table.rows[0][i] is None and table.rows[1][i] == pytest.approx(0.7)


def test_markdown_and_rich_tables(tmp_path):
    runs = [read_run(p) for p in find_run_dirs(two_runs(tmp_path))]
    md = report_markdown(runs)
    assert "| slice | 3/3 | 81.67 | 73.33 | 8.33 | -12.50 | -8.33 | 16.50 |" in md
    assert "General ability per benchmark" in md and "| lora | 20.00 | 50.00 | 90.00 |" in md
    console = Console(record=True, width=250)
    console.print(rich_table(runs))
    text = console.export_text()
    assert "max_forgetting" in text and "81.67" in text and "[csqa]" not in text


def test_duplicate_methods_get_folder_names(tmp_path):
    a = read_run(write_run(tmp_path / "c05", "slice", TASKS, R3))
    b = read_run(write_run(tmp_path / "c1", "slice", TASKS, R3_LORA))
    assert [row[0] for row in comparison_table([a, b]).rows] == ["slice (c05)", "slice (c1)"]


# --- report and figures ------------------------------------------------------------------------------------------

def test_write_report(tmp_path):
    out = tmp_path / "report"
    written = write_report([two_runs(tmp_path)], out)
    names = [p.name for p in written]
    assert names == ["metrics.md", "metrics.csv", "r_matrix.png", "task_curves.png", "general.png",
                     "init_cosine.png"]
    for path in written:
        assert path.parent == out and path.stat().st_size > 0
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == PNG and path.stat().st_size > 5000
    assert sorted(p.name for p in out.iterdir()) == sorted(names)  # no temp files left


def test_write_report_single_run_without_extras(tmp_path):
    run_dir = write_run(tmp_path / "lora", "lora", TASKS, R3_LORA[:2])
    written = write_report([run_dir], tmp_path / "out")
    assert [p.name for p in written] == ["metrics.md", "metrics.csv", "r_matrix.png", "task_curves.png"]
    assert "| lora | 2/3 |" in (tmp_path / "out" / "metrics.md").read_text()


def test_coinciding_series_get_distinct_styles():
    styles = [series_style(k, 4) for k in range(4)]
    assert len({(s["marker"], s["linestyle"]) for s in styles}) == 4
    offsets = [s["offset"] for s in styles]
    assert offsets == sorted(offsets) and len(set(offsets)) == 4 and sum(offsets) == pytest.approx(0)
    assert series_style(0, 1)["offset"] == 0


def test_zero_and_missing_bars_are_marked():
    _, (ax,) = new_figure(1, 1, (3, 3))
    mark_zero_and_missing(ax, np.array([0.0, 1.0, 2.0]), np.array([0.0, NAN, 40.0]), "C0", 0.2)
    assert [t.get_text() for t in ax.texts] == ["0", "n/a"]
    assert len(ax.lines) == 1  # the tick at 0; a real bar needs no mark


def test_write_report_needs_runs(tmp_path):
    with pytest.raises(ConfigError, match="no run folders"):
        write_report([], tmp_path)
