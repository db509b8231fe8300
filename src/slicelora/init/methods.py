"""Initialise a PEFT LoRA adapter by method name: vanilla, lora_ga (paper / reference / peft), loram, slice.

    report = init_adapter(peft_model, "slice", InitConfig(strength=1.0), current=batches, replay=past_batches)

Every layer's factors are computed before the model is touched, so a failed init (a rank too large, a degenerate
gradient, ...) leaves the model as it was; the absorption then runs one layer at a time. Absorbing
methods subtract s B A from the base weight, so the model's function is unchanged right after the init.
A model sharded with FSDP2 (`fully_shard`) works the same: gradients stay sharded, each layer is gathered alone for
its SVD and absorption, and every rank writes only its own block (the result equals the unsharded init).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file

from ..errors import InitError
from ..io import write_with
from ..models import LLAMA_TARGETS
from .decompose import Selection, absorb, dst_basis, lowrank_svd, select_factors, variance_matched_scale
from .gradients import accumulate_gradients, canonical_name, check_buffer_memory, target_layers
from .sharding import assign_, gather, is_sharded, joint_key, per_rank, reshard_all
from .surgery import SurgeryMode, SurgeryReport, project_conflicting

METHODS = ("vanilla", "lora_ga", "loram", "slice")
LORA_GA_VARIANTS = ("paper", "reference", "peft")
Batches = Iterable[Mapping[str, torch.Tensor]]


@dataclass
class InitConfig:
    """How to initialise; rank and scaling come from the PEFT adapter itself."""

    lora_ga_variant: Literal["paper", "reference", "peft"] = "paper"
    selection: Selection = "lora_ga"  # which singular vectors SLICE / LoRA-GA paper use
    strength: float = 1.0  # SLICE's c
    gate: float = 0.0  # SLICE's tau: project only when cos < tau
    surgery_mode: SurgeryMode = "global"
    gamma: float = 16.0  # the reference / peft variants' stable scale d_out^(1/4) / sqrt(gamma)
    seed: int = 42  # the SVD's random start (and vanilla's Kaiming draw)
    niter: int = 4
    offload_to_cpu: bool = False  # keep gradient buffers in CPU memory
    gradient_checkpointing: bool = False  # recompute activations in the gradient passes (large models)
    gradient_cache: str | None = None  # a safetensors file: reuse the gradients when model and batches match
    targets: tuple[str, ...] = LLAMA_TARGETS


@dataclass
class InitReport:
    method: str
    seconds: float = 0.0
    current_batches: int = 0
    replay_batches: int = 0
    gradients_from_cache: bool = False
    surgery: SurgeryReport | None = None
    betas: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["surgery"] = self.surgery.to_dict() if self.surgery else None
        return out


def _lora_layers(model: torch.nn.Module, adapter: str, targets: tuple[str, ...]) -> dict[str, torch.nn.Module]:
    """Canonical name -> the PEFT LoRA layer carrying `adapter`, for every target layer."""
    target_layers(model, targets)  # raises on quantised / unsupported / unmatched targets
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


def _fingerprint(model: torch.nn.Module, layers: Mapping[str, torch.nn.Module], batches: list) -> str:
    """A hash of the model's config, its target weights and the batches: what the gradients depend on."""
    h = hashlib.sha256(json.dumps(getattr(model, "config", {}).to_dict() if hasattr(model, "config") else {},
                                  sort_keys=True, default=str).encode())
    for name, layer in layers.items():
        w = layer.get_base_layer().weight.detach()
        h.update(name.encode())
        h.update(torch.stack([w.double().sum(), w.double().abs().sum(), w.double().pow(2).sum()]).numpy().tobytes())
    for batch in batches:
        for key in ("input_ids", "attention_mask", "labels"):
            if key in batch:
                h.update(batch[key].cpu().numpy().tobytes())
    return h.hexdigest()


def _cache_matches(cache: Path, key: str, device: torch.device) -> bool:
    """Whether the gradient cache file holds gradients for `key`, on every rank (else all ranks recompute)."""
    stored = None
    if cache.is_file():
        from safetensors import safe_open

        with safe_open(str(cache), "pt") as f:
            stored = (f.metadata() or {}).get("fingerprint")
    return all(row[0] for row in per_rank([stored == key], device))


