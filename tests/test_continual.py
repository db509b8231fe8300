"""Training-time continual-learning methods: O-LoRA's loss against a direct computation and its effect, experience
replay on the hooks, the state saved per stage and restored by resume, a toy method registered in a test, and the
bad settings."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import RESUME_SCRIPT, SMALL, assert_same_run, crash_at, logits, wrap
from slicelora.errors import ConfigError
from slicelora.loop.config import load_config
from slicelora.loop.continual import CL_METHODS, ContinualMethod, OLoRA, Stage, lora_a_weights, register_cl
from slicelora.loop.stages import run
from slicelora.init import init_adapter
from slicelora.models import tiny_llama, tiny_tokenizer


def olora_config(lam: float = 0.5):
    return load_config(None, ["cl.method=olora", f"cl.olora_lambda={lam}"])


def test_olora_loss_equals_a_direct_computation(model):
    peft_model = wrap(model, r=4)
    method = OLoRA(olora_config(0.7))
    assert method.penalty(peft_model) is None  # nothing learned before: no term
    g = torch.Generator().manual_seed(0)
    past = [{name: torch.randn(4, a.shape[1], generator=g) for name, a in lora_a_weights(peft_model).items()}
            for _ in range(2)]
    for t, anchors in enumerate(past, start=1):
        method.after_stage(Stage(t, [], []), {f"{name}.A": a for name, a in anchors.items()})
    expected = 0.0
    for name, a in lora_a_weights(peft_model).items():
        for anchors in past:
            for i in range(a.shape[0]):  # |A A'^T|_F^2 = sum over row pairs of <a_i, a'_j>^2
                for j in range(anchors[name].shape[0]):
                    expected += float(a[i].detach().double() @ anchors[name][j].double()) ** 2
    got = method.penalty(peft_model)
    assert got.requires_grad and float(got.detach()) == pytest.approx(0.7 * expected, rel=1e-5)
    restored = OLoRA(olora_config(0.7))
    restored.load_state_dict(method.state_dict())
    assert float(restored.penalty(peft_model).detach()) == float(got.detach())


def overlap(run_dir) -> float:
    """|A_2 A_1^T|_F^2 summed over layers: how far stage 2's trained A lies from stage 1's."""
    first, second = (load_file(str(run_dir / "stages" / f"0{t}" / "adapter" / "adapter_model.safetensors"))
                     for t in (1, 2))
    return sum(float((second[k] @ first[k].T).pow(2).sum()) for k in first if "lora_A" in k)


def test_olora_runs_saves_its_state_and_pushes_a_apart(tiny_folder, tmp_path):
    settings = [f"model={tiny_folder}", *SMALL, "init.method=vanilla", "sequence=[363, 1687]", "train.lr=2e-2",
                "train.epochs=3"]
    plain = run(load_config(None, settings), tmp_path / "plain")
    olora = run(load_config(None, [*settings, "cl.method=olora", "cl.olora_lambda=50"]), tmp_path / "olora")
    first = json.loads((olora / "stages" / "01" / "train.json").read_text())
    second = json.loads((olora / "stages" / "02" / "train.json").read_text())
    assert "penalties" not in first and len(second["penalties"]) == second["steps"]
    state = load_file(str(olora / "stages" / "02" / "cl_state.safetensors"))
    adapters = [load_file(str(olora / "stages" / f"0{t}" / "adapter" / "adapter_model.safetensors")) for t in (1, 2)]
    for key, anchors in state.items():  # the anchors are the trained A's of stages 1 and 2, stacked
        layer = key.removeprefix("olora/anchors/")
        a = [next(v for k, v in adapter.items() if k.endswith(f"{layer}.lora_A.weight")) for adapter in adapters]
        torch.testing.assert_close(anchors, torch.cat(a).float())
    assert second["penalties"][-1] < 0.5 * second["penalties"][0]  # the term it adds is being minimised
    assert overlap(olora) < 0.5 * overlap(plain)
    assert not (plain / "stages" / "01" / "cl_state.safetensors").exists()  # no method, no state file


def test_experience_replay_mixes_past_examples_in(tiny_folder, tmp_path):
    out = run(load_config(None, [f"model={tiny_folder}", *SMALL, "init.method=vanilla", "train.replay_examples=4"]),
              tmp_path / "replay")
    examples = [json.loads((out / "stages" / f"0{t}" / "train.json").read_text())["examples"] for t in (1, 2, 3)]
    assert examples == [12, 16, 20]  # 12 of the task, plus 4 of every past task
    with pytest.raises(ConfigError, match="set train.replay_examples > 0"):
        load_config(None, ["cl.method=replay"])


def test_unknown_and_bad_cl_settings_are_refused():
    with pytest.raises(ConfigError, match="Did you mean 'olora'"):
        load_config(None, ["cl.method=o-lora"])
    with pytest.raises(ConfigError, match="olora_lambda"):
        load_config(None, ["cl.method=olora", "cl.olora_lambda=-1"])
    with pytest.raises(ConfigError, match="non-empty name"):
        register_cl(OLoRA)  # already registered


class CountingMethod(ContinualMethod):
    """A toy method: counts the stages it saw (its state) and adds no loss."""

    name = "counting"

    def __init__(self, config) -> None:
        super().__init__(config)
        self.stages = torch.zeros(1)

    def after_stage(self, stage, trained) -> None:
        self.stages += 1

    def state_dict(self):
        return {"stages": self.stages}

    def load_state_dict(self, state) -> None:
        self.stages = state["stages"].clone()


def test_a_toy_method_is_one_registration(tiny_folder, tmp_path):
    register_cl(CountingMethod)
    try:
        out = run(load_config(None, [f"model={tiny_folder}", *SMALL, "init.method=vanilla", "cl.method=counting"]),
                  tmp_path / "toy")
        assert [float(load_file(str(out / "stages" / f"0{t}" / "cl_state.safetensors"))["counting/stages"])
                for t in (1, 2, 3)] == [1.0, 2.0, 3.0]
    finally:
        CL_METHODS.pop("counting")


CL_SETTINGS = {"olora": ["cl.method=olora", "train.replay_examples=2"],
               "inflora": ["cl.method=inflora", "cl.inflora_rank=8", "cl.inflora_batches=2", "cl.inflora_batch_size=4"]}


@pytest.mark.slow
@pytest.mark.parametrize("method", CL_SETTINGS)
@pytest.mark.parametrize("step", ["2:init", "2:train", "3:eval"])
def test_cl_methods_resume_after_a_crash_at_each_step(tiny_folder, tmp_path, method, step):
    settings = [f"model={tiny_folder}", *SMALL, "init.method=slice", *CL_SETTINGS[method]]
    reference = run(load_config(None, settings), tmp_path / "reference")
    crash_at(step, [sys.executable, "-c", RESUME_SCRIPT, str(tmp_path / "resumed"), *settings])
    run(load_config(None, settings), tmp_path / "resumed", resume=True)
    assert_same_run(reference, tmp_path / "resumed")
    for t in (1, 2, 3):
        name = f"stages/0{t}/train.json"
        assert json.loads((reference / name).read_text())["losses"] == json.loads(
            (tmp_path / "resumed" / name).read_text())["losses"]


def test_input_subspaces_remove_those_directions_from_a_and_keep_the_function(batches):

    g = torch.Generator().manual_seed(1)
    for method in ("vanilla", "lora_ga", "loram"):
        peft_model = wrap(tiny_llama(tiny_tokenizer(), seed=0), r=4)
        before = logits(peft_model, batches[0])
        names = list(lora_a_weights(peft_model))
        bases = {name: torch.linalg.qr(torch.randn(lora_a_weights(peft_model)[name].shape[1], 5, generator=g))[0]
                 for name in names}
        init_adapter(peft_model, method, current=batches, input_subspaces=bases)
        for name, a in lora_a_weights(peft_model).items():
            assert (a.detach().double() @ bases[name].double()).abs().max() < 1e-5, (method, name)
        torch.testing.assert_close(logits(peft_model, batches[0]), before, atol=1e-5, rtol=0)


def test_inflora_projects_a_off_the_past_inputs_and_resumes(tiny_folder, tmp_path):
    settings = [f"model={tiny_folder}", *SMALL, "init.method=lora_ga", "cl.method=inflora", "cl.inflora_rank=8",
                "cl.inflora_batches=2", "cl.inflora_batch_size=4"]
    out = run(load_config(None, settings), tmp_path / "inflora")
    state = load_file(str(out / "stages" / "01" / "cl_state.safetensors"))
    factors = load_file(str(out / "stages" / "02" / "init_factors.safetensors"))
    for key, covariance in state.items():
        layer = key.removeprefix("inflora/covariance/")
        kept = torch.linalg.eigh(covariance)[1][:, -8:]  # the top 8 eigenvectors of stage 1's input covariance
        a0 = factors[f"{layer}.A"].double()
        assert (a0 @ kept).abs().max() < 1e-5 * a0.abs().max(), layer
    stage3 = load_file(str(out / "stages" / "02" / "cl_state.safetensors"))
    assert all(torch.all(torch.linalg.eigvalsh(stage3[k] - state[k]) > -1e-6) for k in state)  # sums grow
    with pytest.raises(ConfigError, match="cl.inflora_rank=48 must be < d_in = 48"):
        run(load_config(None, [*settings, "cl.inflora_rank=48"]), tmp_path / "too-many")
    assert not (tmp_path / "too-many").exists()
