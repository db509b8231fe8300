"""Inits taken from PEFT's own implementations: the factors equal PEFT's for the same model and settings, the
absorbed base equals PEFT's residual weight, the model's function is unchanged after the init, and the stage loop
runs and resumes with them."""

from __future__ import annotations

import sys

import pytest
import torch
from peft import EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights

from conftest import RESUME_SCRIPT, SMALL, assert_same_run, crash_at, logits, wrap
from slicelora.init import init_adapter
from slicelora.init.gradients import canonical_name
from slicelora.loop.config import load_config
from slicelora.loop.stages import run
from slicelora.models import LLAMA_TARGETS, tiny_llama, tiny_tokenizer


def lora_layers(model) -> dict:
    return {canonical_name(n): m for n, m in model.named_modules() if "default" in getattr(m, "lora_A", {})}


@pytest.mark.parametrize("niter", [None, 2])
def test_pissa_equals_peft_and_keeps_the_function(batches, niter):
    tokenizer = tiny_tokenizer()
    ours = wrap(tiny_llama(tokenizer, seed=0), r=4)
    before = logits(ours, batches[0])
    from slicelora.init import InitConfig

    init_adapter(ours, "pissa", InitConfig(pissa_niter=niter, seed=7))
    mode = "pissa" if niter is None else f"pissa_niter_{niter}"
    torch.manual_seed(7)  # PEFT draws its randomised SVD from the global generator
    theirs = get_peft_model(tiny_llama(tokenizer, seed=0), LoraConfig(
        r=4, lora_alpha=2.0, use_rslora=True, target_modules=list(LLAMA_TARGETS), lora_dropout=0.0,
        init_lora_weights=mode))
    mine, peft_layers = lora_layers(ours), lora_layers(theirs)
    assert mine.keys() == peft_layers.keys() and len(mine) == 14
    for name, layer in mine.items():
        other = peft_layers[name]
        if niter is None:  # exact SVD: bit for bit; PEFT's randomised one per layer in its own RNG order
            assert torch.equal(layer.lora_A["default"].weight, other.lora_A["default"].weight), name
            assert torch.equal(layer.lora_B["default"].weight, other.lora_B["default"].weight), name
            torch.testing.assert_close(layer.get_base_layer().weight, other.get_base_layer().weight,
                                       atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(ours, batches[0]), before, atol=1e-5, rtol=0)


def test_eva_equals_peft_and_keeps_the_function(batches):
    tokenizer = tiny_tokenizer()
    ours = wrap(tiny_llama(tokenizer, seed=0), r=4)
    before = logits(ours, batches[0])
    report = init_adapter(ours, "eva", current=batches)
    assert report.current_batches == len(batches) and not report.absorbs
    config = LoraConfig(r=4, lora_alpha=2.0, use_rslora=True, target_modules=list(LLAMA_TARGETS), lora_dropout=0.0,
                        init_lora_weights="eva", eva_config=EvaConfig(rho=1.0))
    theirs = get_peft_model(tiny_llama(tokenizer, seed=0), config)
    initialize_lora_eva_weights(theirs, batches, show_progress_bar=False)
    mine, peft_layers = lora_layers(ours), lora_layers(theirs)
    assert mine.keys() == peft_layers.keys()
    for name, layer in mine.items():
        torch.testing.assert_close(layer.lora_A["default"].weight, peft_layers[name].lora_A["default"].weight,
                                   atol=1e-6, rtol=0)
        assert not layer.lora_B["default"].weight.any()
    torch.testing.assert_close(logits(ours, batches[0]), before, atol=0, rtol=0)  # B = 0: nothing changes


@pytest.mark.slow
@pytest.mark.parametrize("method", ["pissa", "eva"])
@pytest.mark.parametrize("step", ["2:init", "2:train", "3:eval"])
def test_peft_inits_run_three_stages_and_resume_after_a_crash(tiny_folder, tmp_path, method, step):
    settings = [f"model={tiny_folder}", *SMALL, f"init.method={method}"]
    reference = run(load_config(None, settings), tmp_path / "reference")
    crash_at(step, [sys.executable, "-c", RESUME_SCRIPT, str(tmp_path / "resumed"), *settings])
    run(load_config(None, settings), tmp_path / "resumed", resume=True)
    assert_same_run(reference, tmp_path / "resumed")
