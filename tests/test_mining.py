"""Adversarial sequence mining: CountSketch, subset search, cached task signatures, mining outputs."""

from __future__ import annotations

import csv
import json
import math
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch

from slicelora.data.sequences import load_sequence
from slicelora.data.tasks import Example, Task
from slicelora.errors import ConfigError, DataError
from slicelora.init.gradients import accumulate_gradients
from slicelora.mining import (
    CountSketch,
    SignatureSettings,
    mine,
    pairwise_cosine,
    rank_subsets,
    signatures,
    task_signature,
    write_mining_outputs,
)
from slicelora.mining.sketch import CPU_CHUNK



@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run ~100x faster on one thread when the 2 cores are shared: the thread pool's barriers dominate."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- sketch


def reference_hash(sketch: CountSketch, name: str, index: int) -> tuple[int, bool]:
    """splitmix64(key + index * gamma) in Python integers: (bucket, negative)."""
    mask = (1 << 64) - 1
    z = (sketch.layer_key(name) + index * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    z ^= z >> 31
    return (((z >> 32) & 0x7FFFFFFF) * sketch.k) >> 31, bool(z >> 63)


def test_hash_matches_a_python_reference_and_is_stable():
    sketch = CountSketch(k=200_000, seed=7)
    index = torch.tensor([0, 1, 2, 12345, 2**31 - 1, 2**32 + 5, 2**40 + 3])
    bucket, negative = sketch.hash_coords("model.layers.0.mlp.up_proj", index)
    expected = [reference_hash(sketch, "model.layers.0.mlp.up_proj", int(i)) for i in index]
    assert list(zip(bucket.tolist(), negative.tolist())) == expected
    again = CountSketch(k=200_000, seed=7).hash_coords("model.layers.0.mlp.up_proj", index)
    assert torch.equal(again[0], bucket) and torch.equal(again[1], negative)
    other_layer = sketch.hash_coords("model.layers.1.mlp.up_proj", torch.arange(1000))[0]
    other_seed = CountSketch(k=200_000, seed=8).hash_coords("model.layers.0.mlp.up_proj", torch.arange(1000))[0]
    base = sketch.hash_coords("model.layers.0.mlp.up_proj", torch.arange(1000))[0]
    assert (other_layer != base).float().mean() > 0.99 and (other_seed != base).float().mean() > 0.99


def test_sketch_is_linear_chunked_and_sums_layers():
    sketch = CountSketch(k=1000, seed=1)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(3 * CPU_CHUNK + 17, generator=gen, dtype=torch.float64), torch.randn(
        3 * CPU_CHUNK + 17, generator=gen, dtype=torch.float64)
    sx, sy = sketch.sketch_layer("w", x), sketch.sketch_layer("w", y)
    torch.testing.assert_close(sketch.sketch_layer("w", 2 * x - 3 * y), 2 * sx - 3 * sy)
    bucket, negative = sketch.hash_coords("w", torch.arange(x.numel()))  # all at once, no chunks
    direct = torch.zeros(1000, dtype=torch.float64).index_add_(0, bucket, torch.where(negative, -x, x))
    torch.testing.assert_close(sx, direct)
    torch.testing.assert_close(sketch.sketch_layers({"w": x.reshape(-1, 1), "v": y}), sx + sketch.sketch_layer("v", y))
    assert sketch.sketch_layer("w", x.float()).dtype == torch.float32


def test_sketch_inner_products_are_unbiased_with_the_predicted_variance():
    """Over many seeds, on structured (rank-one, constant) gradients, the error of <S x, S y> has mean ~0 and the
    standard deviation of the CountSketch formula, so a single sketch is within a few of them."""
    k, seeds = 256, 300
    gen = torch.Generator().manual_seed(3)
    u, v = torch.randn(200, generator=gen, dtype=torch.float64), torch.randn(300, generator=gen, dtype=torch.float64)
    x = torch.outer(u.abs(), v.abs()).reshape(-1)
    y = torch.ones_like(x) + 0.3 * torch.outer(u, v).reshape(-1)
    true = float(x @ y)
    sigma = math.sqrt((x.norm() ** 2 * y.norm() ** 2 + true**2 - 2 * (x * x * y * y).sum()) / k)
    errors = np.array([
        float(CountSketch(k, seed).sketch_layer("w", x) @ CountSketch(k, seed).sketch_layer("w", y)) - true
        for seed in range(seeds)
    ])
    assert abs(errors.mean()) < 4 * sigma / math.sqrt(seeds)
    assert 0.8 * sigma < errors.std() < 1.2 * sigma  # the sample std's relative standard error is ~4% here
    assert np.abs(errors).max() < 6 * sigma
    assert sigma <= math.sqrt(2 / k) * float(x.norm() * y.norm())  # the bound in the module docstring


# ---------------------------------------------------------------- search


def brute_force(cos: np.ndarray, size: int) -> list[tuple[tuple[int, ...], float]]:
    scored = []
    for subset in combinations(range(len(cos)), size):
        pairs = list(combinations(subset, 2))
        scored.append((subset, sum(cos[a, b] for a, b in pairs) / len(pairs)))
    return scored


def random_cosines(n: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(n, 6))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors @ vectors.T


@pytest.mark.parametrize("n,size", [(9, 4), (11, 3), (8, 2)])
def test_exhaustive_equals_brute_force(n, size):
    cos = random_cosines(n, seed=n)
    truth = brute_force(cos, size)
    for lowest in (True, False):
        expected = sorted(truth, key=lambda item: item[1] if lowest else -item[1])[:7]
        found = rank_subsets(cos, size, 7, lowest=lowest)
        assert [s for s, _ in found] == [s for s, _ in expected]
        np.testing.assert_allclose([v for _, v in found], [v for _, v in expected], atol=1e-12)
    assert len(rank_subsets(cos, size, 10_000)) == math.comb(n, size)


def test_exhaustive_handles_many_chunks(monkeypatch):
    monkeypatch.setattr("slicelora.mining.search.CHUNK", 37)
    cos = random_cosines(12, seed=5)
    expected = sorted(brute_force(cos, 4), key=lambda item: item[1])[:5]
    assert [s for s, _ in rank_subsets(cos, 4, 5)] == [s for s, _ in expected]


def test_wide_beam_is_exact_and_heuristics_find_a_planted_optimum():
    cos = random_cosines(10, seed=1)
    exact = rank_subsets(cos, 4, 5, lowest=False)
    assert rank_subsets(cos, 4, 5, lowest=False, method="beam", beam_width=math.comb(10, 3)) == exact
    # A planted group of mutually opposed tasks in an otherwise aligned pool: both heuristics must find it.
    rng = np.random.default_rng(2)
    noise = rng.uniform(0.3, 0.9, (20, 20))
    cos = (noise + noise.T) / 2
    planted = (3, 7, 11, 16, 19)
    for a, b in combinations(planted, 2):
        cos[a, b] = cos[b, a] = rng.uniform(-0.6, -0.4)
    np.fill_diagonal(cos, 1.0)
    for method in ("beam", "greedy"):
        assert rank_subsets(cos, 5, 1, method=method, beam_width=50)[0][0] == planted
    assert rank_subsets(cos, 5, 1)[0][0] == planted


def test_search_rejects_bad_requests():
    cos = random_cosines(6, seed=0)
    with pytest.raises(ConfigError, match="fewer than the subset size"):
        rank_subsets(cos, 7, 3)
    with pytest.raises(ConfigError, match="exceeds the limit.*heuristic"):
        rank_subsets(cos, 3, 3, limit=10)
    assert len(rank_subsets(cos, 3, 3, limit=10, method="beam")) == 3
    with pytest.raises(ConfigError, match="at least 2 tasks"):
        rank_subsets(cos, 1, 3)
    with pytest.raises(ConfigError, match="not one of"):
        rank_subsets(cos, 3, 3, method="annealing")
    with pytest.raises(ConfigError, match="symmetric"):
        rank_subsets(cos + np.triu(np.ones((6, 6)), 1), 3, 3)


def test_pairwise_cosine():
    vectors = {"b": torch.tensor([1.0, 0.0, 1.0]), "a": torch.tensor([1.0, 1.0, 0.0]), "c": torch.tensor([-2.0, 0, 0])}
    names, cos = pairwise_cosine(vectors)
    assert names == ["a", "b", "c"] and cos.dtype == np.float64
    np.testing.assert_allclose(cos, [[1, 0.5, -math.sqrt(0.5)], [0.5, 1, -math.sqrt(0.5)],
                                     [-math.sqrt(0.5), -math.sqrt(0.5), 1]], atol=1e-12)
    with pytest.raises(DataError, match="'z'.*norm 0"):
        pairwise_cosine({**vectors, "z": torch.zeros(3)})


# ---------------------------------------------------------------- signatures and mining

SETTINGS = SignatureSettings(batches=2, batch_size=4, max_length=48, k=4096)


def toy_task(name: str, rule: str, n: int = 12) -> Task:
    words = ["red cat", "blue sky", "green tea", "big dog", "old tree", "new car"]
    examples = []
    for i in range(n):
        w = words[i % len(words)]
        answer = {"upper": w.upper(), "reverse": " ".join(w.split()[::-1]), "count": str(len(w)),
                  "first": w.split()[0]}[rule]
        examples.append(Example(f"{rule} the words.\n\nInput: {w} {i}", answer, (answer,)))
    return Task(name, "superni", examples, [], "exact_match", "exact_match", Path(f"{name}.json"))


@pytest.fixture
def pool() -> list[Task]:
    return [toy_task(f"task{i}_{rule}", rule) for i, rule in enumerate(["upper", "reverse", "count", "first"], 1)]


@pytest.fixture
def passes(monkeypatch) -> list[str]:
    """Counts gradient passes made by the signature code (each is one call of accumulate_gradients)."""
    calls: list[str] = []

    def counting(model, batches, **kwargs):
        calls.append(kwargs.get("desc", ""))
        return accumulate_gradients(model, batches, **kwargs)

    monkeypatch.setattr(signatures, "accumulate_gradients", counting)
    return calls


def test_sketched_cosines_agree_with_exact_ones(model, tokenizer, pool, tmp_path):
    """The k-sketch's cosine errors stay within a tolerance derived from k, and the sketch-mode signature (sketched
    batch by batch inside the gradient pass) is the sketch of the exact mean gradient."""
    k = 16384
    settings = SignatureSettings(batches=2, batch_size=4, max_length=48, k=k, mode="exact")
    result = mine(model, tokenizer, pool, settings, size=2, top=3, cache=tmp_path)
    # For unit vectors the cosine error is about e_xy - c/2 (e_xx + e_yy), each inner-product error e having a
    # standard deviation of at most sqrt(2/k): at most 2 sqrt(2/k); allow 4 of them.
    tolerance = 4 * 2 * math.sqrt(2 / k)
    assert result.sketch_error["max_abs_error"] < tolerance
    assert result.sketch_error["pairs"] == 6 and result.sketch_error["k"] == k
    sketched = {task.name: task_signature(model, tokenizer, task, SignatureSettings(
        batches=2, batch_size=4, max_length=48, k=k, mode="sketch"), cache=tmp_path) for task in pool}
    names, sketched_cos = pairwise_cosine(sketched)
    assert names == result.names
    error = np.abs(sketched_cos - result.cosine).max()
    np.testing.assert_allclose(error, result.sketch_error["max_abs_error"], atol=1e-4)
    # the exact cosines are those of the flattened full gradients
    flat = {t.name: torch.cat([g.reshape(-1) for g in accumulate_gradients(
        model, signatures.signature_batches(tokenizer, t, settings)).values()]) for t in pool}
    np.testing.assert_allclose(pairwise_cosine(flat)[1], result.cosine, atol=1e-5)


def test_signatures_are_cached_and_invalidated(model, tokenizer, pool, passes, tmp_path):
    task = pool[0]
    first = task_signature(model, tokenizer, task, SETTINGS, cache=tmp_path)
    assert first.shape == (SETTINGS.k,) and len(passes) == 1
    torch.testing.assert_close(task_signature(model, tokenizer, task, SETTINGS, cache=tmp_path), first)
    assert len(passes) == 1  # reused
    # settings change
    task_signature(model, tokenizer, task, SignatureSettings(batches=2, batch_size=4, max_length=40, k=4096),
                   cache=tmp_path)
    task_signature(model, tokenizer, task, SignatureSettings(batches=2, batch_size=4, max_length=48, k=2048),
                   cache=tmp_path)
    task_signature(model, tokenizer, task, SignatureSettings(batches=2, batch_size=4, max_length=48, k=4096,
                                                             loss_on="answer"), cache=tmp_path)
    assert len(passes) == 4
    # task data change
    changed = Task(task.name, task.family, [Example(e.prompt, e.answer + "!", e.references) for e in task.train],
                   [], task.metric, task.native_metric, task.path)
    task_signature(model, tokenizer, changed, SETTINGS, cache=tmp_path)
    assert len(passes) == 5
    # model change
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    task_signature(model, tokenizer, task, SETTINGS, cache=tmp_path)
    assert len(passes) == 6
    # back to the first model: reused again
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] -= 1e-3
    torch.testing.assert_close(task_signature(model, tokenizer, task, SETTINGS, cache=tmp_path), first)
    assert len(passes) == 6
    # an unreadable cache file is recomputed and replaced
    for path in tmp_path.glob(f"{task.name}-*.safetensors"):
        path.write_bytes(b"broken")
    torch.testing.assert_close(task_signature(model, tokenizer, task, SETTINGS, cache=tmp_path), first)
    assert len(passes) == 7


