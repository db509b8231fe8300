"""One-sided gradient surgery (docs/method.md, SLICE): remove (part of) the current gradient's conflict with replay.

Only the current gradient changes. The paper's projection is PCGrad-c; the official code's variants are here too:
GradVac (raise the cosine to a target phi), null-space (remove the replay gradient's top singular directions),
retain-add (subtract a fixed multiple of the replay gradient), each gated by a fixed tau, by a per-layer threshold
(median of the layers' cosines minus delta) or always applied, and optionally rescaled to the current gradient's
norm. Dot products and norms are float64. Gradients sharded under FSDP are projected block by block; only the dot
products cross ranks (null-space needs whole matrices and is refused there).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch

from ..errors import InitError
from .sharding import all_reduce_sum, is_sharded, local

SurgeryMode = Literal["global", "per_layer"]
Projection = Literal["pcgrad", "gradvac", "null_space", "retain_add"]
GateRule = Literal["fixed", "median", "always"]
PROJECTIONS = ("pcgrad", "gradvac", "null_space", "retain_add")
GATE_RULES = ("fixed", "median", "always")
CLIP = 0.999  # GradVac clips cosines and phi to +-CLIP


@dataclass
class LayerConflict:
    cosine: float
    fired: bool
    scalar: float  # g <- g_cur - scalar * g_rep (PCGrad, GradVac, retain-add); 0 when not fired or null-space
    directions: int = 0  # null-space: how many of the replay gradient's singular directions were removed
    rescale: float = 1.0  # magnitude-preserving: the factor that restored the norm before the projection


@dataclass
class SurgeryReport:
    mode: str
    strength: float
    gate: float
    cosine: float  # global cosine between current and replay gradients
    fired: bool  # global mode: whether the projection was applied; per-layer: whether any layer was projected
    scalar: float  # global mode: the shared coefficient; per-layer: 0
    norm_current: float
    norm_replay: float
    cosine_after: float
    layers: dict[str, LayerConflict] = field(default_factory=dict)
    projection: str = "pcgrad"
    gate_rule: str = "fixed"
    threshold: float | None = None  # the cosine below which it fired (tau, phi or median - delta); None: always

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ProjectionSettings:
    """The variant and its parameters. `phi`: GradVac's target cosine in [-1, 1) (it fires when cos < phi).
    `retain`: retain-add's multiple of G_rep. `null_rank` / `null_threshold`: null-space keeps at most k of G_rep's
    left singular vectors (None: all) with sigma_i / sigma_max >= the threshold. `gate_delta`: the median rule's
    margin.
    `preserve_magnitude`: rescale each projected unit (all layers, or one layer per-layer) to its norm before."""

    projection: Projection = "pcgrad"
    gate_rule: GateRule = "fixed"
    phi: float = 0.0
    retain: float = 1.0
    null_rank: int | None = None
    null_threshold: float = 0.0
    gate_delta: float = 0.0
    preserve_magnitude: bool = False

    def check(self, mode: str) -> None:
        if self.projection not in PROJECTIONS:
            raise InitError(f"projection {self.projection!r} must be one of {', '.join(PROJECTIONS)}.")
        if self.gate_rule not in GATE_RULES:
            raise InitError(f"gate rule {self.gate_rule!r} must be one of {', '.join(GATE_RULES)}.")
        if self.gate_rule == "median" and mode != "per_layer":
            raise InitError("the median gate rule sets one threshold from the layers' cosines: it needs "
                            "surgery_mode='per_layer'.")
        if self.projection == "gradvac" and not -1.0 <= self.phi < 1.0:
            raise InitError(f"GradVac's target cosine phi={self.phi} must lie in [-1, 1).")
        if self.projection == "null_space" and self.null_rank is not None and self.null_rank < 1:
            raise InitError(f"null_rank={self.null_rank} must be >= 1 (or None: every direction above the threshold).")
        if self.projection == "null_space" and not 0.0 <= self.null_threshold <= 1.0:
            raise InitError(f"null_threshold={self.null_threshold} must lie in [0, 1] (a fraction of sigma_max).")
        if not math.isfinite(self.retain) or not math.isfinite(self.gate_delta):
            raise InitError("retain and gate_delta must be finite numbers.")


CHUNK = 1 << 18  # elements per float64 block: the surgery's scratch memory stays at a few MiB per layer


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """<a, b> in float64 over this rank's block (the whole tensor unless sharded)."""
    a, b = local(a).reshape(-1), local(b).reshape(-1)
    return sum(float(torch.dot(a[i:i + CHUNK].double(), b[i:i + CHUNK].double())) for i in range(0, a.numel(), CHUNK))


