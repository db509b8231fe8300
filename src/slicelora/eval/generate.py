"""Batched greedy generation and batched log-likelihood scoring.

Both pad on the LEFT, so every row's real tokens end in the last column: new tokens are appended to all rows in
step, and the positions a multiple-choice score needs are the last columns of every row. Position ids count real
tokens only (cumulative sum of the attention mask), so a padded row sees exactly the positions it would see alone.
Multiple choice (`choice_logprobs`) runs each context once and scores all its choices from it (the last column's
logits, then the context's KV cache), instead of one forward per (context, choice) as `sequence_logprobs` does.
Generation can score given suffixes of its prompts the same way, on its own KV cache (`generate_ids`).

Batched results equal one-at-a-time results up to float rounding, not bit for bit: the attention mask and positions
make the maths identical, but CPU/GPU kernels round differently for different matrix shapes (a 1-row decode step
uses matrix-vector products, a batch matrix-matrix ones with other blocking; SDPA takes another path with a padding
mask). In float32 that is ~1e-6 relative, enough to flip a greedy choice only at a near-exact tie.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

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
    if max_prompt_length < 1:
        raise ConfigError(f"generate: max_prompt_length={max_prompt_length} must be positive.")
    encoded = [encode_prompt(tokenizer, p, max_prompt_length)[0] for p in prompts]
    return generate_ids(model, tokenizer, encoded, max_new_tokens=max_new_tokens, batch_size=batch_size,
                        desc=desc)[0]


def generate_ids(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
    desc: str | None = None,
    suffixes: Sequence[Sequence[int] | None] | None = None,
) -> tuple[list[str], list[float | None]]:
    """`generate` on prompts given as token ids, and per prompt the sum of log p(suffix tokens | prompt) of its
    entry in `suffixes` (a non-empty id list, or None: not scored; all None without `suffixes`), in input order.

    The suffixes are scored on the generation's own KV cache, so the prompt is not run a second time: after a batch
    is generated, its cache is cut back to all but the last prompt column (left padding puts every row's last
    prompt token there) and one forward runs [last prompt token] + suffix[:-1] for the rows with a suffix, whose
    logits then predict every suffix token, the first included (see `_continuation_logprobs`). The generation call
    does not depend on `suffixes` (the cache is only read after it), so the texts are those of `generate`. One
    batch's cache is held at a time.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ConfigError(f"generate: batch_size={batch_size} and max_new_tokens={max_new_tokens} must be positive.")
    order = _longest_first([len(p) for p in prompts])
    pad_id, device, cache_argument = _pad_id(tokenizer), _model_device(model), _cache_argument(model)
    texts = [""] * len(prompts)
    sums: list[float | None] = [None] * len(prompts)
    with evaluating(model), tqdm(total=len(prompts), desc=desc, disable=desc is None, unit="ex") as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            ids, mask = _left_pad([prompts[i] for i in batch], pad_id, device)
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                do_sample=False, use_cache=True, pad_token_id=pad_id, return_dict_in_generate=True,
            )
            decoded = tokenizer.batch_decode(out.sequences[:, ids.shape[1]:], skip_special_tokens=True)
            for i, text in zip(batch, decoded):
                texts[i] = text.strip()
            rows = [r for r, i in enumerate(batch) if suffixes is not None and suffixes[i] is not None]
            if rows:
                cache = getattr(out, cache_argument)  # the output field is named like the forward's argument
                cache.crop(-(cache.get_seq_length() - ids.shape[1] + 1))  # a negative count: tokens to drop
                if len(rows) < len(batch):
                    cache.batch_select_indices(torch.tensor(rows, device=device))
                scored = [list(suffixes[batch[r]]) for r in rows]
                totals = _continuation_logprobs(
                    model, cache, mask[rows, :-1], [[prompts[batch[r]][-1], *s[:-1]] for r, s in zip(rows, scored)],
                    scored, pad_id, cache_argument,
                )
                for r, total in zip(rows, totals):
                    sums[batch[r]] = total
                del cache
            del out  # this batch's cache goes before the next batch's generation starts
            bar.update(len(batch))
    return texts, sums


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


