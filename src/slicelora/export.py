"""Export a finished stage of a run folder as standard Hugging Face folders (`slicelora export`).

- merged: the model after stage t (safetensors, config, tokenizer, generation config, a README.md model card with
  the run's settings and scores), which `AutoModelForCausalLM.from_pretrained` loads.
- adapter: stage t's weight change as a standard PEFT adapter, `DIR/adapter`, on the model after stage t-1,
  exported beside it as `DIR/base`. An absorbing init's trained adapter (B, A) fits W - s B0 A0, not the merged
  model W, so on W the stage's change is s (B A - B0 A0): one rank-2r LoRA with A' = [A; A0], B' = [B, -B0] and the
  same scaling s (lora_alpha set for rank 2r). An OSF stage's adapter is exported as it is: PEFT recomputes its SVD
  split from `DIR/base` when it loads it. The adapter's `base_model_name_or_path` is DIR/base as an absolute path:
  PEFT (AutoPeftModelForCausalLM) passes that field to `from_pretrained` as it is, so a relative path would be read
  against the current directory, not the adapter folder. A moved pair loads with
  `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("NEW/base"), "NEW/adapter")`.

Each export is written into a hidden temporary sibling folder and renamed into place, so a folder is complete or
absent. Models are rebuilt in float32 on the CPU from the run folder's files (as `--resume` does), then every saved
tensor is cast to the export dtype: by default ("auto") that of the run's base model.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig

from .errors import ConfigError, RunStateError
from .init.gradients import canonical_name
from .loop.adapters import kind_of
from .loop.runfolder import (ADAPTER_DIR, ADAPTER_WEIGHTS, FACTORS_FILE, INIT_FILE, SCORES_FILE, TRAIN_FILE, Run,
                             is_run_folder, read_run, stage_dir, stage_finished)
from .loop.stages import merged_model, stage_absorbs
from .models import resolve_model_path

STAGE_FILES = (f"{ADAPTER_DIR}/adapter_config.json", f"{ADAPTER_DIR}/{ADAPTER_WEIGHTS}", INIT_FILE, TRAIN_FILE,
               SCORES_FILE)  # what rebuilding a stage reads (and the init's factors when it absorbs)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_stage(run_dir: str | Path, stage: int | None = None, *, merged: str | Path | None = None,
                 adapter: str | Path | None = None, dtype: str = "auto") -> list[Path]:
    """Write the model after `stage` (default: the last finished stage) to `merged` and/or the stage's change as a
    LoRA adapter to `adapter` (`adapter/adapter` on `adapter/base`), with tensors in `dtype` ("auto", "float32",
    "bfloat16" or "float16"; see `export_dtype`); returns the folders written. Every input is checked before anything
    is written."""
    run_dir = Path(run_dir)
    if merged is None and adapter is None:
        raise ConfigError("export: give --merged DIR (the model after the stage) and/or --adapter DIR (the stage's "
                          "change as a LoRA adapter on the model before it).")
    run = _read_finished_run(run_dir)
    stage = run.stages_done if stage is None else stage
    _check_stage(run, stage)
    torch_dtype = export_dtype(run, dtype)
    outputs = [Path(p) for p in (merged, adapter) if p is not None]
    for out in outputs:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ConfigError(f"export folder {out} exists and is not empty; give a new or empty folder.")
    if len(outputs) == 2:
        first, second = (out.resolve() for out in outputs)
        if first == second or first in second.parents or second in first.parents:
            raise ConfigError(f"--merged {merged} and --adapter {adapter} overlap; give two separate folders.")
    written = []
    if merged is not None:
        model, tokenizer = merged_model(run_dir, stage)
        written.append(_write_folder(Path(merged), lambda tmp: _save_model(
            model.to(torch_dtype), tokenizer, tmp, _card(run, stage, f"the model after stage {stage}", torch_dtype))))
    if adapter is not None:
        written.append(_write_folder(Path(adapter), lambda tmp: _save_stage_adapter(
            run, stage, Path(adapter), tmp, torch_dtype)))
    return written


def export_dtype(run: Run, dtype: str) -> torch.dtype:
    """The exported tensors' dtype: `dtype`, or for "auto" the run's base model's as its config.json records it
    (`dtype`, or `torch_dtype` as transformers 4 wrote it; float32 when it records none)."""
    if dtype != "auto" and dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: choose auto, {', '.join(DTYPES)}.")
    if dtype != "auto":
        return DTYPES[dtype]
    config_file = resolve_model_path(run.config["model"]) / "config.json"
    config = json.loads(config_file.read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    if name not in DTYPES:
        raise ConfigError(f"--dtype auto: the base model's {config_file} records dtype {name!r}, which export does "
                          f"not write; give --dtype {', '.join(DTYPES)}.")
    return DTYPES[name]


def _read_finished_run(run_dir: Path) -> Run:
    if not is_run_folder(run_dir):
        raise RunStateError(f"{run_dir} is not a run folder (no config.json); give a folder written by "
                            "`slicelora run` (or one method's folder inside a `compare` or study folder).")
    if not stage_finished(run_dir, 1):
        raise RunStateError(f"{run_dir} has no finished stage yet (no stages/01/scores.json); continue it with "
                            "`slicelora run --resume` and export once a stage has finished.")
    return read_run(run_dir)


def _check_stage(run: Run, stage: int) -> None:
    """Stage `stage` and every stage before it finished, with the files a rebuild reads."""
    total, done = 1 if run.multitask else len(run.tasks), run.stages_done
    if not 1 <= stage <= total:
        raise ConfigError(f"--stage {stage}: {run.path} has stages 1..{total}; give one of them.")
    if stage > done:
        raise RunStateError(f"--stage {stage}: stage {stage} of {run.path} has not finished (no "
                            f"{stage_dir(run.path, stage) / SCORES_FILE}); its finished stages are 1..{done}. "
                            "Export one of those, or finish the run with `slicelora run --resume` first.")
    for t in range(1, stage + 1):
        folder = stage_dir(run.path, t)
        missing = [name for name in STAGE_FILES if not (folder / name).is_file()]
        if not missing and stage_absorbs(folder) and not (folder / FACTORS_FILE).is_file():
            missing.append(FACTORS_FILE)
        if missing:
            raise RunStateError(f"{folder} lacks {', '.join(missing)}: stage {t} cannot be rebuilt. Delete that "
                                "stage folder and rerun it with `slicelora run --resume`, or export an earlier stage.")


def _write_folder(out: Path, write) -> Path:
    """Run `write(tmp)` on a hidden temporary sibling of `out`, then rename it to `out` (an empty `out` is replaced)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        write(tmp)
        if out.is_dir():
            out.rmdir()  # checked empty up front
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _save_model(model: torch.nn.Module, tokenizer, folder: Path, card: str) -> None:
    """A standard model folder: safetensors weights, config, generation config, tokenizer and the model card."""
    model.save_pretrained(folder)
    if not (folder / "generation_config.json").is_file():
        GenerationConfig.from_model_config(model.config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "README.md").write_text(card, encoding="utf-8")


