"""Study statistics on hand-worked numbers: t quantiles, t intervals, paired differences, and the vectorised
bootstrap against a direct loop over the same random draws."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from slicelora.errors import DataError
from slicelora.eval.metrics import cl_metrics
from slicelora.report.stats import (SUMMARIES, betainc, bootstrap_paired, bootstrap_seeds, difference,
                                    paired_differences, summaries, t_cdf, t_quantile, t_summary)


# --- Student t ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("df, expected", [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (9, 2.262),
                                          (29, 2.045), (120, 1.980)])
def test_t_quantile_975_against_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=5e-4)


def test_t_quantile_closed_forms_and_symmetry():
    # df = 1 is the Cauchy distribution: q(p) = tan(pi (p - 1/2)); df = 2: q(p) = (2p - 1) / sqrt(2 p (1 - p)).
    for p in (0.6, 0.9, 0.975, 0.995):
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-10)
        assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-10)
    assert t_quantile(0.025, 4) == pytest.approx(-t_quantile(0.975, 4))
    assert t_quantile(0.5, 7) == 0.0
    assert t_quantile(0.975, 1e7) == pytest.approx(1.959964, abs=1e-5)  # the normal quantile
    assert t_cdf(t_quantile(0.8, 5.5), 5.5) == pytest.approx(0.8, abs=1e-12)


def test_betainc_known_values():
    assert betainc(1, 1, 0.3) == pytest.approx(0.3)  # uniform
    assert betainc(2, 3, 0.4) == pytest.approx(0.5248)  # 1 - sum_{k<2} C(4,k) 0.4^k 0.6^(4-k)
    assert betainc(0.5, 0.5, 0.5) == pytest.approx(0.5)


@pytest.mark.parametrize("p, df", [(0.0, 3), (1.0, 3), (0.9, 0)])
def test_t_quantile_rejects_bad_arguments(p, df):
    with pytest.raises(DataError):
        t_quantile(p, df)


# --- means and paired differences --------------------------------------------------------------------------------

def test_t_summary_three_values():
    # [-2, -4, -3]: mean -3, deviations 1, -1, 0 -> sd = sqrt(2/2) = 1; half = t_{.975,2} / sqrt(3)
    # = 4.302653 / 1.732051 = 2.484138
    s = t_summary([-2.0, -4.0, -3.0])
    assert (s.n, s.mean, s.sd) == (3, -3.0, 1.0)
    assert (s.low, s.high) == pytest.approx((-5.484138, -0.515862), abs=1e-6)


def test_t_summary_two_values_is_wide():
    # [1, 3]: mean 2, sd sqrt(2); half = 12.706205 * sqrt(2) / sqrt(2) = 12.706205
    s = t_summary([1.0, 3.0])
    assert (s.low, s.high) == pytest.approx((2 - 12.706205, 2 + 12.706205), abs=1e-6)


def test_t_summary_one_and_no_value():
    one = t_summary([5.0])
    assert one.n == 1 and one.mean == 5.0 and math.isnan(one.low) and math.isnan(one.sd)
    assert t_summary([]).n == 0 and math.isnan(t_summary([]).mean)


def test_paired_differences_by_seed():
    # seeds 0, 1, 2 are in both (seed 3 has no reference, seed 4 a NaN, seed 5 no variant):
    # differences 80 - 83 = -3, 70 - 74 = -4, 75 - 78 = -3
    # mean -10/3; deviations 1/3, -2/3, 1/3 -> variance (1/9 + 4/9 + 1/9) / 2 = 1/3, sd = 0.577350
    # half = t_{.975,2} * sd / sqrt(3) = 4.302653 / 3 = 1.434218
    variant = {0: 80.0, 1: 70.0, 2: 75.0, 3: 60.0, 4: math.nan}
    reference = {2: 78.0, 0: 83.0, 1: 74.0, 4: 50.0, 5: 1.0}
    seeds, diffs = paired_differences(variant, reference)
    assert seeds == [0, 1, 2] and diffs.tolist() == [-3.0, -4.0, -3.0]
    d = difference(diffs, None, B=500)
    assert (d.n, d.mean, d.sd) == pytest.approx((3, -10 / 3, 0.577350), abs=1e-6)
    assert (d.t_low, d.t_high) == pytest.approx((-10 / 3 - 1.434218, -10 / 3 + 1.434218), abs=1e-6)
    assert d.resampled == "seeds" and d.boot_low <= d.mean <= d.boot_high


def test_difference_with_one_seed():
    d = difference([2.0], None)
    assert d.n == 1 and d.mean == 2.0 and math.isnan(d.t_low) and math.isnan(d.boot_low) and d.resampled == ""
    d = difference([2.0], (1.0, 3.0))
    assert (d.boot_low, d.boot_high, d.resampled) == (1.0, 3.0, "examples")


# --- bootstrap ---------------------------------------------------------------------------------------------------

def test_bootstrap_seeds_matches_a_loop():
    diffs = np.array([-3.0, 1.0, -4.5, 0.5])
    B = 300
    rng = np.random.default_rng(7)
    picks = rng.integers(0, 4, size=(B, 4))
    means = sorted(float(np.mean([diffs[i] for i in row])) for row in picks)
    assert bootstrap_seeds(diffs, B=B, seed=7) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])))
    assert all(math.isnan(x) for x in bootstrap_seeds([1.0]))


def test_summaries_match_cl_metrics():
    R = np.array([[80, np.nan, np.nan], [88, 90, np.nan], [60, 85, 75]])
    m = cl_metrics(R)
    s = summaries(np.diag(R), R[-1])
    assert {k: float(v) for k, v in s.items()} == pytest.approx(
        {"learned": m["AP"], "final": m["FP"], "drop": m["Forget"], "change": m["BWT"]})
    assert float(summaries(np.array([50.0]), np.array([50.0]))["change"]) == 0.0


def direct_bootstrap(pairs, B, seed):
    """The bootstrap written as plain loops over replicates, seed slots, runs and tasks, with the draws the
    documented order gives."""
    n, tasks = len(pairs), len(pairs[0])
    k_max = max(p[j].shape[-1] for p in pairs for j in range(tasks))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n, size=(B, n))
    u = rng.random((B, n, tasks, k_max))
    replicates = {name: [] for name in SUMMARIES}
    for b in range(B):
        total = dict.fromkeys(SUMMARIES, 0.0)
        for slot in range(n):
            s = picks[b, slot]
            per_run = []
            for run in (0, 1):
                diag, last = [], []
                for j in range(tasks):
                    K = pairs[s][j].shape[-1]
                    drawn = [int(math.floor(u[b, slot, j, e] * K)) for e in range(K)]
                    diag.append(sum(pairs[s][j][run, 0, i] for i in drawn) / K)
                    last.append(sum(pairs[s][j][run, 1, i] for i in drawn) / K)
                learned, final = sum(diag) / tasks, sum(last) / tasks
                change = sum(last[j] - diag[j] for j in range(tasks - 1)) / (tasks - 1) if tasks > 1 else 0.0
                per_run.append({"learned": learned, "final": final, "drop": learned - final, "change": change})
            for name in SUMMARIES:
                total[name] += per_run[0][name] - per_run[1][name]
        for name in SUMMARIES:
            replicates[name].append(total[name] / n)
    return {name: tuple(np.percentile(v, [2.5, 97.5])) for name, v in replicates.items()}


def ragged_pairs(rng, counts):
    """pairs[s][j] of shape (2, 2, counts[s][j]) with scores in 0..100."""
    return [[rng.uniform(0, 100, (2, 2, k)) for k in row] for row in counts]


def test_bootstrap_paired_matches_a_loop():
    rng = np.random.default_rng(3)
    pairs = ragged_pairs(rng, [[3, 4], [2, 5], [4, 1]])  # 3 seeds, 2 tasks, unequal example counts
    got = bootstrap_paired(pairs, B=150, seed=11, chunk=64)  # chunks of 64, 64 and 22 replicates
    want = direct_bootstrap(pairs, B=150, seed=11)
    for name in SUMMARIES:
        assert got[name] == pytest.approx(want[name], rel=1e-9, abs=1e-9)


def test_bootstrap_paired_one_seed_resamples_examples_only():
    rng = np.random.default_rng(4)
    pairs = ragged_pairs(rng, [[6, 3, 4]])
    got = bootstrap_paired(pairs, B=120, seed=2)
    want = direct_bootstrap(pairs, B=120, seed=2)
    for name in SUMMARIES:
        assert got[name] == pytest.approx(want[name], rel=1e-9, abs=1e-9)
        assert got[name][0] < got[name][1]


def test_bootstrap_paired_constant_examples_give_the_point_value():
    # every example of a cell equal: each replicate reproduces the cell means, so the interval is a point.
    # [[variant diag, last], [reference diag, last]] per task: task 1 [[80, 60], [80, 40]], task 2 [[70, 70], [90, 90]]
    # learned 75 - 85 = -10; final 65 - 65 = 0; drop 10 - 20 = -10; change (60 - 80) - (40 - 80) = 20
    cells = ([[80, 60], [80, 40]], [[70, 70], [90, 90]])
    pairs = [[np.repeat(np.array(c, float)[..., None], 3, axis=-1) for c in cells]]
    got = bootstrap_paired(pairs, B=50)
    for name, value in {"learned": -10.0, "final": 0.0, "drop": -10.0, "change": 20.0}.items():
        assert got[name] == pytest.approx((value, value))


def test_bootstrap_paired_is_fast():
    # 5 seeds x 5 tasks x 64 examples, 2000 draws: well under a second on an idle core (generous bound here,
    # the machine is shared)
    pairs = ragged_pairs(np.random.default_rng(5), [[64] * 5] * 5)
    start = time.perf_counter()
    bootstrap_paired(pairs)
    assert time.perf_counter() - start < 3.0


def test_bootstrap_paired_rejects_bad_shapes():
    with pytest.raises(DataError):
        bootstrap_paired([])
    with pytest.raises(DataError):
        bootstrap_paired([[np.zeros((2, 2, 0))]])
    with pytest.raises(DataError):
        bootstrap_paired([[np.zeros((2, 2, 3))], [np.zeros((2, 2, 3)), np.zeros((2, 2, 3))]])
