"""The init registry: the built-in methods' records, definitions refused when inconsistent, unknown names with the
nearest suggested, and a toy method registered here in a few lines that the config, the CLI and the stage loop
(resume included) take without any other file changing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from typer.testing import CliRunner

from conftest import SMALL, assert_same_run, crash_at, logits, probe, wrap
from slicelora.cli import app
from slicelora.errors import ConfigError, InitError
from slicelora.init import Factors, InitMethod, LayerInput, get_init, init_adapter, init_names, register_init
from slicelora.init.registry import INITS
from slicelora.loop.config import load_config
from slicelora.loop.runfolder import read_run
from slicelora.loop.stages import run, stage_base_model

TESTS = Path(__file__).parent


def _toy_factors(layer: LayerInput, config) -> Factors:
    """A toy gradient-based init: A from the gradient's first rows, B from its first columns, both small."""
    scale = 0.1 / layer.grad.norm()
    return Factors((layer.grad[:layer.rank] * scale).contiguous(), (layer.grad[:, :layer.rank] * scale).contiguous())


def register_toy() -> None:
    register_init(InitMethod("toy", data="current", absorbs=True, factors=_toy_factors,
                             summary="A test method [not for use]."))


@pytest.fixture
def toy():
    register_toy()
    yield "toy"
    INITS.pop("toy")


def test_builtin_methods_are_registered_once_with_their_records():
    assert init_names()[:4] == ("vanilla", "lora_ga", "loram", "slice")
    assert {n: (get_init(n).data, get_init(n).absorbs) for n in init_names()[:4]} == {
        "vanilla": ("none", False), "lora_ga": ("current", True), "loram": ("none", True), "slice": ("replay", True)}
    # the stage loop builds replay batches for these, and only these
    assert [n for n in init_names() if get_init(n).uses_replay] == ["slice", "corda"]
    with pytest.raises(InitError, match="already registered"):
        register_init(get_init("slice"))


def test_each_methods_settings_are_declared_once_in_its_dataclasses():
    """A method's settings are the fields of its settings dataclasses; InitConfig (the library) and the run
    config's init section inherit those declarations: same names, types and defaults, and the choices come from
    their Literal types."""
    from dataclasses import fields

    from slicelora.init import InitConfig
    from slicelora.loop.config import CHOICES, InitSection, RunConfig

    assert get_init("vanilla").setting_names() == ("seed",)
    assert get_init("loram").setting_names() == ()
    assert set(get_init("lora_ga").setting_names()) == {"lora_ga_variant", "gamma", "selection", "niter", "seed"}
    assert set(get_init("slice").setting_names(combined=False)) == {"selection", "niter", "seed"}
    assert {"strength", "gate", "surgery_mode", "projection", "phi", "gate_delta"} <= set(
        get_init("slice").setting_names())
    defaults, section = InitConfig(), RunConfig().init
    for name in init_names():
        for cls in get_init(name).settings + get_init(name).combine_settings:
            for f in fields(cls):
                assert isinstance(InitConfig(), cls)
                if f.name != "seed":  # the run's seed (plus the stage) is the init's
                    assert issubclass(InitSection, cls) and getattr(section, f.name) == getattr(defaults, f.name)
    assert CHOICES["init.corda_mode"] == ("kpm", "ipm") and CHOICES["init.lora_ga_variant"] == ("paper", "reference",
                                                                                                 "peft")
    assert load_config(None, ["init.gamma=8", "init.niter=2"]).init.gamma == 8.0
    with pytest.raises(ConfigError, match="init.gamma"):
        load_config(None, ["init.gamma=-1"])


@pytest.mark.parametrize("fields, message", [
    (dict(data="activations"), "must be one of none, current, replay, inputs, replay_inputs"),
    (dict(data="inputs"), "prepare step goes with data='inputs' or 'replay_inputs'"),
    (dict(data="replay_inputs"), "prepare step goes with data='inputs' or 'replay_inputs'"),
    (dict(prepare=lambda m, c, r, cfg, name: None), "prepare step goes with"),
    (dict(data="replay"), "combine step goes with data='replay'"),
    (dict(combine=lambda c, r, cfg: (c, None)), "combine step goes with data='replay'"),
    (dict(factors=None), "nothing to absorb"),
    (dict(settings=("strength",)), "settings and combine_settings name settings dataclasses"),
])
def test_inconsistent_definitions_are_refused(fields, message):
    definition = dict(name="bad", data="current", absorbs=True, factors=_toy_factors, summary="")
    with pytest.raises(InitError, match=message):
        InitMethod(**{**definition, **fields})


def test_unknown_methods_suggest_the_nearest_name(model, batches):
    with pytest.raises(ConfigError, match="Did you mean 'slice'"):
        load_config(None, ["init.method=slcie"])
    with pytest.raises(InitError, match="Did you mean 'lora_ga'"):
        init_adapter(wrap(model), "lora-ga", current=batches)


def test_a_toy_method_runs_through_init_config_cli_and_loop(toy, tiny_folder, model, batches, tmp_path):
    # the library: absorbed, so the model computes the same function right after the init
    peft_model = wrap(model)
    before = logits(peft_model, batches[0])
    report = init_adapter(peft_model, toy, current=batches)
    assert report.absorbs and report.current_batches == len(batches)
    torch.testing.assert_close(logits(peft_model, batches[0]), before, atol=1e-5, rtol=0)
    # the config and the CLI
    assert load_config(None, [f"init.method={toy}"]).init.method == toy
    runner = CliRunner()
    listed = runner.invoke(app, ["methods"])
    assert listed.exit_code == 0 and "A test method [not for use]." in listed.output
    out = tmp_path / "cli"
    result = runner.invoke(app, ["run", "--method", toy, "--model", str(tiny_folder), "-o", str(out),
                                 *(arg for item in SMALL for arg in ("--set", item))])
    assert result.exit_code == 0, result.output
    # the loop: three stages, each stage's record says it was absorbed, the saved adapter loads onto its base
    assert read_run(out).R.shape == (3, 3)
    for t in (1, 2, 3):
        init = json.loads((out / "stages" / f"{t:02d}" / "init.json").read_text())
        assert init["method"] == toy and init["absorbs"] is True
    live = {}
    again = run(load_config(None, [f"model={tiny_folder}", *SMALL, f"init.method={toy}"]), tmp_path / "again",
                on_stage=lambda t, m: live.__setitem__(t, probe(m)))
    assert_same_run(out, again)
    loaded = PeftModel.from_pretrained(stage_base_model(again, 2), again / "stages" / "02" / "adapter")
    torch.testing.assert_close(probe(loaded), live[2], atol=1e-5, rtol=0)


TOY_RESUME = ("import sys; sys.path.insert(0, sys.argv[1]); import test_registry; test_registry.register_toy();"
              "from slicelora.loop.config import load_config; from slicelora.loop.stages import run;"
              "run(load_config(None, sys.argv[3:]), sys.argv[2], resume=True)")


@pytest.mark.slow
@pytest.mark.parametrize("step", ["2:init", "2:train", "3:eval"])
def test_a_toy_method_resumes_after_a_crash_at_each_step(toy, tiny_folder, tmp_path, step):
    settings = [f"model={tiny_folder}", *SMALL, f"init.method={toy}"]
    reference = run(load_config(None, settings), tmp_path / "reference")
    crash_at(step, [sys.executable, "-c", TOY_RESUME, str(TESTS), str(tmp_path / "resumed"), *settings])
    run(load_config(None, settings), tmp_path / "resumed", resume=True)
    assert_same_run(reference, tmp_path / "resumed")
