"""The continual-learning stage loop, top to bottom (docs/method.md, "Protocol"):

    for each task T_t of the sequence:
        1. add a fresh adapter to the current (merged) model: LoRA, or PEFT's OSF (adapter.type, loop/adapters.py)
        2. start it: a registered LoRA init (SLICE and CorDA also read a replay buffer of past tasks);
           OSF's SVD split, keeping a growing fraction of every layer's top singular directions
        3. train only the adapter on T_t
        4. merge it into the weights
        5. evaluate every task seen so far -> row t of R (scores) and of R_loss (answer NLL)

After every stage the run folder gets, atomically: the init diagnostics and initial factors (OSF: the preserved
ranks), the stage's key, the trained adapter (PEFT format), the loss curve, every generation with its score and
answer NLL, the R row, and the wall time of each step (timing.json, the only file that differs between two runs of
the same config); the layout is runfolder.py's. `run` below is the loop itself, one function per step.
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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from ..data.sequences import load_sequence
from ..data.tasks import Example, Task, load_task, search_dirs
from ..errors import RunStateError
from ..eval.general import GeneralConfig, general_scores
from ..eval.scoring import load_metric
from ..eval.tasks import evaluate_task
from ..init import absorb_factors, adapter_factors, get_init
from ..io import remove_temporaries, write_json, write_text, write_with
from ..models import load_model, peft_wrapping
from .adapters import ADAPTERS, Start, StageAdapter
from .config import RESUMABLE, RunConfig, changes, check_against_model, describe, from_dict
from .continual import ContinualMethod, Stage, active_methods
from .runfolder import (ADAPTER_DIR, ADAPTER_WEIGHTS, CL_STATE_FILE, CONFIG_FILE, FACTORS_FILE, GENERAL_FILE,
                        GENERATIONS_FILE, INIT_FILE, KEY_FILE, SCORES_FILE, STAGES_DIR, TASKS_FILE, TIMING_FILE,
                        TRAIN_FILE, is_run_folder, stage_dir, write_run_summary)
from .sharing import SharedWork, copy_tree, general_key, model_key, stage_key
from .tracking import Tracker
from .train import TOKEN_MEAN, divergence, train_adapter

# A stage adapter's base_model_name_or_path: it fits no saved model (see each kind's readme in adapters.py), so it
# names none and AutoPeftModelForCausalLM fails loudly, quoting this text, instead of loading onto the wrong weights.
STAGE_ADAPTER_BASE = "not a path: a slicelora stage adapter fits the run's model before this stage, see README.md"


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


# --- run folder ------------------------------------------------------------------------------------------------

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
    if is_run_folder(out):
        raise RunStateError(f"{out} is a run folder (it has {CONFIG_FILE}); give a new folder for the {what}.")


def _check_run_dir(run_dir: Path, config: RunConfig, resume: bool) -> RunConfig | None:
    """Refuse a folder that holds another run, or results that would be overwritten without --resume; write nothing.
    Returns the config the folder was run with (None for a new folder). Only RESUMABLE settings may differ."""
    check_output(run_dir)
    saved = run_dir / CONFIG_FILE
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
    if not resume and (run_dir / STAGES_DIR).exists():
        raise RunStateError(f"{run_dir} already has results of this run; pass --resume to continue it.")
    return previous


def _write_run_dir(run_dir: Path, config: RunConfig, previous: RunConfig | None, tasks: list[Task]) -> None:
    """Record the run's config and tasks, once settings, data and model have been checked. Changed general-ability
    settings drop the scores made with the old ones (recomputed when general.enabled)."""
    if previous is not None:
        remove_temporaries(run_dir)  # left by a process killed mid-write
        if previous.general != config.general:
            (run_dir / GENERAL_FILE).unlink(missing_ok=True)
    write_json(run_dir / CONFIG_FILE, config.to_dict())
    write_json(run_dir / TASKS_FILE, [task.name for task in tasks])


def _save_adapter(path: Path, model: PeftModel, readme: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for config in model.peft_config.values():
        if isinstance(config.target_modules, set):  # a set is saved in hash order, which changes between processes
            config.target_modules = sorted(config.target_modules)
        config.base_model_name_or_path = STAGE_ADAPTER_BASE
    model.save_pretrained(tmp, save_embedding_layers=False)  # the vocabulary is never resized; no base to compare
    (tmp / "README.md").write_text(readme, encoding="utf-8")  # PEFT's card names the raw base model
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def _stage_adapter(model: torch.nn.Module, folder: Path) -> PeftModel:
    """A finished stage's trained adapter on `model`, whose weights become the adapter's base: W - s B0 A0 for
    absorbing inits (from the initial factors), W otherwise."""
    with peft_wrapping():
        peft_model = PeftModel.from_pretrained(model, folder / ADAPTER_DIR, is_trainable=False)
    if stage_absorbs(folder):
        absorb_factors(peft_model, load_file(str(folder / FACTORS_FILE)))
    return peft_model


def rebuild_stage(model: torch.nn.Module, folder: Path, config: RunConfig) -> torch.nn.Module:
    """Replay a finished stage's weight change on `model`: W <- W - s B0 A0 (absorbing inits), then merge the
    trained adapter, with the same operations as the live run, so the result is bitwise the same."""
    return _stage_adapter(model, folder).merge_and_unload()


def stage_absorbs(folder: Path) -> bool:
    """Whether a finished stage's init was absorbed into the base weight (its init record says so; records written
    before it did are looked up by method)."""
    init = json.loads((folder / INIT_FILE).read_text())
    return init["absorbs"] if "absorbs" in init else get_init(init["method"]).absorbs


def merged_model(run_dir: str | Path, stage: int) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """The run's model after its first `stage` stages (0: the base model), rebuilt from the run folder, and the
    tokenizer; float32 on the CPU."""
    run_dir = Path(run_dir)
    config = from_dict(json.loads((run_dir / CONFIG_FILE).read_text()))
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

@dataclass(frozen=True)
class _Run:
    """What every step of a run uses: its settings and folder, the tokenizer, the processes, the stage adapter's
    kind, the continual-learning methods and the shared store (None outside studies)."""

    config: RunConfig
    dir: Path
    tokenizer: PreTrainedTokenizerBase
    accelerator: Accelerator
    adapter: StageAdapter
    methods: list[ContinualMethod]
    shared: SharedWork | None
    tracker: Tracker

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def shard(self) -> tuple[int, int]:
        return self.accelerator.process_index, self.accelerator.num_processes


@dataclass(frozen=True)
class _Init:
    """Step 2's outcome: how the adapter started, the stage's keys before and after it, and a finished stage with the
    same key in the shared store (None: train here)."""

    start: Start
    keys: dict[str, str | None]
    source: Path | None


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
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    ctx, tasks, model = _prepare(config, Path(run_dir), resume, accelerator, shared)
    key = model_key(config.model, model)
    general = _general(ctx, model, "base", base_general, key)
    for stage in _stages(tasks, config):
        folder = stage_dir(ctx.dir, stage.number)
        trained = (folder / TRAIN_FILE).is_file()
        if trained:  # resumed: the stage's weight change and the methods' state after it, from its files
            model, key = _resume_stage(ctx, model, folder)
        if (folder / SCORES_FILE).is_file():
            continue
        timing = json.loads((folder / TIMING_FILE).read_text()) if (folder / TIMING_FILE).is_file() else {}
        if not trained:
            start = time.perf_counter()
            adapter = _fresh_adapter(ctx, model, stage)                                         # 1.
            init = _initialise(ctx, adapter, stage, key)                                        # 2.
            timing = {"init": time.perf_counter() - start,
                      "gradient_sets_from_cache": init.start.cached,
                      "shared": init.source is not None}
            curve, timing["train"] = _train(ctx, adapter, stage, init.source)                   # 3.
            _save_trained(ctx, folder, stage, adapter, init, timing)
            model, key = _merge(ctx, adapter, stage, folder, curve), init.keys["after"]         # 4.
        if on_stage is not None:
            on_stage(stage.number, model)
        _evaluate(ctx, model, stage, folder, key, timing)                                       # 5.
        ctx.tracker.log_stage(stage.number)
    _general(ctx, model, "final", general, key)
    ctx.tracker.close()
    if ctx.main:
        write_run_summary(ctx.dir)
    accelerator.wait_for_everyone()
    return ctx.dir


def _prepare(config: RunConfig, run_dir: Path, resume: bool, accelerator: Accelerator,
             shared: SharedWork | None) -> tuple[_Run, list[Task], torch.nn.Module]:
    """Check the folder, load the tasks and the model and check the settings and the methods against them; only
    then record the run's config and tasks. Returns the run's context, its tasks and the base model."""
    main = accelerator.is_main_process
    previous = _check_run_dir(run_dir, config, resume) if main else None
    accelerator.wait_for_everyone()
    sequence = load_sequence(config.sequence)
    data_dirs = search_dirs(config.data_dirs, config.data_only)
    tasks = [load_task(ref, data_dirs, heldout_size=config.eval.heldout_size, seed=config.seed,
                       allow_reasoning_variant=config.allow_reasoning_variant) for ref in sequence.tasks]
    for task in tasks:  # before any training: a metric that cannot be loaded (xlingual ROUGE-L's tokenizer) stops here
        load_metric(task.metric if config.eval.scoring == "paper" else task.native_metric)
    adapter = ADAPTERS[config.adapter.type](config, len(stage_groups(tasks, config)))
    for task in tasks if main else []:
        if len(task.heldout) < config.eval.examples:
            warnings.warn(f"task {task.name} holds out {len(task.heldout)} examples, fewer than eval.examples="
                          f"{config.eval.examples}: all {len(task.heldout)} are scored.", stacklevel=3)
    dtype = torch.bfloat16 if accelerator.device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    model, tokenizer = load_model(config.model, dtype=dtype, device=accelerator.device)
    check_against_model(config, model)
    adapter.check(model)
    methods = active_methods(config)
    for method in methods:
        method.check(model)
    if main:  # nothing is written before the settings, the data and the model have passed their checks
        _write_run_dir(run_dir, config, previous, tasks)
    tracker = Tracker(run_dir, config, enabled=main)
    return _Run(config, run_dir, tokenizer, accelerator, adapter, methods, shared, tracker), tasks, model


def _stages(tasks: list[Task], config: RunConfig) -> list[Stage]:
    """The run's stages, each with the tasks it learns and those learned before it."""
    groups = stage_groups(tasks, config)
    return [Stage(t, learn, [task for group in groups[:t - 1] for task in group])
            for t, learn in enumerate(groups, start=1)]


