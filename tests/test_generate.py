"""Batched greedy generation and log-likelihood scoring against one-example-at-a-time references."""

from __future__ import annotations

import pytest
import torch
from conftest import wrap

from slicelora.errors import ConfigError
from slicelora.eval.general import Request, multiple_choice_picks
from slicelora.eval.generate import _left_pad, _positions, choice_logprobs, generate, sequence_logprobs
from slicelora.models import tiny_llama

PROMPTS = [
    "hello",
    "a much longer prompt with many more bytes in it, so that the batch needs left padding",
    "xyz 123",
    "",
    "What is the answer?",
    "q" * 70,
    "zz top",
]


@pytest.fixture(scope="module")
def lively(tokenizer):
    # Larger initial weights than the default make a random model's greedy outputs vary from token to token.
    return tiny_llama(tokenizer, seed=3, initializer_range=0.2)


def test_batched_generation_equals_one_at_a_time(lively, tokenizer):
    lively.train()
    batched = generate(lively, tokenizer, PROMPTS, max_new_tokens=24, batch_size=3, desc="test")
    single = [generate(lively, tokenizer, [p], max_new_tokens=24, batch_size=1)[0] for p in PROMPTS]
    assert batched == single
    assert len(set(batched)) == len(PROMPTS)  # not a degenerate constant output
    assert lively.training  # training mode restored


