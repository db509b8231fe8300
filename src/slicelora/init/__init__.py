"""The initialiser library: set a PEFT LoRA adapter from gradients (SLICE, LoRA-GA) or without data (LoRAM, vanilla).

Usable without the rest of slicelora: give it a PEFT model and batches of input_ids / attention_mask / labels.
"""

from .decompose import absorb, dst_basis, lowrank_svd, product_variance, select_factors, variance_matched_scale
from .gradients import accumulate_gradients, canonical_name, target_layers
from .methods import LORA_GA_VARIANTS, METHODS, InitConfig, InitReport, init_adapter
from .surgery import SurgeryReport, project_conflicting

__all__ = [
    "InitConfig", "InitReport", "LORA_GA_VARIANTS", "METHODS", "SurgeryReport", "absorb", "accumulate_gradients",
    "canonical_name", "dst_basis", "init_adapter", "lowrank_svd", "product_variance", "project_conflicting",
    "select_factors", "target_layers", "variance_matched_scale",
]
