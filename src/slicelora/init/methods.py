"""The built-in initialisations (definitions in docs/method.md), one registration each.

- vanilla: PEFT's default draw, A Kaiming-uniform and B = 0 (nothing to absorb).
- lora_ga: factors from the SVD of the current task's gradient, in three variants (paper, reference, peft).
- loram: fixed DST-I bases for A and B, variance-matched to the weight; no data.
- slice: LoRA-GA paper's factors from the current gradient after one-sided surgery against the replay gradient.
- pissa: PEFT's own PiSSA (the weight's top singular directions), absorbed.
- eva: PEFT's own EVA (A from the SVD of the layer's inputs on the current task, B = 0), not absorbed.
- corda: PEFT's own CorDA (the SVD of W times the layer's input covariance on the replay batches (kpm) or the
  current task's (ipm)), absorbed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from peft import EvaConfig, LoraConfig
from peft.tuners.lora.config import CordaConfig
from peft.tuners.lora.corda import calib_cov_distribution, collect_eigens, crop_corda_eigens
from peft.tuners.lora.eva import get_eva_state_dict
from peft.tuners.lora.layer import Linear as LoraLinear

from ..errors import InitError
from .adapter import (CordaSettings, InitConfig, LoraGASettings, PissaSettings, SeedSettings, SliceSettings,
                      SvdSettings)
from .decompose import dst_basis, lowrank_svd, select_factors, variance_matched_scale
from .gradients import canonical_name
from .registry import Factors, Gradients, InitMethod, LayerInput, Prepared, register_init
from .sharding import all_reduce_sum, is_distributed, per_rank
from .surgery import SurgeryReport, project_conflicting


def _variance_matched(a, b, weight) -> Factors:
    beta = variance_matched_scale(a, b, weight)
    return Factors(a * beta, b * beta, beta)


def _gradient_factors(layer: LayerInput, config: InitConfig, variant: str) -> Factors:
    """LoRA-GA's factors from the layer's gradient. paper: singular vectors picked by `config.selection`, scaled to
    match the weight's variance; reference / peft: B = U[:, r:2r], A = V[:, :r]^T with the stable scale
    d_out^(1/4) / sqrt(gamma) (peft folds the singular values into B and scales only B)."""
    rank, d_out = layer.rank, layer.weight.shape[0]
    u, s, v = lowrank_svd(layer.grad, rank, config.seed, config.niter, fix_signs=variant != "peft")
    if variant == "paper":
        return _variance_matched(*select_factors(u, v, rank, config.selection), layer.weight)
    if v.shape[1] < 2 * rank:
        raise InitError(f"the {variant} LoRA-GA variant needs 2r = {2 * rank} <= min(d_out, d_in) = {v.shape[1]}.")
    stable = d_out ** 0.25 / config.gamma ** 0.5
    a, b = v[:, :rank].T.contiguous(), u[:, rank:2 * rank]
    if variant == "peft":
        return Factors(a, (b @ s[rank:2 * rank].diag() * stable).contiguous())
    return Factors(a * stable, (b * stable).contiguous())


def _lora_ga(layer: LayerInput, config: InitConfig) -> Factors:
    return _gradient_factors(layer, config, config.lora_ga_variant)


def _slice(layer: LayerInput, config: InitConfig) -> Factors:
    return _gradient_factors(layer, config, "paper")


def _surgery(current: Gradients, replay: Gradients, config: InitConfig) -> tuple[Gradients, SurgeryReport]:
    return project_conflicting(current, replay, strength=config.strength, gate=config.gate, mode=config.surgery_mode,
                               settings=config, inplace=True)


def _loram(layer: LayerInput, config: InitConfig) -> Factors:
    d_out, d_in = layer.weight.shape
    return _variance_matched(dst_basis(layer.rank, d_in), dst_basis(d_out, layer.rank), layer.weight)


def _on_scratch(layer: LayerInput, seed: int, init: Callable[[LoraLinear], None]) -> Factors:
    """One of PEFT's own layer inits, `init(scratch)`, run on a scratch LoRA layer over a copy of W with the
    adapter's rank and exact scaling, under `seed` (the caller's random state untouched); its A and B. The real
    weight then takes our absorption, the operation a resumed run replays."""
    d_out, d_in = layer.weight.shape
    with torch.random.fork_rng(devices=[layer.weight.device] if layer.weight.device.type == "cuda" else []):
        torch.manual_seed(seed)
        base = torch.nn.Linear(d_in, d_out, bias=False, dtype=layer.weight.dtype, device=layer.weight.device)
        base.weight.data = layer.weight.detach().clone()
        scratch = LoraLinear(base, "default", LoraConfig(r=layer.rank), r=layer.rank, init_lora_weights=True)
        scratch.scaling["default"] = layer.scaling
        init(scratch)
    return Factors(scratch.lora_A["default"].weight.detach(), scratch.lora_B["default"].weight.detach())


def _pissa(layer: LayerInput, config: InitConfig) -> Factors:
    """PEFT's PiSSA (`LoraLayer.pissa_init`): B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_r^T from the SVD of W
    (exact, or PEFT's `pissa_niter_n` randomised one, seeded)."""
    mode = "pissa" if config.pissa_niter is None else f"pissa_niter_{config.pissa_niter}"
    return _on_scratch(layer, config.seed, lambda scratch: scratch.pissa_init("default", mode))


register_init(InitMethod(
    "vanilla", data="none", absorbs=False, factors=None, settings=(SeedSettings,),
    summary="PEFT's default LoRA init: A Kaiming-uniform, B = 0."))
register_init(InitMethod(
    "lora_ga", data="current", absorbs=True, factors=_lora_ga,
    settings=(LoraGASettings, SvdSettings, SeedSettings),
    summary="LoRA-GA: factors from the SVD of the current task's gradient (variants paper, reference, peft)."))
register_init(InitMethod(
    "loram", data="none", absorbs=True, factors=_loram,
    summary="LoRAM: fixed DST-I bases, variance-matched to the weight; no data."))
register_init(InitMethod(
    "slice", data="replay", absorbs=True, factors=_slice, combine=_surgery,
    settings=(SvdSettings, SeedSettings), combine_settings=(SliceSettings,),
    summary="SLICE: LoRA-GA (paper) on the current gradient after one-sided surgery against the replay gradient."))
register_init(InitMethod(
    "pissa", data="none", absorbs=True, factors=_pissa, settings=(PissaSettings, SeedSettings),
    summary="PiSSA (PEFT's implementation): A and B from the weight's top r singular directions, absorbed."))


def _eva_inputs(model: torch.nn.Module, current: list, replay: list, config: InitConfig,
                adapter_name: str) -> Prepared:
    """PEFT's EVA on the current batches (rho = 1: every layer keeps the adapter's rank): per layer, the top right
    singular vectors of its inputs, found by PEFT's incremental SVD, as A (r x d_in)."""
    lora = model.peft_config[adapter_name]
    eva_config = LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, target_modules=lora.target_modules,
                            use_rslora=lora.use_rslora, init_lora_weights="eva", eva_config=EvaConfig(rho=1.0))
    return Prepared(get_eva_state_dict(model, current, peft_config=eva_config, adapter_name=adapter_name,
                                       show_progress_bar=False))


