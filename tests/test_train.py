"""The training step: its loss is the mean over every predicted token of the step's micro-batches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from conftest import wrap
from slicelora.data.prompts import make_batches
from slicelora.data.tasks import Example
from slicelora.loop import train
from slicelora.loop.config import TrainSection


def uneven_examples() -> list[Example]:
    """Answers from 1 to 12 words, so micro-batches hold very different numbers of answer tokens."""
    return [Example(f"Count to {n}.\n\nInput: {n}", " ".join(["one"] * n), ("x",)) for n in range(1, 13)]


def token_mean_loss(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Sum of every predicted token's cross-entropy over all batches, divided by their number: computed directly."""
    total, count = 0.0, 0
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        total = total + F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                        ignore_index=-100, reduction="sum")
        count += int((labels != -100).sum())
    return total / count


def lora_model(model) -> torch.nn.Module:
    torch.manual_seed(0)
    peft_model = wrap(model)
    for name, p in peft_model.named_parameters():  # B != 0 so that A gets a gradient too
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    return peft_model


def first_step(peft_model, tokenizer, examples, cfg, monkeypatch, accelerator: Accelerator | None = None
               ) -> tuple[dict[str, torch.Tensor], dict]:
    """The gradients train_adapter hands its first optimiser step, and its curve."""
    params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    seen: dict[str, torch.Tensor] = {}
    original_step = torch.optim.AdamW.step

    def record_then_step(self, *args, **kwargs):
        if not seen:
            seen.update({n: p.grad.clone() for n, p in params.items()})
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", record_then_step)
    curve = train.train_adapter(peft_model, tokenizer, examples, cfg, accelerator or Accelerator(cpu=True), seed=7)
    return seen, curve


def reference_grads(peft_model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    peft_model.zero_grad()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    peft_model.zero_grad()
    return grads


@pytest.mark.parametrize("loss_on", ["answer", "full"])
def test_a_step_weighs_micro_batches_by_their_tokens(model, tokenizer, monkeypatch, loss_on):
    """The gradient of one accumulated step (3 micro-batches of unequal token counts) equals the gradient of the
    token-mean loss over all of them, and the recorded step loss is that mean."""
    peft_model = lora_model(model)
    examples = uneven_examples()
    cfg = TrainSection(epochs=1, lr=1e-3, warmup_ratio=0.0, max_grad_norm=0.0, batch_size=4, grad_accum=3,
                       max_length=64, loss_on=loss_on, bf16=False)
    batches = make_batches(examples, tokenizer, cfg.batch_size, cfg.max_length, loss_on, seed=7)
    assert len(batches) == 3 and len({train.predicted_tokens(b) for b in batches}) == 3  # they really differ
    expected_loss = token_mean_loss(peft_model, batches)
    expected = reference_grads(peft_model, expected_loss)
    mean_of_means = reference_grads(peft_model, sum(token_mean_loss(peft_model, [b]) for b in batches) / 3)
    assert not all(torch.allclose(mean_of_means[n], g, rtol=1e-2, atol=1e-6) for n, g in expected.items())

    seen, curve = first_step(peft_model, tokenizer, examples, cfg, monkeypatch)
    assert curve["steps"] == 1 and curve["losses"][0] == pytest.approx(expected_loss.item(), rel=1e-5)
    for n, grad in expected.items():
        torch.testing.assert_close(seen[n], grad, rtol=1e-4, atol=1e-7)


def test_one_micro_batch_is_the_models_own_loss(model, tokenizer, monkeypatch):
    """One micro-batch per step on one process: the step's gradient is bitwise that of the model's own mean loss
    (so runs with train.grad_accum=1, such as the committed studies, are unchanged)."""
    peft_model = lora_model(model)
    examples = uneven_examples()[:4]
    cfg = TrainSection(epochs=1, lr=1e-3, warmup_ratio=0.0, max_grad_norm=0.0, batch_size=4, grad_accum=1,
                       max_length=64, loss_on="answer", bf16=False)
    batch = make_batches(examples, tokenizer, cfg.batch_size, cfg.max_length, "answer", seed=7)[0]
    loss = peft_model(**{k: batch[k] for k in train.MODEL_INPUTS}).loss
    expected = reference_grads(peft_model, loss)
    seen, curve = first_step(peft_model, tokenizer, examples, cfg, monkeypatch)
    assert curve["losses"] == [loss.item()]
    assert all(torch.equal(seen[n], grad) for n, grad in expected.items())


class RankOf(Accelerator):
    """One process playing rank `index` of `world` without DDP, so each rank's gradient can be read on its own."""

    def __init__(self, index: int, world: int):
        super().__init__(cpu=True)
        self.index, self.world = index, world

    @property
    def process_index(self) -> int:
        return self.index

    @property
    def num_processes(self) -> int:
        return self.world

    def reduce(self, tensor, reduction="sum", scale=1.0):
        return tensor


def two_ranks_average(peft_model, tokenizer, examples, cfg, monkeypatch) -> dict[str, torch.Tensor]:
    """The first step's gradients of ranks 0 and 1 of 2, each from the same adapter, averaged (as DDP does)."""
    state = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    per_rank = []
    for index in range(2):
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if n in state:
                    p.copy_(state[n])
        seen, curve = first_step(peft_model, tokenizer, examples, cfg, monkeypatch, RankOf(index, 2))
        assert curve["loss"] == train.TOKEN_MEAN
        per_rank.append(seen)
    return {n: (per_rank[0][n] + per_rank[1][n]) / 2 for n in per_rank[0]}


def test_ranks_weigh_their_rows_by_the_steps_tokens(model, tokenizer, monkeypatch):
    """Under data parallelism each rank takes its rows of the global batches and DDP averages the ranks' gradients:
    that average equals the gradient of the token mean over all rows (not a mean of the ranks' means)."""
    peft_model = lora_model(model)
    examples = uneven_examples()[:8]
    cfg = TrainSection(epochs=1, lr=1e-3, warmup_ratio=0.0, max_grad_norm=0.0, batch_size=4, grad_accum=2,
                       max_length=64, loss_on="answer", bf16=False)
    batches = make_batches(examples, tokenizer, cfg.batch_size, cfg.max_length, "answer", seed=7)
    expected = reference_grads(peft_model, token_mean_loss(peft_model, batches))
    for n, grad in two_ranks_average(peft_model, tokenizer, examples, cfg, monkeypatch).items():
        torch.testing.assert_close(grad, expected[n], rtol=1e-4, atol=1e-7)


def test_a_rank_without_rows_takes_part_at_weight_zero(model, tokenizer, monkeypatch):
    """5 examples in batches of 4 on 2 ranks: rank 1 has no row of the last batch; it still runs its backward (DDP
    would wait for it) and adds nothing, so the ranks' average is still the token mean over all rows."""
    peft_model = lora_model(model)
    examples = uneven_examples()[:5]
    cfg = TrainSection(epochs=1, lr=1e-3, warmup_ratio=0.0, max_grad_norm=0.0, batch_size=4, grad_accum=2,
                       max_length=64, loss_on="answer", bf16=False)
    batches = make_batches(examples, tokenizer, cfg.batch_size, cfg.max_length, "answer", seed=7)
    assert [len(b["input_ids"]) for b in batches] == [4, 1]
    expected = reference_grads(peft_model, token_mean_loss(peft_model, batches))
    for n, grad in two_ranks_average(peft_model, tokenizer, examples, cfg, monkeypatch).items():
        torch.testing.assert_close(grad, expected[n], rtol=1e-4, atol=1e-7)
