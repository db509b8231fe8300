"""Adversarial sequence mining: task gradient signatures, CountSketch, cosine subset search."""

from .search import EXHAUSTIVE_LIMIT, METHODS, check_search, pairwise_cosine, rank_subsets, subset_scores
from .signatures import (
    MiningResult,
    SignatureSettings,
    mine,
    model_fingerprint,
    signature_batches,
    signature_key,
    task_signature,
    write_mining_outputs,
)
from .sketch import CountSketch, sketch_error

__all__ = [
    "EXHAUSTIVE_LIMIT", "METHODS", "CountSketch", "MiningResult", "SignatureSettings", "check_search", "mine",
    "model_fingerprint", "pairwise_cosine", "rank_subsets", "signature_batches", "signature_key", "sketch_error",
    "subset_scores", "task_signature", "write_mining_outputs",
]