def _eva(layer: LayerInput, config: InitConfig) -> Factors:
    a = layer.grad.to(layer.weight.dtype).contiguous()
    return Factors(a, torch.zeros(layer.weight.shape[0], a.shape[0], dtype=layer.weight.dtype,
                                  device=layer.weight.device))


register_init(InitMethod(
    "eva", data="inputs", absorbs=False, factors=_eva, prepare=_eva_inputs,
    summary="EVA (PEFT's implementation): A from the SVD of each layer's inputs on the current task, B = 0."))


CORDA_MODES = ("kpm", "ipm")


def _corda_covariances(model: torch.nn.Module, current: list, replay: list, config: InitConfig,
                       adapter_name: str) -> Prepared:
    """PEFT's CorDA covariance pass (`calib_cov_distribution`) on the base layers under the adapter's LoRA layers,
    with the adapter off: per layer, the mean over examples of X^T X, X one example's inputs to the layer divided
    by the absolute value of its largest entry. Each example runs alone and without its padding (PEFT's hook takes
    one sequence per call). kpm reads the replay batches, the knowledge the frozen weight must keep; with none (a
    first stage) it runs as ipm on the current batches, and says so in `settled`. Under torch.distributed the ranks' sums are added:
    every rank gets the covariances of all the examples."""
    if config.corda_mode not in CORDA_MODES:
        raise InitError(f"corda_mode={config.corda_mode!r} must be one of {', '.join(CORDA_MODES)} (kpm: keep the "
                        "replay batches' knowledge; ipm: preview the current task).")
    device = next(model.parameters()).device
    counts = per_rank([len(current), len(replay)], device)
    mode = "kpm" if config.corda_mode == "kpm" and any(c[1] for c in counts) else "ipm"
    read, batches = ("replay", replay) if mode == "kpm" else ("current", current)
    empty = [rank for rank, c in enumerate(counts) if not c[1 if mode == "kpm" else 0]]
    if empty:
        raise InitError(f"init 'corda' reads the {read} batches, but rank(s) {empty} received none; give every "
                        "process some (at least as many batches as processes).")
    names = {f"{name}.base_layer": canonical_name(name) for name, module in model.named_modules()
             if adapter_name in getattr(module, "lora_A", {})}
    bases = {name: module for name, module in model.named_modules() if name in names}

    def run_model() -> None:
        for batch in batches:
            masks = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
            for ids, mask in zip(batch["input_ids"], masks):
                model(input_ids=ids[mask.bool()][None].to(device))

    modes = {module: module.training for module in model.modules()}  # PEFT's pass leaves the model in eval mode
    hooks = {module: set(module._forward_hooks) for module in bases.values()}
    peft_config = LoraConfig(target_modules=list(bases), init_lora_weights="corda",
                             corda_config=CordaConfig(corda_method=mode))
    try:
        with model.disable_adapter():
            calib_cov_distribution(model, peft_config, run_model, None, None)
        covariances = {names[name]: module.covariance_matrix for name, module in bases.items()}
    except ValueError as exc:  # PEFT's checks: NaN or infinite layer inputs or covariances
        raise InitError(f"init 'corda': PEFT's covariance pass failed on the {read} batches: {exc}") from None
    finally:
        for module, before in hooks.items():  # PEFT removes its hooks only after a pass that succeeded
            for key in set(module._forward_hooks) - before:
                del module._forward_hooks[key]
            for attribute in ("covariance_matrix", "sample_count"):
                if hasattr(module, attribute):
                    delattr(module, attribute)
        for module, training in modes.items():
            module.training = training
    if is_distributed():  # PEFT's mean over every rank's examples: sum(mean_k n_k) / sum(n_k)
        examples = sum(len(batch["input_ids"]) for batch in batches)
        total = sum(row[0] for row in per_rank([examples], device))
        covariances = {name: all_reduce_sum(c * examples, device) / total for name, c in covariances.items()}
    return Prepared(covariances, read=(read,), settled={"corda_mode": mode} if mode != config.corda_mode else {})


