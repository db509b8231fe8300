"""Statistics of a study: means over seeds with Student-t intervals, paired differences between two variants, and a
bootstrap that resamples seeds and, within each seed, the scored examples of every task.

Pure numpy (no scipy): the Student t quantile is found by bisection on its distribution function, written with the
regularised incomplete beta function.

The CL metrics are recomputed in the bootstrap from four summaries of the resampled score (or loss) matrix, named
here by what they measure so that one routine serves scores and losses alike:
  learned = mean_j M[j,j]; final = mean_j M[N,j]; drop = learned - final; change = mean_{j<N} (M[N,j] - M[j,j]).
SCORE_METRICS and LOSS_METRICS map the metric names of `eval.metrics` onto them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from slicelora.errors import DataError

LEVEL = 0.95
SCORE_METRICS = {"AP": "learned", "FP": "final", "Forget": "drop", "BWT": "change"}
LOSS_METRICS = {"loss_learned": "learned", "loss_final": "final", "loss_increase": "change"}
SUMMARIES = ("learned", "final", "drop", "change")


# --- Student t ---------------------------------------------------------------------------------------------------

def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz), valid for x < (a+1)/(a+b+2)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p quantile of Student's t with df > 0 degrees of freedom (bisection on t_cdf to ~1e-12 relative)."""
    if not 0.0 < p < 1.0 or not df > 0:
        raise DataError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p!r}, df={df!r}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if p == 0.5:
        return 0.0
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    while hi - lo > 1e-12 * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


# --- means and paired differences --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Summary:
    """Mean over n seeds, sample standard deviation and 95% Student-t interval (NaN when n < 2)."""

    n: int
    mean: float
    sd: float
    low: float
    high: float


def t_summary(values: Sequence[float] | np.ndarray) -> Summary:
    """mean +- t_{0.975, n-1} * sd / sqrt(n) over the values (one per seed)."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n < 2:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    sd = float(x.std(ddof=1))
    half = t_quantile(0.5 + LEVEL / 2, n - 1) * sd / math.sqrt(n)
    return Summary(n, mean, sd, mean - half, mean + half)


def paired_differences(variant: Mapping[int, float], reference: Mapping[int, float]) -> tuple[list[int], np.ndarray]:
    """The seeds both have a finite value for (sorted) and variant - reference at each of them."""
    seeds = sorted(s for s in variant.keys() & reference.keys()
                   if math.isfinite(variant[s]) and math.isfinite(reference[s]))
    return seeds, np.array([variant[s] - reference[s] for s in seeds], dtype=float)


# --- bootstrap ---------------------------------------------------------------------------------------------------

def _percentile_interval(values: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(values, [50 * (1 - LEVEL), 50 * (1 + LEVEL)])
    return float(low), float(high)


def bootstrap_seeds(diffs: Sequence[float] | np.ndarray, *, B: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile 95% interval of the mean difference, resampling the seeds with replacement (B times, draws
    rng.integers(0, n, (B, n)) from numpy's default_rng(seed)). NaN with fewer than 2 seeds: one value says
    nothing about seed-to-seed spread."""
    d = np.asarray(diffs, dtype=float)
    if len(d) < 2:
        return math.nan, math.nan
    picks = np.random.default_rng(seed).integers(0, len(d), size=(B, len(d)))
    return _percentile_interval(d[picks].mean(axis=1))


def summaries(diag: np.ndarray, last: np.ndarray) -> dict[str, np.ndarray]:
    """learned, final, drop and change of matrices given by their diagonal and last row (tasks on the last axis)."""
    learned, final = diag.mean(axis=-1), last.mean(axis=-1)
    n = diag.shape[-1]
    change = (last[..., :-1] - diag[..., :-1]).mean(axis=-1) if n > 1 else np.zeros_like(learned)
    return {"learned": learned, "final": final, "drop": learned - final, "change": change}


