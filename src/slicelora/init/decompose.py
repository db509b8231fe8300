"""From a gradient (or no data) to LoRA factors: seeded low-rank SVD, factor selection, DST-I bases,
variance-matched magnitude, and absorption into the base weight (docs/method.md)."""

from __future__ import annotations

import math
from typing import Literal

import torch

from ..errors import InitError

Selection = Literal["lora_ga", "top_r"]


def lowrank_svd(
    grad: torch.Tensor, rank: int, seed: int, niter: int = 4, fix_signs: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.svd_lowrank with q = min(4r, min(shape)) and niter = 4, with its random start seeded.

    Singular vector pairs (u_i, v_i) are defined only up to a joint sign, and LAPACK may flip one under a
    perturbation of 1e-8 (e.g. another summation order across processes). Since LoRA-GA's B and A take u_i and v_j
    with different indices, a flip changes B A. With `fix_signs` each pair is flipped so that the largest-magnitude
    entry of u_i is positive, which makes the init reproducible (U S V^T is unchanged).
    """
    q = min(4 * rank, min(grad.shape))
    devices = [grad.device] if grad.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(grad.float(), q=q, niter=niter)
    if fix_signs:
        signs = torch.sign(u.gather(0, u.abs().argmax(0, keepdim=True)))
        signs[signs == 0] = 1
        u, v = u * signs, v * signs
    return u, s, v


def select_factors(u: torch.Tensor, v: torch.Tensor, rank: int, selection: Selection) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) from the singular vectors: "lora_ga": B = U[:, :r], A = V[:, r:2r]^T; "top_r": B = U[:, :r], A = V[:, :r]^T."""
    if selection == "lora_ga":
        if v.shape[1] < 2 * rank:
            raise InitError(
                f"selection 'lora_ga' needs 2r = {2 * rank} singular vectors but the layer has only {v.shape[1]}; "
                "lower the rank or use selection 'top_r'."
            )
        return v[:, rank:2 * rank].T.contiguous(), u[:, :rank].contiguous()
    if selection == "top_r":
        return v[:, :rank].T.contiguous(), u[:, :rank].contiguous()
    raise InitError(f"selection {selection!r} must be 'lora_ga' or 'top_r'.")


def dst_basis(rows: int, cols: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The DST-I matrix of LoRAM: for rows >= cols, entry (i, k) = sqrt(2/(rows+1)) sin((i+1)(k+1) pi/(rows+1)),
    whose columns are orthonormal; for rows < cols, the transpose of the cols x rows one."""
    if rows < cols:
        return dst_basis(cols, rows, dtype).T.contiguous()
    i = torch.arange(1, rows + 1, dtype=torch.float64)[:, None]
    k = torch.arange(1, cols + 1, dtype=torch.float64)[None, :]
    return (math.sqrt(2.0 / (rows + 1)) * torch.sin(i * k * math.pi / (rows + 1))).to(dtype)


def product_variance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Population variance of the entries of B @ A, without forming the d_out x d_in product."""
    a, b = a.double(), b.double()
    n = b.shape[0] * a.shape[1]
    sum_sq = float(((a @ a.T) * (b.T @ b)).sum())
    total = float(b.sum(0) @ a.sum(1))
    return sum_sq / n - (total / n) ** 2


def variance_matched_scale(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor) -> float:
    """beta with Var(beta B beta A) = Var(W) * log_m(r), m = min(d_out, d_in), r = the adapter rank."""
    rank = a.shape[0]
    m = min(weight.shape)
    if rank < 2:
        raise InitError("variance matching needs rank r >= 2 (log_m(1) = 0 would zero the adapter).")
    rho = math.log(rank) / math.log(m)
    var_ba = product_variance(a, b)
    if var_ba <= 0:
        raise InitError("B A has zero variance: the gradient gave a degenerate decomposition.")
    return (rho * entry_variance(weight) / var_ba) ** 0.25


def entry_variance(weight: torch.Tensor, chunk: int = 1 << 18) -> float:
    """Population variance of the entries, two-pass in float64 over blocks of `chunk` entries: the same value as
    weight.double().var(unbiased=False) without a float64 copy of the whole matrix."""
    flat = weight.detach().reshape(-1)
    blocks = range(0, flat.numel(), chunk)
    mean = sum(float(flat[i:i + chunk].double().sum()) for i in blocks) / flat.numel()
    return sum(float((flat[i:i + chunk].double() - mean).square().sum()) for i in blocks) / flat.numel()


def absorb(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W - s B A, computed in float32 from the factors as the adapter will hold them, returned in W's dtype.
    One d_out x d_in float32 buffer (plus the cast back for a bf16 W): the product is added in place."""
    out = weight.to(torch.float32, copy=True)
    return out.addmm_(b.to(out.device).float(), a.to(out.device).float(), alpha=-scaling).to(weight.dtype)