def _resume_stage(ctx: _Run, model: torch.nn.Module, folder: Path) -> tuple[torch.nn.Module, str | None]:
    """A stage trained earlier: its weight change replayed on `model`, its key, and the methods' state after it."""
    curve = json.loads((folder / TRAIN_FILE).read_text())
    if ctx.main and ctx.config.train.grad_accum > 1 and curve.get("loss") != TOKEN_MEAN:
        warnings.warn(f"{folder} was trained by an earlier version, whose loss with train.grad_accum="
                      f"{ctx.config.train.grad_accum} was a mean of the micro-batches' means; the stages still to run "
                      "use the mean over all of a step's tokens. Rerun into a new folder for one loss throughout.",
                      stacklevel=3)
    model = rebuild_stage(model, folder, ctx.config)
    key = _read_key(folder)
    _load_cl_state(ctx.methods, folder)
    return model, key


def _fresh_adapter(ctx: _Run, model: torch.nn.Module, stage: Stage) -> PeftModel:
    """1. A fresh adapter of the run's kind on the current merged model."""
    return ctx.adapter.wrap(model, stage.number)


def _initialise(ctx: _Run, model: PeftModel, stage: Stage, key: str | None) -> _Init:
    """2. Start the adapter (a LoRA init runs on this process's share of its batches, the methods naming the input
    directions it must not read), then look up the stage's key in the shared store."""
    start = ctx.adapter.start(model, stage, tokenizer=ctx.tokenizer, shard=ctx.shard, methods=ctx.methods,
                              shared=ctx.shared)
    after = key and stage_key(key, stage_settings(ctx.config), stage.past + stage.learn, stage.number,
                              start.factors, start.absorbs)
    source = ctx.shared.find_stage(after) if ctx.shared is not None and key else None
    _fault_point(stage.number, "init")
    return _Init(start, {"before": key, "after": after}, source)


