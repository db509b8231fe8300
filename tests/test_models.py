"""Models beyond a local Llama folder: model ids in the Hugging Face cache, the default LoRA targets of other
architectures, and GPT-2's Conv1D layers (weights stored transposed) under every init and the stage loop."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, Qwen2Config, Qwen2ForCausalLM,
)
from transformers.pytorch_utils import Conv1D

from conftest import logits
from slicelora.data.sequences import inline_sequence
from slicelora.errors import ConfigError, InitError
from slicelora.init import InitConfig, accumulate_gradients, init_adapter, target_layers
from slicelora.loop.stages import run, stage_base_model
from slicelora.models import LLAMA_TARGETS, linear_names, load_model, peft_wrapping, resolve_targets, tiny_llama
from test_loop import probe, small_config

METHODS = ["vanilla", "lora_ga", "loram", "slice"]


def tiny(kind: str, tokenizer) -> torch.nn.Module:
    """A tiny random causal LM of another architecture, in eval mode (GPT-2's dropout off)."""
    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
               bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=256, **ids)).eval()
    if kind == "gpt_neox":
        return GPTNeoXForCausalLM(GPTNeoXConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                                intermediate_size=64, max_position_embeddings=256, **ids)).eval()
    return Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                        num_key_value_heads=1, intermediate_size=64, max_position_embeddings=256,
                                        **ids)).eval()


def wrapped(model: torch.nn.Module, r: int = 4) -> PeftModel:
    """LoRA on the model's default targets, as the stage loop puts it."""
    targets = list(resolve_targets(model, LLAMA_TARGETS))
    transposed = isinstance(next(iter(target_layers(model).values())), Conv1D)
    with peft_wrapping():
        return get_peft_model(model, LoraConfig(r=r, lora_alpha=2.0, use_rslora=True, target_modules=targets,
                                                lora_dropout=0.0, fan_in_fan_out=transposed))


# --- model ids in the Hugging Face cache ------------------------------------------------------------------------

@pytest.fixture
def hub(tmp_path, tokenizer) -> Path:
    """A Hugging Face cache holding the tiny Llama as "org/tiny" (models--org--tiny/snapshots/<hash>, refs/main)."""
    snapshot = tmp_path / "hf" / "hub" / "models--org--tiny" / "snapshots" / "0123abcd"
    tiny_llama(tokenizer, seed=3).save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    return tmp_path / "hf"


@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HF_HOME"])
def test_model_id_loads_from_the_hub_cache(hub, monkeypatch, variable):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv(variable, str(hub / "hub" if variable == "HF_HUB_CACHE" else hub))
    model, tokenizer = load_model("org/tiny")
    expected = tiny_llama(tokenizer, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), expected.state_dict().values()))
    assert tokenizer.pad_token is not None


def test_unknown_model_id_says_where_it_looked(hub, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(hub / "hub"))
    with pytest.raises(ConfigError) as caught:
        load_model("org/absent")
    message = str(caught.value)
    assert "'org/absent'" in message and str(hub / "hub") in message and "hf download org/absent" in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json there"):  # an existing folder is never looked up as an id
        load_model(str(tmp_path / "empty"))


# --- default targets --------------------------------------------------------------------------------------------

def test_default_targets_follow_the_architecture(tokenizer):
    assert resolve_targets(tiny("gpt2", tokenizer), LLAMA_TARGETS) == ("c_attn",)  # PEFT's defaults
    neox = tiny("gpt_neox", tokenizer)
    assert resolve_targets(neox, LLAMA_TARGETS) == ("query_key_value",)
    assert resolve_targets(tiny("qwen2", tokenizer), LLAMA_TARGETS) == LLAMA_TARGETS  # Llama names: kept
    assert resolve_targets(neox, ["dense"]) == ("dense",)  # set explicitly: taken as it is
    neox.config.model_type = "unknown_to_peft"  # no PEFT default: every linear layer but the LM head (embed_out)
    expected = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
    assert resolve_targets(neox, LLAMA_TARGETS) == linear_names(neox) == expected
    assert linear_names(wrapped(neox)) == expected  # LoRA layers count as their base layers


