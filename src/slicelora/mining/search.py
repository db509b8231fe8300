"""Pairwise task cosines and the search for the most opposed (or most aligned) task subsets.

A subset's score is the mean cosine over its pairs. `rank_subsets` finds the `top` lowest (or highest) subsets:

- "exhaustive" scores every subset, vectorised: combinations are drawn in blocks of CHUNK rows into a numpy array,
  scored by fancy indexing (one gather per pair of positions), and a running best-`top` is kept with argpartition.
  The paper's 5 of 46 (1,370,754 subsets) takes under half a second. Above `limit` subsets it refuses (ConfigError),
  so a long search is never started by accident; choose a heuristic or raise the limit.
- "beam" (heuristic) grows subsets one task at a time from every single task, keeping the `beam_width` best partial
  subsets (by the sum of their pairwise cosines) at each size. A width of at least C(n, j) for every partial size j
  keeps every subset and is exact; narrower beams may miss a subset whose small parts all look mediocre.
- "greedy" (heuristic) starts once from every task and adds, each time, the task that lowers (raises) the pair sum
  the most; it returns the best distinct results of these n runs, so possibly fewer than `top`.

Ties are broken by the subset's indices in lexicographic order, so every method is deterministic.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import chain, combinations, islice
from math import comb
from typing import Literal

import numpy as np
import torch

from ..errors import ConfigError, DataError

Method = Literal["exhaustive", "beam", "greedy"]
METHODS = ("exhaustive", "beam", "greedy")
EXHAUSTIVE_LIMIT = 20_000_000  # several seconds of exhaustive search (5 of 46 is 1.4 million)
DEFAULT_BEAM_WIDTH = 2000
CHUNK = 1 << 20  # subsets scored at a time


def pairwise_cosine(signatures: Mapping[str, torch.Tensor | np.ndarray]) -> tuple[list[str], np.ndarray]:
    """Task names sorted by name and their cosine matrix (float64, unit diagonal, clipped to [-1, 1])."""
    names = sorted(signatures)
    if not names:
        raise DataError("pairwise_cosine: no signatures were given.")
    vectors = [torch.as_tensor(signatures[name]).reshape(-1).double() for name in names]
    sizes = {v.numel() for v in vectors}
    if len(sizes) > 1:
        raise DataError(
            f"pairwise_cosine: signatures have different lengths {sorted(sizes)}; compute them all with the same "
            "model, targets and sketch settings."
        )
    matrix = torch.stack(vectors)
    norms = matrix.norm(dim=1)
    for name, norm in zip(names, norms.tolist()):
        if not norm > 0 or not np.isfinite(norm):
            raise DataError(f"the gradient signature of task {name!r} has norm {norm}: its loss gives no gradient.")
    unit = matrix / norms[:, None]
    cos = (unit @ unit.T).clamp_(-1.0, 1.0).numpy()
    np.fill_diagonal(cos, 1.0)
    return names, cos


def subset_scores(cos: np.ndarray, subsets: np.ndarray) -> np.ndarray:
    """Mean pairwise cosine of each row of `subsets` (integer array of shape (m, size), size >= 2)."""
    size = subsets.shape[1]
    total = np.zeros(len(subsets))
    for i, j in combinations(range(size), 2):
        total += cos[subsets[:, i], subsets[:, j]]
    return total / comb(size, 2)


def rank_subsets(
    cos: np.ndarray,
    size: int,
    top: int = 10,
    *,
    lowest: bool = True,
    method: Method = "exhaustive",
    limit: int = EXHAUSTIVE_LIMIT,
    beam_width: int = DEFAULT_BEAM_WIDTH,
) -> list[tuple[tuple[int, ...], float]]:
    """The `top` subsets of `size` tasks with the lowest (or highest) mean pairwise cosine, best first.

    Each result is (ascending task indices into `cos`, mean pairwise cosine). See the module docstring for the
    methods; "exhaustive" raises ConfigError when C(n, size) exceeds `limit`.
    """
    cos = _check_matrix(cos)
    check_search(len(cos), size, top, method, limit, beam_width)
    key = cos if lowest else -cos  # every search minimises
    if method == "exhaustive":
        sets = _exhaustive(key, size, top)
    elif method == "beam":
        sets = _beam(key, size, max(beam_width, top))
    else:
        sets = _greedy(key, size)
    sets = sets[_best(sets, subset_scores(key, sets), top)]
    return [(tuple(int(i) for i in row), float(score)) for row, score in zip(sets, subset_scores(cos, sets))]


def check_search(n: int, size: int, top: int, method: str, limit: int = EXHAUSTIVE_LIMIT,
                 beam_width: int = DEFAULT_BEAM_WIDTH) -> None:
    """Raise ConfigError for a search that cannot run: size < 2, a pool of n < size tasks, top < 1, an unknown
    method, an exhaustive search over more than `limit` subsets, a beam width < 1."""
    if size < 2:
        raise ConfigError(f"subset size: {size} is too small; a mean pairwise cosine needs at least 2 tasks.")
    if n < size:
        raise ConfigError(f"the task pool has {n} tasks, fewer than the subset size {size}: add tasks or lower size.")
    if top < 1:
        raise ConfigError(f"top: {top} must be at least 1.")
    if method not in METHODS:
        raise ConfigError(f"search method: {method!r} is not one of {', '.join(METHODS)}.")
    if method == "exhaustive" and comb(n, size) > limit:
        raise ConfigError(
            f"exhaustive search over {comb(n, size):,} subsets ({size} of {n}) exceeds the limit of {limit:,}: "
            "choose a heuristic (method 'beam' or 'greedy') or raise the limit."
        )
    if method == "beam" and beam_width < 1:
        raise ConfigError(f"beam width: {beam_width} must be at least 1.")


def _check_matrix(cos: np.ndarray) -> np.ndarray:
    cos = np.asarray(cos, dtype=np.float64)
    if cos.ndim != 2 or cos.shape[0] != cos.shape[1]:
        raise ConfigError(f"the cosine matrix must be square, got shape {cos.shape}.")
    if not np.isfinite(cos).all() or not np.allclose(cos, cos.T, atol=1e-9):
        raise ConfigError("the cosine matrix must be finite and symmetric.")
    return cos


def _best(sets: np.ndarray, keys: np.ndarray, top: int) -> np.ndarray:
    """Row indices of the `top` smallest keys, ties broken by the rows in lexicographic order, best first."""
    if len(keys) > top:
        cutoff = np.partition(keys, top - 1)[top - 1]
        candidates = np.flatnonzero(keys <= cutoff)
    else:
        candidates = np.arange(len(keys))
    order = np.lexsort((*sets[candidates].T[::-1], keys[candidates]))
    return candidates[order[:top]]


def _exhaustive(key: np.ndarray, size: int, top: int) -> np.ndarray:
    all_subsets = combinations(range(len(key)), size)
    kept = np.empty((0, size), dtype=np.intp)
    while True:
        block = np.fromiter(chain.from_iterable(islice(all_subsets, CHUNK)), dtype=np.intp).reshape(-1, size)
        if not len(block):
            return kept
        sets = np.concatenate([kept, block])
        kept = sets[_best(sets, subset_scores(key, sets), top)]


def _partial_keys(key: np.ndarray, sets: np.ndarray) -> np.ndarray:
    """(rows, n): for each partial subset and each task, the sum of the task's cosines with the subset's members;
    members themselves get +inf so that they are never added twice."""
    sums = key[sets].sum(axis=1)
    np.put_along_axis(sums, sets, np.inf, axis=1)
    return sums


def _beam(key: np.ndarray, size: int, width: int) -> np.ndarray:
    sets = np.arange(len(key))[:, None]
    pair_sums = np.zeros(len(sets))
    for _ in range(size - 1):
        extended = pair_sums[:, None] + _partial_keys(key, sets)
        rows, tasks = np.nonzero(np.isfinite(extended))
        grown = np.sort(np.column_stack([sets[rows], tasks]), axis=1)
        grown, first = np.unique(grown, axis=0, return_index=True)
        grown_sums = extended[rows, tasks][first]
        keep = _best(grown, grown_sums, width)
        sets, pair_sums = grown[keep], grown_sums[keep]
    return sets


def _greedy(key: np.ndarray, size: int) -> np.ndarray:
    sets = np.arange(len(key))[:, None]
    for _ in range(size - 1):
        sets = np.column_stack([sets, _partial_keys(key, sets).argmin(axis=1)])
    return np.unique(np.sort(sets, axis=1), axis=0)
