"""`slicelora export`: a finished stage as a standard model folder and as a standard PEFT LoRA adapter on the model
before it, each reproducing the run's model; stage adapters name no base they do not fit; bad input is refused
before anything is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from conftest import probe, small_config
import slicelora.export as export_module
from slicelora.cli import app
from slicelora.errors import ConfigError, RunStateError
from slicelora.export import export_stage
from slicelora.loop.stages import STAGE_ADAPTER_BASE, run


@pytest.fixture(scope="module", params=["slice", "vanilla"])
def finished(request, tiny_folder, tmp_path_factory) -> tuple[str, Path, dict[int, torch.Tensor]]:
    """A 3-stage run of one method and the probe logits of its model after each stage."""
    live = {}
    folder = run(small_config(tiny_folder, f"init.method={request.param}"), tmp_path_factory.mktemp("run") / "run",
                 on_stage=lambda t, m: live.__setitem__(t, probe(m)))
    return request.param, folder, live


def test_merged_export_is_the_run_model_after_the_stage(finished, tmp_path):
    method, folder, live = finished
    out = tmp_path / "merged"
    assert export_stage(folder, 2, merged=out) == [out]
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "README.md"} <= {p.name for p in out.iterdir()}
    assert (live[2] - live[1]).abs().max() > 1e-4  # the stage changed the model well beyond the tolerance
    torch.testing.assert_close(probe(AutoModelForCausalLM.from_pretrained(out)), live[2], atol=1e-5, rtol=0)
    assert AutoTokenizer.from_pretrained(out)("hi")["input_ids"]
    card = (out / "README.md").read_text()
    assert "the model after stage 2" in card and f"initialised by `{method}`" in card and '"rank": 4' in card
    assert "task1687_sentiment140_classification" in card and "task591" not in card.split("```json")[0]
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no temporary folder left


def test_adapter_export_reproduces_the_stage_on_the_model_before_it(finished, tmp_path):
    method, folder, live = finished
    out = tmp_path / "adapter"
    export_stage(folder, 2, adapter=out)
    base = AutoModelForCausalLM.from_pretrained(out / "base")
    torch.testing.assert_close(probe(base), live[1], atol=1e-5, rtol=0)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == (8 if method == "slice" else 4)  # absorbing: [B, -B0] [A; A0] has rank 2r
    assert config["base_model_name_or_path"] == str((out / "base").resolve()) and config["use_rslora"]
    torch.testing.assert_close(probe(PeftModel.from_pretrained(base, out / "adapter")), live[2], atol=1e-5, rtol=0)
    # the standard one-line load finds the exported base through the adapter's config
    torch.testing.assert_close(probe(AutoPeftModelForCausalLM.from_pretrained(out / "adapter")), live[2],
                               atol=1e-5, rtol=0)
    first = tmp_path / "first"  # stage 1's adapter sits on the base model itself
    export_stage(folder, 1, adapter=first)
    torch.testing.assert_close(probe(AutoPeftModelForCausalLM.from_pretrained(first / "adapter")), live[1],
                               atol=1e-5, rtol=0)


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def exported_files(out: Path) -> list[Path]:
    return [out / "merged" / "model.safetensors", out / "pair" / "base" / "model.safetensors",
            out / "pair" / "adapter" / "adapter_model.safetensors"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_export_dtype_casts_every_saved_tensor(finished, tmp_path, dtype):
    _, folder, live = finished
    name = str(dtype).removeprefix("torch.")
    export_stage(folder, 2, merged=tmp_path / "f32" / "merged", adapter=tmp_path / "f32" / "pair", dtype="float32")
    export_stage(folder, 2, merged=tmp_path / "low" / "merged", adapter=tmp_path / "low" / "pair", dtype=name)
    for full, low in zip(exported_files(tmp_path / "f32"), exported_files(tmp_path / "low")):
        want, got = tensors(full), tensors(low)
        assert set(got) == set(want) and all(t.dtype == torch.float32 for t in want.values())
        assert all(torch.equal(got[k], want[k].to(dtype)) for k in want)  # the float32 export, rounded once
    assert json.loads((tmp_path / "low" / "merged" / "config.json").read_text())["dtype"] == name
    assert f"Tensors are {name}." in (tmp_path / "low" / "merged" / "README.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "low" / "merged", dtype="auto")
    assert model.dtype == dtype
    pair = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "low" / "pair" / "adapter", dtype="auto")
    assert pair.get_base_model().dtype == dtype
    # They load and run. Rounding the weights to 8 (bfloat16) or 11 (float16) significant bits moved the probe logits
    # (up to 1.1) by at most 0.0032 and 0.0004; the tensor comparison above is the exact check.
    tolerance = 0.01 if dtype == torch.bfloat16 else 0.002
    torch.testing.assert_close(probe(model).float(), live[2], atol=tolerance, rtol=0)
    torch.testing.assert_close(probe(pair).float(), live[2], atol=tolerance, rtol=0)


def test_export_dtype_auto_is_the_base_models(finished, tmp_path):
    _, folder, _ = finished
    model_dir, run_dir = tmp_path / "model", tmp_path / "run"
    config = json.loads((folder / "config.json").read_text())
    shutil.copytree(config["model"], model_dir)
    shutil.copytree(folder, run_dir)
    (run_dir / "config.json").write_text(json.dumps({**config, "model": str(model_dir)}))
    model_config = json.loads((model_dir / "config.json").read_text())
    assert model_config["dtype"] == "float32"
    export_stage(run_dir, 1, merged=tmp_path / "as_saved")
    assert {t.dtype for t in tensors(tmp_path / "as_saved" / "model.safetensors").values()} == {torch.float32}
    del model_config["dtype"]  # transformers 4 wrote torch_dtype
    (model_dir / "config.json").write_text(json.dumps({**model_config, "torch_dtype": "bfloat16"}))
    export_stage(run_dir, 1, merged=tmp_path / "legacy")
    assert {t.dtype for t in tensors(tmp_path / "legacy" / "model.safetensors").values()} == {torch.bfloat16}
    (model_dir / "config.json").write_text(json.dumps({**model_config, "dtype": "float64"}))
    with pytest.raises(ConfigError, match=r"config.json records dtype 'float64'.*give --dtype float32"):
        export_stage(run_dir, 1, merged=tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_adapter_pair_loads_from_any_directory_and_after_a_move(finished, tmp_path, monkeypatch):
    """PEFT reads base_model_name_or_path against the current directory, so the export records the base's absolute
    path: the adapter loads wherever the process runs; a moved pair loads with PeftModel on its base."""
    _, folder, live = finished
    out = tmp_path / "pair"
    export_stage(folder, 2, adapter=out)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    torch.testing.assert_close(probe(AutoPeftModelForCausalLM.from_pretrained(out / "adapter")), live[2],
                               atol=1e-5, rtol=0)
    moved = tmp_path / "moved"
    out.rename(moved)
    assert "If you move this folder and ../base" in (moved / "adapter" / "README.md").read_text()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(moved / "base"), moved / "adapter")
    torch.testing.assert_close(probe(model), live[2], atol=1e-5, rtol=0)


def test_stage_adapters_name_no_base_they_do_not_fit(finished):
    _, folder, _ = finished
    adapter = folder / "stages" / "02" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == STAGE_ADAPTER_BASE
    assert "stage_base_model" in (adapter / "README.md").read_text()
    with pytest.raises(Exception, match="not a path: a slicelora stage adapter"):
        AutoPeftModelForCausalLM.from_pretrained(adapter)


def test_bad_exports_are_refused_and_leave_nothing(finished, tmp_path, monkeypatch):
    _, folder, _ = finished
    with pytest.raises(RunStateError, match="is not a run folder"):
        export_stage(tmp_path, 1, merged=tmp_path / "out")
    with pytest.raises(ConfigError, match="give --merged DIR"):
        export_stage(folder, 1)
    with pytest.raises(ConfigError, match="has stages 1..3"):
        export_stage(folder, 4, merged=tmp_path / "out")
    with pytest.raises(ConfigError, match="--dtype 'int8': choose auto, float32, bfloat16, float16"):
        export_stage(folder, 1, merged=tmp_path / "out", dtype="int8")
    busy = tmp_path / "busy"
    (busy / "keep").mkdir(parents=True)
    with pytest.raises(ConfigError, match="exists and is not empty"):
        export_stage(folder, 1, merged=tmp_path / "out", adapter=busy)
    with pytest.raises(ConfigError, match="overlap"):
        export_stage(folder, 1, merged=tmp_path / "out", adapter=tmp_path / "out" / "inner")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(folder, unfinished)
    (unfinished / "stages" / "03" / "scores.json").unlink()
    with pytest.raises(RunStateError, match="stage 3 of .* has not finished"):
        export_stage(unfinished, 3, merged=tmp_path / "out")
    (unfinished / "stages" / "02" / "train.json").unlink()
    with pytest.raises(RunStateError, match="lacks train.json"):
        export_stage(unfinished, 2, merged=tmp_path / "out")
    shutil.rmtree(unfinished / "stages")
    with pytest.raises(RunStateError, match="no finished stage yet"):
        export_stage(unfinished, None, merged=tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "unfinished"]
    # a failure while writing leaves neither the folder nor its temporary sibling
    def fail(model, tokenizer, out, card):
        (out / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "_save_model", fail)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OSError, match="disk full"):
        export_stage(folder, 1, merged=empty)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "empty", "unfinished"] and not any(empty.iterdir())


def test_export_command(finished, tmp_path):
    _, folder, _ = finished
    runner = CliRunner()
    done = runner.invoke(app, ["export", str(folder), "--merged", str(tmp_path / "last")])
    assert done.exit_code == 0, done.output
    assert "the model after stage 3" in (tmp_path / "last" / "README.md").read_text()  # default: the last stage
    refused = runner.invoke(app, ["export", str(folder), "--stage", "0", "--adapter", str(tmp_path / "a")])
    assert refused.exit_code == 2 and "has stages 1..3" in refused.output and not (tmp_path / "a").exists()
    half = runner.invoke(app, ["export", str(folder), "--merged", str(tmp_path / "half"), "--dtype", "float16"])
    assert half.exit_code == 0, half.output
    assert {t.dtype for t in tensors(tmp_path / "half" / "model.safetensors").values()} == {torch.float16}
    refused = runner.invoke(app, ["export", str(folder), "--merged", str(tmp_path / "b"), "--dtype", "fp8"])
    assert refused.exit_code == 2 and "choose auto, float32" in refused.output and not (tmp_path / "b").exists()
    assert "--dtype" in runner.invoke(app, ["export", "--help"]).output
