"""Train the adapter on one task: AdamW, linear schedule with warmup, gradient accumulation, bf16 autocast.

The loss of an optimiser step is the mean over every predicted token of its micro-batches (on every process), not
a mean of per-batch means, so a short micro-batch weighs no more than its tokens. Data-parallel under accelerate:
every rank sees the same global batches and takes its own rows of each, and gradients are averaged by DDP at each
optimiser step, so N processes follow one process's schedule.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence

import torch
from accelerate import Accelerator
from peft.tuners.tuners_utils import BaseTunerLayer
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from ..data.prompts import make_batches
from ..data.tasks import Example
from ..errors import ConfigError, TrainingDiverged
from ..init.gradients import bf16_supported
from ..models import set_checkpointing
from .config import TrainSection

MODEL_INPUTS = ("input_ids", "attention_mask", "labels")
TOKEN_MEAN = "token_mean"  # train.json's "loss": how a step's loss is normalised (earlier versions: per-batch means)


def rank_rows(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """This rank's rows of a global batch (all rows with one process)."""
    return {k: batch[k][rank::world] for k in MODEL_INPUTS}


def predicted_tokens(batch: dict[str, torch.Tensor]) -> int:
    """How many tokens a batch's loss averages over: the labels after the causal shift that are not ignored."""
    return int((batch["labels"][:, 1:] != -100).sum())


def _diverged(loss: float, norm: float, accelerator: Accelerator) -> bool:
    """Whether the loss or the gradient norm is non-finite on any process (all of them decide alike)."""
    bad = torch.tensor(float(not (math.isfinite(loss) and math.isfinite(norm))), device=accelerator.device)
    return bool(accelerator.reduce(bad, "sum").item()) if accelerator.num_processes > 1 else bool(bad.item())


def _finite_update(model: torch.nn.Module) -> bool:
    """Whether every adapter layer's weight change (what the merge adds: LoRA's s B A, OSF's change of its trained
    part) is finite: finite factors can still overflow in their product."""
    with torch.no_grad():
        return all(torch.isfinite(module.get_delta_weight(name)).all() for module in model.modules()
                   if isinstance(module, BaseTunerLayer) for name in module.active_adapters)


def divergence(what: str, cfg: TrainSection) -> TrainingDiverged:
    """The error for a diverged stage: what happened, and the settings to change."""
    return TrainingDiverged(
        f"{what} The stage is not marked finished; finished stages are kept. Lower train.lr (now {cfg.lr:g})"
        + (", or set train.bf16=false" if cfg.bf16 else "")
        + ("" if cfg.max_grad_norm else ", or clip gradients with train.max_grad_norm=1")
        + ", and rerun into a new --output folder (a run folder holds one config).")


def train_adapter(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[Example],
    cfg: TrainSection,
    accelerator: Accelerator,
    *,
    seed: int,
    desc: str = "train",
    penalty: Callable[[], torch.Tensor | None] | None = None,
) -> dict:
    """Train the trainable parameters of `model` (the stage's adapter) on `examples`; return the loss curve and how
    many prompts were cut from the left to fit train.max_length. `penalty()`, when given, is added once to every
    optimisation step's loss (a continual-learning method's term); the curve records the language-model loss and,
    separately, the penalty. A non-finite loss or gradient norm stops training with TrainingDiverged before the
    optimiser step that it would spoil."""
    start = time.perf_counter()
    stats: dict[str, int] = {}  # prompts cut from the left to fit max_length (counted once, in the first epoch)
    epochs = [make_batches(examples, tokenizer, cfg.batch_size, cfg.max_length, cfg.loss_on, seed=seed + e,
                           stats=stats if e == 0 else None) for e in range(cfg.epochs)]
    steps_per_epoch = math.ceil(len(epochs[0]) / cfg.grad_accum)
    total = steps_per_epoch * cfg.epochs
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * total), total)
    if cfg.gradient_checkpointing:
        set_checkpointing(model, True)
    wrapped = accelerator.prepare_model(model)
    use_bf16 = cfg.bf16 and bf16_supported(accelerator.device)
    rank, world = accelerator.process_index, accelerator.num_processes
    if world > 1 and cfg.batch_size < world:
        raise ConfigError(f"train.batch_size={cfg.batch_size} must be at least the number of processes ({world}).")
    wrapped.train()
    losses: list[float] = []
    penalties: list[float] = []
    bar = tqdm(total=total, desc=desc, leave=False, disable=not accelerator.is_main_process)
    for batches in epochs:
        for start_idx in range(0, len(batches), cfg.grad_accum):
            group = batches[start_idx:start_idx + cfg.grad_accum]
            rows = [rank_rows(batch, rank, world) for batch in group]
            # Each micro-batch's mean loss weighs by its share of the step's tokens (all ranks': every rank sees the
            # global batches); x world because DDP averages over ranks. One micro-batch on one process: weight 1.0.
            step_tokens = max(sum(predicted_tokens(batch) for batch in group), 1)
            local_tokens = [predicted_tokens(r) for r in rows]
            # a rank left without rows (a last batch smaller than the world) runs one row at weight 0, so that its
            # backward still meets the other ranks' gradient reduction
            rows = [r if len(r["input_ids"]) else {k: batch[k][:1] for k in MODEL_INPUTS}
                    for r, batch in zip(rows, group)]
            step_loss = 0.0  # this rank's token mean, for the curve
            for i, local in enumerate(rows):
                inputs = {k: v.to(accelerator.device) for k, v in local.items()}
                sync = i == len(group) - 1
                with (contextlib.nullcontext() if sync else accelerator.no_sync(wrapped)), \
                        torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    mean = wrapped(**inputs).loss
                step_loss += mean.item() * (local_tokens[i] / max(sum(local_tokens), 1))
                loss = mean * (local_tokens[i] * world / step_tokens)
                extra = penalty() if sync and penalty is not None else None
                if extra is not None:  # in the step's last backward, so DDP reduces it with the rest
                    penalties.append(extra.item())
                    loss = loss + extra
                loss.backward()
            if cfg.max_grad_norm:
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            else:
                norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            if _diverged(step_loss, float(norm), accelerator):
                bar.close()
                raise divergence(f"{desc}: training diverged at optimiser step {len(losses) + 1} of {total}: the "
                                 f"loss is {step_loss:g} and the gradient norm {float(norm):g}.", cfg)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}")
    bar.close()
    if not _finite_update(model):  # the last steps can spoil the adapter with no later loss to show it
        raise divergence(f"{desc}: training diverged by optimiser step {total} of {total}: the adapter's weight "
                         "change is not finite.", cfg)
    wrapped.eval()
    if cfg.gradient_checkpointing:
        set_checkpointing(model, False)
    del wrapped, optimizer
    accelerator.free_memory()  # drop accelerate's reference to the DDP wrapper; the next stage wraps a new model
    curve = {"losses": losses, "loss": TOKEN_MEAN, "steps": total, "seconds": time.perf_counter() - start,
             "bf16": use_bf16, "truncated_prompts": stats["truncated"], "examples": stats["examples"]}
    return {**curve, "penalties": penalties} if penalties else curve
