"""The initialiser library: set a PEFT LoRA adapter from gradients (SLICE, LoRA-GA) or without data (LoRAM, vanilla).

Usable without the rest of slicelora: give it a PEFT model and batches of input_ids / attention_mask / labels.
Methods are registered in `registry` (the built-in ones in `methods`); `init_adapter` runs any of them.
"""

from . import methods as _builtin  # noqa: F401  (registers vanilla, lora_ga, loram, slice)
from .adapter import LORA_GA_VARIANTS, InitConfig, InitReport, absorb_factors, adapter_factors, init_adapter
from .decompose import absorb, dst_basis, lowrank_svd, product_variance, select_factors, variance_matched_scale
from .gradients import accumulate_gradients, canonical_name, target_layers
from .registry import Factors, InitMethod, LayerInput, get_init, init_names, register_init
from .surgery import SurgeryReport, project_conflicting

__all__ = [
    "Factors", "InitConfig", "InitMethod", "InitReport", "LORA_GA_VARIANTS", "LayerInput", "SurgeryReport", "absorb",
    "absorb_factors", "accumulate_gradients", "adapter_factors", "canonical_name", "dst_basis", "get_init",
    "init_adapter", "init_names",
    "lowrank_svd", "product_variance", "project_conflicting", "register_init", "select_factors", "target_layers",
    "variance_matched_scale",
]
