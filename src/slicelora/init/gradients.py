"""Average full-weight gradients of the LM loss over batches, for the target linear layers only.

Each target weight gets a post-accumulate hook that folds its fresh gradient into a float32 buffer (optionally on
the CPU, optionally through a linear `transform` such as a sketch) and frees it at once, so at most one layer's raw
gradient is alive at a time. Nothing else requires grad during the pass. Under torch.distributed the sums and batch
counts are all-reduced, so N processes over N shards of the batches give the mean over all of them. Under FSDP2
the buffers are sharded like the weights (see sharding.py). With `autocast` the forward/backward passes run under
bfloat16 autocast, as training does (2.6x faster for SmolLM2-135M on a CPU with avx512_bf16); the buffers stay
float32. A target layer is an nn.Linear or GPT-2's Conv1D, whose weight is stored transposed, (d_in, d_out): its
gradient is returned as (d_out, d_in) like every other.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from ..errors import InitError
from ..models import LLAMA_TARGETS, is_checkpointing, resolve_targets, set_checkpointing
from .sharding import all_reduce_sum, check_sharding, is_distributed, local, per_rank, reshard_all, sharded_zeros

MODEL_INPUTS = ("input_ids", "attention_mask", "labels")
PEFT_PREFIX = "base_model.model."


def canonical_name(name: str) -> str:
    """The module name without PEFT's wrapper prefix, so a plain and a PEFT-wrapped model share names."""
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def _layer_class(module: nn.Module) -> type:
    """The module's own class, also when FSDP2 re-classed it (e.g. FSDPLinear) to shard it alone."""
    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def is_transposed(layer: nn.Module) -> bool:
    """Whether the layer stores its weight as (d_in, d_out): GPT-2's Conv1D."""
    return _layer_class(layer) is Conv1D


