"""SLICE's projection variants on hand-built gradients, each against its formula: GradVac reaches its target
cosine, null-space output is orthogonal to the removed directions, magnitude preservation keeps the norm and the
direction, the median rule and always-project fire where they should, retain-add subtracts a fixed multiple; then
through init_adapter and the run config, and the bad inputs."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import global_dot, random_grads, wrap
from slicelora.errors import ConfigError, InitError
from slicelora.init import InitConfig, init_adapter, project_conflicting
from slicelora.init.surgery import ProjectionSettings
from slicelora.loop.config import load_config


def cosine(a: dict, b: dict) -> float:
    return global_dot(a, b) / math.sqrt(global_dot(a, a) * global_dot(b, b))


def conflicting(seed: int = 0, amount: float = 0.8) -> tuple[dict, dict]:
    cur, rep = random_grads(seed), random_grads(seed + 1)
    return cur, {k: v - amount * cur[k] for k, v in rep.items()}


@pytest.mark.parametrize("phi", [-0.3, 0.0, 0.25, 0.6])
def test_gradvac_reaches_its_target_cosine(phi):
    cur, rep = conflicting()
    assert cosine(cur, rep) < phi
    out, report = project_conflicting(cur, rep, settings=ProjectionSettings(projection="gradvac", phi=phi))
    assert report.fired and report.threshold == phi
    assert cosine(out, rep) == pytest.approx(phi, abs=1e-6) and report.cosine_after == pytest.approx(phi, abs=1e-6)
    # the formula: g = g_cur + lam g_rep, lam = |g_c| (phi sqrt(1 - cos^2) - cos sqrt(1 - phi^2)) / (|g_r| sqrt(1 - phi^2))
    c, nc, nr = cosine(cur, rep), math.sqrt(global_dot(cur, cur)), math.sqrt(global_dot(rep, rep))
    lam = nc * (phi * math.sqrt(1 - c * c) - c * math.sqrt(1 - phi * phi)) / (nr * math.sqrt(1 - phi * phi))
    torch.testing.assert_close(out["l1"], cur["l1"] + lam * rep["l1"], rtol=1e-6, atol=1e-6)


def test_gradvac_fires_only_below_phi():
    cur, rep = conflicting()
    above = cosine(cur, rep) - 0.1  # phi below the cosine: nothing to raise
    out, report = project_conflicting(cur, rep, settings=ProjectionSettings(projection="gradvac", phi=above))
    assert not report.fired and all(torch.equal(out[k], cur[k]) for k in cur)


@pytest.mark.parametrize("null_rank, threshold, kept", [(1, 0.0, 1), (2, 0.0, 2), (None, 0.5, None)])
def test_null_space_output_is_orthogonal_to_the_kept_directions(null_rank, threshold, kept):
    g = torch.Generator().manual_seed(3)
    cur = {"l0": torch.randn(6, 8, generator=g), "l1": torch.randn(5, 4, generator=g)}
    rep = {"l0": torch.randn(6, 8, generator=g), "l1": torch.randn(5, 4, generator=g)}
    settings = ProjectionSettings(projection="null_space", gate_rule="always", null_rank=null_rank,
                                  null_threshold=threshold)
    out, report = project_conflicting(cur, rep, mode="per_layer", settings=settings)
    for name in cur:
        u, sigma, _ = torch.linalg.svd(rep[name].double())
        k = kept or int((sigma >= threshold * sigma[0]).sum())
        assert report.layers[name].directions == k and report.layers[name].fired
        basis = u[:, :k]
        assert (basis.T @ out[name].double()).abs().max() < 1e-6  # nothing left along the removed directions
        # and nothing else changed: the component outside them is G_cur's
        rest = torch.eye(basis.shape[0], dtype=torch.float64) - basis @ basis.T
        torch.testing.assert_close(rest @ out[name].double(), rest @ cur[name].double(), rtol=1e-6, atol=1e-6)


def test_null_space_refuses_no_direction_and_everything():
    cur, rep = random_grads(0), random_grads(1)
    rep["l2"] = torch.zeros_like(rep["l2"])
    with pytest.raises(InitError, match="l2.*no singular direction.*lower null_threshold"):
        project_conflicting(cur, rep, mode="per_layer",
                            settings=ProjectionSettings(projection="null_space", gate_rule="always", null_rank=1))
    cur, rep = random_grads(0), random_grads(1)
    with pytest.raises(InitError, match="leaves no gradient"):  # (3, 3): 3 directions span every output
        project_conflicting(cur, rep, mode="per_layer",
                            settings=ProjectionSettings(projection="null_space", gate_rule="always", null_rank=3))


@pytest.mark.parametrize("mode", ["global", "per_layer"])
@pytest.mark.parametrize("projection", ["pcgrad", "gradvac", "retain_add"])
def test_magnitude_preserving_keeps_the_norm_and_the_direction(mode, projection):
    cur, rep = conflicting()
    plain, _ = project_conflicting(cur, rep, mode=mode, settings=ProjectionSettings(projection=projection,
                                                                                      gate_rule="always"))
    kept, report = project_conflicting(cur, rep, mode=mode, settings=ProjectionSettings(
        projection=projection, gate_rule="always", preserve_magnitude=True))
    units = [list(cur)] if mode == "global" else [[k] for k in cur]
    for unit in units:
        before = sum(global_dot({k: cur[k]}, {k: cur[k]}) for k in unit)
        after = sum(global_dot({k: kept[k]}, {k: kept[k]}) for k in unit)
        assert after == pytest.approx(before, rel=1e-6)
        factor = report.layers[unit[0]].rescale
        for k in unit:
            torch.testing.assert_close(kept[k], plain[k] * factor, rtol=1e-6, atol=1e-6)


def test_median_rule_fires_below_the_median_minus_delta():
    cur = random_grads(0, shapes=((4, 4),) * 5)
    rep = {k: v * w for (k, v), w in zip(cur.items(), (-1.0, -0.5, 0.2, 0.6, 1.0))}
    rep = {k: v + 0.3 * random_grads(9, shapes=((4, 4),) * 5)[k] for k, v in rep.items()}
    cosines = {k: cosine({k: cur[k]}, {k: rep[k]}) for k in cur}
    delta = 0.05
    _, report = project_conflicting(cur, rep, mode="per_layer", settings=ProjectionSettings(gate_rule="median",
                                                                                              gate_delta=delta))
    tau = sorted(cosines.values())[2] - delta
    assert report.threshold == pytest.approx(tau)
    assert {k: l.fired for k, l in report.layers.items()} == {k: c < tau for k, c in cosines.items()}
    assert sum(l.fired for l in report.layers.values()) == 2


def test_always_project_fires_on_aligned_gradients_and_retain_add_subtracts_a_multiple():
    cur = random_grads(0)
    rep = {k: v + 0.1 * random_grads(3)[k] for k, v in cur.items()}  # aligned: the fixed gate would not fire
    out, report = project_conflicting(cur, rep, settings=ProjectionSettings(gate_rule="always"))
    assert report.cosine > 0.9 and report.fired and report.threshold is None and abs(report.cosine_after) < 1e-6
    out, report = project_conflicting(cur, rep, strength=0.5, settings=ProjectionSettings(
        projection="retain_add", gate_rule="always", retain=0.4))
    for k in cur:  # c scales every correction: g = g_cur - c * retain * g_rep
        torch.testing.assert_close(out[k], cur[k] - 0.2 * rep[k], rtol=1e-6, atol=1e-6)


def test_the_default_projection_is_unchanged_pcgrad():
    cur, rep = conflicting()
    default, _ = project_conflicting(cur, rep)
    explicit, report = project_conflicting(cur, rep, settings=ProjectionSettings(projection="pcgrad",
                                                                                  gate_rule="fixed"))
    assert report.projection == "pcgrad" and all(torch.equal(default[k], explicit[k]) for k in cur)


def test_variants_through_init_adapter_are_recorded(model, batches, replay_batches):
    config = InitConfig(projection="gradvac", phi=0.5, preserve_magnitude=True)
    report = init_adapter(wrap(model), "slice", config, current=batches, replay=replay_batches)
    surgery = report.to_dict()["surgery"]
    assert surgery["projection"] == "gradvac" and surgery["threshold"] == 0.5
    if surgery["fired"]:
        assert surgery["cosine_after"] == pytest.approx(0.5, abs=1e-4)
        assert surgery["norm_current"] > 0 and next(iter(surgery["layers"].values()))["rescale"] != 1.0


@pytest.mark.parametrize("overrides, message", [
    (["init.projection=gradvac", "init.phi=1.0"], "phi=1.0 must lie in"),
    (["init.projection=gradvac", "init.phi=-1.5"], "phi=-1.5 must lie in"),
    (["init.gate_rule=median"], "needs surgery_mode='per_layer'"),
    (["init.projection=null_space", "init.null_rank=0"], "null_rank=0 must be >= 1"),
    (["init.projection=null_space", "init.null_threshold=2"], "null_threshold=2.0 must lie in"),
    (["init.projection=nullspace"], "Did you mean 'null_space'"),
])
def test_bad_projection_settings_are_refused_before_any_model_loads(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_bad_projection_settings_are_refused_by_the_library(model, batches, replay_batches):
    with pytest.raises(InitError, match="phi=1.0"):
        init_adapter(wrap(model), "slice", InitConfig(projection="gradvac", phi=1.0), current=batches,
                     replay=replay_batches)
