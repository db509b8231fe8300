"""The built-in initialisations (definitions in docs/method.md), one registration each.

- vanilla: PEFT's default draw, A Kaiming-uniform and B = 0 (nothing to absorb).
- lora_ga: factors from the SVD of the current task's gradient, in three variants (paper, reference, peft).
- loram: fixed DST-I bases for A and B, variance-matched to the weight; no data.
- slice: LoRA-GA paper's factors from the current gradient after one-sided surgery against the replay gradient.
- pissa: PEFT's own PiSSA (the weight's top singular directions), absorbed.
- eva: PEFT's own EVA (A from the SVD of the layer's inputs on the current task, B = 0), not absorbed.
"""

from __future__ import annotations

import torch
from peft import EvaConfig, LoraConfig
from peft.tuners.lora.eva import get_eva_state_dict
from peft.tuners.lora.layer import Linear as LoraLinear

from ..errors import InitError
from .adapter import InitConfig, projection_settings
from .decompose import dst_basis, lowrank_svd, select_factors, variance_matched_scale
from .registry import Factors, Gradients, InitMethod, LayerInput, register_init
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
                               settings=projection_settings(config), inplace=True)


def _loram(layer: LayerInput, config: InitConfig) -> Factors:
    d_out, d_in = layer.weight.shape
    return _variance_matched(dst_basis(layer.rank, d_in), dst_basis(d_out, layer.rank), layer.weight)


def _pissa(layer: LayerInput, config: InitConfig) -> Factors:
    """PEFT's PiSSA (`LoraLayer.pissa_init`) run on a scratch copy of the layer with the adapter's rank and exact
    scaling: A = sqrt(S_r / s) U_r^T-side, B = the V_r side, from the SVD of W (exact, or PEFT's `pissa_niter_n`
    randomised one, seeded). The real weight then takes our absorption, the operation a resumed run replays."""
    d_out, d_in = layer.weight.shape
    mode = "pissa" if config.pissa_niter is None else f"pissa_niter_{config.pissa_niter}"
    with torch.random.fork_rng(devices=[layer.weight.device] if layer.weight.device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        base = torch.nn.Linear(d_in, d_out, bias=False, dtype=layer.weight.dtype, device=layer.weight.device)
        base.weight.data = layer.weight.detach().clone()
        scratch = LoraLinear(base, "default", LoraConfig(r=layer.rank), r=layer.rank, init_lora_weights=True)
        scratch.scaling["default"] = layer.scaling
        scratch.pissa_init("default", mode)
    return Factors(scratch.lora_A["default"].weight.detach(), scratch.lora_B["default"].weight.detach())


register_init(InitMethod(
    "vanilla", data="none", absorbs=False, factors=None, settings=("seed",),
    summary="PEFT's default LoRA init: A Kaiming-uniform, B = 0."))
register_init(InitMethod(
    "lora_ga", data="current", absorbs=True, factors=_lora_ga,
    settings=("lora_ga_variant", "selection", "gamma", "seed", "niter"),
    summary="LoRA-GA: factors from the SVD of the current task's gradient (variants paper, reference, peft)."))
register_init(InitMethod(
    "loram", data="none", absorbs=True, factors=_loram, settings=(),
    summary="LoRAM: fixed DST-I bases, variance-matched to the weight; no data."))
register_init(InitMethod(
    "slice", data="replay", absorbs=True, factors=_slice, combine=_surgery,
    settings=("selection", "seed", "niter"),
    combine_settings=("strength", "gate", "surgery_mode", "projection", "gate_rule", "phi", "retain", "null_rank",
                      "null_threshold", "gate_delta", "preserve_magnitude"),
    summary="SLICE: LoRA-GA (paper) on the current gradient after one-sided surgery against the replay gradient."))
register_init(InitMethod(
    "pissa", data="none", absorbs=True, factors=_pissa, settings=("pissa_niter", "seed"),
    summary="PiSSA (PEFT's implementation): A and B from the weight's top r singular directions, absorbed."))


def _eva_inputs(model: torch.nn.Module, batches: list, config: InitConfig, adapter_name: str) -> Gradients:
    """PEFT's EVA on the current batches (rho = 1: every layer keeps the adapter's rank): per layer, the top right
    singular vectors of its inputs, found by PEFT's incremental SVD, as A (r x d_in)."""
    lora = model.peft_config[adapter_name]
    eva_config = LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, target_modules=lora.target_modules,
                            use_rslora=lora.use_rslora, init_lora_weights="eva", eva_config=EvaConfig(rho=1.0))
    return get_eva_state_dict(model, batches, peft_config=eva_config, adapter_name=adapter_name,
                              show_progress_bar=False)


def _eva(layer: LayerInput, config: InitConfig) -> Factors:
    a = layer.grad.to(layer.weight.dtype).contiguous()
    return Factors(a, torch.zeros(layer.weight.shape[0], a.shape[0], dtype=layer.weight.dtype,
                                  device=layer.weight.device))


register_init(InitMethod(
    "eva", data="inputs", absorbs=False, factors=_eva, prepare=_eva_inputs,
    summary="EVA (PEFT's implementation): A from the SVD of each layer's inputs on the current task, B = 0."))