def test_non_linear_target_is_refused_with_the_reason(tokenizer):
    with pytest.raises(InitError, match="not a linear layer .*drop it from the targets"):
        target_layers(tiny("gpt2", tokenizer), ("wte",))


# --- GPT-2's Conv1D --------------------------------------------------------------------------------------------

def as_linear(model: torch.nn.Module) -> torch.nn.Module:
    """The same function with every Conv1D replaced by an nn.Linear holding the transposed weight."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            linear = torch.nn.Linear(module.nx, module.nf)
            with torch.no_grad():
                linear.weight.copy_(module.weight.T)
                linear.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear)
    return model


def test_conv1d_gradients_and_factors_equal_those_of_the_linear_layout(tokenizer, batches, replay_batches):
    conv = tiny("gpt2", tokenizer)
    linear = as_linear(conv)
    grads = accumulate_gradients(conv, batches, targets=("c_attn", "c_fc"))
    reference = accumulate_gradients(linear, batches, targets=("c_attn", "c_fc"))
    assert grads.keys() == reference.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], reference[name], atol=1e-6, rtol=1e-5)  # both (d_out, d_in)
    for method in ("lora_ga", "slice"):
        a, b = wrapped(copy.deepcopy(conv)), wrapped(copy.deepcopy(linear))
        for model in (a, b):
            init_adapter(model, method, InitConfig(), current=batches,
                         replay=replay_batches if method == "slice" else None)
        layer_a = a.base_model.model.transformer.h[1].attn.c_attn
        layer_b = b.base_model.model.transformer.h[1].attn.c_attn
        for key in ("lora_A", "lora_B"):
            torch.testing.assert_close(getattr(layer_a, key)["default"].weight, getattr(layer_b, key)["default"].weight,
                                       atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(layer_a.get_base_layer().weight.T, layer_b.get_base_layer().weight,
                                   atol=1e-5, rtol=1e-4)  # the absorbed W - s B0 A0, stored transposed


@pytest.mark.parametrize("kind", ["gpt2", "gpt_neox", "qwen2"])
@pytest.mark.parametrize("method", METHODS)
def test_every_init_keeps_the_function_on_other_architectures(tokenizer, batches, replay_batches, kind, method):
    model = wrapped(tiny(kind, tokenizer))
    before = logits(model, batches[0])
    report = init_adapter(model, method, InitConfig(), current=batches if method != "loram" and method != "vanilla"
                          else None, replay=replay_batches if method == "slice" else None)
    model.eval()
    torch.testing.assert_close(logits(model, batches[0]), before, atol=2e-5, rtol=0)
    if method != "vanilla":
        assert report.absorbs and any(m.lora_B["default"].weight.abs().sum() > 0 for m in model.modules()
                                      if "default" in getattr(m, "lora_B", {}))


@pytest.mark.parametrize("kind, targets", [("gpt2", ["c_attn"]), ("gpt_neox", ["query_key_value"]),
                                           ("qwen2", list(LLAMA_TARGETS))])
def test_two_stage_run_on_other_architectures(tmp_path, tokenizer, kind, targets):
    folder = tmp_path / kind
    tiny(kind, tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config = small_config(folder, "init.method=slice")
    config.sequence = inline_sequence(["363", "1687"])
    live = {}
    out = run(config, tmp_path / "run", on_stage=lambda t, m: live.__setitem__(t, probe(m)))
    adapter = json.loads((out / "stages" / "02" / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == sorted(targets) and adapter["fan_in_fan_out"] is (kind == "gpt2")
    assert json.loads((out / "stages" / "02" / "init.json").read_text())["surgery"] is not None
    for t in (1, 2):
        with peft_wrapping():
            loaded = PeftModel.from_pretrained(stage_base_model(out, t), out / "stages" / f"{t:02d}" / "adapter")
        torch.testing.assert_close(probe(loaded.eval()), live[t], atol=1e-5, rtol=0)
