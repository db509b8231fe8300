"""PEFT's OSF as the stage adapter (adapter.type=osf): the same run folder and metrics as LoRA runs, the preserved
ranks of the schedule, OSF's defining property checked from the weights and gradients (an independent SVD), resume
after a crash at each step, comparisons, studies and exports, and the combinations refused before any work."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from peft.tuners.osf import OSFLayer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from typer.testing import CliRunner

from conftest import RESUME_SCRIPT, SMALL, assert_same_run, crash_at, probe
import slicelora.loop.stages as stages_module
from slicelora.cli import app
from slicelora.errors import ConfigError
from slicelora.export import export_stage
from slicelora.init.gradients import canonical_name
from slicelora.loop.adapters import OSFAdapter
from slicelora.loop.config import load_config
from slicelora.loop.runfolder import read_run
from slicelora.loop.stages import merged_model, run
from slicelora.report.plots import write_report
from slicelora.study import parse_study, run_study
from slicelora.study.plan import count_work

# the small run with OSF, at a learning rate that moves OSF's SVD factors (unit-norm columns) visibly in 2 steps
OSF = [s for s in SMALL if not s.startswith("adapter.rank")] + ["adapter.type=osf", "train.lr=1e-2"]


def osf_settings(model: Path, *extra: str) -> list[str]:
    return [f"model={model}", *OSF, *extra]


def preserved(stage: int, shape: tuple[int, ...], stages: int = 3) -> int:
    """k_t by hand: the default schedule keeps (t - 1) / stages of min(d_out, d_in), at least 1, at most all but 1."""
    m = min(shape)
    return min(m - 1, max(1, (stage - 1) * m // stages))


def osf_layers(model: torch.nn.Module) -> dict[str, OSFLayer]:
    return {canonical_name(name): module for name, module in model.named_modules() if isinstance(module, OSFLayer)}


def weights(model: torch.nn.Module, names) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    return {name: modules[name].weight.detach().double() for name in names}


@pytest.fixture(scope="module")
def osf_run(tiny_folder, tmp_path_factory) -> tuple[Path, dict[int, torch.Tensor], list[str]]:
    """A 3-stage OSF run, the probe logits of its model after each stage and the warnings it gave."""
    live = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folder = run(load_config(None, osf_settings(tiny_folder)), tmp_path_factory.mktemp("osf") / "run",
                     on_stage=lambda t, m: live.__setitem__(t, probe(m)))
    return folder, live, [str(w.message) for w in caught]


def test_an_osf_run_writes_what_a_lora_run_writes(tiny_folder, osf_run, tmp_path):
    folder, _, caught = osf_run
    assert caught == []
    lora = run(load_config(None, [f"model={tiny_folder}", *SMALL, "init.method=vanilla"]), tmp_path / "lora")
    files = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    assert files == {str(p.relative_to(lora)) for p in lora.rglob("*") if p.is_file()}
    result = read_run(folder)
    assert result.method == "osf" and result.R.shape == (3, 3)
    metrics = [json.loads((f / "metrics.json").read_text()) for f in (folder, lora)]
    assert metrics[0].keys() == metrics[1].keys() and metrics[0]["method"] == "osf"
    written = {p.name for p in write_report([folder, lora], tmp_path / "report")}
    assert {"metrics.md", "metrics.csv", "r_matrix.png", "task_curves.png"} <= written
    assert "| osf |" in (tmp_path / "report" / "metrics.md").read_text()
    adapter = folder / "stages" / "02" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "OSF"
    assert "This OSF adapter" in (adapter / "README.md").read_text()
    model = merged_model(folder, 0)[0]
    shapes = {name: tuple(module.weight.shape) for name, module in model.named_modules() if name.endswith("_proj")}
    for t in (1, 2, 3):
        init = json.loads((folder / "stages" / f"0{t}" / "init.json").read_text())
        assert init["method"] == "osf" and not init["absorbs"]
        assert init["preserved_fraction"] == pytest.approx((t - 1) / 3)
        assert init["preserved_ranks"] == {name: preserved(t, shape) for name, shape in shapes.items()}
        factors = load_file(str(folder / "stages" / f"0{t}" / "init_factors.safetensors"))
        assert factors == {f"{name}.preserved_rank": torch.tensor([k]) for name, k in init["preserved_ranks"].items()}


def test_osf_gradients_stay_off_the_preserved_subspace_and_its_top_part_is_kept(tiny_folder, tmp_path, monkeypatch):
    """Through the loop and its AdamW: every gradient the optimiser gets for U_low (V_low) has no component along the
    top k_t left (right) singular vectors of the stage's starting weight, from our own SVD; and after the merge,
    W_t - (top k_t part of W_{t-1}) has rank at most min(d_out, d_in) - k_t: the kept part is carried over exactly."""
    steps: list[dict[torch.Tensor, torch.Tensor]] = []

    class Recording(torch.optim.AdamW):
        def step(self, closure=None):
            steps.append({p: p.grad.clone() for group in self.param_groups for p in group["params"]})
            return super().step(closure)

    worst: dict[int, float] = {}
    train_adapter = stages_module.train_adapter

    def checked(model, *args, **kwargs):
        steps.clear()
        curve = train_adapter(model, *args, **kwargs)
        stage, ratios = len(worst) + 1, []
        for layer in osf_layers(model).values():
            w = layer.get_base_layer().weight.detach().double()  # frozen while training: W_{t-1}
            k = preserved(stage, tuple(w.shape))
            u, _, vh = torch.linalg.svd(w)
            params = layer.osf_svd_params["default"]
            for grads in steps:
                gu, gv = grads[params["U_low"]].double(), grads[params["V_low"]].double()
                assert gu.norm() > 0 and gv.norm() > 0
                ratios += [float((u[:, :k].T @ gu).norm() / gu.norm()), float((gv @ vh[:k].T).norm() / gv.norm())]
        worst[stage] = max(ratios)
        return curve

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    monkeypatch.setattr(stages_module, "train_adapter", checked)
    folder = run(load_config(None, osf_settings(tiny_folder)), tmp_path / "run")
    assert len(steps) == 2 and set(worst) == {1, 2, 3} and max(worst.values()) < 1e-4, worst  # float32
    names = list(json.loads((folder / "stages" / "01" / "init.json").read_text())["preserved_ranks"])
    before = weights(merged_model(folder, 0)[0], names)
    for t in (1, 2, 3):
        after = weights(merged_model(folder, t)[0], names)
        for name in names:
            w, k = before[name], preserved(t, tuple(before[name].shape))
            u, s, vh = torch.linalg.svd(w)
            kept = u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
            sigma = torch.linalg.svdvals(after[name] - kept)
            m = min(w.shape)
            assert (after[name] - w).norm() > 1e-3 * w.norm(), (t, name)  # the stage changed the weight
            assert sigma[m - k:].max() < 1e-5 * s[0], (t, name, k)
        before = after


def test_with_plain_sgd_the_weight_updates_are_orthogonal_to_the_preserved_subspace(tiny_folder, tmp_path,
                                                                                     monkeypatch):
    """OSF projects gradients; with an optimiser whose step is a multiple of the gradient (SGD in place of the loop's
    AdamW) every stage's weight change Delta = W_t - W_{t-1} lies in the orthogonal complement of the top k_t
    singular vectors of W_{t-1} on both sides: U_k^T Delta = 0 and Delta V_k = 0, from the merged weights alone."""

    class SGD(torch.optim.SGD):
        def __init__(self, params, lr, weight_decay=0.0):
            super().__init__(params, lr=lr, weight_decay=weight_decay)

    monkeypatch.setattr(torch.optim, "AdamW", SGD)
    settings = osf_settings(tiny_folder, "train.lr=50", "train.max_grad_norm=0")
    folder = run(load_config(None, settings), tmp_path / "sgd")
    names = list(json.loads((folder / "stages" / "01" / "init.json").read_text())["preserved_ranks"])
    before = weights(merged_model(folder, 0)[0], names)
    for t in (1, 2, 3):
        after = weights(merged_model(folder, t)[0], names)
        for name in names:
            w, delta = before[name], after[name] - before[name]
            k = preserved(t, tuple(w.shape))
            u, _, vh = torch.linalg.svd(w)
            noise = 1e-6 * w.norm()  # float32 merges; an unconstrained change has about sqrt(k / m) of its norm there
            assert delta.norm() > 1e-4 * w.norm(), (t, name)
            assert (u[:, :k].T @ delta).norm() < 1e-3 * delta.norm() + noise, (t, name)
            assert (delta @ vh[:k].T).norm() < 1e-3 * delta.norm() + noise, (t, name)
        before = after


@pytest.mark.slow
@pytest.mark.parametrize("step", ["2:init", "2:train", "3:eval"])
def test_osf_resumes_after_a_crash_at_each_step(tiny_folder, osf_run, tmp_path, step):
    settings = osf_settings(tiny_folder)
    crash_at(step, [sys.executable, "-c", RESUME_SCRIPT, str(tmp_path / "resumed"), *settings])
    run(load_config(None, settings), tmp_path / "resumed", resume=True)
    assert_same_run(osf_run[0], tmp_path / "resumed")
    for t in (1, 2, 3):
        name = f"stages/0{t}/train.json"
        assert json.loads((osf_run[0] / name).read_text())["losses"] == json.loads(
            (tmp_path / "resumed" / name).read_text())["losses"]


def test_osf_exports_reproduce_the_run(osf_run, tmp_path):
    folder, live, _ = osf_run
    assert (live[2] - live[1]).abs().max() > 1e-3  # the stage changed the model well beyond the tolerance
    export_stage(folder, 2, merged=tmp_path / "merged", adapter=tmp_path / "adapter")
    torch.testing.assert_close(probe(AutoModelForCausalLM.from_pretrained(tmp_path / "merged")), live[2],
                               atol=1e-5, rtol=0)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter" / "base")
    torch.testing.assert_close(probe(base), live[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(probe(PeftModel.from_pretrained(base, tmp_path / "adapter" / "adapter")), live[2],
                               atol=1e-5, rtol=0)
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter" / "adapter")  # PEFT re-splits ../base
    torch.testing.assert_close(probe(loaded), live[2], atol=1e-5, rtol=0)
    card = (tmp_path / "adapter" / "adapter" / "README.md").read_text()
    assert "stage 2's change as a PEFT OSF adapter" in card and "with PEFT's OSF (orthogonal" in card
    assert "- osf" in card


def test_compare_and_studies_take_osf(tiny_folder, tmp_path):
    out = tmp_path / "compare"
    command = ["compare", "--methods", "vanilla,osf", "-o", str(out), "--model", str(tiny_folder),
               *[a for s in SMALL for a in ("--set", s)]]
    planned = CliRunner().invoke(app, [*command, "--plan"])
    assert planned.exit_code == 0 and "variants: vanilla, osf" in planned.output and not out.exists(), planned.output
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    assert [read_run(out / m).method for m in ("vanilla", "osf")] == ["vanilla", "osf"]
    assert json.loads((out / "osf" / "config.json").read_text())["adapter"]["type"] == "osf"
    assert (out / "metrics.md").is_file() and "osf" in (out / "metrics.md").read_text()
    spec = {"base": {"model": str(tiny_folder), "adapter": {"rank": 4}, "init": {"batches": 2, "batch_size": 4},
                     "train": {"epochs": 1, "batch_size": 4, "grad_accum": 2, "max_length": 96, "max_examples": 12},
                     "eval.examples": 3, "eval.max_new_tokens": 3, "general.enabled": False},
            "variants": {"lora_ga": {"init.method": "lora_ga"}, "osf": {"adapter.type": "osf"},
                         "osf-step": {"adapter.type": "osf", "osf.preserve_step": 0.25}},
            "sequences": {"two": ["363", "1687"]}, "seeds": [1], "reference": "lora_ga"}
    work = count_work(parse_study(spec))
    assert work.gradient_batches == 2 * 2  # LoRA-GA's two stages; OSF reads no gradients
    assert work.train_batches == work.train_batches_all * 5 // 6  # the OSF variants' first stage (f = 0) is one
    study = run_study(parse_study(spec), tmp_path / "study")
    cell = read_run(study / "cells/two/osf/seed1")
    assert cell.method == "osf" and cell.R.shape == (2, 2)
    assert json.loads((study / "cells/two/osf/seed1/stages/02/init.json").read_text())["preserved_fraction"] == 0.5
    shared = [json.loads((study / f"cells/two/osf-step/seed1/stages/0{t}/timing.json").read_text())["shared"]
              for t in (1, 2)]
    assert shared == [True, False]  # stage 1 copied from the other OSF cell, stage 2 keeps 1/4, not 1/2
    cells = parse_study(spec).cells()
    alone = run(parse_study(spec).config(next(c for c in cells if c.variant == "osf-step")), tmp_path / "alone")
    for t in (1, 2):  # the copied stage is bitwise the stage trained alone, and so is the one after it
        for name in ("adapter/adapter_model.safetensors", "generations.jsonl", "init_factors.safetensors"):
            path = f"stages/0{t}/{name}"
            assert (study / "cells/two/osf-step/seed1" / path).read_bytes() == (alone / path).read_bytes(), path
    spec["variants"]["osf"]["init.method"] = "slice"
    with pytest.raises(ConfigError, match=r"variant 'osf': init.method is read only with adapter.type=lora"):
        parse_study(spec)


@pytest.mark.parametrize("settings, message", [
    (["cl.method=olora"], "cl.method=olora works on LoRA adapters only: it keeps every past stage's LoRA A"),
    (["cl.method=inflora"], "cl.method=inflora works on LoRA adapters only: it starts the new LoRA adapter's A"),
    (["osf.preserve=1"], r"osf.preserve must be a fraction in \[0, 1\)"),
])
def test_combinations_osf_cannot_work_with_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["adapter.type=osf", *settings])


def test_settings_of_the_other_adapter_type_are_refused_in_a_single_run(tmp_path):
    runner = CliRunner()
    refused = runner.invoke(app, ["run", "--method", "osf", "-o", str(tmp_path / "a"), "--set", "init.method=slice"])
    assert refused.exit_code == 2 and not (tmp_path / "a").exists()
    text = " ".join(refused.output.split())
    assert "init.method is read only with adapter.type=lora" in text and "so it ignores it" in text
    with pytest.raises(ConfigError, match=r"osf.preserve is read only with adapter.type=osf"):
        load_config(None, ["osf.preserve=0.5"], strict=True)
    assert load_config(None, ["adapter.type=osf", "train.replay_examples=4"], strict=True).adapter.type == "osf"


def test_a_schedule_leaving_nothing_to_train_and_conv1d_layers_are_refused(tiny_folder, tmp_path):
    config = load_config(None, osf_settings(tiny_folder, "osf.preserve=0.4", "osf.preserve_step=0.3"))
    with pytest.raises(ConfigError, match=r"keep a fraction 1 >= 1 of every layer at stage 3 of 3"):
        run(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert OSFAdapter(config, 2).fraction(2) == pytest.approx(0.7)  # two stages leave room: 0.4, then 0.7
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=32, vocab_size=64))
    with pytest.raises(ConfigError, match="PEFT's OSF wraps nn.Linear layers only"):
        OSFAdapter(load_config(None, ["adapter.type=osf"]), 3).check(gpt2)