def _corda(layer: LayerInput, config: InitConfig) -> Factors:
    """PEFT's CorDA from the layer's input covariance C (`grad`): the SVD of W C, C damped until it inverts well,
    with V = C^-1 times the right singular vectors (`collect_eigens`), cut to the r largest (ipm) or r smallest
    (kpm) components (`crop_corda_eigens`), then `corda_init`: B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_r^T."""
    targets = LoraConfig(r=layer.rank, target_modules=["base_layer"])  # the scratch layer's base

    def corda(scratch: LoraLinear) -> None:
        base = scratch.get_base_layer()
        base.covariance_matrix, base.corda_method, base.rank = layer.grad, config.corda_mode, layer.rank
        collect_eigens(scratch, targets, verbose=False)
        crop_corda_eigens(scratch, targets)
        scratch.corda_init("default", "corda")

    return _on_scratch(layer, config.seed, corda)


register_init(InitMethod(
    "corda", data="replay_inputs", absorbs=True, factors=_corda, prepare=_corda_covariances,
    settings=(CordaSettings,),
    summary="CorDA (PEFT's implementation): factors from the SVD of W times each layer's input covariance, absorbed; "
            "kpm (default) takes the r smallest components under the replay buffer's covariance (ipm at the first "
            "stage), ipm the r largest under the current task's."))
