"""Weights sharded by FSDP2 (`torch.distributed.fsdp.fully_shard`) are DTensors: each rank holds a block of rows.

The inits keep gradient buffers sharded the same way (1/N of the memory per rank) and gather one layer at a time
where a whole matrix is needed (the SVD, Var(W), the absorption); everything elementwise or a sum runs on the local
block, with the sums all-reduced. On unsharded tensors every helper here is the identity or a local operation.
Every decision that leads to a collective is taken from values all ranks share, so no rank waits alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor

from ..errors import InitError


def is_sharded(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's block of a sharded tensor (a view, writable), else the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def check_sharding(weights: Sequence[torch.Tensor]) -> bool:
    """Whether the target weights are sharded; refuses a mix of sharded and whole ones, and meshes other than one
    flat dimension over all ranks (the sums here run over the world group)."""
    sharded = [isinstance(w, DTensor) for w in weights]
    if any(sharded) and not all(sharded):
        raise InitError(f"{sum(sharded)} of {len(sharded)} target weights are FSDP-sharded: shard every block that "
                        "holds a target layer (fully_shard each decoder layer, then the root), or none.")
    for w in weights if all(sharded) else []:
        if w.device_mesh.ndim != 1 or w.device_mesh.size() != dist.get_world_size():
            raise InitError(f"FSDP over a {w.device_mesh.ndim}-D mesh of {w.device_mesh.size()} ranks is not supported: "
                            "shard over one flat mesh of all ranks (plain fully_shard), or replicate the model.")
    return bool(sharded) and all(sharded)


def reshard_all(model: nn.Module) -> None:
    """Put every FSDP2 module back in its sharded state, so parameters are the sharded DTensors we read and write
    (after a forward without backward, or with reshard_after_forward=False, FSDP still shows unsharded copies)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def sharded_zeros(weight: DTensor, device: torch.device | str) -> DTensor:
    """A float32 buffer sharded like `weight`, its block on `device` (the weight's device, or the CPU to offload)."""
    block = torch.zeros(weight.to_local().shape, dtype=torch.float32, device=device)
    return DTensor.from_local(block, weight.device_mesh, weight.placements, shape=weight.shape, stride=weight.stride())


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """The whole matrix on every rank (one all-gather), from its device or from CPU memory if offloaded."""
    if not isinstance(tensor, DTensor):
        return tensor
    mesh = tensor.device_mesh
    if tensor.to_local().device.type != mesh.device_type:  # offloaded block: gather through the mesh's device
        tensor = DTensor.from_local(tensor.to_local().to(mesh.device_type), mesh, tensor.placements,
                                    shape=tensor.shape, stride=tensor.stride())
    return tensor.full_tensor()


@torch.no_grad()
def assign_(param: torch.Tensor, value: torch.Tensor) -> None:
    """param <- value, where `value` is the whole matrix. A sharded param gets its rows of rank 0's value (a
    scatter), so every rank holds the same matrix even if the ranks' factors differ in a last bit."""
    if isinstance(param, DTensor):
        mesh = param.device_mesh
        block = distribute_tensor(value.to(mesh.device_type), mesh, param.placements, src_data_rank=0)
        param.to_local().copy_(block.to_local())
    else:
        param.copy_(value)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _collective_device(device: torch.device | None) -> torch.device:
    """Where a CPU tensor must travel for a collective: nccl reduces only GPU tensors."""
    if dist.get_backend() != "nccl":
        return torch.device("cpu")
    return device if device is not None and device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())


def all_reduce_sum(tensor: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """Sum across ranks; with nccl a CPU tensor travels through `device` (default: the current GPU)."""
    if tensor.device.type == "cpu" and dist.get_backend() == "nccl":
        on_device = tensor.to(_collective_device(device))
        dist.all_reduce(on_device)
        return on_device.to("cpu")
    dist.all_reduce(tensor)
    return tensor


def joint_key(key: str) -> str:
    """A hash of every rank's `key` (e.g. a fingerprint of its share of the batches); `key` in a single process."""
    if not is_distributed():
        return key
    keys: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(keys, key)
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


def per_rank(values: Sequence[int], device: torch.device | None = None) -> list[list[int]]:
    """Every rank's `values` (small integers), in rank order; [values] in a single process."""
    if not is_distributed():
        return [list(values)]
    mine = torch.tensor(list(values), dtype=torch.long, device=_collective_device(device))
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    return [t.tolist() for t in gathered]
