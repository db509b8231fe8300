"""Continual-learning metrics from the score matrix R (SPEC section 4).

R[i, j] is the score (0..100) on task j after stage i, 0-based here; cells with i < j are NaN.
"""

from __future__ import annotations

import numpy as np

from slicelora.errors import DataError

METRIC_NAMES = ("AP", "FP", "Forget", "BWT", "BWT_trace", "max_forgetting")


def check_r(R: np.ndarray | list) -> np.ndarray:
    """Return R as a float array after checking that it is a square, lower-triangular score matrix:
    every cell with i >= j finite and in 0..100, every cell with i < j NaN."""
    try:
        R = np.asarray(R, dtype=float)
    except (TypeError, ValueError) as e:
        raise DataError(f"score matrix R is not numeric: {e}") from None
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] == 0:
        raise DataError(f"score matrix R must be square N x N with N >= 1 (stages x tasks), got shape {R.shape}")
    lower = np.tril(np.ones(R.shape, dtype=bool))
    bad = lower & ~(np.isfinite(R) & (R >= 0) & (R <= 100))
    if bad.any():
        i, j = map(int, np.argwhere(bad)[0])
        raise DataError(f"score matrix R[{i}, {j}] (stage {i + 1}, task {j + 1}) = {float(R[i, j])!r}; "
                        "every cell on or below the diagonal must be a score in 0..100")
    filled = ~lower & ~np.isnan(R)
    if filled.any():
        i, j = map(int, np.argwhere(filled)[0])
        raise DataError(f"score matrix R[{i}, {j}] (stage {i + 1}, task {j + 1}) = {float(R[i, j])!r} lies above the "
                        "diagonal, where a task is not learned yet; leave those cells NaN (is R transposed?)")
    return R


def cl_metrics(R: np.ndarray | list) -> dict[str, float]:
    """AP, FP, Forget, BWT, BWT_trace and max_forgetting of an N x N lower-triangular score matrix.

    AP = mean_t R[t,t]; FP = mean_j R[N,j]; Forget = AP - FP; BWT = mean_{j<N} (R[N,j] - R[j,j]);
    BWT_trace = sum_{j<N} (R[N,j] - R[j,j]) / N (the TRACE paper's 1/N variant, i.e. BWT * (N-1)/N);
    max_forgetting = mean_{j<N} (max_{j<=i<N} R[i,j] - R[N,j]).
    With N = 1 there is no past task: BWT, BWT_trace and max_forgetting are 0.0 (nothing was forgotten, and
    the values stay finite so they can go to JSON and tables), consistent with Forget = AP - FP = 0.
    """
    R = check_r(R)
    n = R.shape[0]
    diag, last = np.diag(R), R[-1]
    ap, fp = float(diag.mean()), float(last.mean())
    if n == 1:
        bwt = bwt_trace = max_forgetting = 0.0
    else:
        change = last[:-1] - diag[:-1]
        bwt = float(change.mean())
        bwt_trace = float(change.sum() / n)
        best_before = np.nanmax(R[:-1, :-1], axis=0)  # NaN cells (i < j) are skipped; column j has i = j
        max_forgetting = float((best_before - last[:-1]).mean())
    return {"AP": ap, "FP": fp, "Forget": ap - fp, "BWT": bwt, "BWT_trace": bwt_trace,
            "max_forgetting": max_forgetting}
