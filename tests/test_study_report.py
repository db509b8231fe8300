"""The study report on a synthetic study written by hand: study.csv against a direct computation, the sentences of
study.md, the gate record, the compute, the figures, and missing or broken cells."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from slicelora.errors import DataError
from slicelora.eval.metrics import cl_metrics, loss_metrics
from slicelora.report.stats import bootstrap_paired, bootstrap_seeds
from slicelora.report.study import read_study_results, write_study_report

PNG = b"\x89PNG\r\n\x1a\n"
T1 = 12.706205  # t_{0.975, 1}: two seeds
VARIANTS = {"lora_ga": "lora_ga", "slice-c1.0": "slice"}

# Per-example scores: EXAMPLES[sequence][(variant, seed)][stage - 1][task] = one score per example (index 0..K-1).
# seqA, seed 0: lora_ga forgets alpha entirely (75 -> 0), slice-c1.0 keeps it (75 -> 75) but learns beta worse
# (50 vs 75). Seed 1 is the same but for one alpha example lora_ga keeps at 4.
#   lora_ga s0: AP 75, FP 37.5, Forget 37.5, BWT -75    slice s0: AP 62.5, FP 62.5, Forget 0, BWT 0
#   lora_ga s1: AP 75, FP 38,   Forget 37,   BWT -74    slice s1: the same as s0
#   slice - lora_ga: AP [-12.5, -12.5], FP [25, 24.5], Forget [-37.5, -37], BWT [75, 74]
#   Forget: mean -37.25, sd 0.353553, t half-width 12.706205 * 0.353553 / sqrt(2) = 3.176551
SLICE_A = [{"alpha": [100, 100, 100, 0]}, {"alpha": [100, 100, 100, 0], "beta": [100, 0, 0, 100]}]
EXAMPLES = {
    "seqA": {
        ("lora_ga", 0): [{"alpha": [100, 100, 100, 0]}, {"alpha": [0, 0, 0, 0], "beta": [100, 100, 0, 100]}],
        ("lora_ga", 1): [{"alpha": [100, 100, 100, 0]}, {"alpha": [0, 0, 0, 4], "beta": [100, 100, 0, 100]}],
        ("slice-c1.0", 0): SLICE_A,
        ("slice-c1.0", 1): SLICE_A,
    },
    # seqB: written in the older format (no losses); lora_ga seed 1 is missing, slice-c1.0 seed 0 is unfinished
    "seqB": {
        ("lora_ga", 0): [{"alpha": [100, 100]}, {"alpha": [100, 0], "beta": [100, 100]},
                         {"alpha": [0, 0], "beta": [100, 0], "gamma": [100, 100]}],
        ("slice-c1.0", 0): [{"alpha": [100, 100]}, {"alpha": [100, 100], "beta": [100, 0]}],
        ("slice-c1.0", 1): [{"alpha": [100, 0]}, {"alpha": [100, 0], "beta": [0, 100]},
                            {"alpha": [100, 0], "beta": [0, 100], "gamma": [100, 100]}],
    },
}
TASKS = {"seqA": ["alpha", "beta"], "seqB": ["alpha", "beta", "gamma"]}
COSINES = {("seqA", 0): [-0.3], ("seqA", 1): [0.2], ("seqB", 0): [-0.1], ("seqB", 1): [0.1, -0.2]}  # stages 2..
GP_FINAL = {("lora_ga", 0): 40.0, ("lora_ga", 1): 44.0, ("slice-c1.0", 0): 45.0, ("slice-c1.0", 1): 47.0}


def nll(score: float) -> float:
    """A per-example answer NLL that falls as the score rises."""
    return (100 - score) / 50 + 0.1


def write_cell(run: Path, sequence: str, variant: str, seed: int, stages: list[dict[str, list[float]]]) -> None:
    """A run folder in the stage loop's layout; seqA records losses and NLLs, seqB is written without them."""
    method, tasks, with_losses = VARIANTS[variant], TASKS[sequence], sequence == "seqA"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"sequence": sequence, "seed": seed, "model": "tiny",
                                                 "init": {"method": method, "gate": 0.0}}))
    (run / "tasks.json").write_text(json.dumps(tasks))
    for t, examples in enumerate(stages, start=1):
        folder = run / "stages" / f"{t:02d}"
        folder.mkdir(parents=True)
        records = [{"task": task, "index": i, "prompt": "p", "prompt_truncated": False, "prediction": "x",
                    "references": ["x"], "metric": "em", "score": float(s),
                    **({"nll": nll(s), "answer_tokens": 2} if with_losses else {})}
                   for task, scores in examples.items() for i, s in reversed(list(enumerate(scores)))]
        (folder / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        record = {"stage": t, "task": tasks[t - 1], "truncated_prompts": {k: 0 for k in examples},
                  "scores": {k: float(np.mean(v)) for k, v in examples.items()}}
        if with_losses:
            record["losses"] = {k: float(np.mean([nll(s) for s in v])) for k, v in examples.items()}
        (folder / "scores.json").write_text(json.dumps(record))
        surgery = None
        if method == "slice" and t >= 2:
            cosine = COSINES[(sequence, seed)][t - 2]
            surgery = {"mode": "global", "strength": 1.0, "gate": 0.0, "cosine": cosine, "fired": cosine < 0,
                       "scalar": 0.1 if cosine < 0 else 0.0, "norm_current": 1.0, "norm_replay": 1.0,
                       "cosine_after": 0.0, "layers": {}}
        (folder / "init.json").write_text(json.dumps({"method": method, "current_batches": 2, "replay_batches": 2,
                                                      "surgery": surgery, "betas": {}, "stage": t,
                                                      "task": tasks[t - 1], "tau": 0.0}))
        (folder / "timing.json").write_text(json.dumps({"init": 1.0, "train": 10.0, "eval": 2.0,
                                                        "shared": t == 1 and method == "slice"}))
    if sequence == "seqA":
        (run / "general.json").write_text(json.dumps({"base": {"GP": {"hellaswag": 50.0}},
                                                      "final": {"GP": {"hellaswag": GP_FINAL[(variant, seed)]}}}))


def write_study(root: Path, examples: dict = EXAMPLES) -> Path:
    cells = []
    for sequence in TASKS:
        for variant in VARIANTS:
            for seed in (0, 1):
                folder = f"cells/{sequence}/{variant}/seed{seed}"
                cells.append({"sequence": sequence, "variant": variant, "seed": seed, "dir": folder})
                if (variant, seed) in examples.get(sequence, {}):
                    write_cell(root / folder, sequence, variant, seed, examples[sequence][(variant, seed)])
    spec = {"base": {"model": "tiny"}, "variants": {"lora_ga": {"init.method": "lora_ga"},
                                                    "slice-c1.0": {"init.method": "slice", "init.strength": 1.0}},
            "sequences": {"seqA": "tests/seqA.yaml", "seqB": "tests/seqB.yaml"}, "seeds": [0, 1],
            "reference": ["lora_ga"]}
    root.mkdir(parents=True, exist_ok=True)
    (root / "study.json").write_text(json.dumps({"spec": spec, "cells": cells}))
    return root


# --- the direct computation ----------------------------------------------------------------------------------------

def matrix(stages: list[dict[str, list[float]]], tasks: list[str], value=lambda s: s) -> np.ndarray:
    M = np.full((len(tasks), len(tasks)), np.nan)
    for i, examples in enumerate(stages):
        for j, task in enumerate(tasks[:i + 1]):
            M[i, j] = np.mean([value(s) for s in examples[task]])
    return M


def direct_metrics(sequence: str, variant: str, seed: int) -> dict[str, float]:
    stages, tasks = EXAMPLES[sequence][(variant, seed)], TASKS[sequence]
    out = {k: v for k, v in cl_metrics(matrix(stages, tasks)).items() if k in ("AP", "FP", "Forget", "BWT")}
    if sequence == "seqA":
        out.update(loss_metrics(matrix(stages, tasks, nll)))
        out.update(GP_final=GP_FINAL[(variant, seed)], GP_delta=GP_FINAL[(variant, seed)] - 50.0)
    return out


def t_interval_two(values: list[float]) -> tuple[float, float, float]:
    mean, sd = float(np.mean(values)), float(np.std(values, ddof=1))
    return mean, mean - T1 * sd / math.sqrt(2), mean + T1 * sd / math.sqrt(2)


def example_pairs(field=lambda s: s) -> list[list[np.ndarray]]:
    """seqA's bootstrap input: per seed and task, [slice, lora_ga] x [after learning it, after stage 2] x examples."""
    pairs = []
    for seed in (0, 1):
        per_task = []
        for j, task in enumerate(TASKS["seqA"]):
            runs = [EXAMPLES["seqA"][(v, seed)] for v in ("slice-c1.0", "lora_ga")]
            per_task.append(np.array([[[field(s) for s in r[j][task]], [field(s) for s in r[-1][task]]]
                                      for r in runs], dtype=float))
        pairs.append(per_task)
    return pairs


def csv_rows(study: Path) -> dict[tuple[str, str, str, str, str], dict[str, str]]:
    with open(study / "study.csv", newline="") as f:
        return {(r["kind"], r["sequence"], r["variant"], r["reference"], r["metric"]): r for r in csv.DictReader(f)}


def number(cell: str) -> float:
    return float(cell) if cell else math.nan


# --- tests ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[Path, list[Path]]:
    root = write_study(tmp_path_factory.mktemp("study") / "STUDY")
    return root, write_study_report(root)


def test_written_files(study):
    root, written = study
    assert [p.relative_to(root).as_posix() for p in written] == [
        "study.csv", "study.md", "plots/forest.png", "plots/r_mean_seqA.png", "plots/curves_seqA.png",
        "plots/r_mean_seqB.png", "plots/curves_seqB.png", "plots/gate.png"]
    for path in written:
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == PNG and path.stat().st_size > 5000
    assert not list(root.rglob(".*.tmp"))


def test_means_match_a_direct_computation(study):
    rows = csv_rows(study[0])
    for variant in VARIANTS:
        per_seed = [direct_metrics("seqA", variant, seed) for seed in (0, 1)]
        for metric in per_seed[0]:
            row = rows[("mean", "seqA", variant, "", metric)]
            mean, low, high = t_interval_two([m[metric] for m in per_seed])
            assert (row["n"], row["seeds"]) == ("2", "0 1")
            assert [number(row[k]) for k in ("mean", "ci_low", "ci_high")] == pytest.approx([mean, low, high])
    assert number(rows[("mean", "seqA", "lora_ga", "", "FP")]["ci_high"]) == pytest.approx(37.75 + 3.176551)
    # seqB: one complete seed per variant, no losses (older format), no GP/IP
    row = rows[("mean", "seqB", "lora_ga", "", "AP")]
    assert row["n"] == "1" and number(row["mean"]) == pytest.approx(direct_metrics("seqB", "lora_ga", 0)["AP"])
    assert row["ci_low"] == "" and ("mean", "seqB", "lora_ga", "", "loss_final") not in rows
    assert number(rows[("mean", "seqB", "slice-c1.0", "", "Forget")]["mean"]) == pytest.approx(0.0)


def test_differences_match_a_direct_computation(study):
    rows = csv_rows(study[0])
    diffs = {m: [direct_metrics("seqA", "slice-c1.0", s)[m] - direct_metrics("seqA", "lora_ga", s)[m]
                 for s in (0, 1)] for m in direct_metrics("seqA", "lora_ga", 0)}
    assert diffs["Forget"] == pytest.approx([-37.5, -37.0]) and diffs["AP"] == pytest.approx([-12.5, -12.5])
    boot_scores = bootstrap_paired(example_pairs(), B=2000, seed=0)
    boot_losses = bootstrap_paired(example_pairs(nll), B=2000, seed=0)
    expected_boot = {"AP": boot_scores["learned"], "FP": boot_scores["final"], "Forget": boot_scores["drop"],
                     "BWT": boot_scores["change"], "loss_learned": boot_losses["learned"],
                     "loss_final": boot_losses["final"], "loss_increase": boot_losses["change"],
                     "GP_final": bootstrap_seeds(diffs["GP_final"]), "GP_delta": bootstrap_seeds(diffs["GP_delta"])}
    for metric, values in diffs.items():
        row = rows[("difference", "seqA", "slice-c1.0", "lora_ga", metric)]
        mean, low, high = t_interval_two(values)
        assert [number(row[k]) for k in ("mean", "ci_low", "ci_high")] == pytest.approx([mean, low, high])
        assert (number(row["boot_low"]), number(row["boot_high"])) == pytest.approx(expected_boot[metric])
        assert row["resampled"] == ("seeds" if metric.startswith("GP") else "seeds and examples")
    forget = rows[("difference", "seqA", "slice-c1.0", "lora_ga", "Forget")]
    assert (number(forget["ci_low"]), number(forget["ci_high"])) == pytest.approx((-40.426551, -34.073449))
    # seqB: the two variants share no complete seed, so there is nothing to compare
    assert not [k for k in rows if k[0] == "difference" and k[1] == "seqB"]


def test_markdown_sentences(study):
    md = (study[0] / "study.md").read_text()
    lo, hi = bootstrap_paired(example_pairs(), B=2000, seed=0)["drop"]
    assert hi < 0
    assert (f"- slice-c1.0 forgets less than lora_ga on seqA (Forget -37.2, 95% CI -40.4 to -34.1, bootstrap "
            f"{lo:.1f} to {hi:.1f}, 2 seeds).") in md
    lo, hi = bootstrap_paired(example_pairs(), B=2000, seed=0)["learned"]
    assert hi == 0.0  # a quarter of the resamples miss beta's one differing example in both seeds
    assert (f"- slice-c1.0 vs lora_ga on seqA, AP: no difference shown: the bootstrap interval includes 0 (AP -12.5, "
            f"95% CI -12.5 to -12.5, bootstrap {lo:.1f} to 0.0, 2 seeds).") in md
    assert "- slice-c1.0 has a higher BWT than lora_ga on seqA (BWT +74.5, 95% CI 68.1 to 80.9, bootstrap" in md
    assert "- slice-c1.0 raises the past tasks' loss less than lora_ga on seqA (loss_increase -1.490" in md
    assert "No variant shares a complete seed with lora_ga on seqB." in md
    assert "| slice-c1.0 | slice | 2/2 | 62.5 ± 0.0 | 62.5 ± 0.0 | 0.0 ± 0.0 | 0.0 ± 0.0 |" in md


def test_markdown_cells_gate_and_compute(study):
    md = (study[0] / "study.md").read_text()
    assert "6 of 8 cells complete." in md
    assert "| seqB | lora_ga | 1 | missing | cells/seqB/lora_ga/seed1 |" in md
    assert "| seqB | slice-c1.0 | 0 | unfinished (2/3 stages) | cells/seqB/slice-c1.0/seed0 |" in md
    assert "### slice-c1.0 on seqA (tau = 0)" in md and "The gate fired at 1 of 2 stages" in md
    assert "| 0 | -0.300 fired | 1/1 |" in md and "| 1 | 0.200 not | 0/1 |" in md
    assert "The gate fired at 2 of 3 stages" in md  # seqB: the unfinished seed's stage 2 counts too
    assert "| 1 | 0.100 not | -0.200 fired | 1/2 |" in md and "| 0 | -0.100 fired | - | 1/1 |" in md
    assert "### lora_ga on" not in md
    # seqA slice: 2 seeds x 2 stages of 1 + 10 + 2 s, stage 1 shared in both seeds
    assert "| seqA | slice-c1.0 | 4/4 | 4 | 40 | 8 | 52 | 2 |" in md
    assert "| seqB | slice-c1.0 | 5/5 | 5 | 50 | 10 | 65 | 2 |" in md
    assert "Total: 208 s" in md  # 4 + 4 + 3 + 5 finished stages, 13 s each


def test_unstarted_and_broken_cells_are_reported(tmp_path):
    root = write_study(tmp_path / "STUDY", examples={"seqA": {("lora_ga", 0): EXAMPLES["seqA"][("lora_ga", 0)]}})
    (root / "cells/seqA/slice-c1.0/seed0").mkdir(parents=True)
    (root / "cells/seqA/slice-c1.0/seed0/config.json").write_text(json.dumps({"init": {"method": "slice"}}))
    scores = root / "cells/seqA/lora_ga/seed0/stages/02/scores.json"
    scores.write_text("{broken")
    written = write_study_report(root)
    assert [p.name for p in written] == ["study.csv", "study.md"]  # nothing to plot
    md = (root / "study.md").read_text()
    assert "0 of 8 cells complete." in md
    assert "| seqA | slice-c1.0 | 0 | no stage finished |" in md
    assert "| seqA | lora_ga | 0 | unreadable: " in md and "not valid JSON" in md
    assert "No SLICE cell has finished a stage >= 2." in md
    assert "No finished stage records its timing" in md
    assert (root / "study.csv").read_text().splitlines() == [
        "kind,sequence,variant,reference,metric,n,seeds,mean,sd,ci_low,ci_high,boot_low,boot_high,resampled"]


def test_example_data_that_does_not_match_scores_falls_back_to_seeds(tmp_path):
    root = write_study(tmp_path / "STUDY")
    gens = root / "cells/seqA/slice-c1.0/seed1/stages/02/generations.jsonl"
    gens.write_text("".join(line for line in gens.read_text().splitlines(keepends=True) if '"beta"' not in line))
    write_study_report(root, B=200)
    rows = csv_rows(root)
    assert rows[("difference", "seqA", "slice-c1.0", "lora_ga", "AP")]["resampled"] == "seeds"
    assert rows[("difference", "seqA", "slice-c1.0", "lora_ga", "loss_learned")]["resampled"] == "seeds"


def test_read_study_errors(tmp_path):
    with pytest.raises(DataError, match="no study.json"):
        read_study_results(tmp_path)
    (tmp_path / "study.json").write_text(json.dumps({"spec": {}, "cells": [{"sequence": "a"}]}))
    with pytest.raises(DataError, match=r"cells\[0\]"):
        read_study_results(tmp_path)
    (tmp_path / "study.json").write_text(json.dumps({"cells": []}))
    with pytest.raises(DataError, match="expected"):
        read_study_results(tmp_path)


def test_a_second_reference_is_not_compared_back(tmp_path):
    root = write_study(tmp_path / "STUDY")
    study = json.loads((root / "study.json").read_text())
    study["spec"]["reference"] = ["lora_ga", "slice-c1.0"]
    (root / "study.json").write_text(json.dumps(study))
    write_study_report(root, B=200)
    assert {k[3] for k in csv_rows(root) if k[0] == "difference"} == {"lora_ga"}
    assert "Differences against slice-c1.0" not in (root / "study.md").read_text()
