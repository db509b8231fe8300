"""Train a LoRA adapter with transformers' Trainer, initialised by SLICE (or any registered init) through
slicelora's SliceInitCallback, then reload the trained model from the saved folder and check its logits.

    python examples/trainer_slice.py                          # a tiny random model, a few steps (seconds)
    python examples/trainer_slice.py --model HuggingFaceTB/SmolLM2-135M-Instruct --steps 100 --output out/slice
    accelerate launch --multi_gpu --num_processes 2 examples/trainer_slice.py --model PATH

Under accelerate every process initialises from its share of the init batches (--multi_gpu also on a machine
without a GPU: with --cpu accelerate starts one process). The task learned is Sentiment140 (Super-NI task1687); SLICE's replay set is SST-2 (task363), the same judgement
with other label words, so their gradients pull against each other. Both ship with slicelora. --model takes a local
folder or a model id in the Hugging Face cache (nothing is downloaded).
"""

from __future__ import annotations

import argparse

import torch
from peft import LoraConfig, get_peft_model
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

from slicelora.data.prompts import encode_example
from slicelora.data.tasks import load_task
from slicelora.init import InitConfig, get_init
from slicelora.integrations import SliceInitCallback, load_trained
from slicelora.models import LLAMA_TARGETS, load_model, peft_wrapping, resolve_targets, tiny_llama, tiny_tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a model folder or cached model id (default: tiny random Llama)")
    parser.add_argument("--method", default="slice", help="a registered init: vanilla, lora_ga, loram, slice, ...")
    parser.add_argument("--output", default="runs/trainer_slice", help="the Trainer's output folder")
    parser.add_argument("--steps", type=int, default=4, help="optimiser steps")
    parser.add_argument("--examples", type=int, default=64, help="training examples of the current task")
    parser.add_argument("--init-examples", type=int, default=16, help="examples per gradient set of the init")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128, help="tokens per example (prompts cut from the left)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=2.0, help="rsLoRA: s = alpha / sqrt(rank)")
    parser.add_argument("--lr", type=float, default=5e-4)
    return parser.parse_args(argv)


def base_model(args: argparse.Namespace):
    """The model to adapt and its tokenizer: the same weights on every call."""
    if args.model is None:
        tokenizer = tiny_tokenizer()
        return tiny_llama(tokenizer, seed=0), tokenizer
    return load_model(args.model)


def rows(task: str, tokenizer, count: int, max_length: int) -> list[dict[str, list[int]]]:
    """The first `count` training examples of a shipped task as tokenised rows (what a datasets.Dataset yields)."""
    examples = load_task(task).train[:count]
    return [{"input_ids": e.input_ids, "labels": e.labels}
            for e in (encode_example(tokenizer, example, max_length) for example in examples)]


def build_trainer(args: argparse.Namespace) -> Trainer:
    model, tokenizer = base_model(args)
    with peft_wrapping():
        model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.alpha, use_rslora=True, lora_dropout=0.0,
                                                 target_modules=list(resolve_targets(model, LLAMA_TARGETS))))
    train = rows("1687", tokenizer, args.examples, args.max_length)
    method = get_init(args.method)  # what the init reads: nothing, the current task's rows, and past tasks' rows
    init = SliceInitCallback(args.method, InitConfig(),
                             current=train[:args.init_examples] if method.data != "none" else None,
                             replay=rows("363", tokenizer, args.init_examples, args.max_length)
                             if method.uses_replay else None, batch_size=args.batch_size)
    training = TrainingArguments(args.output, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                                 learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=1, save_steps=2,
                                 report_to="none", use_cpu=not torch.cuda.is_available(), seed=0)
    return Trainer(model=model, args=training, train_dataset=train, processing_class=tokenizer, callbacks=[init],
                   data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100))


def run(trainer: Trainer, args: argparse.Namespace) -> float:
    """Train, save (adapter and initial factors in --output), reload onto a fresh base model; returns the largest
    logit difference between the trained model and the reloaded one."""
    trainer.train()
    trainer.save_model()
    if not trainer.is_world_process_zero():
        return 0.0
    batch = trainer.data_collator(trainer.train_dataset[:2])
    device = trainer.model.device
    reloaded = load_trained(base_model(args)[0], args.output).to(device).eval()
    with torch.no_grad():
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
        gap = (trainer.model.eval()(**inputs).logits - reloaded(**inputs).logits).abs().max().item()
    report = next(c for c in trainer.callback_handler.callbacks if isinstance(c, SliceInitCallback)).report
    print(f"init {report.method}: absorbed {report.absorbs}, {report.current_batches} current and "
          f"{report.replay_batches} replay batches" + (f", SLICE's cosine {report.surgery.cosine:+.3f}"
                                                         if report.surgery else ""))
    print(f"trained {trainer.state.global_step} steps into {args.output}; reloaded with load_trained: "
          f"max |logit difference| = {gap:.2e}")
    return gap


def main(argv: list[str] | None = None) -> float:
    args = parse_args(argv)
    return run(build_trainer(args), args)


if __name__ == "__main__":
    main()