def bootstrap_paired(pairs: Sequence[Sequence[np.ndarray]], *, B: int = 2000, seed: int = 0,
                     chunk: int = 256) -> dict[str, tuple[float, float]]:
    """Percentile 95% intervals of the mean (over seeds) of variant - reference for each of SUMMARIES.

    pairs[s][j] holds seed s's examples of task j as an array of shape (2, 2, K): [variant, reference] x [after
    learning task j, after the last stage] x the K examples both runs scored, aligned by example index (finite
    values). A replicate draws n seeds with replacement and, for each drawn seed and task, K examples with
    replacement, the same for the variant and the reference (paired) and for both stages; it recomputes the
    matrices' diagonal and last row as means over the drawn examples, then the summaries, differences and their
    mean over the drawn seeds. The draws, from numpy's default_rng(seed): picks = rng.integers(0, n, (B, n)), then
    u = rng.random((B, n, tasks, max K)); example e of task j in slot k of replicate b is floor(u[b,k,j,e] * K)
    for e < K, K being the count of the picked seed's task j. With one seed only the examples are resampled.
    """
    n, tasks = len(pairs), len(pairs[0]) if pairs else 0
    if n == 0 or tasks == 0 or any(len(p) != tasks for p in pairs):
        raise DataError("bootstrap_paired needs at least one seed and the same tasks in every seed")
    K = np.array([[p[j].shape[-1] for j in range(tasks)] for p in pairs])
    if (K == 0).any() or any(p[j].shape[:2] != (2, 2) for p in pairs for j in range(tasks)):
        raise DataError("bootstrap_paired needs arrays of shape (2, 2, K) with K >= 1 examples per seed and task")
    k_max = int(K.max())
    X = np.zeros((n, tasks, k_max, 2, 2))  # seed, task, example, run, cell
    for s, p in enumerate(pairs):
        for j in range(tasks):
            X[s, j, :K[s, j]] = np.moveaxis(p[j], -1, 0)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n, size=(B, n))
    u = rng.random((B, n, tasks, k_max))
    diffs = {name: np.empty(B) for name in SUMMARIES}
    for start in range(0, B, chunk):
        p = picks[start:start + chunk]  # (b, n)
        counts = K[p]  # (b, n, tasks)
        idx = np.floor(u[start:start + chunk] * counts[..., None]).astype(np.int64)
        valid = np.arange(k_max) < counts[..., None]
        drawn = X[p[:, :, None, None], np.arange(tasks)[:, None], idx]  # (b, n, tasks, k_max, run, cell)
        means = (drawn * valid[..., None, None]).sum(axis=3) / counts[..., None, None]  # (b, n, tasks, run, cell)
        per_run = summaries(np.moveaxis(means[..., 0], 2, -1), np.moveaxis(means[..., 1], 2, -1))  # (b, n, run)
        for name, value in per_run.items():
            diffs[name][start:start + chunk] = (value[..., 0] - value[..., 1]).mean(axis=1)
    return {name: _percentile_interval(d) for name, d in diffs.items()}


@dataclass(frozen=True)
class Difference:
    """A paired comparison over n seeds: mean difference, the differences' standard deviation, the mean's 95%
    Student-t interval and 95% bootstrap interval;
    `resampled` says what the bootstrap resampled ("seeds and examples", "examples" with one seed, "seeds" without
    per-example data, "" when it is undefined)."""

    n: int
    mean: float
    sd: float
    t_low: float
    t_high: float
    boot_low: float
    boot_high: float
    resampled: str


def difference(diffs: Sequence[float] | np.ndarray, boot: tuple[float, float] | None, *, B: int = 2000,
               seed: int = 0) -> Difference:
    """Summarise paired differences (one per seed); `boot` is the example-level bootstrap interval when one was
    computed, else the seeds are resampled on their own."""
    t = t_summary(diffs)
    if boot is not None:
        resampled = "seeds and examples" if t.n > 1 else "examples"
    else:
        boot = bootstrap_seeds(diffs, B=B, seed=seed)
        resampled = "seeds" if math.isfinite(boot[0]) else ""
    return Difference(t.n, t.mean, t.sd, t.low, t.high, boot[0], boot[1], resampled)