def oriented(layer: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` (the layer's weight, or one shaped like it) as (d_out, d_in), or back: a transposed view for Conv1D,
    the tensor itself for nn.Linear."""
    return tensor.T if is_transposed(layer) else tensor


def target_layers(model: nn.Module, targets: Sequence[str] = LLAMA_TARGETS) -> dict[str, nn.Module]:
    """Map each target module's canonical name to the layer holding its full weight (PEFT: the base layer), an
    nn.Linear or a Conv1D. The default targets resolve to the model's own names (models.resolve_targets)."""
    targets = resolve_targets(model, targets)
    layers: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in targets:
            continue
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        weight = getattr(base, "weight", None)
        if _layer_class(base) not in (nn.Linear, Conv1D) or weight is None or not weight.dtype.is_floating_point:
            quantised = isinstance(base, nn.Linear) or weight is not None and not weight.dtype.is_floating_point
            raise InitError(
                f"layer {canonical_name(name)!r} is a {type(base).__name__}"
                + (f" with weight dtype {getattr(weight, 'dtype', None)}: LoRA inits need full-precision weights. "
                   "Load the model unquantised (dtype=torch.float32 or bfloat16), or drop it from the targets."
                   if quantised else ", not a linear layer (nn.Linear or Conv1D): drop it from the targets.")
            )
        layers[canonical_name(name)] = base
    if not layers:
        raise InitError(
            f"no target layer matched {list(targets)} in {type(model).__name__}; "
            "pass the names of the model's linear projections as targets."
        )
    return layers


def bf16_supported(device: torch.device) -> bool:
    """Whether bfloat16 autocast is fast and exact enough here (native bf16 on the GPU or the CPU)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpu = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or getattr(
        torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return bool(cpu)


def free_bytes(device: torch.device) -> int | None:
    """Free memory on `device`, None if unknown. CUDA: the driver's count. CPU: the kernel's MemAvailable (free
    pages plus the page cache it can reclaim; free pages alone fall to a few hundred MiB on a machine that has read
    many files, with gigabytes to spare), else the free physical pages."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_buffer_memory(model: nn.Module, sets: int, *, targets: Sequence[str] | None = None,
                        offload_to_cpu: bool = False) -> int:
    """Refuse, before any work, gradient buffers that cannot fit: `sets` float32 copies of every target weight plus
    one whole layer (its raw gradient; under FSDP, whose buffers hold only this rank's rows, two whole layers: the
    gathered gradient and weight), on the CPU when offloaded, else on the model's device. CPU memory is shared by
    the node's LOCAL_WORLD_SIZE processes. Under torch.distributed it is a collective (call it on every rank):
    every rank refuses if one does. Returns the bytes needed per rank."""
    reshard_all(model)
    layers = target_layers(model, targets or LLAMA_TARGETS)
    sharded = check_sharding([layer.weight for layer in layers.values()])
    model_device = next(model.parameters()).device
    device = torch.device("cpu") if offload_to_cpu else model_device
    sizes = [local(layer.weight).numel() for layer in layers.values()]
    needed = 4 * (sets * sum(sizes) + (2 if sharded else 1) * max(layer.weight.numel() for layer in layers.values()))
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device.type == "cpu" else 1
    free = free_bytes(device)
    fits = [row[0] for row in per_rank([free is None or needed * sharing <= free], model_device)]
    if not all(fits):
        if free is None or needed * sharing <= free:
            raise InitError(f"the gradient buffers do not fit on rank(s) {[r for r, ok in enumerate(fits) if not ok]}; "
                            "see that rank's error.")
        advice = ("use fewer target modules or a machine with more memory" if device.type == "cpu" else
                  "set init.offload_to_cpu=true (InitConfig(offload_to_cpu=True)) to keep them in CPU memory")
        raise InitError(
            f"the gradient buffers need {needed * sharing / 2**20:.1f} MiB on {device} ({sets} float32 set(s) of "
            f"{len(sizes)} target weights{f', for {sharing} processes' if sharing > 1 else ''}) but only "
            f"{free / 2**20:.1f} MiB are free: {advice}."
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
    autocast: bool = False,
    desc: str | None = None,
) -> dict[str, torch.Tensor]:
    """Mean over `batches` of d(LM loss)/dW for every target weight W, as float32 (d_out, d_in) tensors keyed by
    layer name.

    The model runs in eval mode (no dropout) so the gradient is that of the deterministic loss; its train/eval
    state, every requires_grad flag and the target weights' .grad are restored afterwards, whatever happens.
    `transform(name, grad)` must be linear (the mean of transformed gradients is returned).
    `gradient_checkpointing` recomputes activations in the backward pass (Hugging Face models), trading time for
    activation memory on large models. `autocast` runs each batch's forward/backward under
    torch.autocast(bfloat16) (whether the device does bf16 fast is the caller's business, see `bf16_supported`):
    the weights' gradients are still float32, but computed from bf16 matmuls, so they agree with the exact ones
    only to a per-layer cosine of about 0.995-0.9999 (SmolLM2-135M, see benchmarks/init_cost.py --autocast).

    Under FSDP2 (`fully_shard`) the weights and their gradients are sharded DTensors; FSDP averages each batch's
    gradient across ranks, and the buffers stay sharded like the weights (the caller gathers one layer at a time).
    Every rank must then get the same number of batches, which is checked before the first one.
    """
    reshard_all(model)
    layers = target_layers(model, targets or LLAMA_TARGETS)
    device = next(model.parameters()).device
    sharded = check_sharding([layer.weight for layer in layers.values()])
    if sharded and transform is not None:
        raise InitError("a gradient transform (e.g. a mining sketch) needs whole layers: run it on an unsharded model.")
    if sharded and any(is_transposed(layer) for layer in layers.values()):
        raise InitError("gradients of FSDP-sharded Conv1D layers (GPT-2 style, weight stored (d_in, d_out)) are not "
                        "supported: run the gradient-based init on an unsharded model.")
    batches = list(batches)
    count = _batches_summed(len(batches), device, sharded)
    params = list(model.parameters())
    saved_flags = [p.requires_grad for p in params]
    was_training = model.training
    # Sharded: buffers made here, on the default stream (FSDP runs the hooks on its reduce-scatter stream).
    sums: dict[str, torch.Tensor] = {
        name: sharded_zeros(layer.weight, "cpu" if offload_to_cpu else local(layer.weight).device)
        for name, layer in layers.items()} if sharded else {}
    handles = []

    def fold_into_buffer(name: str) -> Callable[[torch.Tensor], None]:
        def hook(weight: torch.Tensor) -> None:
            if sharded:  # FSDP has averaged this batch's gradient over the ranks; add this rank's rows
                buffer = local(sums[name])
                buffer.add_(local(weight.grad).to(buffer.device, torch.float32))
                weight.grad = None
                return
            grad = weight.grad.float()
            weight.grad = None
            if is_transposed(layers[name]):
                grad = grad.T.contiguous()
            if transform is not None:
                grad = transform(name, grad)
            if offload_to_cpu:
                grad = grad.to("cpu")
            if name in sums:
                sums[name].add_(grad)
            else:
                sums[name] = grad  # the grad was detached from the weight above, so it is ours
        return hook

    checkpointing = gradient_checkpointing and not is_checkpointing(model)
    # A fresh PEFT adapter (every lora_B zero) adds nothing to the function: run the base model without its LoRA
    # branches, which otherwise cost a few extra kernels and saved activations per target layer and batch.
    lora_b = [w for n, w in model.named_parameters() if ".lora_B." in n]
    bypass = (hasattr(model, "disable_adapter") and bool(lora_b) and not bool(
        _over_shards(torch.stack([local(w).detach().count_nonzero() for w in lora_b]), sharded, device).any()))
    losses: list[torch.Tensor] = []
    stack = contextlib.ExitStack()
    try:
        if bypass:
            stack.enter_context(model.disable_adapter())
        if checkpointing:
            set_checkpointing(model, True)
        for p in params:
            p.requires_grad_(False)
        for name, layer in layers.items():
            layer.weight.requires_grad_(True)
            handles.append(layer.weight.register_post_accumulate_grad_hook(fold_into_buffer(name)))
        model.eval()
        for batch in tqdm(batches, desc=desc, disable=desc is None, leave=False):
            inputs = {k: batch[k].to(device) for k in MODEL_INPUTS if k in batch}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = model(**inputs).loss
            loss.backward()
            losses.append(loss.detach())  # checked after the loop: no device sync between batches
        nonfinite = (~torch.isfinite(torch.stack(losses))).cpu()
        if int(all_reduce_sum(nonfinite.sum(), device) if is_distributed() else nonfinite.sum()):  # all ranks stop
            if not nonfinite.any():
                raise InitError("the LM loss of a gradient batch on another rank is not finite; see its error.")
            bad = int(nonfinite.nonzero()[0])
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
            set_checkpointing(model, False)
        model.train(was_training)

    if is_distributed() and not sharded:  # under FSDP each batch's gradient is already averaged across ranks
        sums = {name: all_reduce_sum(sums[name], device) for name in layers}
    means = {name: sums[name].div_(count) for name in layers}
    # Per layer: non-finite entries, non-zero entries (summed over shards).
    flags = _over_shards(torch.stack([torch.stack([(~torch.isfinite(local(g))).sum(), local(g).count_nonzero()])
                                      for g in means.values()]).cpu(), sharded, device)
    for name, (nonfinite, nonzero) in zip(means, flags.tolist()):
        if nonfinite:
            raise InitError(f"the gradient of layer {name!r} is not finite; lower the learning signal or use float32.")
        if not nonzero:
            raise InitError(
                f"the gradient of layer {name!r} is all zero: the loss does not depend on it "
                "(are all labels masked, or is the layer frozen/unused?)."
            )
    return means


def _over_shards(values: torch.Tensor, sharded: bool, device: torch.device) -> torch.Tensor:
    """Per-rank partial sums over local shards -> sums over the whole tensors (no-op when nothing is sharded)."""
    return all_reduce_sum(values, device) if sharded else values


def _batches_summed(count: int, device: torch.device, sharded: bool) -> int:
    """How many batch gradients the final buffers sum: all ranks' (their sums are all-reduced), or under FSDP,
    which averages each batch across ranks, this rank's, which must equal every other rank's."""
    counts = [row[0] for row in per_rank([count], device)]
    if len(counts) == 1 and count == 0:
        raise InitError("the batch iterable was empty: gradient-based inits need at least one batch.")
    if min(counts) == 0:
        raise InitError(f"a rank received no gradient batches (batches per rank: {counts}); "
                        "give every process at least one batch.")
    if sharded and len(set(counts)) > 1:
        raise InitError(f"with FSDP-sharded weights every rank must run the same number of gradient batches, got "
                        f"{counts}: split the batches evenly (e.g. drop the last len % world_size).")
    return count if sharded else sum(counts)
