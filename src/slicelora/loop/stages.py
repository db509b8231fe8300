"""The continual-learning stage loop, top to bottom (docs/method.md, "Protocol"):

    for each task T_t of the sequence:
        1. add a fresh LoRA adapter to the current (merged) model
        2. initialise it (vanilla | lora_ga | loram | slice, with SLICE's replay buffer of past tasks)
        3. train only the adapter on T_t
        4. merge it into the weights
        5. evaluate every task seen so far -> row t of R (scores) and of R_loss (answer NLL)

After every stage the run folder gets, atomically: the init diagnostics and initial factors, the stage's key, the
trained adapter (PEFT format), the loss curve, every generation with its score and answer NLL, the R row, and the
wall time of each step (timing.json, the only file that differs between two runs of the same config).
`resume=True` rebuilds the merged model from those files and continues after the last finished step, ending with
the same results. With a `SharedWork` store (studies), a stage whose key another run already finished is copied
from it instead of being trained and evaluated again (see sharing.py).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from ..data.prompts import make_batches
from ..data.sequences import load_sequence
from ..data.tasks import Example, Task, load_task, search_dirs
from ..errors import RunStateError
from ..eval.general import GeneralConfig, general_scores
from ..eval.tasks import evaluate_task
from ..init import InitConfig, absorb_factors, adapter_factors, get_init, init_adapter
from ..init.gradients import canonical_name, is_transposed, target_layers
from ..io import remove_temporaries, write_json, write_text, write_with
from ..models import load_model, peft_wrapping, resolve_targets
from ..report.runs import write_run_summary
from .config import RESUMABLE, RunConfig, changes, check_against_model, describe, from_dict, library_init_config
from .continual import ContinualMethod, Stage, active_methods, replay_buffer
from .sharing import KEY_FILE, SharedWork, copy_tree, general_key, model_key, stage_key
from .train import divergence, train_adapter

# InitReport fields that depend on how this run got there (timing, the cache): timing.json, not init.json
CL_STATE = "cl_state.safetensors"  # the continual-learning methods' state after the stage
RUN_DEPENDENT = ("seconds", "gradients_from_cache", "gradient_sets_from_cache")
# A stage adapter's base_model_name_or_path: it fits no saved model (see STAGE_ADAPTER_README), so it names none and
# AutoPeftModelForCausalLM fails loudly, quoting this text, instead of loading it onto the wrong weights.
STAGE_ADAPTER_BASE = "not a path: a slicelora stage adapter fits the run's model before this stage, see README.md"
STAGE_ADAPTER_README = """# A slicelora stage adapter

This LoRA adapter (PEFT format) is one stage of a slicelora run. It fits no model saved anywhere: its base is the
run's model merged up to the previous stage, and for absorbing inits (init.json: "absorbs": true) with this stage's
initial factors subtracted (W - s B0 A0, from init_factors.safetensors). So `base_model_name_or_path` names no model.

- Rebuild its base in Python: `slicelora.loop.stages.stage_base_model(run_folder, stage)`, then
  `PeftModel.from_pretrained(base, this_folder)`.