def _train(ctx: _Run, model: PeftModel, stage: Stage, source: Path | None) -> tuple[dict, float]:
    """3. Train only the adapter, with the methods' examples and loss terms (or take the adapter trained from this
    very state in `source`); the methods then see the trained factors. Returns the loss curve and the seconds."""
    start = time.perf_counter()
    if source is None:
        config, methods, t = ctx.config, ctx.methods, stage.number
        curve = train_adapter(model, ctx.tokenizer, training_examples(stage, config, methods), config.train,
                              ctx.accelerator, seed=config.seed + 1000 * t, desc=f"stage {t} train",
                              penalty=_summed_penalty(methods, model) if methods else None)
        seconds = curve.pop("seconds")
    else:
        set_peft_model_state_dict(model, load_file(str(source / ADAPTER_DIR / ADAPTER_WEIGHTS)))
        curve = json.loads((source / TRAIN_FILE).read_text())
        seconds = time.perf_counter() - start
    for method in ctx.methods:
        method.after_stage(stage, adapter_factors(model))
    _fault_point(stage.number, "train")
    return curve, seconds


def _save_trained(ctx: _Run, folder: Path, stage: Stage, model: PeftModel, init: _Init, timing: dict) -> None:
    """The stage's files once trained, but for the methods' state and train.json (after the merge)."""
    if not ctx.main:
        return
    write_with(folder / FACTORS_FILE, lambda p: save_file(init.start.factors, str(p)))
    write_json(folder / INIT_FILE, {**init.start.record, "stage": stage.number, "task": _label(stage.learn)})
    write_json(folder / KEY_FILE, init.keys)
    if init.source is None:
        _save_adapter(folder / ADAPTER_DIR, model, ctx.adapter.readme)
    else:
        copy_tree(init.source / ADAPTER_DIR, folder / ADAPTER_DIR)
    write_json(folder / TIMING_FILE, timing)


