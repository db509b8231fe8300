"""Answer NLL: batched values against a direct one-example-at-a-time cross-entropy on the training encoding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import toy_examples

from slicelora.data.prompts import IGNORE_INDEX, encode_example
from slicelora.data.tasks import Example
from slicelora.errors import DataError
from slicelora.eval.loss import answer_losses
from slicelora.models import tiny_llama

MAX_LENGTH = 80


@pytest.fixture(scope="module")
def lively(tokenizer):
    return tiny_llama(tokenizer, seed=3, initializer_range=0.2)


@pytest.fixture(scope="module")
def examples() -> list[Example]:
    # Mixed lengths: short and longer prompts and answers, and one whose prompt is cut from the left.
    mixed = [*toy_examples("sentiment", 3), *toy_examples("reverse", 3)]
    return [*mixed[:2], Example("long prompt " * 20, "its answer", ("its answer",)), *mixed[2:]]


def direct(model, tokenizer, ex: Example) -> tuple[float, int]:
    encoded = encode_example(tokenizer, ex, MAX_LENGTH, loss_on="answer")
    labels = torch.tensor(encoded.labels)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([encoded.input_ids])).logits[0]
    nll = F.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=IGNORE_INDEX, reduction="sum")
    return nll.item(), int((labels != IGNORE_INDEX).sum())


@pytest.mark.parametrize("batch_size", [1, 3])
def test_answer_losses_equal_direct_cross_entropy_in_input_order(lively, tokenizer, examples, batch_size):
    assert encode_example(tokenizer, examples[2], MAX_LENGTH, loss_on="answer").truncated
    lively.train()
    got = answer_losses(lively, tokenizer, examples, batch_size=batch_size, max_length=MAX_LENGTH, desc="test")
    assert lively.training  # training mode restored
    expected = [direct(lively, tokenizer, ex) for ex in examples]
    assert len({n for _, n in expected}) > 2  # answers of several lengths
    for (nll, n), (want_nll, want_n) in zip(got, expected):
        assert n == want_n
        assert nll == pytest.approx(want_nll, abs=1e-4)
    reverse = answer_losses(lively, tokenizer, examples[::-1], batch_size=batch_size, max_length=MAX_LENGTH)
    assert [n for _, n in reverse] == [n for _, n in got][::-1]
    assert [nll for nll, _ in reverse] == pytest.approx([nll for nll, _ in got][::-1], abs=1e-4)


def test_answer_losses_reject_an_empty_answer(lively, tokenizer, examples):
    assert answer_losses(lively, tokenizer, [], batch_size=2, max_length=MAX_LENGTH) == []
    with pytest.raises(DataError, match=r"example 1 .*answer ''"):
        answer_losses(lively, tokenizer, [examples[0], Example("Say nothing.", "", ("",))], batch_size=2,
                      max_length=MAX_LENGTH)
