"""From examples to token ids: chat formatting (docs/method.md, Protocol), loss masks, left-truncation, padded batches.

The prompt is the user turn (with the model's chat template, when it has one); the answer is the assistant turn.
The answer's ids are always the suffix of the full ids, so a too-long example loses tokens from the LEFT of its
prompt, never from its answer.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from ..errors import ConfigError

if TYPE_CHECKING:
    from .tasks import Example

IGNORE_INDEX = -100
LossOn = Literal["full", "answer"]


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def _prompt_text(tokenizer, prompt: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt + "\n"


def _full_text(tokenizer, prompt: str, answer: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], tokenize=False
        )
    return prompt + "\n" + answer + (tokenizer.eos_token or "")


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_prompt(tokenizer, prompt: str, max_length: int) -> tuple[list[int], bool]:
    """Ids of the chat-wrapped user turn plus the generation prompt, cut from the left to `max_length`."""
    ids = _ids(tokenizer, _prompt_text(tokenizer, prompt))
    return (ids[-max_length:], True) if len(ids) > max_length else (ids, False)


def encode_example(tokenizer, example: Example, max_length: int, loss_on: LossOn = "full") -> Encoded:
    """Ids and labels of prompt + answer. `loss_on="full"` trains on every token (the paper), "answer" on the
    answer's tokens only. Too long: the prompt is cut from the left; an answer alone longer than `max_length`
    keeps its first `max_length` tokens."""
    if loss_on not in ("full", "answer"):
        raise ConfigError(f"loss_on: {loss_on!r} is not one of 'full', 'answer'.")
    prompt_text = _prompt_text(tokenizer, example.prompt)
    full_text = _full_text(tokenizer, example.prompt, example.answer)
    if not full_text.startswith(prompt_text):  # templates that rewrite the user turn: fall back to concatenation
        full_text = prompt_text + example.answer + (tokenizer.eos_token or "")
    prompt_ids = _ids(tokenizer, prompt_text)
    answer_ids = _ids(tokenizer, full_text[len(prompt_text):])[:max_length]
    keep = max(max_length - len(answer_ids), 0)  # prompt tokens that fit beside the answer
    truncated = len(prompt_ids) > keep
    prompt_ids = prompt_ids[max(len(prompt_ids) - keep, 0):]
    masked = [IGNORE_INDEX] * len(prompt_ids) if loss_on == "answer" else list(prompt_ids)
    return Encoded(prompt_ids + answer_ids, masked + answer_ids, truncated)


def collate(encoded: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors for training: padding has attention 0 and label IGNORE_INDEX."""
    width = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, e in enumerate(encoded):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def make_batches(
    examples: Iterable[Example],
    tokenizer,
    batch_size: int,
    max_length: int,
    loss_on: LossOn = "full",
    seed: int | None = 42,
    num_batches: int | None = None,
    stats: dict[str, int] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Tokenised, padded batches of `examples`, in a seeded shuffle (no shuffle when seed is None).

    `num_batches` takes only the first batches of the shuffle (e.g. SLICE's S = 8 batches); the last batch may be
    smaller. If `stats` is given, stats["truncated"] and stats["examples"] are increased (a run reports them).
    """
    items = list(examples)
    if not items:
        raise ConfigError("make_batches: no examples were given; check the task's split is not empty.")
    if batch_size < 1 or max_length < 2:
        raise ConfigError(f"make_batches: batch_size={batch_size} and max_length={max_length} must be positive.")
    if seed is not None:
        random.Random(seed).shuffle(items)
    if num_batches is not None:
        items = items[: num_batches * batch_size]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = []
    for start in range(0, len(items), batch_size):
        encoded = [encode_example(tokenizer, ex, max_length, loss_on) for ex in items[start:start + batch_size]]
        batches.append(collate(encoded, pad_id))
        if stats is not None:
            stats["truncated"] = stats.get("truncated", 0) + sum(e.truncated for e in encoded)
            stats["examples"] = stats.get("examples", 0) + len(encoded)
    return batches