def _merge(ctx: _Run, model: PeftModel, stage: Stage, folder: Path, curve: dict) -> torch.nn.Module:
    """4. Merge the adapter into the weights; the methods take their last step on the merged model. Their state,
    then train.json (its presence marks the stage trained), complete the stage's training files."""
    merged = model.merge_and_unload()
    for method in ctx.methods:
        method.after_merge(stage, merged, ctx.tokenizer)
    if ctx.main:
        if ctx.methods:
            state = {f"{m.name}/{k}": v for m in ctx.methods for k, v in m.state_dict().items()}
            write_with(folder / CL_STATE_FILE,
                       lambda p: save_file(state, str(p), metadata={"methods": _names(ctx.methods)}))
        write_json(folder / TRAIN_FILE, curve)
    ctx.accelerator.wait_for_everyone()
    return merged


def _evaluate(ctx: _Run, model: torch.nn.Module, stage: Stage, folder: Path, key: str | None, timing: dict) -> None:
    """5. Evaluate every task seen so far (or copy the results of the stage with the same key computed elsewhere):
    the generations, the stage's row of R and R_loss (scores.json: its presence marks the stage finished), the step
    times and the run's summary."""
    source = ctx.shared.find_stage(key) if ctx.shared is not None and key else None
    start = time.perf_counter()
    if source is None:
        generations, scores = _score_seen(model, ctx.tokenizer, stage.past + stage.learn, ctx.config, ctx.shard)
        broken = [name for name, loss in scores["losses"].items() if not math.isfinite(loss)]
        if broken:
            raise divergence(f"stage {stage.number}: training diverged: the model it left gives non-finite losses on "
                             f"the held-out examples of {', '.join(broken)}.", ctx.config.train)
    _fault_point(stage.number, "eval")
    if ctx.main:
        if source is None:
            write_text(folder / GENERATIONS_FILE,
                       "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in generations))
            write_json(folder / SCORES_FILE, {"stage": stage.number, "task": _label(stage.learn), **scores})
        else:
            for name in (GENERATIONS_FILE, SCORES_FILE):
                write_with(folder / name, lambda p, name=name: shutil.copyfile(source / name, p))
        write_json(folder / TIMING_FILE, {**timing, "eval": time.perf_counter() - start})
        if ctx.shared is not None and source is None:
            ctx.shared.publish_stage(key, folder)
        write_run_summary(ctx.dir)
    ctx.accelerator.wait_for_everyone()


def _summed_penalty(methods: list[ContinualMethod], model: PeftModel) -> Callable[[], torch.Tensor | None]:
    """The sum of the methods' loss terms on the live adapter (None when none of them adds one)."""
    def total() -> torch.Tensor | None:
        terms = [term for term in (m.penalty(model) for m in methods) if term is not None]
        return torch.stack(terms).sum() if terms else None
    return total


def _names(methods: list[ContinualMethod]) -> str:
    return ",".join(m.name for m in methods)


def _load_cl_state(methods: list[ContinualMethod], folder: Path) -> None:
    """Restore the methods' state as it was after a finished stage (nothing to do without methods)."""
    if not methods:
        return
    path = folder / CL_STATE_FILE
    if not path.is_file():
        raise RunStateError(f"{path} is missing: this stage was trained without the continual-learning methods "
                            f"{_names(methods)}; resume with the settings it was run with, or start a new run.")
    state = load_file(str(path))
    for method in methods:
        prefix = f"{method.name}/"
        method.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})


