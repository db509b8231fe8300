"""Prompt encoding: chat layout, loss masks, left truncation of the prompt only, padded batches."""

from __future__ import annotations

import pytest
import torch

from slicelora.data.prompts import IGNORE_INDEX, collate, encode_example, encode_prompt, make_batches
from slicelora.data.tasks import Example
from slicelora.errors import ConfigError


@pytest.fixture
def example() -> Example:
    return Example("Classify the review.\n\nInput: a fine film", "POS", ("POS",))


def test_short_example_is_kept_whole_in_chat_layout(tokenizer, example):
    encoded = encode_example(tokenizer, example, max_length=512)
    text = tokenizer.decode(encoded.input_ids)
    assert text == tokenizer.apply_chat_template(
        [{"role": "user", "content": example.prompt}, {"role": "assistant", "content": "POS"}], tokenize=False)
    assert not encoded.truncated and encoded.labels == encoded.input_ids
    for max_length in range(len(encoded.input_ids), 2 * len(encoded.input_ids) + 2):  # any length that fits
        again = encode_example(tokenizer, example, max_length)
        assert again.input_ids == encoded.input_ids and not again.truncated


def test_answer_only_loss_masks_the_prompt(tokenizer, example):
    encoded = encode_example(tokenizer, example, max_length=512, loss_on="answer")
    prompt_len = len(encode_prompt(tokenizer, example.prompt, 512)[0])
    assert encoded.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert tokenizer.decode(encoded.labels[prompt_len:]) == "POS<|im_end|>\n"


def test_long_prompt_is_cut_from_the_left_never_the_answer(tokenizer, example):
    full = encode_example(tokenizer, example, max_length=512)
    encoded = encode_example(tokenizer, example, max_length=30)
    assert encoded.truncated and len(encoded.input_ids) == 30
    assert encoded.input_ids == full.input_ids[-30:]  # the last 30 tokens: the end of the prompt and the whole answer
    assert tokenizer.decode(encoded.input_ids).endswith("assistant\nPOS<|im_end|>\n")
    prompt_ids, cut = encode_prompt(tokenizer, example.prompt, 10)
    assert cut and prompt_ids == encode_prompt(tokenizer, example.prompt, 512)[0][-10:]


def test_batches_pad_right_and_count_truncation(tokenizer, example):
    long = Example("x" * 200, "NEG", ("NEG",))
    stats: dict[str, int] = {}
    (batch,) = make_batches([example, long], tokenizer, batch_size=2, max_length=120, seed=None, stats=stats)
    assert stats == {"truncated": 1, "examples": 2}
    lengths = batch["attention_mask"].sum(1).tolist()
    assert batch["input_ids"].shape[1] == max(lengths)
    short = lengths.index(min(lengths))
    assert (batch["labels"][short, min(lengths):] == IGNORE_INDEX).all()
    with pytest.raises(ConfigError, match="no examples"):
        make_batches([], tokenizer, 2, 64)
    padded = collate([encode_example(tokenizer, example, 64)], pad_id=0)
    assert set(padded) == {"input_ids", "attention_mask", "labels"} and padded["input_ids"].dtype == torch.long
