"""Initialise a PEFT LoRA adapter by the name of a registered method (registry.py; the built-in ones in methods.py).

    report = init_adapter(peft_model, "slice", InitConfig(strength=1.0), current=batches, replay=past_batches)

Every layer's factors are computed before the model is touched, so a failed init (a rank too large, a degenerate
gradient, ...) leaves the model as it was; the absorption then runs one layer at a time. Absorbing
methods subtract s B A from the base weight, so the model's function is unchanged right after the init; the saved
adapter then fits that base, which `absorb_factors` rebuilds from the initial factors (`adapter_factors`).
Target layers are nn.Linear or GPT-2's Conv1D (weight stored transposed; PEFT's fan_in_fan_out): methods always see
(d_out, d_in) weights and gradients.
A model sharded with FSDP2 (`fully_shard`) works the same: gradients stay sharded, each layer is gathered alone for
its SVD and absorption, and every rank writes only its own block (the result equals the unsharded init).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import InitError
from ..io import write_with
from ..models import LLAMA_TARGETS, resolve_targets
from .decompose import Selection, absorb
from .gradients import (
    MODEL_INPUTS, accumulate_gradients, bf16_supported, canonical_name, check_buffer_memory, oriented, target_layers,
)
from .registry import LayerInput, get_init
from .sharding import assign_, gather, is_sharded, joint_key, per_rank, reshard_all
from .surgery import ProjectionSettings, SurgeryMode, SurgeryReport

LORA_GA_VARIANTS = ("paper", "reference", "peft")
Batches = Iterable[Mapping[str, torch.Tensor]]
SET_NAMES = {"current": "current task", "replay": "replay"}


# --- each method's settings: a small dataclass per method (a registration names the ones its method reads) -----

@dataclass
class SeedSettings:
    seed: int = 42  # the SVD's random start (and vanilla's Kaiming draw, PiSSA's randomised SVD)


@dataclass
class SvdSettings:
    """How LoRA-GA (and SLICE, which is LoRA-GA on the surgically combined gradient) take the gradient's SVD."""

    selection: Selection = "lora_ga"  # which singular vectors the paper variant uses
    niter: int = 4  # subspace iterations of the randomised SVD


@dataclass
class LoraGASettings:
    lora_ga_variant: Literal["paper", "reference", "peft"] = "paper"
    gamma: float = 16.0  # the reference / peft variants' stable scale d_out^(1/4) / sqrt(gamma)


@dataclass
class SliceSettings(ProjectionSettings):
    """SLICE's surgery: the strength c, the gate tau, global or per-layer decisions, and the projection variant
    (surgery.ProjectionSettings: which correction, when it fires, its parameters)."""

    strength: float = 1.0  # c
    gate: float = 0.0  # tau: project only when cos < tau
    surgery_mode: SurgeryMode = "global"


@dataclass
class PissaSettings:
    pissa_niter: int | None = None  # None = exact SVD of W (PEFT's "pissa"); n = PEFT's "pissa_niter_n"


@dataclass
class CordaSettings:
    # kpm keeps the replay batches' knowledge in the frozen weight (ipm when there are none); ipm previews the
    # current task
    corda_mode: Literal["kpm", "ipm"] = "kpm"


@dataclass
class InitConfig(SeedSettings, SvdSettings, LoraGASettings, SliceSettings, PissaSettings, CordaSettings):
    """How to initialise: every method's settings (the classes above; each method reads its own) and how the
    gradients are computed. Rank and scaling come from the PEFT adapter itself.

    `autocast`: run the gradient passes under bfloat16 autocast, as training does, where the device does bf16
    natively (`bf16_supported`; elsewhere they stay float32). The buffers stay float32; the gradients are those of
    the bf16 forward. Off by default: exact float32 gradients.

    Gradients are cached only when asked, never under FSDP, keyed by a fingerprint of the model's config and target
    weights, the batches and whether autocast ran (so float32 and autocast gradients never stand in for each
    other). `gradient_cache`: one safetensors file holding this init's gradient sets together, reused when every set
    matches, else overwritten. `gradient_cache_dir`: a folder (made when first written) holding one file
    `<fingerprint>.safetensors` per gradient set, so inits on the same model and batches share a set, e.g. LoRA-GA and
    SLICE at one stage share the current-task gradients. Set one of the two at most.
    """

    offload_to_cpu: bool = False  # keep gradient buffers in CPU memory
    gradient_checkpointing: bool = False  # recompute activations in the gradient passes (large models)
    autocast: bool = False  # gradient passes under bf16 autocast where the device supports it
    gradient_cache: str | None = None  # a safetensors file: reuse the gradients when model and batches match
    gradient_cache_dir: str | None = None  # a folder of <fingerprint>.safetensors, one per gradient set
    # the layers' last name components; the default, on a model without the Llama names, resolves to the model's
    # own (PEFT's defaults for its model_type, else every linear layer but the LM head: models.resolve_targets)
    targets: tuple[str, ...] = LLAMA_TARGETS


