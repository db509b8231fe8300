"""Answer negative log-likelihood: a low-noise companion of the generation scores for measuring forgetting.

A generation score (exact match, ROUGE-L) moves only when a greedy output changes, so on a few examples it is
coarse and noisy. The answer NLL under teacher forcing moves with every change of the model: the mean per-token
answer NLL (sum of the NLLs / sum of the token counts) separates methods with fewer examples. The encoding is the
training one (`encode_example`, loss on the answer), so the answer tokens are those a run trains on, the
end-of-turn marker included.

`answer_losses` scores examples on their own (one forward per batch); `generate_and_score`, used by the evaluation
loop, scores them on the KV cache of their greedy generation, whose prompt pass is the bulk of a teacher-forced
pass (answers are short), and is checked against `answer_losses`.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..data.prompts import IGNORE_INDEX, encode_example, encode_prompt
from ..data.tasks import Example
from ..errors import ConfigError, DataError
from .generate import generate_ids, suffix_logprobs


def _answer_rows(tokenizer, examples: Sequence[Example], max_length: int) -> list[tuple[list[int], int]]:
    """Per example: the ids of `encode_example(tokenizer, ex, max_length, loss_on="answer")` and its number of
    scored answer tokens (the labeled ones with a token before them, as in the training loss, which are the ids'
    last ones). An example without any raises DataError."""
    rows = []
    for i, ex in enumerate(examples):
        encoded = encode_example(tokenizer, ex, max_length, loss_on="answer")
        n = sum(label != IGNORE_INDEX for label in encoded.labels[1:])
        if not ex.answer or n == 0:
            raise DataError(
                f"answer NLL: example {i} (prompt {ex.prompt[:60]!r}, answer {ex.answer!r}) has no answer tokens "
                "to score; drop it or give it an answer."
            )
        rows.append((encoded.input_ids, n))
    return rows


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
    rows = _answer_rows(tokenizer, examples, max_length)
    sums = suffix_logprobs(model, tokenizer, [ids for ids, _ in rows], [n for _, n in rows], batch_size=batch_size,
                           desc=desc, unit="ex")
    return [(-total, n) for total, (_, n) in zip(sums, rows)]


def generate_and_score(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    max_new_tokens: int,
    batch_size: int,
    max_prompt_length: int,
    max_length: int,
    desc: str | None = None,
) -> tuple[list[str], list[tuple[float, int]]]:
    """`generate` on the examples' prompts and `answer_losses(..., max_length=max_length)` of the examples, in input
    order: (texts, [(sum of the answer tokens' NLLs, number of answer tokens)]), the answer pass reusing the
    generation's prompt pass.

    An example whose teacher-forced context (its prompt cut to `max_length` minus the answer's length) is the
    generation's prompt (cut to `max_prompt_length`), the usual case, has its answer scored on the generation's KV
    cache (`generate_ids`); the others (prompts cut differently) go through `answer_losses`' own pass. The texts
    are those of `generate` and the NLLs those of `answer_losses` up to float rounding (other matrix shapes).
    """
    if max_prompt_length < 1 or max_length < 2:
        raise ConfigError(
            f"generate_and_score: max_prompt_length={max_prompt_length} must be at least 1 and "
            f"max_length={max_length} at least 2."
        )
    rows = _answer_rows(tokenizer, examples, max_length)
    prompts = [encode_prompt(tokenizer, ex.prompt, max_prompt_length)[0] for ex in examples]
    suffixes = [ids[-n:] if ids[:-n] == prompt else None for (ids, n), prompt in zip(rows, prompts)]
    texts, sums = generate_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               desc=desc, suffixes=suffixes)
    rest = [i for i, total in enumerate(sums) if total is None]
    for i, total in zip(rest, suffix_logprobs(model, tokenizer, [rows[i][0] for i in rest],
                                              [rows[i][1] for i in rest], batch_size=batch_size)):
        sums[i] = total
    return texts, [(-total, n) for total, (_, n) in zip(sums, rows)]