def _right_pad(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    return ids.to(device), mask.to(device)


def _cache_argument(model) -> str:
    """The forward argument that takes a KV cache: transformers 5 renamed `past_key_values` to `cache`; the name is
    read from the forward of the model under any PEFT wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _continuation_logprobs(
    model,
    cache,
    mask: torch.Tensor,
    inputs: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    pad_id: int,
    cache_argument: str,
) -> list[float]:
    """Per row r: the sum over j of log p(targets[r][j] | cache row r, inputs[r][:j + 1]), inputs[r] and targets[r]
    of the same length, from one forward on `cache` (extended in place), whose rows' attention mask is `mask`.

    The inputs are right-padded, after every real token, so no real token attends to padding; positions go on
    from each row's real cached length (`mask`'s row sum); float32 log-softmax.
    """
    device = mask.device
    input_ids, input_mask = _right_pad(inputs, pad_id, device)
    target_ids, _ = _right_pad(targets, pad_id, device)
    steps = torch.arange(input_ids.shape[1], device=device).unsqueeze(0)
    logits = model(
        input_ids=input_ids, attention_mask=torch.cat([mask, input_mask], dim=1),
        position_ids=mask.sum(-1, keepdim=True) + steps, use_cache=True, **{cache_argument: cache},
    ).logits
    token_lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)
    return torch.where(input_mask.bool(), token_lp, 0.0).sum(-1).tolist()


def suffix_logprobs(
    model,
    tokenizer,
    rows: Sequence[Sequence[int]],
    counts: Sequence[int],
    *,
    batch_size: int,
    desc: str | None = None,
    unit: str = "seq",
) -> list[float]:
    """For each row of token ids, the sum of log p(token | the tokens before it) over its last `counts[i]` tokens
    (1 <= counts[i] < len(row)), in the order of `rows`.

    Rows are sorted by length into left-padded batches of `batch_size` with real-token position ids, so every row's
    scored tokens lie in the last columns and only those columns' logits are computed (`logits_to_keep`), upcast to
    float32 before the log-softmax. Eval mode under inference_mode, the training mode given back afterwards.
    """
    order = _longest_first([len(r) for r in rows])
    pad_id, device = _pad_id(tokenizer), _model_device(model)
    sums = [0.0] * len(rows)
    with evaluating(model), tqdm(total=len(rows), desc=desc, disable=desc is None, unit=unit) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            ids, mask = _left_pad([rows[i] for i in batch], pad_id, device)
            n = torch.tensor([counts[i] for i in batch], device=device)
            k = int(n.max())
            # Columns W-k-1 .. W-2 predict the last k tokens (W-k .. W-1); row r needs only its last n[r].
            logits = model(
                input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=False,
                logits_to_keep=k + 1,
            ).logits[:, -k - 1:-1]
            token_lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, -k:].unsqueeze(-1)).squeeze(-1)
            wanted = torch.arange(k, device=device).unsqueeze(0) >= (k - n).unsqueeze(1)
            for i, total in zip(batch, torch.where(wanted, token_lp, 0.0).sum(-1).tolist()):
                sums[i] = total
            bar.update(len(batch))
    return sums


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
    """For each pair, (sum of log p(continuation tokens | context), token count, character count), one forward per
    pair: the reference that `choice_logprobs` is checked against.

    Raw text, no chat template (log-likelihood multiple choice as lm-eval-harness does it); see `suffix_logprobs`
    for the batching.
    """
    if len(contexts) != len(continuations):
        raise ConfigError(f"sequence_logprobs: {len(contexts)} contexts but {len(continuations)} continuations.")
    if batch_size < 1:
        raise ConfigError(f"sequence_logprobs: batch_size={batch_size} must be positive.")
    encoded = [_score_ids(tokenizer, c, x, max_length) for c, x in zip(contexts, continuations)]
    sums = suffix_logprobs(model, tokenizer, [ids for ids, _ in encoded], [n for _, n in encoded],
                           batch_size=batch_size, desc=desc)
    return [(total, n, len(x)) for total, (_, n), x in zip(sums, encoded, continuations)]


def choice_logprobs(
    model,
    tokenizer,
    contexts: Sequence[str],
    continuations: Sequence[Sequence[str]],
    batch_size: int = 16,
    *,
    max_length: int = 2048,
    desc: str | None = None,
) -> list[list[tuple[float, int, int]]]:
    """For each context, per continuation: the `sequence_logprobs` values of that (context, continuation) pair,
    computing each context once instead of once per continuation.

    Pairs are encoded as `sequence_logprobs` encodes them; pairs whose (left-truncated) context ids are equal share
    a context. Shared contexts run `batch_size` at a time, left-padded with real-token position ids, keeping their
    KV cache; the last column's log-probs score every continuation's first token, which is all that one-token
    continuations (answer letters) need. The batch's longer continuations then run longest first, `batch_size` at a
    time (little padding), each row on a copy of its context's cache row, positions going on from the context's
    real length; their padding is on the right, after every real token, so no real token attends to it. A context
    left with one continuation (one cut from the left differently for continuations of different lengths) is
    scored with it in one forward, as `sequence_logprobs` does.
    """
    if len(contexts) != len(continuations):
        raise ConfigError(f"choice_logprobs: {len(contexts)} contexts but {len(continuations)} continuation lists.")
    if batch_size < 1:
        raise ConfigError(f"choice_logprobs: batch_size={batch_size} must be positive.")
    runs: dict[tuple[int, ...], list[tuple[int, int, list[int]]]] = {}  # context ids -> (context, choice, ids)
    for i, (context, options) in enumerate(zip(contexts, continuations)):
        for j, option in enumerate(options):
            ids, n = _score_ids(tokenizer, context, option, max_length)
            runs.setdefault(tuple(ids[:-n]), []).append((i, j, ids[-n:]))
    results = [[(0.0, 0, 0)] * len(options) for options in continuations]
    alone = [(list(prefix) + ids, i, j, len(ids)) for prefix, pairs in runs.items() if len(pairs) == 1
             for i, j, ids in pairs]
    sums = suffix_logprobs(model, tokenizer, [a[0] for a in alone], [a[3] for a in alone], batch_size=batch_size,
                           desc=desc)
    for (_, i, j, n), total in zip(alone, sums):
        results[i][j] = (total, n, len(continuations[i][j]))
    prefixes = [prefix for prefix, pairs in runs.items() if len(pairs) > 1]
    order = _longest_first([len(p) for p in prefixes])
    pad_id, device, cache_argument = _pad_id(tokenizer), _model_device(model), _cache_argument(model)
    config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    with evaluating(model), tqdm(total=len(prefixes), desc=desc, disable=desc is None, unit="ctx") as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            members = [(row, i, j, ids) for row, u in enumerate(batch) for i, j, ids in runs[prefixes[u]]]
            longer = sorted((m for m in members if len(m[3]) > 1), key=lambda m: -len(m[3]))
            ids, mask = _left_pad([prefixes[u] for u in batch], pad_id, device)
            cache = DynamicCache(config=config) if longer else None
            logits = model(
                input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=bool(longer),
                logits_to_keep=1, **{cache_argument: cache},
            ).logits[:, -1]
            first = torch.log_softmax(logits.float(), dim=-1)[
                torch.tensor([m[0] for m in members], device=device),
                torch.tensor([m[3][0] for m in members], device=device),
            ].tolist()
            totals = {(i, j): lp for (_, i, j, _), lp in zip(members, first)}
            for chunk_start in range(0, len(longer), batch_size):
                chunk = longer[chunk_start:chunk_start + batch_size]
                source = torch.tensor([m[0] for m in chunk], device=device)
                rows_cache = DynamicCache([(k[source], v[source]) for k, v, *_ in cache], config=config)
                chunk_lps = _continuation_logprobs(model, rows_cache, mask[source], [m[3][:-1] for m in chunk],
                                                   [m[3][1:] for m in chunk], pad_id, cache_argument)
                for (_, i, j, _), lp in zip(chunk, chunk_lps):
                    totals[i, j] += lp
            for _, i, j, cont in members:
                results[i][j] = (totals[i, j], len(cont), len(continuations[i][j]))
            bar.update(len(batch))
    return results