def _save_stage_adapter(run: Run, stage: int, final: Path, tmp: Path, dtype: torch.dtype) -> None:
    """`tmp/base`: the model after stage-1; `tmp/adapter`: stage `stage`'s change on it as a standard PEFT adapter
    (LoRA, or the stage's own OSF adapter), whose base_model_name_or_path is `final/base` (where tmp is renamed to),
    absolute (see the module docstring)."""
    model, tokenizer = merged_model(run.path, stage - 1)
    before = "the base model (before stage 1)" if stage == 1 else f"the model after stage {stage - 1}"
    _save_model(model.to(dtype), tokenizer, tmp / "base", _card(run, stage - 1, before, dtype))
    folder = stage_dir(run.path, stage)
    config = PeftConfig.from_pretrained(str(folder / ADAPTER_DIR))
    weights = load_file(str(folder / ADAPTER_DIR / ADAPTER_WEIGHTS))
    if stage_absorbs(folder):
        weights, config = _with_absorbed_init(weights, load_file(str(folder / FACTORS_FILE)), config)
    config.base_model_name_or_path = str((final / "base").resolve())
    config.inference_mode = True
    config.save_pretrained(str(tmp / "adapter"))
    weights = {key: tensor.to(dtype) for key, tensor in weights.items()}
    save_file(weights, str(tmp / "adapter" / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    note = ("The init was absorbed (W - s B0 A0), so this adapter has rank 2r: the trained factors and the "
            "initial ones, B' = [B, -B0], A' = [A; A0], with the run's scaling s.\n\n" if stage_absorbs(folder) else "")
    moved = ("If you move this folder and ../base, load them with `PeftModel.from_pretrained("
             "AutoModelForCausalLM.from_pretrained(\"NEW/base\"), \"NEW/adapter\")`: this adapter's "
             "base_model_name_or_path is the absolute path that ../base had at export.\n\n")
    what = f"stage {stage}'s change as a PEFT {kind_of(run.config).title} adapter on ../base (the model before it)"
    card = _card(run, stage, what, dtype, library="peft", base=config.base_model_name_or_path, note=note + moved)
    (tmp / "adapter" / "README.md").write_text(card, encoding="utf-8")


def _with_absorbed_init(weights: dict[str, torch.Tensor], factors: dict[str, torch.Tensor],
                        config: LoraConfig) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """The rank-2r adapter of s (B A - B0 A0) from the trained (A, B) in `weights` and the initial (A0, B0)."""
    if config.rank_pattern or config.alpha_pattern:
        raise ConfigError("export: stage adapters with per-module ranks or alphas (rank_pattern, alpha_pattern) "
                          "are not supported.")
    out = {}
    for key, a in weights.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight")
        b = weights[f"{module}.lora_B.weight"]
        name = canonical_name(module)
        a0, b0 = factors[f"{name}.A"].to(a.dtype), factors[f"{name}.B"].to(b.dtype)
        out[key] = torch.cat([a, a0], dim=0).contiguous()
        out[f"{module}.lora_B.weight"] = torch.cat([b, -b0], dim=1).contiguous()
    if len(out) != len(weights):
        extra = sorted(set(weights) - set(out))[:3]
        raise ConfigError(f"export: the stage adapter holds tensors other than LoRA A and B ({extra}); only plain "
                          "LoRA adapters can be exported.")
    # s = alpha / sqrt(r) (rsLoRA) or alpha / r: the same s at rank 2r needs alpha * sqrt(2) or alpha * 2
    config.lora_alpha *= math.sqrt(2) if config.use_rslora else 2
    config.r *= 2
    return out, config


def _card(run: Run, stage: int, what: str, dtype: torch.dtype, library: str = "transformers",
          base: str | None = None, note: str = "") -> str:
    """A README.md model card: what the folder holds, the run's scores after `stage` and its settings."""
    config = run.config
    tags = "\n".join(f"- {tag}" for tag in ("slicelora", "continual-learning", kind_of(config).name))
    front = f"---\nlibrary_name: {library}\n" + (f"base_model: {base}\n" if base else "") + f"tags:\n{tags}\n---\n"
    lines = [front, f"# {run.path.name}: {what}", "",
             f"{note}Exported by `slicelora export` from the run folder `{run.path.resolve()}`: continual "
             f"fine-tuning of `{config['model']}` with {kind_of(config).describe(config)} (one adapter per stage, "
             f"merged into the weights after the stage). Tensors are {str(dtype).removeprefix('torch.')}.", ""]
    if stage >= 1:
        partial = replace(run, R=run.R[:stage], R_loss=None if run.R_loss is None else run.R_loss[:stage])
        lines += [f"Scores after stage {stage} (the protocol's scorers on each task's held-out examples):", "",
                  "| stage | task learned | score after stage " + f"{stage} |", "| ---: | --- | ---: |"]
        columns = run.tasks if run.multitask else run.tasks[:stage]
        lines += [f"| {1 if run.multitask else j + 1} | {task} | {run.R[stage - 1, j]:.2f} |"
                  for j, task in enumerate(columns)]
        metrics = {**partial.metrics(), **partial.loss_metrics()}
        lines += ["", "Continual-learning metrics over the tasks learned so far: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()) + ".", ""]
    lines += ["Run settings (the run folder's config.json):", "", "```json", json.dumps(config, indent=2), "```", ""]
    return "\n".join(lines)