- Or export standard folders: `slicelora export RUN --stage t --merged DIR` (the model after the stage) or
  `--adapter DIR` (the stage's change as a LoRA adapter on the exported model of the previous stage).
"""


# --- data for one stage ----------------------------------------------------------------------------------------

def stage_groups(tasks: list[Task], config: RunConfig) -> list[list[Task]]:
    """The tasks each stage learns: one per stage, or all of them in one stage (train.multitask: the joint-training
    reference, the upper bound that continual methods are compared with)."""
    return [list(tasks)] if config.train.multitask else [[task] for task in tasks]


def training_examples(stage: Stage, config: RunConfig, methods: list[ContinualMethod]) -> list[Example]:
    """The train split of each task learned at this stage (each capped by train.max_examples), then whatever the
    continual-learning methods add (experience replay: past tasks' examples)."""
    examples = []
    for task in stage.learn:
        chosen = task.train
        if config.train.max_examples is not None and len(chosen) > config.train.max_examples:
            chosen = random.Random(f"{config.seed}:{task.name}:train").sample(chosen, config.train.max_examples)
        examples = examples + chosen
    for method in methods:
        examples = method.examples(stage, examples)
    return examples


def init_batches(learn: list[Task], past: list[Task], config: RunConfig, tokenizer, stage: int):
    """The init's gradient batches, as its method needs them: S of the current task(s), and for replay methods
    (SLICE) S per past task (each_task) or S in all (all_tasks)."""
    cfg = config.init
    data = get_init(cfg.method).data
    if data == "none":
        return [], []
    kw = dict(tokenizer=tokenizer, batch_size=cfg.batch_size, max_length=config.train.max_length,
              loss_on=cfg.loss_on, seed=config.seed + stage, num_batches=cfg.batches)
    current = make_batches([ex for task in learn for ex in task.train], **kw)
    if data != "replay" or not past:
        return current, []
    buffers = [replay_buffer(old, cfg.replay_buffer, config.seed) for old in past]
    if cfg.replay_batching == "each_task":
        return current, [b for buffer in buffers for b in make_batches(buffer, **kw)]
    return current, make_batches([ex for buffer in buffers for ex in buffer], **kw)


def lora_config(config: RunConfig, model: torch.nn.Module) -> LoraConfig:
    """The stage adapter's PEFT config on `model`: adapter.targets resolved to its layer names, fan_in_fan_out for
    GPT-2's Conv1D layers (weights stored transposed)."""
    a = config.adapter
    transposed = any(is_transposed(layer) for layer in target_layers(model, a.targets).values())
    return LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=a.dropout, use_rslora=True,
                      target_modules=list(resolve_targets(model, a.targets)), init_lora_weights=True,
                      **({"fan_in_fan_out": True} if transposed else {}))


def init_config(config: RunConfig, stage: int, shared: SharedWork | None = None) -> InitConfig:
    """The init library's settings for stage `stage`: every field the run config's init section shares with
    InitConfig, plus what the loop decides: the seed, the targets, gradient checkpointing as in training, gradient
    passes under bf16 autocast when training uses it (init.autocast), and the shared store's gradient cache."""
    return library_init_config(
        config.init, seed=config.seed + stage, targets=tuple(config.adapter.targets),
        gradient_checkpointing=config.train.gradient_checkpointing, autocast=config.init.autocast and config.train.bf16,
        gradient_cache_dir=shared.gradient_cache() if shared is not None else None)


# --- run folder ------------------------------------------------------------------------------------------------

def stage_dir(run_dir: Path, stage: int) -> Path:
    return run_dir / "stages" / f"{stage:02d}"


def _fault_point(stage: int, step: str) -> None:
    """Fault injection for the resume tests: SLICELORA_FAULT="2:train" kills this process there."""
    if os.environ.get("SLICELORA_FAULT") == f"{stage}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def check_output(path: Path) -> None:
    """Refuse an output path that is (or lies inside) an existing file."""
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise RunStateError(f"--output {path}: {existing} is a file, not a folder; give a new or existing folder.")


def check_collection_dir(out: Path, what: str) -> None:
    """Refuse, for a folder that will hold several run folders (a comparison, a study), a file or a run folder."""
    check_output(out)
    if (out / "config.json").is_file():
        raise RunStateError(f"{out} is a run folder (it has config.json); give a new folder for the {what}.")


def _check_run_dir(run_dir: Path, config: RunConfig, resume: bool) -> RunConfig | None:
    """Refuse a folder that holds another run, or results that would be overwritten without --resume; write nothing.
    Returns the config the folder was run with (None for a new folder). Only RESUMABLE settings may differ."""
    check_output(run_dir)
    saved = run_dir / "config.json"
    if not saved.is_file():
        if run_dir.exists() and any(run_dir.iterdir()):
            raise RunStateError(f"{run_dir} is not empty and holds no run; choose an empty or new --output folder.")
        return None
    try:
        previous = from_dict(json.loads(saved.read_text()))
    except Exception as exc:  # noqa: BLE001 - any unreadable config means "a different run"
        raise RunStateError(f"{saved} cannot be read ({exc}); choose another --output folder.") from None
    refused = {k: v for k, v in changes(previous, config).items() if not k.startswith(RESUMABLE)}
    if refused:
        raise RunStateError(
            f"{run_dir} holds a different run; its config.json differs in {describe(refused)}. Choose another "
            "--output folder, or set these back to resume it (only eval.batch_size and general.* may change)."
        )
    if not resume and (run_dir / "stages").exists():
        raise RunStateError(f"{run_dir} already has results of this run; pass --resume to continue it.")
    return previous


def _write_run_dir(run_dir: Path, config: RunConfig, previous: RunConfig | None, tasks: list[Task]) -> None:
    """Record the run's config and tasks, once settings, data and model have been checked. Changed general-ability
    settings drop the scores made with the old ones (recomputed when general.enabled)."""
    if previous is not None:
        remove_temporaries(run_dir)  # left by a process killed mid-write
        if previous.general != config.general:
            (run_dir / "general.json").unlink(missing_ok=True)
    write_json(run_dir / "config.json", config.to_dict())
    write_json(run_dir / "tasks.json", [task.name for task in tasks])


def _save_adapter(path: Path, model: PeftModel) -> None:
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for config in model.peft_config.values():
        if isinstance(config.target_modules, set):  # a set is saved in hash order, which changes between processes
            config.target_modules = sorted(config.target_modules)
        config.base_model_name_or_path = STAGE_ADAPTER_BASE
    model.save_pretrained(tmp, save_embedding_layers=False)  # the vocabulary is never resized; no base to compare
    (tmp / "README.md").write_text(STAGE_ADAPTER_README, encoding="utf-8")  # PEFT's card names the raw base model
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def _stage_adapter(model: torch.nn.Module, folder: Path) -> PeftModel:
    """A finished stage's trained adapter on `model`, whose weights become the adapter's base: W - s B0 A0 for
    absorbing inits (from the initial factors), W otherwise."""
    with peft_wrapping():
        peft_model = PeftModel.from_pretrained(model, folder / "adapter", is_trainable=False)
    if stage_absorbs(folder):
        absorb_factors(peft_model, load_file(str(folder / "init_factors.safetensors")))
    return peft_model


def rebuild_stage(model: torch.nn.Module, folder: Path, config: RunConfig) -> torch.nn.Module:
    """Replay a finished stage's weight change on `model`: W <- W - s B0 A0 (absorbing inits), then merge the
    trained adapter, with the same operations as the live run, so the result is bitwise the same."""
    return _stage_adapter(model, folder).merge_and_unload()


def stage_absorbs(folder: Path) -> bool:
    """Whether a finished stage's init was absorbed into the base weight (its init record says so; records written
    before it did are looked up by method)."""
    init = json.loads((folder / "init.json").read_text())
    return init["absorbs"] if "absorbs" in init else get_init(init["method"]).absorbs


def merged_model(run_dir: str | Path, stage: int) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """The run's model after its first `stage` stages (0: the base model), rebuilt from the run folder, and the
    tokenizer; float32 on the CPU."""
    run_dir = Path(run_dir)
    config = from_dict(json.loads((run_dir / "config.json").read_text()))
    model, tokenizer = load_model(config.model)
    for t in range(1, stage + 1):
        model = rebuild_stage(model, stage_dir(run_dir, t), config)
    return model, tokenizer


def stage_base_model(run_dir: str | Path, stage: int) -> torch.nn.Module:
    """The base onto which stage `stage`'s saved adapter loads (PeftModel.from_pretrained): the model merged up to
    stage-1, with this stage's initial factors absorbed (for absorbing inits)."""
    model, _ = merged_model(run_dir, stage - 1)
    return _stage_adapter(model, stage_dir(Path(run_dir), stage)).unload()


# --- the loop --------------------------------------------------------------------------------------------------

def run(
    config: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    base_general: dict | None = None,
    accelerator: Accelerator | None = None,
    on_stage: Callable[[int, torch.nn.Module], None] | None = None,
    shared: SharedWork | None = None,
) -> Path:
    """Run `config` into `run_dir` (or resume it there) and return the folder. `base_general` reuses the base
    model's general-ability scores computed elsewhere (e.g. by `compare`, once for every method). `on_stage(t,
    model)` is called with the merged model after each stage (e.g. to inspect or save it). `shared` (a study's
    store) lets stages and scores that another run already computed with the same key be copied, not recomputed."""
    run_dir = Path(run_dir)
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    main = accelerator.is_main_process
    shard = (accelerator.process_index, accelerator.num_processes)
    previous = _check_run_dir(run_dir, config, resume) if main else None
    accelerator.wait_for_everyone()

    sequence = load_sequence(config.sequence)
    data_dirs = search_dirs(config.data_dirs, config.data_only)
    tasks = [load_task(ref, data_dirs, heldout_size=config.eval.heldout_size, seed=config.seed,
                       allow_reasoning_variant=config.allow_reasoning_variant) for ref in sequence.tasks]
    for task in tasks if main else []:
        if len(task.heldout) < config.eval.examples:
            warnings.warn(f"task {task.name} holds out {len(task.heldout)} examples, fewer than eval.examples="
                          f"{config.eval.examples}: all {len(task.heldout)} are scored.", stacklevel=2)
    dtype = torch.bfloat16 if accelerator.device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    model, tokenizer = load_model(config.model, dtype=dtype, device=accelerator.device)
    check_against_model(config, model)
    methods = active_methods(config)
    for method in methods:
        method.check(model)
    if main:  # nothing is written before the settings, the data and the model have passed their checks
        _write_run_dir(run_dir, config, previous, tasks)
    key = model_key(config.model, model)
    general = _general(run_dir, config, model, tokenizer, "base", base_general, accelerator, shared, key)

    groups = stage_groups(tasks, config)
    for t, learn in enumerate(groups, start=1):
        folder, seen = stage_dir(run_dir, t), [task for group in groups[:t] for task in group]
        trained = (folder / "train.json").is_file()
        if trained:  # finished or trained earlier: replay its weight change, restore the CL methods' state
            model = rebuild_stage(model, folder, config)
            key = _read_key(folder)
            _load_cl_state(methods, folder)
        if (folder / "scores.json").is_file():
            continue
        timing = json.loads((folder / "timing.json").read_text()) if (folder / "timing.json").is_file() else {}
        if not trained:
            stage = Stage(t, learn, seen[:len(seen) - len(learn)])
            model, key, timing = _learn(model, tokenizer, stage, config, key, folder, accelerator, shared, methods)
        if on_stage is not None:
            on_stage(t, model)
        # 5. evaluate every task seen so far (or copy the scores of the same stage computed elsewhere)
        source = shared.find_stage(key) if shared is not None and key else None
        start = time.perf_counter()
        if source is None:
            generations, scores = _evaluate(model, tokenizer, seen, config, shard)
            broken = [name for name, loss in scores["losses"].items() if not math.isfinite(loss)]
            if broken:
                raise divergence(f"stage {t}: training diverged: the model it left gives non-finite losses on the "
                                 f"held-out examples of {', '.join(broken)}.", config.train)
        _fault_point(t, "eval")
        if main:
            if source is None:
                write_text(folder / "generations.jsonl",
                           "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in generations))
                write_json(folder / "scores.json", {"stage": t, "task": _label(learn), **scores})
            else:
                for name in ("generations.jsonl", "scores.json"):
                    write_with(folder / name, lambda p, name=name: shutil.copyfile(source / name, p))
            write_json(folder / "timing.json", {**timing, "eval": time.perf_counter() - start})
            if shared is not None and source is None:
                shared.publish_stage(key, folder)
            write_run_summary(run_dir)
        accelerator.wait_for_everyone()

    _general(run_dir, config, model, tokenizer, "final", general, accelerator, shared, key)
    if main:
        write_run_summary(run_dir)
    accelerator.wait_for_everyone()
    return run_dir


def _learn(model, tokenizer, stage: Stage, config: RunConfig, key: str | None, folder: Path,
           accelerator: Accelerator, shared: SharedWork | None,
           methods: list[ContinualMethod]) -> tuple[torch.nn.Module, str, dict]:
    """Steps 1-4 of a stage: a fresh adapter, its init, training with the continual-learning methods' hooks (or the
    adapter trained from this very state found in `shared`), the stage's files, the merge. Returns the merged model,
    the stage's key and the step times."""
    t, learn, past, main = stage.number, stage.learn, stage.past, accelerator.is_main_process
    seen = past + learn
    shard = (accelerator.process_index, accelerator.num_processes)
    start = time.perf_counter()
    # 1. a fresh adapter on the current merged model
    with peft_wrapping():
        peft_model = get_peft_model(model, lora_config(config, model))
    # 2. initialise it
    current, replay = init_batches(learn, past, config, tokenizer, t)
    subspaces = {name: u for method in methods for name, u in method.input_subspaces(stage).items()}
    report = init_adapter(peft_model, config.init.method, init_config(config, t, shared),
                          current=current[shard[0]::shard[1]], replay=replay[shard[0]::shard[1]] or None,
                          input_subspaces=subspaces or None)
    factors = adapter_factors(peft_model)
    keys = {"before": key, "after": key and stage_key(key, stage_settings(config), seen, t, factors,
                                                      report.absorbs)}
    source = shared.find_stage(keys["after"]) if shared is not None and key else None
    _fault_point(t, "init")
    timing = {"init": time.perf_counter() - start, "gradient_sets_from_cache": report.gradient_sets_from_cache,
              "shared": source is not None}
    start = time.perf_counter()
    # 3. train only the adapter (or take the adapter trained from this very state elsewhere)
    if source is None:
        curve = train_adapter(peft_model, tokenizer, training_examples(stage, config, methods), config.train,
                              accelerator, seed=config.seed + 1000 * t, desc=f"stage {t} train",
                              penalty=_summed_penalty(methods, peft_model) if methods else None)
        timing["train"] = curve.pop("seconds")
    else:
        set_peft_model_state_dict(peft_model, load_file(str(source / "adapter" / "adapter_model.safetensors")))
        curve = json.loads((source / "train.json").read_text())
        timing["train"] = time.perf_counter() - start
    for method in methods:
        method.after_stage(stage, trained_factors(peft_model))
    _fault_point(t, "train")
    if main:
        write_with(folder / "init_factors.safetensors", lambda p: save_file(factors, str(p)))
        record = {k: v for k, v in report.to_dict().items() if k not in RUN_DEPENDENT}
        write_json(folder / "init.json", {**record, "stage": t, "task": _label(learn), "tau": config.init.gate})
        write_json(folder / KEY_FILE, keys)
        if source is None:
            _save_adapter(folder / "adapter", peft_model)
        else:
            copy_tree(source / "adapter", folder / "adapter")
        write_json(folder / "timing.json", timing)
    # 4. merge, then the methods' last step on the merged model; their state and train.json (last: its presence
    # marks the stage as trained) complete the stage
    merged = peft_model.merge_and_unload()
    for method in methods:
        method.after_merge(stage, merged, tokenizer)
    if main:
        if methods:
            state = {f"{m.name}/{k}": v for m in methods for k, v in m.state_dict().items()}
            write_with(folder / CL_STATE, lambda p: save_file(state, str(p), metadata={"methods": _names(methods)}))
        write_json(folder / "train.json", curve)
    accelerator.wait_for_everyone()
    return merged, keys["after"], timing


def _summed_penalty(methods: list[ContinualMethod], model: PeftModel) -> Callable[[], torch.Tensor | None]:
    """The sum of the methods' loss terms on the live adapter (None when none of them adds one)."""
    def total() -> torch.Tensor | None:
        terms = [term for term in (m.penalty(model) for m in methods) if term is not None]
        return torch.stack(terms).sum() if terms else None
    return total


def trained_factors(model: PeftModel) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Canonical layer name -> (A, B) of the adapter as trained, before the merge."""
    return {canonical_name(name): (module.lora_A["default"].weight.detach(), module.lora_B["default"].weight.detach())
            for name, module in model.named_modules() if "default" in getattr(module, "lora_A", {})}


def _names(methods: list[ContinualMethod]) -> str:
    return ",".join(m.name for m in methods)


def _load_cl_state(methods: list[ContinualMethod], folder: Path) -> None:
    """Restore the methods' state as it was after a finished stage (nothing to do without methods)."""
    if not methods:
        return
    path = folder / CL_STATE
    if not path.is_file():
        raise RunStateError(f"{path} is missing: this stage was trained without the continual-learning methods "
                            f"{_names(methods)}; resume with the settings it was run with, or start a new run.")
    state = load_file(str(path))
    for method in methods:
        prefix = f"{method.name}/"
        method.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})