def _summed(values: list[float], sharded: bool) -> list[float]:
    """Per-block partial sums -> sums over whole tensors, in one all-reduce when the gradients are sharded."""
    return all_reduce_sum(torch.tensor(values, dtype=torch.float64)).tolist() if sharded else values


def _subtract_inplace(g: torch.Tensor, r: torch.Tensor, scalar: float) -> torch.Tensor:
    """g <- g - scalar * r, each block computed in float64 and rounded once (the same values as unchunked)."""
    flat, rep = local(g).view(-1), local(r).reshape(-1)
    for i in range(0, flat.numel(), CHUNK):
        flat[i:i + CHUNK].copy_(flat[i:i + CHUNK].double() - scalar * rep[i:i + CHUNK].double())
    return g


def _scalar(settings: ProjectionSettings, strength: float, d: float, nc: float, nr: float, eps: float) -> float:
    """The coefficient in g = g_cur - scalar * g_rep of the linear projections, from <g_cur, g_rep>, |g_cur|^2 and
    |g_rep|^2 of one unit (all layers, or one layer); c scales every correction."""
    if settings.projection == "retain_add":
        return strength * settings.retain
    if settings.projection == "gradvac":  # the lambda that gives cos(g, g_rep) = phi, negated
        if nc <= 0 or nr <= 0:
            return 0.0
        cos = max(-CLIP, min(CLIP, d / math.sqrt(nc * nr)))
        phi = max(-CLIP, min(CLIP, settings.phi))
        lam = math.sqrt(nc) * (phi * math.sqrt(1 - cos ** 2) - cos * math.sqrt(1 - phi ** 2)) / (
            math.sqrt(nr) * math.sqrt(1 - phi ** 2))
        return -strength * lam
    return strength * d / (nr + eps)  # PCGrad-c


def _null_space(g_cur: torch.Tensor, g_rep: torch.Tensor, strength: float, settings: ProjectionSettings,
                name: str) -> tuple[torch.Tensor, int]:
    """G_cur - c U_k U_k^T G_cur, U_k the replay gradient's top left singular vectors (at most null_rank of them,
    each with sigma_i / sigma_max >= null_threshold), in float64; returns it and k."""
    u, sigma, _ = torch.linalg.svd(g_rep.double(), full_matrices=False)
    keep = int((sigma >= settings.null_threshold * sigma[0]).sum()) if sigma[0] > 0 else 0
    keep = min(keep, settings.null_rank or keep)
    if keep == 0:
        raise InitError(f"layer {name!r}: no singular direction of the replay gradient has sigma_i / sigma_max >= "
                        f"{settings.null_threshold} (sigma_max = {float(sigma[0]):.3g}); lower null_threshold.")
    basis = u[:, :keep]
    out = g_cur.double() - strength * basis @ (basis.T @ g_cur.double())
    if out.norm() <= 1e-6 * g_cur.double().norm():
        raise InitError(f"layer {name!r}: removing {keep} directions leaves no gradient (they span every output "
                        "direction); set a smaller null_rank or a higher null_threshold.")
    return out.to(g_cur.dtype), keep