def test_left_padded_rows_match_unpadded_rows(tokenizer):
    # A left-padded row with real-token positions gives the logits of the row alone, up to kernel rounding (the
    # matrix products differ in shape, so the BLAS reduction order differs; ~1e-6 here). Without the attention mask
    # the padding would leak into the row.
    model = tiny_llama(tokenizer, seed=1, initializer_range=0.2)
    rows = [[5, 9, 200, 17, 33, 41, 8, 2], [70, 71, 72], [100, 3, 250, 4, 9]]
    ids, mask = _left_pad(rows, tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits
        unmasked = model(input_ids=ids).logits
        for i, row in enumerate(rows):
            alone = model(input_ids=torch.tensor([row])).logits[0]
            start = ids.shape[1] - len(row)
            torch.testing.assert_close(padded[i, start:], alone, rtol=0, atol=1e-4)
            if start:
                assert (unmasked[i, start:] - alone).abs().max() > 1e-2


def test_generate_edge_cases(lively, tokenizer):
    assert generate(lively, tokenizer, [], max_new_tokens=4) == []
    with pytest.raises(ConfigError):
        generate(lively, tokenizer, ["x"], batch_size=0)


def test_sequence_logprobs_match_manual_computation(lively, tokenizer):
    contexts = ["The cat", "A much longer context, padded less", "x", "Question: 2+2?\nAnswer:"]
    continuations = [" sat down", " ok", "yz", " 4"]
    got = sequence_logprobs(lively, tokenizer, contexts, continuations, batch_size=3)
    for (total, n_tokens, n_chars), ctx, cont in zip(got, contexts, continuations):
        ctx_ids = tokenizer(ctx)["input_ids"]
        cont_ids = tokenizer(cont, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(lively(input_ids=torch.tensor([ctx_ids + cont_ids])).logits[0], -1)
        manual = sum(logp[len(ctx_ids) - 1 + j, tok].item() for j, tok in enumerate(cont_ids))
        assert total == pytest.approx(manual, abs=1e-4)
        assert (n_tokens, n_chars) == (len(cont_ids), len(cont))


def test_sequence_logprobs_rejects_mismatched_inputs(lively, tokenizer):
    with pytest.raises(ConfigError):
        sequence_logprobs(lively, tokenizer, ["a", "b"], [" c"])
    with pytest.raises(ConfigError):
        choice_logprobs(lively, tokenizer, ["a", "b"], [[" c"]])


SHOT = "Cooking: A man cracks eggs into a bowl. He whisks them with a fork until they are frothy."
MC_REQUESTS = [  # HellaSwag-like (a long few-shot context, endings of several lengths) and CSQA-like (letters)
    Request(f"{SHOT}\n\n{SHOT}\n\nSports: A girl runs up to the bar.", 2,
            ("she jumps.", "then she falls over the bar and lands on the mat below.", "she vaults it", "no")),
    Request("Cooking: He pours the eggs", 0, ("into a hot pan.", "away", "on the floor and leaves the kitchen.", "x")),
    Request("Question: Where do you keep milk?\nA. fridge\nB. oven\nC. car\nD. bed\nE. sea\nAnswer:", 0,
            ("A", "B", "C", "D", "E")),
    Request(f"{SHOT}\n\nQuestion: What is a fork for?\nA. eating\nB. running\nC. sleeping\nAnswer:", 0,
            ("A", "B", "C")),
    Request("", 1, ("a", "bc d")),
]


def continuations(requests: list[Request]) -> list[list[str]]:
    """Each choice after a space, except one-letter choices: the byte tokenizer's " A" is two tokens where a BPE
    vocabulary has one, so "A" alone takes the one-token route here."""
    return [[c if len(c) == 1 else " " + c for c in r.choices] for r in requests]


@pytest.mark.parametrize(("batch_size", "max_length"), [(1, 512), (3, 512), (16, 512), (3, 90)])
def test_choice_logprobs_equal_pair_by_pair_scores(lively, tokenizer, batch_size, max_length):
    # max_length=90 cuts the long contexts differently for endings of different lengths: those pairs share nothing.
    lively.train()
    contexts = [r.prompt for r in MC_REQUESTS]
    options = continuations(MC_REQUESTS)
    got = choice_logprobs(lively, tokenizer, contexts, options, batch_size, max_length=max_length, desc="test")
    assert lively.training
    flat = sequence_logprobs(lively, tokenizer, [c for c, o in zip(contexts, options) for _ in o],
                             [x for o in options for x in o], batch_size, max_length=max_length)
    pairs = iter(flat)
    expected = [[next(pairs) for _ in o] for o in options]
    for row, want in zip(got, expected):
        assert [v[1:] for v in row] == [v[1:] for v in want]
        assert [v[0] for v in row] == pytest.approx([v[0] for v in want], abs=1e-4)
    assert multiple_choice_picks(MC_REQUESTS, got) == multiple_choice_picks(MC_REQUESTS, expected)


def test_choice_logprobs_run_each_context_once(lively, tokenizer):
    shapes = []
    hook = lively.register_forward_hook(lambda m, a, kw, out: shapes.append(tuple(kw["input_ids"].shape)),
                                        with_kwargs=True)
    try:
        for requests in (MC_REQUESTS[:2], MC_REQUESTS[2:4]):
            choice_logprobs(lively, tokenizer, [r.prompt for r in requests], continuations(requests), 16)
    finally:
        hook.remove()
    # Endings: the two contexts, then their 7 endings of 2+ tokens on the cache. Letters: the two contexts only.
    assert [s[0] for s in shapes] == [2, 7, 2]
    assert shapes[1][1] == len(" then she falls over the bar and lands on the mat below.") - 1


def test_choice_logprobs_on_a_peft_model(tokenizer):
    base = tiny_llama(tokenizer, seed=3, initializer_range=0.2)
    contexts = [r.prompt for r in MC_REQUESTS[:4]]
    options = continuations(MC_REQUESTS[:4])
    expected = choice_logprobs(base, tokenizer, contexts, options, 4)
    got = choice_logprobs(wrap(base), tokenizer, contexts, options, 4)  # the cache goes through the PEFT wrapper
    for row, want in zip(got, expected):
        assert [v[0] for v in row] == pytest.approx([v[0] for v in want], abs=1e-4)


def test_generate_on_a_peft_model(tokenizer):
    base = tiny_llama(tokenizer, seed=3, initializer_range=0.2)
    expected = generate(base, tokenizer, PROMPTS[:3], max_new_tokens=8)
    assert generate(wrap(base), tokenizer, PROMPTS[:3], max_new_tokens=8) == expected  # LoRA B = 0: same function
