"""Hugging Face Trainer integration: any registered init runs on the trainer's PEFT model before training starts.

    trainer = Trainer(model=peft_model, args=TrainingArguments("out", ...), train_dataset=rows,
                      callbacks=[SliceInitCallback("slice", InitConfig(), current=rows[:64], replay=past_rows)])
    trainer.train()
    trainer.save_model()                              # out/: the adapter, beside out/init_factors.safetensors
    model = load_trained(base_model, "out")           # the trained model; .merge_and_unload() for a plain one

TRL's SFTTrainer takes the same callback. Under `accelerate launch` every process initialises from its share of the
batches (the gradients are all-reduced, so all of them hold the same adapter). Absorbing inits (LoRA-GA, LoRAM,
SLICE) leave the base weights at W - s B0 A0, which the saved adapter alone does not record: the callback saves the
initial factors (A0, B0) as `init_factors.safetensors` in the output folder and in every checkpoint, `load_trained`
rebuilds that base from them, and a run resumed from a checkpoint gets it back the same way.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .data.prompts import IGNORE_INDEX, LossOn, make_batches
from .data.tasks import Example
from .errors import InitError
from .io import write_with
from .init import InitConfig, InitReport, absorb_factors, adapter_factors, get_init, init_adapter
from .models import peft_wrapping

INIT_FACTORS = "init_factors.safetensors"


def as_batches(items: Iterable[Any] | None, tokenizer=None, *, batch_size: int = 8, max_length: int = 512,
               loss_on: LossOn = "full") -> list[dict[str, torch.Tensor]]:
    """Gradient batches from what a Trainer user holds, kept in the order given: batches (dicts of 2-D tensors), as
    they are; examples (dicts, e.g. rows of a datasets.Dataset, with input_ids and optionally attention_mask and
    labels; labels default to the attended input_ids), right-padded into batches of `batch_size`; or slicelora
    `Example`s, tokenised with `tokenizer` (make_batches, prompts cut from the left to `max_length`)."""
    items = list(items or [])
    if not items:
        return []
    if isinstance(items[0], Example):
        if tokenizer is None:
            raise InitError("Example objects need a tokenizer: pass tokenizer=... (or give the Trainer a "
                            "processing_class), or give rows of input_ids instead.")
        return make_batches(items, tokenizer, batch_size, max_length, loss_on, seed=None)
    if not all(isinstance(item, Mapping) and "input_ids" in item for item in items):
        raise InitError("init data must be Example objects or dicts holding input_ids (with optional "
                        f"attention_mask and labels), got {type(items[0]).__name__}.")
    if torch.is_tensor(items[0]["input_ids"]) and items[0]["input_ids"].dim() == 2:
        return [_batch(item) for item in items]
    pad_id = next((i for i in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None))
                   if i is not None), 0)
    return [_collate(items[start:start + batch_size], pad_id) for start in range(0, len(items), batch_size)]


def _batch(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A batch's model inputs; attention_mask defaults to ones, labels to the attended input_ids."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask", torch.ones_like(ids))
    labels = batch["labels"] if "labels" in batch else ids.masked_fill(mask == 0, IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _collate(rows: Sequence[Mapping[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels of unbatched rows; padding has attention 0 and label -100."""
    ids = [[int(i) for i in row["input_ids"]] for row in rows]
    masks = [[int(m) for m in row.get("attention_mask", [1] * len(seq))] for row, seq in zip(rows, ids)]
    labels = [[int(x) for x in row["labels"]] if "labels" in row else
              [i if m else IGNORE_INDEX for i, m in zip(seq, mask)] for row, seq, mask in zip(rows, ids, masks)]
    width = max(len(seq) for seq in ids)

    def pad(seqs: list[list[int]], value: int) -> torch.Tensor:
        return torch.tensor([seq + [value] * (width - len(seq)) for seq in seqs], dtype=torch.long)

    return {"input_ids": pad(ids, pad_id), "attention_mask": pad(masks, 0), "labels": pad(labels, IGNORE_INDEX)}