def project_conflicting(
    current: dict[str, torch.Tensor],
    replay: dict[str, torch.Tensor],
    *,
    strength: float = 1.0,
    gate: float = 0.0,
    mode: SurgeryMode = "global",
    settings: ProjectionSettings | None = None,
    eps: float = 1e-12,
    inplace: bool = False,
) -> tuple[dict[str, torch.Tensor], SurgeryReport]:
    """Return G = G_cur - c * (d / (n_rep + eps)) * G_rep where cos(G_cur, G_rep) < gate, else G_cur (PCGrad-c, the
    paper's), or the variant `settings` asks for (module docstring; docs/method.md).

    `mode="global"` (the paper's) computes d, the norms and the cosine over all layers at once and applies one
    decision and one scalar to every layer; `mode="per_layer"` decides and projects each layer on its own. With
    strength c = 1 the PCGrad result is orthogonal to G_rep; c < 1 is a damped projection. `inplace=True` overwrites
    the current gradients instead of allocating a third set of buffers (the init does this).
    """
    settings = settings or ProjectionSettings()
    if set(current) != set(replay):
        raise InitError(f"current and replay gradients cover different layers: {sorted(set(current) ^ set(replay))[:5]}")
    if not 0.0 < strength <= 1.0:
        raise InitError(f"strength c={strength} must lie in (0, 1].")
    if mode not in ("global", "per_layer"):
        raise InitError(f"surgery mode {mode!r} must be 'global' or 'per_layer'.")
    settings.check(mode)
    dots, n_cur, n_rep = {}, {}, {}
    for name, g_cur in current.items():
        g_rep = replay[name]
        if g_cur.shape != g_rep.shape:
            raise InitError(f"layer {name!r}: current {tuple(g_cur.shape)} and replay {tuple(g_rep.shape)} differ.")
        dots[name], n_cur[name], n_rep[name] = _dot(g_cur, g_rep), _dot(g_cur, g_cur), _dot(g_rep, g_rep)
    sharded = any(is_sharded(g) for g in current.values())
    if sharded and settings.projection == "null_space":
        raise InitError("the null-space projection needs whole gradient matrices: it is not supported with "
                        "FSDP-sharded weights; use projection 'pcgrad', 'gradvac' or 'retain_add'.")
    sums = _summed([*dots.values(), *n_cur.values(), *n_rep.values()], sharded)
    for i, name in enumerate(current):
        dots[name], n_cur[name], n_rep[name] = sums[i::len(current)]

    def cos(d: float, nc: float, nr: float) -> float:
        return d / math.sqrt(nc * nr) if nc > 0 and nr > 0 else 0.0

    d, nc, nr = sum(dots.values()), sum(n_cur.values()), sum(n_rep.values())
    global_cos = cos(d, nc, nr)
    layer_cos = {name: cos(dots[name], n_cur[name], n_rep[name]) for name in current}
    threshold = {"always": None, "median": statistics.median(layer_cos.values()) - settings.gate_delta,
                 "fixed": settings.phi if settings.projection == "gradvac" else gate}[settings.gate_rule]

    def fires(c: float) -> bool:
        return threshold is None or c < threshold

    linear = settings.projection != "null_space"
    global_fired = mode == "global" and fires(global_cos)
    global_scalar = _scalar(settings, strength, d, nc, nr, eps) if global_fired and linear else 0.0
    layers: dict[str, LayerConflict] = {}
    projected: dict[str, torch.Tensor] = {}
    for name, g_cur in current.items():
        if mode == "global":
            fired, scalar = global_fired, global_scalar
        else:
            fired = fires(layer_cos[name])
            scalar = _scalar(settings, strength, dots[name], n_cur[name], n_rep[name], eps) if fired and linear else 0.0
        layers[name] = LayerConflict(layer_cos[name], fired, scalar)
        if not fired:
            projected[name] = g_cur
        elif not linear:
            projected[name], layers[name].directions = _null_space(g_cur, replay[name], strength, settings, name)
            if inplace:
                projected[name] = g_cur.copy_(projected[name])
        elif inplace:
            projected[name] = _subtract_inplace(g_cur, replay[name], scalar)
        else:
            projected[name] = (g_cur.double() - scalar * replay[name].double()).to(g_cur.dtype)
    if settings.preserve_magnitude:
        _restore_norms(projected, layers, n_cur, mode, sharded)

    d_after, n_after = _summed([sum(_dot(projected[n], replay[n]) for n in projected),
                                sum(_dot(projected[n], projected[n]) for n in projected)], sharded)
    report = SurgeryReport(
        mode=mode, strength=strength, gate=gate, cosine=global_cos,
        fired=global_fired if mode == "global" else any(l.fired for l in layers.values()),
        scalar=global_scalar, norm_current=math.sqrt(nc), norm_replay=math.sqrt(nr),
        cosine_after=cos(d_after, n_after, nr), layers=layers,
        projection=settings.projection, gate_rule=settings.gate_rule, threshold=threshold,
    )
    return projected, report


def _restore_norms(projected: dict[str, torch.Tensor], layers: dict[str, LayerConflict], n_cur: dict[str, float],
                   mode: str, sharded: bool) -> None:
    """Rescale each projected unit to the norm the current gradient had before: all layers by one factor (global),
    or each fired layer by its own (per-layer). Projected tensors are new or overwritten ones, never the caller's
    unprojected input."""
    fired = [name for name in projected if layers[name].fired]
    if not fired:
        return
    norms = dict(zip(fired, _summed([_dot(projected[n], projected[n]) for n in fired], sharded)))
    units = [fired] if mode == "global" else [[name] for name in fired]
    for unit in units:
        after = sum(norms[n] for n in unit)
        factor = math.sqrt(sum(n_cur[n] for n in unit) / after) if after > 0 else 1.0
        for name in unit:
            local(projected[name]).mul_(factor)
            layers[name].rescale = factor