def _evaluate(model, tokenizer, seen: list[Task], config: RunConfig, shard: tuple[int, int]) -> tuple[list, dict]:
    """Every seen task's scored examples: greedy generations with their scores, and the reference answer's per-token
    NLL under teacher forcing (the continuous companion of the score, computed from generation's own prompt pass).
    Returns the records and scores.json's fields."""
    generations, scores, losses, truncated = [], {}, {}, {}
    for task in seen:
        metric = task.metric if config.eval.scoring == "paper" else task.native_metric
        records = evaluate_task(model, tokenizer, task, examples=config.eval.examples, metric=metric,
                                max_new_tokens=config.eval.max_new_tokens, batch_size=config.eval.batch_size,
                                max_prompt_length=config.train.max_length, shard=shard)
        records = sorted(gather_object(records) if shard[1] > 1 else records, key=lambda r: r["index"])
        scores[task.name] = sum(r["score"] for r in records) / len(records)
        losses[task.name] = sum(r["nll"] for r in records) / len(records)
        truncated[task.name] = sum(r["prompt_truncated"] for r in records)
        generations += records
    return generations, {"scores": scores, "losses": losses, "truncated_prompts": truncated}


def _label(learn: list[Task]) -> str:
    return " & ".join(task.name for task in learn)


def _read_key(folder: Path) -> str | None:
    """A finished stage's key (None for stages written before keys existed: no sharing after them)."""
    path = folder / KEY_FILE
    return json.loads(path.read_text())["after"] if path.is_file() else None


