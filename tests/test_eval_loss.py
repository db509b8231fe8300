"""Answer NLL: batched values against a direct one-example-at-a-time cross-entropy on the training encoding, and
the values scored on the generation's KV cache against `answer_losses`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import toy_examples, wrap

from slicelora.data.prompts import IGNORE_INDEX, encode_example, encode_prompt
from slicelora.data.tasks import Example
from slicelora.errors import DataError
from slicelora.eval import loss
from slicelora.eval.generate import generate
from slicelora.eval.loss import answer_losses, generate_and_score
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


@pytest.fixture(scope="module")
def mixed_examples(examples) -> list[Example]:
    # Besides `examples`: a prompt that fits generation's 80 tokens but not beside its long answer, and a long one
    # that fits beside its short answer.
    return [*examples, Example("p" * 40, "a fairly long answer here", ("x",)), Example("q" * 55, "ok", ("ok",))]


def fallbacks(tokenizer, examples: list[Example], max_prompt_length: int) -> int:
    """Examples whose teacher-forced context is not generation's prompt: cut by one of the two bounds."""
    return sum(encode_example(tokenizer, ex, MAX_LENGTH, loss_on="answer").truncated
               or encode_prompt(tokenizer, ex.prompt, max_prompt_length)[1] for ex in examples)


def check_generate_and_score(model, tokenizer, examples, batch_size, max_prompt_length, monkeypatch) -> None:
    passes = []  # the number of examples of each separate (`answer_losses`) pass
    separate = loss.suffix_logprobs

    def counted(model, tokenizer, rows, *args, **kwargs):
        passes.append(len(rows))
        return separate(model, tokenizer, rows, *args, **kwargs)

    monkeypatch.setattr(loss, "suffix_logprobs", counted)
    model.train()
    texts, got = generate_and_score(model, tokenizer, examples, max_new_tokens=12, batch_size=batch_size,
                                    max_prompt_length=max_prompt_length, max_length=MAX_LENGTH, desc="test")
    assert model.training  # training mode restored
    assert passes == [fallbacks(tokenizer, examples, max_prompt_length)]
    assert 0 < passes[0] < len(examples)  # both routes ran
    assert texts == generate(model, tokenizer, [ex.prompt for ex in examples], max_new_tokens=12,
                             batch_size=batch_size, max_prompt_length=max_prompt_length)
    expected = answer_losses(model, tokenizer, examples, batch_size=batch_size, max_length=MAX_LENGTH)
    assert [n for _, n in got] == [n for _, n in expected]
    assert [nll for nll, _ in got] == pytest.approx([nll for nll, _ in expected], abs=1e-4)


@pytest.mark.parametrize(("batch_size", "max_prompt_length"), [(1, MAX_LENGTH), (3, MAX_LENGTH), (8, MAX_LENGTH),
                                                               (3, 64)])
def test_generate_and_score_equal_generate_and_answer_losses(lively, tokenizer, mixed_examples, batch_size,
                                                             max_prompt_length, monkeypatch):
    # max_prompt_length=64 cuts the longer prompts for generation only: those examples take the separate pass.
    check_generate_and_score(lively, tokenizer, mixed_examples, batch_size, max_prompt_length, monkeypatch)


def test_generate_and_score_on_a_peft_model(tokenizer, mixed_examples, monkeypatch):
    model = wrap(tiny_llama(tokenizer, seed=3, initializer_range=0.2))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)  # an adapter that changes the function
    check_generate_and_score(model, tokenizer, mixed_examples, 3, MAX_LENGTH, monkeypatch)


def test_generate_and_score_rejects_an_empty_answer(lively, tokenizer, examples):
    assert generate_and_score(lively, tokenizer, [], max_new_tokens=4, batch_size=2, max_prompt_length=MAX_LENGTH,
                              max_length=MAX_LENGTH) == ([], [])
    with pytest.raises(DataError, match=r"example 1 .*answer ''"):
        generate_and_score(lively, tokenizer, [examples[0], Example("Say nothing.", "", ("",))], max_new_tokens=4,
                           batch_size=2, max_prompt_length=MAX_LENGTH, max_length=MAX_LENGTH)