class SliceInitCallback(TrainerCallback):
    """Initialise the trainer's PEFT adapter by the registered `method` when training begins (once per callback).

    `current` / `replay`: the init's data (see `as_batches`: batches, dict rows or `Example`s); the replay set only
    for methods that read one (SLICE, CorDA). Rows and Examples are batched by `batch_size` and tokenised with
    `tokenizer`, else the trainer's processing_class. With several processes each takes every world_size-th batch
    (all of them when there are fewer batches than processes). The initial factors are written to the output folder
    and copied into each checkpoint; `report` holds the init's InitReport afterwards.
    """

    def __init__(self, method: str = "slice", config: InitConfig | None = None, *, current: Iterable[Any] | None = None,
                 replay: Iterable[Any] | None = None, tokenizer=None, batch_size: int = 8, max_length: int = 512,
                 loss_on: LossOn = "full", adapter_name: str = "default") -> None:
        self.spec = get_init(method)
        self.config = config or InitConfig()
        self.current, self.replay = list(current or []), list(replay or [])
        self.tokenizer, self.adapter_name = tokenizer, adapter_name
        self.batching = dict(batch_size=batch_size, max_length=max_length, loss_on=loss_on)
        self.report: InitReport | None = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: torch.nn.Module | None = None, processing_class=None, **kwargs) -> None:
        if self.report is not None:  # a second train() call: the adapter was initialised (and trained) already
            return
        path = Path(args.output_dir) / INIT_FACTORS
        if state.global_step > 0:  # resumed: the checkpoint's adapter is loaded, its base needs the absorbed init
            self.report = InitReport(method=self.spec.name, absorbs=saved_absorbs(path))
            if self.report.absorbs:
                absorb_factors(model, load_file(str(path)), self.adapter_name)
            return
        tokenizer = self.tokenizer or processing_class
        current, replay = (as_batches(data, tokenizer, **self.batching) for data in (self.current, self.replay))
        self.report = init_adapter(model, self.spec.name, self.config, current=_share(current, args),
                                   replay=_share(replay, args) or None, adapter_name=self.adapter_name)
        if args.should_save:
            factors = adapter_factors(model, self.adapter_name)
            metadata = {"method": self.spec.name, "absorbs": str(self.report.absorbs).lower()}
            write_with(path, lambda p: save_file(factors, str(p), metadata=metadata))

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        output = Path(args.output_dir)
        saved, checkpoint = output / INIT_FACTORS, output / f"checkpoint-{state.global_step}"
        if args.should_save and checkpoint.is_dir() and saved.is_file():
            write_with(checkpoint / INIT_FACTORS, lambda p: shutil.copyfile(saved, p))


def _share(batches: list, args: TrainingArguments) -> list:
    """This process's batches: every world_size-th one, or all when there are fewer batches than processes."""
    return batches[args.process_index::args.world_size] if len(batches) >= args.world_size else batches


def saved_absorbs(path: Path) -> bool:
    """Whether the init whose factors SliceInitCallback saved at `path` absorbed them into the base weights."""
    if not path.is_file():
        raise InitError(f"{path} is missing: it holds the adapter's initial factors, written by SliceInitCallback "
                        "when the training began. Load the adapter from that run's output folder or checkpoint.")
    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {}).get("absorbs") == "true"


def load_trained(model: torch.nn.Module, folder: str | Path, *, adapter_name: str = "default",
                 is_trainable: bool = False) -> PeftModel:
    """The model a Trainer trained with SliceInitCallback: the adapter saved in `folder` (trainer.save_model()'s
    output folder or a checkpoint) on `model`, the original base model, whose target weights first become those the
    init left (W - s B0 A0 for absorbing inits, from folder/init_factors.safetensors). `.merge_and_unload()` turns
    it into a plain model with the trained weights."""
    path = Path(folder) / INIT_FACTORS
    absorbs = saved_absorbs(path)
    with peft_wrapping():
        peft_model = PeftModel.from_pretrained(model, str(folder), adapter_name=adapter_name,
                                               is_trainable=is_trainable)
    if absorbs:
        absorb_factors(peft_model, load_file(str(path)), adapter_name)
    return peft_model