@dataclass
class InitReport:
    method: str
    absorbs: bool = False  # whether the base weight took W - s B0 A0 (a stage is rebuilt from this record)
    seconds: float = 0.0
    current_batches: int = 0
    replay_batches: int = 0
    autocast: bool = False  # whether the gradient passes ran under bf16 autocast
    gradients_from_cache: bool = False  # every gradient set the init needed came from the cache
    gradient_sets_from_cache: list[str] = field(default_factory=list)  # those that did: "current", "replay"
    surgery: SurgeryReport | None = None
    betas: dict[str, float] = field(default_factory=dict)
    settled: dict = field(default_factory=dict)  # settings the data decided in place of the config's (CorDA's mode)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["surgery"] = self.surgery.to_dict() if self.surgery else None
        if not self.settled:  # recorded only where the data decided a setting (CorDA's first stage)
            del out["settled"]
        return out


def _lora_layers(model: torch.nn.Module, adapter: str, targets: tuple[str, ...]) -> dict[str, torch.nn.Module]:
    """Canonical name -> the PEFT LoRA layer carrying `adapter`, for every target layer."""
    target_layers(model, targets)  # raises on quantised / unsupported / unmatched targets
    targets = resolve_targets(model, targets)
    layers = {
        canonical_name(name): module
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in targets and adapter in getattr(module, "lora_A", {})
    }
    if not layers:
        raise InitError(
            f"no LoRA adapter {adapter!r} on the target layers {list(targets)}: wrap the model with "
            "peft.get_peft_model(model, LoraConfig(target_modules=...)) first."
        )
    return layers