def _gradients(model, current: list, replay: list, layers, config: InitConfig, use_replay: bool, report: InitReport):
    """G_cur (and G_rep when used), from the cache file when its fingerprint matches, else computed (and cached)."""
    if config.gradient_cache and any(is_sharded(layer.get_base_layer().weight) for layer in layers.values()):
        raise InitError("gradient_cache needs whole gradients: it is not supported with FSDP-sharded weights; "
                        "set gradient_cache=None (init.gradient_cache: null).")
    # The gradients are means over every rank's batches, so the key covers all of them (the same on every rank).
    key = joint_key(_fingerprint(model, layers, current + replay)) if config.gradient_cache else None
    cache = Path(config.gradient_cache) if config.gradient_cache else None
    if cache is not None and _cache_matches(cache, key, next(model.parameters()).device):
        tensors = load_file(str(cache))
        report.gradients_from_cache = True
        pick = lambda part: {n[len(part) + 1:]: t for n, t in tensors.items() if n.startswith(part + "/")}
        return pick("current"), (pick("replay") if use_replay else None)
    check_buffer_memory(model, 2 if use_replay else 1, targets=config.targets, offload_to_cpu=config.offload_to_cpu)
    kw = dict(targets=config.targets, offload_to_cpu=config.offload_to_cpu,
              gradient_checkpointing=config.gradient_checkpointing)
    g_cur = accumulate_gradients(model, current, desc="gradients (current task)", **kw)
    g_rep = accumulate_gradients(model, replay, desc="gradients (replay)", **kw) if use_replay else None
    if cache is not None:
        tensors = {f"current/{n}": t.contiguous() for n, t in g_cur.items()}
        tensors.update({f"replay/{n}": t.contiguous() for n, t in (g_rep or {}).items()})
        write_with(cache, lambda p: save_file(tensors, str(p), metadata={"fingerprint": key}))
    return g_cur, g_rep


def _factors(method: str, grad: torch.Tensor | None, weight: torch.Tensor, rank: int, config: InitConfig):
    """(A, B, beta) for one layer; beta is None for the variants that do not variance-match."""
    d_out, d_in = weight.shape
    if method == "loram":
        a, b = dst_basis(rank, d_in), dst_basis(d_out, rank)
    else:
        variant = config.lora_ga_variant if method == "lora_ga" else "paper"
        u, s, v = lowrank_svd(grad, rank, config.seed, config.niter, fix_signs=variant != "peft")
        if variant in ("reference", "peft"):
            if v.shape[1] < 2 * rank:
                raise InitError(f"the {variant} LoRA-GA variant needs 2r = {2 * rank} <= min(d_out, d_in) = {v.shape[1]}.")
            stable = d_out ** 0.25 / config.gamma ** 0.5
            a = v[:, :rank].T.contiguous()
            b = u[:, rank:2 * rank]
            if variant == "peft":  # peft folds the singular values into B and scales only B
                return a, (b @ torch.diag(s[rank:2 * rank]) * stable).contiguous(), None
            return a * stable, (b * stable).contiguous(), None
        a, b = select_factors(u, v, rank, config.selection)
    beta = variance_matched_scale(a, b, weight)
    return a * beta, b * beta, beta


