"""Answer negative log-likelihood: a low-noise companion of the generation scores for measuring forgetting.

A generation score (exact match, ROUGE-L) moves only when a greedy output changes, so on a few examples it is
coarse and noisy. The answer NLL under teacher forcing moves with every change of the model: the mean per-token
answer NLL (sum of the NLLs / sum of the token counts) separates methods with fewer examples, and one forward per
batch costs far less than decoding. The encoding is the training one (`encode_example`, loss on the answer), so
the answer tokens are those a run trains on, the end-of-turn marker included.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..data.prompts import IGNORE_INDEX, encode_example
from ..data.tasks import Example
from ..errors import ConfigError, DataError
from .generate import suffix_logprobs


def answer_losses(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    batch_size: int,
    max_length: int,
    desc: str | None = None,
) -> list[tuple[float, int]]:
    """Per example, in input order: (sum of the NLLs of its answer tokens, number of answer tokens), teacher forced
    on `encode_example(tokenizer, ex, max_length, loss_on="answer")`.

    The answer tokens are the labeled ones that have a token before them (all of them unless `max_length` leaves no
    prompt token), as in the training loss. Batched by `suffix_logprobs` (sorted by length, only the answer
    columns' logits, float32 log-softmax, eval mode under inference_mode). An empty answer raises DataError.
    """
    if batch_size < 1 or max_length < 2:
        raise ConfigError(
            f"answer_losses: batch_size={batch_size} must be at least 1 and max_length={max_length} at least 2."
        )
    rows, counts = [], []
    for i, ex in enumerate(examples):
        encoded = encode_example(tokenizer, ex, max_length, loss_on="answer")
        n = sum(label != IGNORE_INDEX for label in encoded.labels[1:])
        if not ex.answer or n == 0:
            raise DataError(
                f"answer_losses: example {i} (prompt {ex.prompt[:60]!r}, answer {ex.answer!r}) has no answer tokens "
                "to score; drop it or give it an answer."
            )
        rows.append(encoded.input_ids)
        counts.append(n)
    sums = suffix_logprobs(model, tokenizer, rows, counts, batch_size=batch_size, desc=desc, unit="ex")
    return [(-total, n) for total, n in zip(sums, counts)]