def _score_seen(model, tokenizer, seen: list[Task], config: RunConfig, shard: tuple[int, int]) -> tuple[list, dict]:
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
    """The settings a stage's results depend on besides its start's tensors and tasks (see sharing.stage_key): the
    start's own settings (init.*, osf.*, adapter.type) act through those tensors only (LoRA's are factors, OSF's
    kept ranks). With several micro-batches per step the training loss is the token mean (`TOKEN_MEAN`), which
    earlier versions did not compute: such stages get keys of their own."""
    settings = {k: v for k, v in config.to_dict().items() if k not in ("init", "osf", "general", "sequence", "track")}
    settings["adapter"] = {k: v for k, v in settings["adapter"].items() if k != "type"}
    if config.train.grad_accum > 1:
        settings["train"] = {**settings["train"], "loss": TOKEN_MEAN}
    return settings


def _general(ctx: _Run, model: torch.nn.Module, which: str, known: dict | None, key: str | None) -> dict:
    """GP/IP scores of the base model ("base") or after the last stage ("final"), kept in general.json; taken from
    `known` (base only) or from `shared` when the same model was scored there with the same settings."""
    config, shared = ctx.config, ctx.shared
    path = ctx.dir / GENERAL_FILE
    general = json.loads(path.read_text()) if path.is_file() else {}
    if which == "base" and known and "base" in known:
        general["base"] = known["base"]
    g = config.general
    settings = {k: v for k, v in asdict(g).items() if not (k == "backend" and v == "native")}  # keys as before it
    share_key = general_key(key, {**settings, "seed": config.seed}) if shared is not None and key else None
    found = shared.find_general(share_key) if config.general.enabled and which not in general and share_key else None
    if found:
        general[which] = found
    if not config.general.enabled or which in general:
        if ctx.main and general:
            write_json(path, general)
        return general
    if ctx.main:
        general[which] = general_scores(model, ctx.tokenizer, GeneralConfig(
            limit=g.limit, shots=g.shots, seed=config.seed, batch_size=g.batch_size, max_length=g.max_length,
            benchmarks=tuple(g.benchmarks), backend=g.backend))
        write_json(path, general)
        if share_key:
            shared.publish_general(share_key, general[which])
    ctx.accelerator.wait_for_everyone()
    return general
