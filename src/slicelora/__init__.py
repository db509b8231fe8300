"""slicelora: continual fine-tuning with LoRA adapters, SLICE and its baselines."""

__version__ = "0.1.0"