def init_adapter(
    model: torch.nn.Module,
    method: str,
    config: InitConfig | None = None,
    *,
    current: Batches | None = None,
    replay: Batches | None = None,
    adapter_name: str = "default",
) -> InitReport:
    """Set the LoRA adapter `adapter_name` of a PEFT model by `method` (SPEC 3) and return what was done.

    `current`: batches of the task about to be learned (gradient methods). `replay`: batches of past tasks (SLICE
    only; empty or None at the first stage, where SLICE equals LoRA-GA paper). Under torch.distributed every rank
    calls it with its own share of the batches.
    """
    config = config or InitConfig()
    if method not in METHODS:
        raise InitError(f"unknown init method {method!r}; choose one of {', '.join(METHODS)}.")
    if config.lora_ga_variant not in LORA_GA_VARIANTS:
        raise InitError(f"lora_ga_variant {config.lora_ga_variant!r} must be one of {', '.join(LORA_GA_VARIANTS)}.")
    start = time.perf_counter()
    report = InitReport(method=method)
    reshard_all(model)
    layers = _lora_layers(model, adapter_name, config.targets)
    current = list(current or [])
    replay = list(replay or [])
    # Decide from every rank's counts, so that all ranks take the same branch (and meet at the same collectives).
    counts = per_rank([len(current), len(replay)], next(model.parameters()).device)
    if replay and method != "slice":
        warnings.warn(f"init {method!r} does not use replay batches; the {len(replay)} given are ignored.", stacklevel=2)
    if current and method in ("vanilla", "loram"):
        warnings.warn(f"init {method!r} uses no data; the {len(current)} current batches are ignored.", stacklevel=2)

    if method == "vanilla":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            for layer in layers.values():
                lora_a, lora_b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
                if is_sharded(lora_a):  # peft's reset_lora_parameters(init_lora_weights=True), drawn whole
                    a = torch.empty(lora_a.shape, dtype=lora_a.dtype, device=lora_a.device)
                    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                    assign_(lora_a, a)
                    assign_(lora_b, torch.zeros(lora_b.shape, dtype=lora_b.dtype))
                    if layer.lora_bias[adapter_name]:
                        assign_(layer.lora_B[adapter_name].bias, torch.zeros(lora_b.shape[0], dtype=lora_b.dtype))
                else:
                    layer.reset_lora_parameters(adapter_name, True)
        report.seconds = time.perf_counter() - start
        return report

    for name, layer in layers.items():
        rank, (d_out, d_in) = layer.r[adapter_name], layer.get_base_layer().weight.shape
        if rank > min(d_out, d_in):
            raise InitError(f"rank {rank} exceeds min(d_out, d_in) = {min(d_out, d_in)} of layer {name!r}; lower r.")

    grads: dict[str, torch.Tensor] = {}
    if method in ("lora_ga", "slice"):
        if min(c[0] for c in counts) == 0:
            raise InitError(f"init {method!r} needs current-task batches (current=...): none were given"
                            + (f" on some ranks (batches per rank: {[c[0] for c in counts]})." if len(counts) > 1 else "."))
        use_replay = method == "slice" and any(c[1] for c in counts)  # a rank without any then fails with the rest
        g_cur, g_rep = _gradients(model, current, replay if use_replay else [], layers, config, use_replay, report)
        report.current_batches, report.replay_batches = len(current), len(replay) if use_replay else 0
        grads = g_cur
        if use_replay:
            grads, report.surgery = project_conflicting(
                g_cur, g_rep, strength=config.strength, gate=config.gate, mode=config.surgery_mode, inplace=True
            )
            del g_rep
        del g_cur  # `grads` is now the only owner, so popping a layer's gradient frees it

    # Factors first (small), each layer's gradient dropped once used; the absorbed weight is made one layer at a
    # time while copying, so no second full set of target weights is ever alive. Sharded gradients and weights are
    # gathered here, one layer at a time.
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, layer in layers.items():
        base = layer.get_base_layer()
        lora_a, lora_b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        grad = grads.pop(name, None)
        a, b, beta = _factors(method, None if grad is None else gather(grad), gather(base.weight.detach()),
                              layer.r[adapter_name], config)
        del grad
        factors[name] = (a.to(lora_a.device, lora_a.dtype), b.to(lora_b.device, lora_b.dtype))
        if beta is not None:
            report.betas[name] = beta
    for name, (a, b) in factors.items():
        layer = layers[name]
        weight = layer.get_base_layer().weight
        assign_(weight, absorb(gather(weight.detach()), a, b, layer.scaling[adapter_name]))
        assign_(layer.lora_A[adapter_name].weight, a)
        assign_(layer.lora_B[adapter_name].weight, b)
    report.seconds = time.perf_counter() - start
    return report
