"""Average full-weight gradients of the LM loss over batches, for the target linear layers only.

Each target weight gets a post-accumulate hook that folds its fresh gradient into a float32 buffer (optionally on
the CPU, optionally through a linear `transform` such as a sketch) and frees it at once, so at most one layer's raw
gradient is alive at a time. Nothing else requires grad during the pass. Under torch.distributed the sums and batch
counts are all-reduced, so N processes over N shards of the batches give the mean over all of them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ..errors import InitError
from ..models import LLAMA_TARGETS

MODEL_INPUTS = ("input_ids", "attention_mask", "labels")
PEFT_PREFIX = "base_model.model."


def canonical_name(name: str) -> str:
    """The module name without PEFT's wrapper prefix, so a plain and a PEFT-wrapped model share names."""
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def target_layers(model: nn.Module, targets: Sequence[str] = LLAMA_TARGETS) -> dict[str, nn.Linear]:
    """Map each target module's canonical name to the nn.Linear holding its full weight (PEFT: the base layer)."""
    layers: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in targets:
            continue
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        weight = getattr(base, "weight", None)
        if type(base) is not nn.Linear or weight is None or not weight.dtype.is_floating_point:
            raise InitError(
                f"layer {canonical_name(name)!r} is a {type(base).__name__} with weight dtype "
                f"{getattr(weight, 'dtype', None)}: gradient-based inits need full-precision nn.Linear layers. "
                "Load the model unquantised (dtype=torch.float32 or bfloat16), or drop it from the targets."
            )
        layers[canonical_name(name)] = base
    if not layers:
        raise InitError(
            f"no target layer matched {list(targets)} in {type(model).__name__}; "
            "pass the names of the model's linear projections as targets."
        )
    return layers


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_sum(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum across ranks; a CPU buffer travels through `device` when the backend cannot reduce CPU tensors."""
    if dist.get_backend() == "nccl" and tensor.device.type == "cpu":
        on_device = tensor.to(device)
        dist.all_reduce(on_device)
        return on_device.to("cpu")
    dist.all_reduce(tensor)
    return tensor


def free_bytes(device: torch.device) -> int | None:
    """Free memory on `device` (CUDA: the driver's count; CPU: available physical pages), None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_buffer_memory(model: nn.Module, sets: int, *, targets: Sequence[str] | None = None,
                        offload_to_cpu: bool = False) -> int:
    """Refuse, before any work, gradient buffers that cannot fit: `sets` float32 copies of every target weight
    plus one layer's raw gradient, on the CPU when offloaded, else on the model's device. Returns the bytes needed."""
    layers = target_layers(model, targets or LLAMA_TARGETS)
    device = torch.device("cpu") if offload_to_cpu else next(model.parameters()).device
    sizes = [layer.weight.numel() for layer in layers.values()]
    needed = 4 * (sets * sum(sizes) + max(sizes))
    free = free_bytes(device)
    if free is not None and needed > free:
        advice = ("use fewer target modules or a machine with more memory" if device.type == "cpu" else
                  "set init.offload_to_cpu=true (InitConfig(offload_to_cpu=True)) to keep them in CPU memory")
        raise InitError(
            f"the gradient buffers need {needed / 2**20:.1f} MiB on {device} ({sets} float32 set(s) of "
            f"{len(sizes)} target weights) but only {free / 2**20:.1f} MiB are free: {advice}."
        )
    return needed


def accumulate_gradients(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    targets: Sequence[str] | None = None,
    offload_to_cpu: bool = False,
    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    gradient_checkpointing: bool = False,
    desc: str | None = None,
) -> dict[str, torch.Tensor]:
    """Mean over `batches` of d(LM loss)/dW for every target weight W, as float32 tensors keyed by layer name.

    The model runs in eval mode (no dropout) so the gradient is that of the deterministic loss; its train/eval
    state, every requires_grad flag and the target weights' .grad are restored afterwards, whatever happens.
    `transform(name, grad)` must be linear (the mean of transformed gradients is returned).
    `gradient_checkpointing` recomputes activations in the backward pass (Hugging Face models), trading time for
    activation memory on large models.
    """
    layers = target_layers(model, targets or LLAMA_TARGETS)
    device = next(model.parameters()).device
    params = list(model.parameters())
    saved_flags = [p.requires_grad for p in params]
    was_training = model.training
    sums: dict[str, torch.Tensor] = {}
    handles = []

    def fold_into_buffer(name: str) -> Callable[[torch.Tensor], None]:
        def hook(weight: torch.Tensor) -> None:
            grad = weight.grad.float()
            weight.grad = None
            if transform is not None:
                grad = transform(name, grad)
            if offload_to_cpu:
                grad = grad.to("cpu")
            if name in sums:
                sums[name].add_(grad)
            else:
                sums[name] = grad  # the grad was detached from the weight above, so it is ours
        return hook

    checkpointing = gradient_checkpointing and not getattr(model, "is_gradient_checkpointing", False)
    # A fresh PEFT adapter (every lora_B zero) adds nothing to the function: run the base model without its LoRA
    # branches, which otherwise cost a few extra kernels and saved activations per target layer and batch.
    lora_b = [w for n, w in model.named_parameters() if ".lora_B." in n]
    bypass = (hasattr(model, "disable_adapter") and bool(lora_b)
              and not bool(torch.stack([w.detach().abs().sum() for w in lora_b]).any()))
    losses: list[torch.Tensor] = []
    count = 0
    stack = contextlib.ExitStack()
    try:
        if bypass:
            stack.enter_context(model.disable_adapter())
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for p in params:
            p.requires_grad_(False)
        for name, layer in layers.items():
            layer.weight.requires_grad_(True)
            handles.append(layer.weight.register_post_accumulate_grad_hook(fold_into_buffer(name)))
        model.eval()
        for batch in tqdm(batches, desc=desc, disable=desc is None, leave=False):
            inputs = {k: batch[k].to(device) for k in MODEL_INPUTS if k in batch}
            loss = model(**inputs).loss
            loss.backward()
            losses.append(loss.detach())  # checked after the loop: no device sync between batches
            count += 1
        finite = torch.isfinite(torch.stack(losses)) if losses else None
        if finite is not None and not bool(finite.all()):
            bad = int((~finite).nonzero()[0])
            raise InitError(f"the LM loss of gradient batch {bad} is {losses[bad].item()}; check the data and dtype.")
    finally:
        stack.close()
        for handle in handles:
            handle.remove()
        for layer in layers.values():
            layer.weight.grad = None
        for p, flag in zip(params, saved_flags):
            p.requires_grad_(flag)
        if checkpointing:
            model.gradient_checkpointing_disable()
        model.train(was_training)

    if _is_distributed():
        counts = torch.tensor([count], dtype=torch.long, device=device if dist.get_backend() == "nccl" else "cpu")
        per_rank = [torch.zeros_like(counts) for _ in range(dist.get_world_size())]
        dist.all_gather(per_rank, counts)
        if min(int(c) for c in per_rank) == 0:
            raise InitError("a rank received no gradient batches; give every process at least one batch.")
        count = sum(int(c) for c in per_rank)
        sums = {name: _all_reduce_sum(sums[name], device) for name in layers}
    if count == 0:
        raise InitError("the batch iterable was empty: gradient-based inits need at least one batch.")

    means = {name: sums[name].div_(count) for name in layers}
    for name, grad in means.items():
        if not torch.isfinite(grad).all():
            raise InitError(f"the gradient of layer {name!r} is not finite; lower the learning signal or use float32.")
        if not grad.any():
            raise InitError(
                f"the gradient of layer {name!r} is all zero: the loss does not depend on it "
                "(are all labels masked, or is the layer frozen/unused?)."
            )
    return means
