"""Continual-learning metrics from the score matrix R and the loss matrix L.

R[i, j] is the score (0..100) on task j after stage i, 0-based here; cells with i < j are NaN. L[i, j] is the mean
per-token NLL of task j's reference answers after stage i, with the same layout.
"""

from __future__ import annotations

import numpy as np

from ..errors import DataError

METRIC_NAMES = ("AP", "FP", "Forget", "BWT", "BWT_trace", "max_forgetting")
LOSS_METRIC_NAMES = ("loss_learned", "loss_final", "loss_increase")


def _check_lower(M: np.ndarray | list, name: str, upper: float, what: str) -> np.ndarray:
    """M as a float array after checking that it is square and lower-triangular: every cell with i >= j finite
    and in 0..upper, every cell with i < j NaN."""
    try:
        M = np.asarray(M, dtype=float)
    except (TypeError, ValueError) as e:
        raise DataError(f"{name} is not numeric: {e}") from None
    if M.ndim != 2 or M.shape[0] != M.shape[1] or M.shape[0] == 0:
        raise DataError(f"{name} must be square N x N with N >= 1 (stages x tasks), got shape {M.shape}")
    letter = name.split()[-1]
    lower = np.tril(np.ones(M.shape, dtype=bool))
    bad = lower & ~(np.isfinite(M) & (M >= 0) & (M <= upper))
    if bad.any():
        i, j = map(int, np.argwhere(bad)[0])
        raise DataError(f"{name}[{i}, {j}] (stage {i + 1}, task {j + 1}) = {float(M[i, j])!r}; "
                        f"every cell on or below the diagonal must be {what}")
    filled = ~lower & ~np.isnan(M)
    if filled.any():
        i, j = map(int, np.argwhere(filled)[0])
        raise DataError(f"{name}[{i}, {j}] (stage {i + 1}, task {j + 1}) = {float(M[i, j])!r} lies above the "
                        f"diagonal, where a task is not learned yet; leave those cells NaN (is {letter} transposed?)")
    return M


def check_r(R: np.ndarray | list) -> np.ndarray:
    """R as a float array, checked to be a square lower-triangular score matrix (cells on and below the
    diagonal in 0..100, cells above NaN)."""
    return _check_lower(R, "score matrix R", 100.0, "a score in 0..100")


def check_losses(L: np.ndarray | list) -> np.ndarray:
    """L as a float array, checked to be a square lower-triangular loss matrix (cells on and below the diagonal
    finite and >= 0, cells above NaN)."""
    return _check_lower(L, "loss matrix L", np.inf, "a finite loss >= 0")


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


def loss_metrics(L: np.ndarray | list) -> dict[str, float]:
    """loss_learned = mean_t L[t,t]; loss_final = mean_j L[N,j]; loss_increase = mean_{j<N} (L[N,j] - L[j,j]),
    the BWT in loss terms (positive: the past tasks got worse), 0.0 with one task."""
    L = check_losses(L)
    diag, last = np.diag(L), L[-1]
    increase = float((last[:-1] - diag[:-1]).mean()) if L.shape[0] > 1 else 0.0
    return {"loss_learned": float(diag.mean()), "loss_final": float(last.mean()), "loss_increase": increase}