def test_mine_reuses_cache_and_reports(model, tokenizer, pool, passes, tmp_path):
    result = mine(model, tokenizer, pool, SETTINGS, size=3, top=2, cache=tmp_path / "cache")
    assert len(passes) == 4 and result.reused == [] and result.sketch_error is None
    assert result.names == sorted(t.name for t in pool)
    assert [score for _, score in result.lowest] == sorted(score for _, score in result.lowest)
    assert result.lowest[0][1] <= result.highest[0][1]
    assert all(list(tasks) == sorted(tasks) for tasks, _ in result.lowest + result.highest)
    again = mine(model, tokenizer, pool, SETTINGS, size=3, top=2, cache=tmp_path / "cache")
    assert len(passes) == 4 and again.reused == [t.name for t in pool]
    np.testing.assert_allclose(again.cosine, result.cosine)

    paths = write_mining_outputs(result, tmp_path / "out")
    assert set(paths) == {"csv", "png", "markdown", "json", "yaml"}
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    with open(paths["csv"]) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["task", *result.names]
    np.testing.assert_allclose(np.array([r[1:] for r in rows[1:]], dtype=float), result.cosine, atol=1e-6)
    data = json.loads(paths["json"].read_text())
    assert [s["name"] for s in data["sequences"]] == ["mined-low-1", "mined-low-2", "mined-high-1", "mined-high-2"]
    sequence = load_sequence(f"{paths['yaml']}:mined-low-1")
    assert sequence.tasks == list(result.lowest[0][0])
    assert "mined-high-2" in paths["markdown"].read_text()


def test_mine_rejects_bad_input_before_any_gradient(model, tokenizer, pool, passes, tmp_path):
    short = toy_task("task9_short", "upper", n=7)
    with pytest.raises(DataError, match="task9_short.*7 training examples.*2 x 4 = 8"):
        mine(model, tokenizer, [*pool, short], SETTINGS, size=2, cache=tmp_path)
    with pytest.raises(ConfigError, match="4 tasks, fewer than the subset size 5"):
        mine(model, tokenizer, pool, SETTINGS, size=5, cache=tmp_path)
    with pytest.raises(ConfigError, match="exceeds the limit"):
        mine(model, tokenizer, pool, SETTINGS, size=2, limit=5, cache=tmp_path)
    with pytest.raises(DataError, match="more than once"):
        mine(model, tokenizer, [*pool, pool[0]], SETTINGS, size=2, cache=tmp_path)
    with pytest.raises(ConfigError, match="mode"):
        SignatureSettings(mode="approximate")
    assert passes == []
