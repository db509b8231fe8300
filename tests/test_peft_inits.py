"""Inits taken from PEFT's own implementations: the factors equal PEFT's for the same model and settings, the
absorbed base equals PEFT's residual weight, the model's function is unchanged after the init, and the stage loop
runs and resumes with them."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from peft import EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights
from peft.tuners.lora.config import CordaConfig
from peft.tuners.lora.corda import preprocess_corda
from safetensors.torch import load_file

import slicelora.loop.adapters as adapters
from conftest import RESUME_SCRIPT, SMALL, assert_same_run, crash_at, logits, small_config, wrap
from slicelora.errors import ConfigError, InitError
from slicelora.init import InitConfig, init_adapter
from slicelora.init.gradients import canonical_name
from slicelora.loop.config import load_config
from slicelora.loop.stages import merged_model, run
from slicelora.models import LLAMA_TARGETS, tiny_llama, tiny_tokenizer


def lora_layers(model) -> dict:
    return {canonical_name(n): m for n, m in model.named_modules() if "default" in getattr(m, "lora_A", {})}


@pytest.mark.parametrize("niter", [None, 2])
def test_pissa_equals_peft_and_keeps_the_function(batches, niter):
    tokenizer = tiny_tokenizer()
    ours = wrap(tiny_llama(tokenizer, seed=0), r=4)
    before = logits(ours, batches[0])
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


def peft_corda(model, batches, mode: str, r: int = 4, alpha: float = 2.0):
    """PEFT's own CorDA on a plain model: preprocess_corda over every example of `batches`, each alone and without
    its padding, then get_peft_model(init_lora_weights="corda")."""
    config = LoraConfig(r=r, lora_alpha=alpha, use_rslora=True, target_modules=list(LLAMA_TARGETS), lora_dropout=0.0,
                        init_lora_weights="corda", corda_config=CordaConfig(corda_method=mode))

    def run_model():
        for batch in batches:
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
                model(input_ids=ids[mask.bool()][None])

    preprocess_corda(model, config, run_model=run_model)
    return get_peft_model(model, config)


def left_behind(model) -> list[str]:
    """Hooks and CorDA fields left on a model's modules, and modules not in training mode."""
    return [name for name, m in model.named_modules()
            if m._forward_hooks or hasattr(m, "covariance_matrix") or hasattr(m, "sample_count") or not m.training]


@pytest.mark.parametrize("mode, with_replay, reads", [
    ("kpm", True, "kpm on replay"), ("ipm", True, "ipm on current"), ("kpm", False, "ipm on current")])
def test_corda_equals_peft_and_keeps_the_function(batches, replay_batches, mode, with_replay, reads):
    """kpm takes the r smallest components of W C, C the replay batches' input covariance; ipm the r largest, C the
    current task's; kpm without replay batches runs as ipm and says so in the report."""
    tokenizer = tiny_tokenizer()
    ours = wrap(tiny_llama(tokenizer, seed=0), r=4)
    ours.train()
    before = logits(ours, batches[0])
    report = init_adapter(ours, "corda", InitConfig(corda_mode=mode), current=batches,
                          replay=replay_batches if with_replay else None)
    peft_mode, data = reads.split(" on ")
    assert report.absorbs and report.settled == ({} if peft_mode == mode else {"corda_mode": peft_mode})
    assert (report.current_batches, report.replay_batches) == ((0, 3) if data == "replay" else (3, 0))
    theirs = peft_corda(tiny_llama(tokenizer, seed=0), replay_batches if data == "replay" else batches, peft_mode)
    mine, peft_layers = lora_layers(ours), lora_layers(theirs)
    assert mine.keys() == peft_layers.keys() and len(mine) == 14
    for name, layer in mine.items():
        other = peft_layers[name]
        assert torch.equal(layer.lora_A["default"].weight, other.lora_A["default"].weight), name
        assert torch.equal(layer.lora_B["default"].weight, other.lora_B["default"].weight), name
        torch.testing.assert_close(layer.get_base_layer().weight, other.get_base_layer().weight, atol=1e-6, rtol=0)
    assert not left_behind(ours)  # PEFT's pass put the model in eval mode and hooked it: all undone
    torch.testing.assert_close(logits(ours, batches[0]), before, atol=1e-5, rtol=0)


