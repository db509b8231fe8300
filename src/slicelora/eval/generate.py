"""Batched greedy generation and batched log-likelihood scoring.

Both pad on the LEFT, so every row's real tokens end in the last column: new tokens are appended to all rows in
step, and the positions a multiple-choice score needs are the last columns of every row. Position ids count real
tokens only (cumulative sum of the attention mask), so a padded row sees exactly the positions it would see alone.

Batched results equal one-at-a-time results up to float rounding, not bit for bit: the attention mask and positions
make the maths identical, but CPU/GPU kernels round differently for different matrix shapes (a 1-row decode step
uses matrix-vector products, a batch matrix-matrix ones with other blocking; SDPA takes another path with a padding
mask). In float32 that is ~1e-6 relative, enough to flip a greedy choice only at a near-exact tie.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from ..data.prompts import encode_prompt
from ..errors import ConfigError, DataError


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ConfigError("The tokenizer has neither a pad nor an eos token; set tokenizer.pad_token first.")
    return pad


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _longest_first(lengths: Sequence[int]) -> list[int]:
    # Similar lengths share a batch (little padding); longest first so an out-of-memory error shows at once.
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


@contextmanager
def evaluating(model) -> Iterator[None]:
    """Eval mode under inference_mode, the model's training mode given back afterwards whatever happens."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    max_prompt_length: int = 1024,
    desc: str | None = None,
) -> list[str]:
    """Greedy continuations of `prompts` (chat-wrapped user turns, cut from the left to `max_prompt_length` tokens),
    decoded without special tokens and stripped, in the order of `prompts`.

    Prompts are sorted by length into batches of `batch_size` and decoded with the KV cache; the model runs in eval
    mode under inference_mode and gets its training mode back afterwards. `desc` turns on a progress bar.
    """
    if batch_size < 1 or max_new_tokens < 1 or max_prompt_length < 1:
        raise ConfigError(
            f"generate: batch_size={batch_size}, max_new_tokens={max_new_tokens} and "
            f"max_prompt_length={max_prompt_length} must be positive."
        )
    encoded = [encode_prompt(tokenizer, p, max_prompt_length)[0] for p in prompts]
    order = _longest_first([len(e) for e in encoded])
    pad_id, device = _pad_id(tokenizer), _model_device(model)
    outputs = [""] * len(prompts)
    with evaluating(model), tqdm(total=len(prompts), desc=desc, disable=desc is None, unit="ex") as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            ids, mask = _left_pad([encoded[i] for i in batch], pad_id, device)
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                do_sample=False, use_cache=True, pad_token_id=pad_id,
            )
            texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
            for i, text in zip(batch, texts):
                outputs[i] = text.strip()
            bar.update(len(batch))
    return outputs


def _score_ids(tokenizer, context: str, continuation: str, max_length: int) -> tuple[list[int], int]:
    """Context ids (with the tokenizer's usual special tokens, e.g. BOS) + continuation ids, encoded separately so
    the boundary is exact; cut from the left to `max_length`. Returns (ids, number of continuation tokens)."""
    ctx = tokenizer(context)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    if not cont:
        raise DataError(f"sequence_logprobs: the continuation {continuation!r} has no tokens.")
    if len(cont) >= max_length:
        raise ConfigError(
            f"sequence_logprobs: a continuation of {len(cont)} tokens does not fit max_length={max_length}; raise it."
        )
    if not ctx:  # the first continuation token needs something to be predicted from
        ctx = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else _pad_id(tokenizer)]
    return (ctx + cont)[-max_length:], len(cont)


def sequence_logprobs(
    model,
    tokenizer,
    contexts: Sequence[str],
    continuations: Sequence[str],
    batch_size: int = 16,
    *,
    max_length: int = 2048,
    desc: str | None = None,
) -> list[tuple[float, int, int]]:
    """For each pair, (sum of log p(continuation tokens | context), token count, character count).

    Raw text, no chat template (log-likelihood multiple choice as lm-eval-harness does it). Batches are left-padded
    with real-token position ids, and only the last columns' logits are computed (`logits_to_keep`), which hold
    every row's continuation.
    """
    if len(contexts) != len(continuations):
        raise ConfigError(f"sequence_logprobs: {len(contexts)} contexts but {len(continuations)} continuations.")
    if batch_size < 1:
        raise ConfigError(f"sequence_logprobs: batch_size={batch_size} must be positive.")
    encoded = [_score_ids(tokenizer, c, x, max_length) for c, x in zip(contexts, continuations)]
    order = _longest_first([len(ids) for ids, _ in encoded])
    pad_id, device = _pad_id(tokenizer), _model_device(model)
    results: list[tuple[float, int, int]] = [(0.0, 0, 0)] * len(encoded)
    with evaluating(model), tqdm(total=len(encoded), desc=desc, disable=desc is None, unit="seq") as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            ids, mask = _left_pad([encoded[i][0] for i in batch], pad_id, device)
            counts = torch.tensor([encoded[i][1] for i in batch], device=device)
            k = int(counts.max())
            # Columns W-k-1 .. W-2 predict the last k tokens (W-k .. W-1); row r needs only its last counts[r].
            logits = model(
                input_ids=ids, attention_mask=mask, position_ids=_positions(mask), logits_to_keep=k + 1
            ).logits[:, -k - 1:-1]
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            token_lp = logprobs.gather(-1, ids[:, -k:].unsqueeze(-1)).squeeze(-1)
            wanted = torch.arange(k, device=device).unsqueeze(0) >= (k - counts).unsqueeze(1)
            sums = torch.where(wanted, token_lp, 0.0).sum(-1).tolist()
            for row, i in enumerate(batch):
                results[i] = (sums[row], encoded[i][1], len(continuations[i]))
            bar.update(len(batch))
    return results
