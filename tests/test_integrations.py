"""The Trainer integration: SliceInitCallback runs the init when training begins (the model's function unchanged, the
factors those of init_adapter on the same batches), saves the initial factors, load_trained rebuilds the trained
model from the saved folder, a resumed run gets its absorbed base back; TRL's SFTTrainer and accelerate launch."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from conftest import logits, toy_examples
from slicelora.data.prompts import make_batches
from slicelora.errors import InitError
from slicelora.init import InitConfig, init_adapter
from slicelora.integrations import INIT_FACTORS, SliceInitCallback, as_batches, load_trained

ROOT = Path(__file__).parents[1]
SPEC = importlib.util.spec_from_file_location("trainer_slice", ROOT / "examples" / "trainer_slice.py")
script = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(script)
SMALL = ["--steps", "3", "--examples", "16", "--init-examples", "8"]


class Probe(TrainerCallback):
    """Records the model's logits on one batch when training begins (after the init callback)."""

    def __init__(self, batch):
        self.batch, self.logits = batch, None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.logits = logits(model, self.batch)


def init_batches(args, tokenizer):
    """The batches the example gives the callback, built again."""
    current = as_batches(script.rows("1687", tokenizer, args.init_examples, args.max_length), tokenizer,
                         batch_size=args.batch_size)
    replay = as_batches(script.rows("363", tokenizer, args.init_examples, args.max_length), tokenizer,
                        batch_size=args.batch_size)
    return current, replay if args.method == "slice" else None


@pytest.mark.parametrize("method", ["slice", "vanilla"])
def test_example_trains_with_the_init_and_reloads(tmp_path, method):
    args = script.parse_args([*SMALL, "--method", method, "--output", str(tmp_path / "out")])
    trainer = script.build_trainer(args)
    batch = trainer.data_collator(trainer.train_dataset[:2])
    before = logits(trainer.model, batch)
    probe = Probe(batch)
    trainer.add_callback(probe)
    assert script.run(trainer, args) == 0.0  # load_trained gives the trained model's logits exactly
    torch.testing.assert_close(probe.logits, before, atol=2e-5, rtol=0)  # the init kept the function
    # the factors the callback set (and saved) are init_adapter's on the same batches
    fresh = script.build_trainer(script.parse_args([*SMALL, "--method", method, "--output", str(tmp_path / "x")]))
    current, replay = init_batches(args, fresh.processing_class)
    init_adapter(fresh.model, method, InitConfig(), current=current if method == "slice" else None, replay=replay)
    saved = load_file(str(tmp_path / "out" / INIT_FACTORS))
    layer = fresh.model.base_model.model.model.layers[1].self_attn.v_proj
    assert torch.equal(saved["model.layers.1.self_attn.v_proj.A"], layer.lora_A["default"].weight)
    assert torch.equal(saved["model.layers.1.self_attn.v_proj.B"], layer.lora_B["default"].weight)
    assert len(saved) == 2 * 7 * 2
    # a checkpoint holds the factors too, and loads the same way
    assert (tmp_path / "out" / "checkpoint-2" / INIT_FACTORS).is_file()
    load_trained(script.base_model(args)[0], tmp_path / "out" / "checkpoint-2")


def test_resumed_training_gets_the_absorbed_base_back(tmp_path):
    args = script.parse_args([*SMALL, "--output", str(tmp_path / "out")])
    trainer = script.build_trainer(args)
    trainer.train()
    resumed = script.build_trainer(args)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    for (name, a), (_, b) in zip(trainer.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=name)  # base weights and adapter alike


def test_load_trained_needs_the_initial_factors(tmp_path, model, tokenizer):
    with pytest.raises(InitError, match=f"{INIT_FACTORS} is missing"):
        load_trained(model, tmp_path)


def test_as_batches_takes_rows_examples_and_batches(tokenizer, batches):
    rows = [{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9], "attention_mask": [1, 1], "labels": [-100, 9]}]
    made = as_batches(rows, tokenizer, batch_size=2)
    assert len(made) == 1
    pad = tokenizer.pad_token_id
    assert made[0]["input_ids"].tolist() == [[5, 6, 7], [8, 9, pad]]
    assert made[0]["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert made[0]["labels"].tolist() == [[5, 6, 7], [-100, 9, -100]]
    examples = toy_examples("sentiment", 6)
    expected = make_batches(examples, tokenizer, 4, 64, seed=None)
    for got, want in zip(as_batches(examples, tokenizer, batch_size=4, max_length=64), expected, strict=True):
        assert all(torch.equal(got[k], want[k]) for k in want)
    unlabelled = [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]} for b in batches]
    for got, b in zip(as_batches(unlabelled), batches, strict=True):
        assert torch.equal(got["labels"], b["input_ids"].masked_fill(b["attention_mask"] == 0, -100))
    with pytest.raises(InitError, match="need a tokenizer"):
        as_batches(examples)
    with pytest.raises(InitError, match="dicts holding input_ids"):
        as_batches(["some text"])


def test_sft_trainer_runs_the_init(tmp_path, tokenizer):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from peft import LoraConfig

    from slicelora.models import LLAMA_TARGETS, peft_wrapping, tiny_llama

    rows = [{"input_ids": r["input_ids"]} for r in script.rows("1687", tokenizer, 16, 96)]
    callback = SliceInitCallback("lora_ga", current=rows[:8], batch_size=4)
    config = trl.SFTConfig(str(tmp_path / "sft"), max_steps=2, per_device_train_batch_size=4, report_to="none",
                           use_cpu=True, bf16=False, save_strategy="no", logging_steps=1)
    lora = LoraConfig(r=4, lora_alpha=2.0, use_rslora=True, lora_dropout=0.0, target_modules=list(LLAMA_TARGETS))
    with peft_wrapping():
        trainer = trl.SFTTrainer(model=tiny_llama(tokenizer, seed=0), args=config, peft_config=lora,
                                 train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
                                 callbacks=[callback])
    trainer.train()
    assert callback.report.absorbs and callback.report.current_batches == 2
    with peft_wrapping():
        from peft import get_peft_model
        fresh = get_peft_model(tiny_llama(tokenizer, seed=0), lora)
    init_adapter(fresh, "lora_ga", current=as_batches(rows[:8], tokenizer, batch_size=4))
    saved = load_file(str(tmp_path / "sft" / INIT_FACTORS))
    layer = fresh.base_model.model.model.layers[0].mlp.down_proj
    torch.testing.assert_close(saved["model.layers.0.mlp.down_proj.A"], layer.lora_A["default"].weight)


@pytest.mark.slow
def test_accelerate_launch_two_processes_init_alike(tmp_path):
    """Two processes under accelerate launch (gloo on a CPU): each inits from half the batches; the factors equal
    one process's up to the all-reduce's summation order, and the reload check passes."""
    args = [*SMALL, "--steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    subprocess.run([sys.executable, str(ROOT / "examples" / "trainer_slice.py"), *args, "--output",
                    str(tmp_path / "one")], env=env, check=True, timeout=600, capture_output=True)
    # --multi_gpu also on a machine without a GPU: --cpu would start one process (docs/distributed.md)
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--main_process_port", "29533", str(ROOT / "examples" / "trainer_slice.py"), *args,
                           "--output", str(tmp_path / "two")], env=env, timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 current and 1 replay batches" in done.stdout  # each process took half of the 2 + 2 batches
    assert "max |logit difference| = 0.00e+00" in done.stdout
    one, two = load_file(str(tmp_path / "one" / INIT_FACTORS)), load_file(str(tmp_path / "two" / INIT_FACTORS))
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=1e-4, msg=key)
