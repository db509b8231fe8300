"""Weights sharded by FSDP2 (`torch.distributed.fsdp.fully_shard`) are DTensors: each rank holds a block of rows.

The inits keep gradient buffers sharded the same way (1/N of the memory per rank) and gather one layer at a time
where a whole matrix is needed (the SVD, Var(W), the absorption); everything elementwise or a sum runs on the local
block, with the sums all-reduced. On unsharded tensors every helper here is the identity or a local operation.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor


def is_sharded(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's block of a sharded tensor (a view, writable), else the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """The whole matrix on every rank (one all-gather), from its device or from CPU memory if offloaded."""
    if not isinstance(tensor, DTensor):
        return tensor
    mesh = tensor.device_mesh
    if tensor.to_local().device.type != mesh.device_type:  # offloaded block: gather through the mesh's device
        tensor = DTensor.from_local(tensor.to_local().to(mesh.device_type), mesh, tensor.placements,
                                    shape=tensor.shape, stride=tensor.stride())
    return tensor.full_tensor()


def offload(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor (or this rank's block of it, still sharded) in CPU memory."""
    if not isinstance(tensor, DTensor):
        return tensor.to("cpu")
    return DTensor.from_local(tensor.to_local().to("cpu"), tensor.device_mesh, tensor.placements,
                              shape=tensor.shape, stride=tensor.stride())


@torch.no_grad()
def assign_(param: torch.Tensor, value: torch.Tensor) -> None:
    """param <- value, where `value` is the whole matrix; a sharded param keeps only its own block (no traffic)."""
    if isinstance(param, DTensor):
        block = distribute_tensor(value.to(param.to_local().device), param.device_mesh, param.placements,
                                  src_data_rank=None)
        param.to_local().copy_(block.to_local())
    else:
        param.copy_(value)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum across ranks; a CPU tensor travels through the GPU when the backend (nccl) cannot reduce CPU tensors."""
    if dist.get_backend() == "nccl" and tensor.device.type == "cpu":
        on_device = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_device)
        return on_device.to("cpu")
    dist.all_reduce(tensor)
    return tensor