def test_corda_bad_input_is_refused_and_leaves_the_model_as_it_was(model, batches, replay_batches):
    with pytest.raises(ConfigError, match="init.corda_mode='kmp'; choose one of kpm, ipm. Did you mean 'kpm'"):
        load_config(None, ["init.method=corda", "init.corda_mode=kmp"])
    with pytest.raises(ConfigError, match="init.corda_mode is read only with init.method=corda"):
        load_config(None, ["init.method=eva", "init.corda_mode=ipm"], strict=True)
    peft_model = wrap(model)
    peft_model.train()
    state = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    with pytest.raises(InitError, match="corda_mode='KPM' must be one of kpm, ipm"):
        init_adapter(peft_model, "corda", InitConfig(corda_mode="KPM"), current=batches, replay=replay_batches)
    with torch.no_grad():  # non-finite layer inputs: PEFT's check fails in the middle of its pass
        peft_model.base_model.model.model.embed_tokens.weight[:, 0] = float("nan")
    with pytest.raises(InitError, match="covariance pass failed on the replay batches: Invalid value found in input"):
        init_adapter(peft_model, "corda", current=batches, replay=replay_batches)
    # every weight but the one made NaN here is as it was (NaN != NaN, so that one is left out)
    assert all(torch.equal(p, state[n]) for n, p in peft_model.named_parameters() if "embed_tokens" not in n)
    assert not left_behind(peft_model)


def test_corda_in_the_loop_keeps_what_the_replay_buffer_knows(tiny_folder, tmp_path, monkeypatch):
    """Stage 1 has no past task: ipm on the current task, recorded. Stage 2: PEFT's own kpm on the model merged
    after stage 1, fed the replay batches the loop built, gives the stage's initial factors."""
    given = []

    def recorded(*args, **kwargs):
        given.append(kwargs)
        return init_adapter(*args, **kwargs)

    monkeypatch.setattr(adapters, "init_adapter", recorded)
    out = run(small_config(tiny_folder, "init.method=corda"), tmp_path / "corda")
    records = [json.loads((out / "stages" / f"{t:02d}" / "init.json").read_text()) for t in (1, 2, 3)]
    assert [(r.get("settled", {}), r["current_batches"], r["replay_batches"]) for r in records] == [
        ({"corda_mode": "ipm"}, 2, 0), ({}, 0, 2), ({}, 0, 4)]  # each_task: 2 batches per past task
    model, _ = merged_model(out, 1)
    theirs = lora_layers(peft_corda(model, given[1]["replay"], "kpm"))
    factors = load_file(str(out / "stages" / "02" / "init_factors.safetensors"))
    assert len(theirs) == 14 and len(factors) == 28
    for name, layer in theirs.items():
        torch.testing.assert_close(factors[f"{name}.A"], layer.lora_A["default"].weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(factors[f"{name}.B"], layer.lora_B["default"].weight, atol=1e-6, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["pissa", "eva", "corda"])
@pytest.mark.parametrize("step", ["2:init", "2:train", "3:eval"])
def test_peft_inits_run_three_stages_and_resume_after_a_crash(tiny_folder, tmp_path, method, step):
    settings = [f"model={tiny_folder}", *SMALL, f"init.method={method}"]
    reference = run(load_config(None, settings), tmp_path / "reference")
    crash_at(step, [sys.executable, "-c", RESUME_SCRIPT, str(tmp_path / "resumed"), *settings])
    run(load_config(None, settings), tmp_path / "resumed", resume=True)
    assert_same_run(reference, tmp_path / "resumed")