def stage_settings(config: RunConfig) -> dict:
    """The settings a stage's results depend on besides its initial factors and tasks (see sharing.stage_key)."""
    return {k: v for k, v in config.to_dict().items() if k not in ("init", "general", "sequence")}


def _general(run_dir: Path, config: RunConfig, model, tokenizer, which: str, known: dict | None, accelerator,
             shared: SharedWork | None, key: str | None) -> dict:
    """GP/IP scores of the base model ("base") or after the last stage ("final"), kept in general.json; taken from
    `known` (base only) or from `shared` when the same model was scored there with the same settings."""
    path = run_dir / "general.json"
    general = json.loads(path.read_text()) if path.is_file() else {}
    if which == "base" and known and "base" in known:
        general["base"] = known["base"]
    g = config.general
    share_key = general_key(key, {**asdict(g), "seed": config.seed}) if shared is not None and key else None
    found = shared.find_general(share_key) if config.general.enabled and which not in general and share_key else None
    if found:
        general[which] = found
    if not config.general.enabled or which in general:
        if accelerator.is_main_process and general:
            write_json(path, general)
        return general
    if accelerator.is_main_process:
        general[which] = general_scores(model, tokenizer, GeneralConfig(
            limit=g.limit, shots=g.shots, seed=config.seed, batch_size=g.batch_size, max_length=g.max_length,
            benchmarks=tuple(g.benchmarks)))
        write_json(path, general)
        if share_key:
            shared.publish_general(share_key, general[which])
    accelerator.wait_for_everyone()
    return general
