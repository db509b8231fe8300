"""CountSketch of gradients, hashed on the fly so nothing of the size of the model is ever stored.

A CountSketch maps x in R^D to S(x) in R^k with S(x)[b] = sum of s(i) x_i over the coordinates i with h(i) = b, where
h(i) is a bucket in [0, k) and s(i) a sign. S is linear, and for random h and s:

    E[<S(x), S(y)>] = <x, y>,
    Var[<S(x), S(y)>] = (||x||^2 ||y||^2 + <x, y>^2 - 2 sum_i x_i^2 y_i^2) / k  <=  2 ||x||^2 ||y||^2 / k,

so inner products (and, with the sketched norms, cosines) are preserved in expectation, with a standard error of
order ||x|| ||y|| / sqrt(k) whatever D is (the variance needs 4-wise independent signs: pairwise-independent schemes
such as multiply-add-shift give heavy-tailed errors on structured inputs like constant or rank-one gradients).

A coordinate is (layer name, flat index i within the layer). Its bucket and sign are bits of splitmix64(key + i * G),
a 64-bit mixer whose outputs pass strong statistical tests even for consecutive inputs, with a 64-bit key per layer
from a keyed hash of (seed, layer name). It is computed in chunks with int64 arithmetic (wrapping mod 2^64, checked
against a Python reference in the tests) on the tensor's own device, so the same seed gives the same sketch for
every task, run and device, and no table of the model's size is ever kept.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError

# Chunk sizes: on the CPU below torch's parallel grain (32768), so each op is one cache-resident loop; on a GPU large.
CPU_CHUNK = 1 << 15
GPU_CHUNK = 1 << 22


def _signed64(value: int) -> int:
    """The int64 with the same 64 bits as `value` mod 2^64."""
    value %= 1 << 64
    return value - (1 << 64) if value >= 1 << 63 else value


_GAMMA = _signed64(0x9E3779B97F4A7C15)  # splitmix64's odd increment
_MIX1 = _signed64(0xBF58476D1CE4E5B9)
_MIX2 = _signed64(0x94D049BB133111EB)


def _xor_shift(z: torch.Tensor, shift: int) -> torch.Tensor:
    """z ^= z >>> shift (a logical shift: the arithmetic shift's sign-extended bits are masked off)."""
    return z.bitwise_xor_((z >> shift) & ((1 << (64 - shift)) - 1))


@dataclass(frozen=True)
class CountSketch:
    """A seeded CountSketch to `k` dimensions of named tensors (layers); see the module docstring."""

    k: int
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.k < 2**31:
            raise ConfigError(f"sketch k: {self.k} must be between 1 and 2^31 - 1 (the paper uses 200000).")

    def layer_key(self, name: str) -> int:
        """The 64-bit key (as an int64 value) of layer `name` under this sketch's seed."""
        digest = hashlib.blake2b(f"{self.seed}\0{name}".encode(), digest_size=8).digest()
        return _signed64(int.from_bytes(digest, "little"))

    def hash_coords(self, name: str, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bucket (int64 in [0, k)) and negative-sign mask (bool) of the flat int64 indices of layer `name`."""
        z = index.to(torch.int64).mul(_GAMMA).add_(self.layer_key(name))
        _xor_shift(z, 30).mul_(_MIX1)
        _xor_shift(z, 27).mul_(_MIX2)
        _xor_shift(z, 31)
        negative = z < 0  # the top bit is the sign; bits 32..62 give the bucket by multiply-shift
        bucket = ((z >> 32) & 0x7FFFFFFF).mul_(self.k).bitwise_right_shift_(31)
        return bucket, negative

    def sketch_layer(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """S(tensor) in R^k for the coordinates of layer `name` (float32, or float64 for float64 input).

        Linear in `tensor`, so it can be `accumulate_gradients`'s transform: each batch's raw gradient is sketched
        as it arrives and the mean of the sketches is the sketch of the mean gradient.
        """
        flat = tensor.detach().reshape(-1)
        dtype = torch.promote_types(flat.dtype, torch.float32)
        out = torch.zeros(self.k, dtype=dtype, device=flat.device)
        chunk = CPU_CHUNK if flat.device.type == "cpu" else GPU_CHUNK
        offsets = torch.arange(min(chunk, flat.numel()), dtype=torch.int64, device=flat.device)
        for start in range(0, flat.numel(), chunk):
            values = flat[start:start + chunk].to(dtype)
            bucket, negative = self.hash_coords(name, offsets[: values.numel()] + start)
            out.index_add_(0, bucket, torch.where(negative, -values, values))
        return out

    def sketch_layers(self, layers: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The sketch of the concatenation of all layers: the sum of their per-layer sketches."""
        if not layers:
            raise ConfigError("sketch_layers: no layers were given.")
        parts = (self.sketch_layer(name, tensor) for name, tensor in layers.items())
        total = next(parts).clone()
        for part in parts:
            total += part.to(total.device)
        return total


def sketch_error(names: list[str], exact: np.ndarray, sketched: np.ndarray, k: int) -> dict:
    """How far sketched cosines are from exact ones over the off-diagonal pairs, beside the 1/sqrt(k) scale of the
    sketch's standard error (for unit vectors the cosine error is about (1 - c^2) / sqrt(k) when no coordinate
    dominates, and at most of order 2 sqrt(2 / k))."""
    rows, cols = np.triu_indices(len(names), 1)
    errors = sketched[rows, cols] - exact[rows, cols]
    if not len(errors):
        raise ConfigError("sketch_error: at least two tasks are needed to compare cosines.")
    worst = int(np.abs(errors).argmax())
    return {
        "k": k,
        "pairs": len(errors),
        "max_abs_error": float(np.abs(errors).max()),
        "mean_abs_error": float(np.abs(errors).mean()),
        "rms_error": float(np.sqrt(np.mean(errors**2))),
        "scale": 1 / float(np.sqrt(k)),
        "worst_pair": [names[rows[worst]], names[cols[worst]]],
    }
