"""One-sided gradient surgery (docs/method.md, SLICE): remove (part of) the current gradient's conflict with replay.

Only the current gradient changes; the replay gradient is never added. Dot products and norms are float64.
Gradients sharded under FSDP are projected block by block; only the dot products cross ranks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch

from ..errors import InitError
from .sharding import all_reduce_sum, is_sharded, local

SurgeryMode = Literal["global", "per_layer"]


@dataclass
class LayerConflict:
    cosine: float
    fired: bool
    scalar: float  # the coefficient of G_rep that was subtracted (c * d / n_rep), 0 when not fired


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

    def to_dict(self) -> dict:
        return asdict(self)


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


def project_conflicting(
    current: dict[str, torch.Tensor],
    replay: dict[str, torch.Tensor],
    *,
    strength: float = 1.0,
    gate: float = 0.0,
    mode: SurgeryMode = "global",
    eps: float = 1e-12,
    inplace: bool = False,
) -> tuple[dict[str, torch.Tensor], SurgeryReport]:
    """Return G = G_cur - c * (d / (n_rep + eps)) * G_rep where cos(G_cur, G_rep) < gate, else G_cur.

    `mode="global"` (the paper's) computes d, the norms and the cosine over all layers at once and applies one
    scalar to every layer; `mode="per_layer"` decides and projects each layer on its own. With strength c = 1 the
    result is orthogonal to G_rep (PCGrad); c < 1 is a damped projection. `inplace=True` overwrites the current
    gradients instead of allocating a third set of buffers (the init does this).
    """
    if set(current) != set(replay):
        raise InitError(f"current and replay gradients cover different layers: {sorted(set(current) ^ set(replay))[:5]}")
    if not 0.0 < strength <= 1.0:
        raise InitError(f"strength c={strength} must lie in (0, 1].")
    if mode not in ("global", "per_layer"):
        raise InitError(f"surgery mode {mode!r} must be 'global' or 'per_layer'.")
    dots, n_cur, n_rep = {}, {}, {}
    for name, g_cur in current.items():
        g_rep = replay[name]
        if g_cur.shape != g_rep.shape:
            raise InitError(f"layer {name!r}: current {tuple(g_cur.shape)} and replay {tuple(g_rep.shape)} differ.")
        dots[name], n_cur[name], n_rep[name] = _dot(g_cur, g_rep), _dot(g_cur, g_cur), _dot(g_rep, g_rep)
    sharded = any(is_sharded(g) for g in current.values())
    sums = _summed([*dots.values(), *n_cur.values(), *n_rep.values()], sharded)
    for i, name in enumerate(current):
        dots[name], n_cur[name], n_rep[name] = sums[i::len(current)]

    def cos(d: float, nc: float, nr: float) -> float:
        return d / math.sqrt(nc * nr) if nc > 0 and nr > 0 else 0.0

    d, nc, nr = sum(dots.values()), sum(n_cur.values()), sum(n_rep.values())
    global_cos = cos(d, nc, nr)
    layers: dict[str, LayerConflict] = {}
    projected: dict[str, torch.Tensor] = {}
    global_fired = mode == "global" and global_cos < gate
    global_scalar = strength * d / (nr + eps) if global_fired else 0.0
    for name, g_cur in current.items():
        layer_cos = cos(dots[name], n_cur[name], n_rep[name])
        if mode == "global":
            fired, scalar = global_fired, global_scalar
        else:
            fired = layer_cos < gate
            scalar = strength * dots[name] / (n_rep[name] + eps) if fired else 0.0
        layers[name] = LayerConflict(layer_cos, fired, scalar)
        if fired:
            if inplace:
                projected[name] = _subtract_inplace(g_cur, replay[name], scalar)
            else:
                projected[name] = (g_cur.double() - scalar * replay[name].double()).to(g_cur.dtype)
        else:
            projected[name] = g_cur

    d_after, n_after = _summed([sum(_dot(projected[n], replay[n]) for n in projected),
                                sum(_dot(projected[n], projected[n]) for n in projected)], sharded)
    report = SurgeryReport(
        mode=mode, strength=strength, gate=gate, cosine=global_cos,
        fired=global_fired if mode == "global" else any(l.fired for l in layers.values()),
        scalar=global_scalar, norm_current=math.sqrt(nc), norm_replay=math.sqrt(nr),
        cosine_after=cos(d_after, n_after, nr), layers=layers,
    )
    return projected, report