def _fingerprints(model: torch.nn.Module, layers: Mapping[str, torch.nn.Module], batch_sets: Sequence[list],
                  autocast: bool) -> list[str]:
    """One hash per batch list, of what its mean gradient depends on: the model's config, the exact bytes of every
    parameter but the LoRA factors, the batches (their shapes too, as the mean is over batches) and whether the
    passes ran under autocast. The target layers are named so that a different target set gives another key."""
    config = model.config.to_dict() if hasattr(model, "config") else {}
    model_hash = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    model_hash.update(" ".join(layers).encode())
    for name, param in model.named_parameters():
        if "lora_" not in name:
            model_hash.update(name.encode())
            model_hash.update(param.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    model_hash.update(b"bf16 autocast" if autocast else b"float32")
    keys = []
    for batches in batch_sets:
        h = model_hash.copy()
        for batch in batches:
            for key in MODEL_INPUTS:
                if key in batch:
                    h.update(f"{key} {tuple(batch[key].shape)} {batch[key].dtype}".encode())
                    h.update(batch[key].cpu().numpy().tobytes())
        keys.append(h.hexdigest())
    return keys


def _cache_entries(model: torch.nn.Module, layers: Mapping[str, torch.nn.Module], sets: Mapping[str, list],
                   config: InitConfig, autocast: bool) -> dict[str, tuple[Path, str, str]]:
    """Where each gradient set is cached: set name -> (file, key, prefix of its tensor names); {} without a cache.
    A key covers every rank's batches (the gradients are means over all of them): it is the same on every rank."""
    if not (config.gradient_cache or config.gradient_cache_dir):
        return {}
    if any(is_sharded(layer.get_base_layer().weight) for layer in layers.values()):
        raise InitError("a gradient cache needs whole gradients: it is not supported with FSDP-sharded weights; set "
                        "gradient_cache=None and gradient_cache_dir=None (init.gradient_cache: null).")
    fingerprints = _fingerprints(model, layers, list(sets.values()), autocast)
    if config.gradient_cache_dir:
        keys = [joint_key(fingerprint) for fingerprint in fingerprints]
        folder = Path(config.gradient_cache_dir)
        return {name: (folder / f"{key}.safetensors", key, "") for name, key in zip(sets, keys)}
    key = joint_key(hashlib.sha256("\n".join(fingerprints).encode()).hexdigest())
    return {name: (Path(config.gradient_cache), key, f"{name}/") for name in sets}


def _cache_matches(cache: Path, key: str, device: torch.device) -> bool:
    """Whether the gradient cache file holds gradients for `key`, on every rank (else all ranks recompute)."""
    stored = None
    if cache.is_file():
        with safe_open(str(cache), "pt") as f:
            stored = (f.metadata() or {}).get("fingerprint")
    return all(row[0] for row in per_rank([stored == key], device))


def _load(cache: Path, prefix: str, device: torch.device) -> dict[str, torch.Tensor]:
    """The tensors of `cache` whose names start with `prefix` (stripped), on `device`."""
    with safe_open(str(cache), "pt") as f:
        return {name[len(prefix):]: f.get_tensor(name).to(device) for name in f.keys() if name.startswith(prefix)}


def _save(cache: Path, key: str, tensors: Mapping[str, torch.Tensor]) -> None:
    write_with(cache, lambda p: save_file({n: t.contiguous() for n, t in tensors.items()}, str(p),
                                          metadata={"fingerprint": key}))


def _gradients(model, current: list, replay: list, layers, config: InitConfig, use_replay: bool, report: InitReport):
    """G_cur (and G_rep when used), each loaded from the cache where it holds that set, else computed (and cached).
    Every rank takes the same decisions, so all of them meet at the same collectives."""
    sets = {"current": current, **({"replay": replay} if use_replay else {})}
    device = next(model.parameters()).device
    report.autocast = config.autocast and bf16_supported(device)
    entries = _cache_entries(model, layers, sets, config, report.autocast)
    cached = [name for name, (cache, key, _) in entries.items() if _cache_matches(cache, key, device)]
    missing = [name for name in sets if name not in cached]
    if missing:
        check_buffer_memory(model, len(sets), targets=config.targets, offload_to_cpu=config.offload_to_cpu)
    buffer_device = torch.device("cpu") if config.offload_to_cpu else device  # where computed buffers live
    # in the model's layer order, as computed ones are: the surgery's sums then run in the same order, bit for bit
    grads = {name: _load(entries[name][0], entries[name][2], buffer_device) for name in cached}
    grads = {name: {layer: g[layer] for layer in layers} for name, g in grads.items()}
    for name in missing:
        grads[name] = accumulate_gradients(
            model, sets[name], targets=config.targets, offload_to_cpu=config.offload_to_cpu,
            gradient_checkpointing=config.gradient_checkpointing, autocast=report.autocast,
            desc=f"gradients ({SET_NAMES[name]})")
        if config.gradient_cache_dir:
            _save(entries[name][0], entries[name][1], grads[name])
    if config.gradient_cache and missing:
        cache, key, _ = entries["current"]
        _save(cache, key, {f"{name}/{layer}": g for name in sets for layer, g in grads[name].items()})
    report.gradient_sets_from_cache = cached
    report.gradients_from_cache = not missing and bool(cached)
    return grads["current"], grads.get("replay")


def init_adapter(
    model: torch.nn.Module,
    method: str,
    config: InitConfig | None = None,
    *,
    current: Batches | None = None,
    replay: Batches | None = None,
    adapter_name: str = "default",
    input_subspaces: Mapping[str, torch.Tensor] | None = None,
) -> InitReport:
    """Set the LoRA adapter `adapter_name` of a PEFT model by the registered `method` (docs/method.md) and return
    what was done.

    `current`: batches of the task about to be learned (every method with data). `replay`: batches of past tasks
    (methods with data "replay" or "replay_inputs" only; empty or None at the first stage, where SLICE equals
    LoRA-GA paper and CorDA's kpm runs as ipm). `input_subspaces`: per canonical layer name, orthonormal columns U
    (d_in x k) that A must not read: A <- A (I - U U^T) before the absorption (InfLoRA's constraint; any method).
    Under torch.distributed every rank calls it with its own share of the batches.
    """
    config = config or InitConfig()
    spec = get_init(method)
    if config.lora_ga_variant not in LORA_GA_VARIANTS:
        raise InitError(f"lora_ga_variant {config.lora_ga_variant!r} must be one of {', '.join(LORA_GA_VARIANTS)}.")
    if config.gradient_cache and config.gradient_cache_dir:
        raise InitError("set gradient_cache (one file) or gradient_cache_dir (a folder of gradient sets), not both.")
    if spec.combine is not None:
        config.check(config.surgery_mode)
    start = time.perf_counter()
    report = InitReport(method=method, absorbs=spec.absorbs)
    reshard_all(model)
    layers = _lora_layers(model, adapter_name, config.targets)
    current = list(current or [])
    replay = list(replay or [])
    # Decide from every rank's counts, so that all ranks take the same branch (and meet at the same collectives).
    counts = per_rank([len(current), len(replay)], next(model.parameters()).device)
    if replay and not spec.uses_replay:
        warnings.warn(f"init {method!r} does not use replay batches; the {len(replay)} given are ignored.",
                      stacklevel=2)
    if current and spec.data == "none":
        warnings.warn(f"init {method!r} uses no data; the {len(current)} current batches are ignored.", stacklevel=2)

    subspaces = _check_subspaces(input_subspaces or {}, layers)
    if spec.factors is None:  # PEFT's own draw (Kaiming A, zero B), from the init's seed
        _peft_draw(layers, adapter_name, config.seed)
        with torch.no_grad():
            for name, basis in subspaces.items():
                lora_a = layers[name].lora_A[adapter_name].weight
                lora_a.copy_(_outside(lora_a, basis))
        report.seconds = time.perf_counter() - start
        return report

    for name, layer in layers.items():
        rank, shape = layer.r[adapter_name], layer.get_base_layer().weight.shape
        if rank > min(shape):
            raise InitError(f"rank {rank} exceeds min(d_out, d_in) = {min(shape)} of layer {name!r}; lower r.")

    grads: dict[str, torch.Tensor] = {}
    if spec.data != "none" and min(c[0] for c in counts) == 0:  # all ranks decide alike, before any collective
        raise InitError(f"init {method!r} needs current-task batches (current=...): none were given"
                        + (f" on some ranks (batches per rank: {[c[0] for c in counts]})." if len(counts) > 1 else "."))
    if spec.prepare is not None:  # the method's own pass over its batches (EVA's activation SVD, CorDA's covariances)
        if any(is_sharded(layer.get_base_layer().weight) for layer in layers.values()):
            raise InitError(f"init {method!r} is not supported with FSDP-sharded weights.")
        prepared = spec.prepare(model, current, replay if spec.uses_replay else [], config, adapter_name)
        grads = {canonical_name(name): t for name, t in prepared.tensors.items()}
        config, report.settled = replace(config, **prepared.settled), dict(prepared.settled)
        report.current_batches = len(current) if "current" in prepared.read else 0
        report.replay_batches = len(replay) if "replay" in prepared.read else 0
    elif spec.data != "none":
        use_replay = spec.data == "replay" and any(c[1] for c in counts)  # a rank without any then fails with the rest
        g_cur, g_rep = _gradients(model, current, replay if use_replay else [], layers, config, use_replay, report)
        report.current_batches, report.replay_batches = len(current), len(replay) if use_replay else 0
        grads = g_cur
        if use_replay:
            grads, report.surgery = spec.combine(g_cur, g_rep, config)
            del g_rep
        del g_cur  # `grads` is now the only owner, so popping a layer's gradient frees it

    # Factors first (small), each layer's gradient dropped once used; the absorbed weight is made one layer at a
    # time while copying, so no second full set of target weights is ever alive. Sharded gradients and weights are
    # gathered here, one layer at a time.
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, layer in layers.items():
        lora_a, lora_b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        grad, base = grads.pop(name, None), layer.get_base_layer()
        made = spec.factors(LayerInput(name, oriented(base, gather(base.weight.detach())),
                                       None if grad is None else gather(grad), layer.r[adapter_name],
                                       layer.scaling[adapter_name]), config)
        del grad
        a = _outside(made.a, subspaces[name]) if name in subspaces else made.a
        factors[name] = (a.to(lora_a.device, lora_a.dtype), made.b.to(lora_b.device, lora_b.dtype))
        if made.beta is not None:
            report.betas[name] = made.beta
    for name, (a, b) in factors.items():
        layer = layers[name]
        if spec.absorbs:
            absorb_layer(layer, a, b, layer.scaling[adapter_name])
        assign_(layer.lora_A[adapter_name].weight, a)
        assign_(layer.lora_B[adapter_name].weight, b)
    report.seconds = time.perf_counter() - start
    return report


def absorb_layer(layer: torch.nn.Module, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
    """W <- W - s B A on a LoRA layer's base weight, in the weight's own layout (Conv1D: transposed); a sharded
    weight is gathered whole and each rank writes its block."""
    base = layer.get_base_layer()
    assign_(base.weight, oriented(base, absorb(oriented(base, gather(base.weight.detach())), a, b, scaling)))


def adapter_factors(model: torch.nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """CPU copies of the adapter's factors, "<canonical layer name>.A" / ".B": taken right after the init (A0, B0),
    they rebuild the base that an absorbing init left (`absorb_factors`)."""
    tensors = {}
    for name, module in model.named_modules():
        if adapter_name in getattr(module, "lora_A", {}):
            tensors[f"{canonical_name(name)}.A"] = module.lora_A[adapter_name].weight.detach().clone().cpu()
            tensors[f"{canonical_name(name)}.B"] = module.lora_B[adapter_name].weight.detach().clone().cpu()
    return tensors


def absorb_factors(model: torch.nn.Module, factors: Mapping[str, torch.Tensor], adapter_name: str = "default") -> None:
    """W <- W - s B0 A0 on every LoRA layer of a PEFT model carrying `adapter_name`, from the initial factors of
    `adapter_factors`: the base weights an absorbing init left, under the adapter trained from it."""
    layers = {canonical_name(name): module for name, module in model.named_modules()
              if adapter_name in getattr(module, "lora_A", {})}
    missing = sorted(name for name in layers if f"{name}.A" not in factors or f"{name}.B" not in factors)
    if missing or not layers:
        raise InitError(f"the initial factors do not match the adapter {adapter_name!r}: "
                        + (f"no factors for its layers {missing[:3]}." if missing else "the model carries no such "
                           "adapter.") + " Use the factors saved with this very adapter.")
    for name, layer in layers.items():
        absorb_layer(layer, factors[f"{name}.A"], factors[f"{name}.B"], layer.scaling[adapter_name])


def _check_subspaces(subspaces: Mapping[str, torch.Tensor], layers: Mapping[str, torch.nn.Module]
                     ) -> dict[str, torch.Tensor]:
    """The input subspaces, each checked against its layer: a known layer, (d_in, k) with k < d_in, not sharded."""
    unknown = sorted(set(subspaces) - set(layers))
    if unknown:
        raise InitError(f"input_subspaces name layers that carry no adapter: {unknown[:3]}.")
    for name, basis in subspaces.items():
        base = layers[name].get_base_layer()
        weight = base.weight
        d_in = oriented(base, weight).shape[1]
        if basis.dim() != 2 or basis.shape[0] != d_in or basis.shape[1] >= d_in:
            raise InitError(f"layer {name!r}: an input subspace must be (d_in, k) with k < d_in = {d_in}, got "
                            f"{tuple(basis.shape)}; keep fewer directions.")
        if is_sharded(weight):
            raise InitError("input subspaces are not supported with FSDP-sharded weights.")
    return dict(subspaces)


def _outside(a: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """A (I - U U^T): A's rows with their components along U's orthonormal columns removed (float64 inside)."""
    u = basis.to(a.device, torch.float64)
    return (a.double() - (a.double() @ u) @ u.T).to(a.dtype)


def _peft_draw(layers: Mapping[str, torch.nn.Module], adapter_name: str, seed: int) -> None:
    """PEFT's default LoRA init (reset_lora_parameters(init_lora_weights=True)) from `seed`; a sharded factor is
    drawn whole, so the result does not depend on the number of ranks."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for layer in layers.values():
            lora_a, lora_b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            if is_sharded(lora_a):
                a = torch.empty(lora_a.shape, dtype=lora_a.dtype, device=lora_a.device)
                torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                assign_(lora_a, a)
                assign_(lora_b, torch.zeros(lora_b.shape, dtype=lora_b.dtype))
                if layer.lora_bias[adapter_name]:
                    assign_(layer.lora_B[adapter_name].bias, torch.zeros(lora_b.shape[0], dtype=lora_b.dtype))
            else:
                layer.reset_lora_parameters(adapter_name, True)
