"""The stage adapter: which PEFT adapter every stage adds to the merged model and how it starts (`adapter.type`).

    lora   a LoRA adapter (adapter.rank, alpha, dropout) set by a registered init (init.*); the continual-learning
           methods may name input directions its A must not read
    osf    PEFT's OSF (orthogonal subspace fine-tuning): every target weight is split by SVD into its top singular
           directions, kept as they are, and the rest, which is trained with gradients projected off the kept ones;
           the kept fraction grows from stage to stage (osf.*)

This module is the one place that knows the kinds. The stage loop asks the run's kind to make the stage's adapter
(`wrap`) and to start it (`start`: init.json's record and the tensors the start depends on beyond the weights, which
the stage's key hashes); the run config asks it which settings it reads and which combinations it refuses; the
planner, the run folder's labels and the export ask it the rest. Training, merging, saving, resuming and scoring are
the same for every kind: PEFT's adapter does the work.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from peft import LoraConfig, OSFConfig, PeftModel, get_peft_model
from peft.tuners.osf import OSFLayer

from ..data.prompts import make_batches
from ..data.tasks import Task
from ..errors import ConfigError
from ..init import InitConfig, InitReport, adapter_factors, get_init, init_adapter
from ..init.gradients import canonical_name, is_transposed, target_layers
from ..init.registry import Data, settings_of
from ..models import peft_wrapping, resolve_targets
from .continual import CL_METHODS, ContinualMethod, Stage, replay_buffer

if TYPE_CHECKING:  # the run config names the registered kinds, so it imports this module
    from .config import InitSection, RunConfig
    from .sharing import SharedWork

LORA = "lora"  # the kind of runs written before adapter types existed
# InitReport fields that depend on how this run got there (timing, the cache): timing.json, not init.json
RUN_DEPENDENT = ("seconds", "gradients_from_cache", "gradient_sets_from_cache")


@dataclass(frozen=True)
class Start:
    """How a stage's adapter started: init.json's record (but for the stage and its task), the tensors its start
    depends on beyond the merged weights (init_factors.safetensors, hashed into the stage's key), whether the base
    weight took part of it (a resumed stage replays that), and the gradient sets read from the cache."""

    record: dict[str, Any]
    factors: dict[str, torch.Tensor]
    absorbs: bool = False
    cached: list[str] = field(default_factory=list)


class StageAdapter(ABC):
    """One kind of stage adapter, made for one run of `stages` stages."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""  # the name as written in prose (LoRA, OSF)
    # dotted keys, or section prefixes ending in ".", that only this kind reads
    settings: ClassVar[tuple[str, ...]] = ()
    summary: ClassVar[str] = ""  # what it trains, in a few words (messages, model cards)
    readme: ClassVar[str] = ""  # README.md of a saved stage adapter

    def __init__(self, config: RunConfig, stages: int) -> None:
        self.config = config
        self.stages = stages

    @classmethod
    def check_config(cls, config: RunConfig) -> None:
        """Refuse settings that cannot work with this kind, before any data or model is loaded."""
        return None

    def check(self, model: torch.nn.Module) -> None:
        """Refuse what only the loaded model tells, before any work."""
        return None

    @abstractmethod
    def wrap(self, model: torch.nn.Module, stage: int) -> PeftModel:
        """A fresh adapter of this kind on every target layer of the merged model, for stage `stage`."""

    @abstractmethod
    def start(self, model: PeftModel, stage: Stage, *, tokenizer, shard: tuple[int, int],
              methods: list[ContinualMethod], shared: SharedWork | None) -> Start:
        """Start the stage's adapter (this process's share of the work under `shard` = (rank, world))."""

    @property
    def data(self) -> Data:
        """The batches the start reads (init.registry's Data)."""
        return "none"

    @property
    def uses_replay(self) -> bool:
        """Whether the start reads batches of past tasks (from stage 2 on)."""
        return False

    @abstractmethod
    def signature(self, stage: int) -> tuple:
        """What the start of stage `stage` depends on besides the model, from the settings alone (the planner's
        prediction of which stages cells share)."""

    @classmethod
    @abstractmethod
    def describe(cls, config: Mapping[str, Any]) -> str:
        """The adapters of a run (its config.json) in a few words, for model cards."""


ADAPTERS: dict[str, type[StageAdapter]] = {}


def register_adapter(cls: type[StageAdapter]) -> type[StageAdapter]:
    """Make a kind selectable as `adapter.type: <cls.name>`."""
    if not cls.name or cls.name in ADAPTERS:
        raise ConfigError(f"a stage adapter kind needs a new, non-empty name: {cls.name!r}.")
    ADAPTERS[cls.name] = cls
    return cls


def adapter_names() -> tuple[str, ...]:
    return tuple(ADAPTERS)


def reads(kind: type[StageAdapter], key: str) -> bool:
    """Whether `key` (dotted) is one of the settings only `kind` reads."""
    return any(key == s or (s.endswith(".") and key.startswith(s)) for s in kind.settings)


def _setting(config: Mapping[str, Any], key: str) -> Any:
    """A dotted key of a run config held as a dict, nested (config.json) or flat (a study's overrides)."""
    if key in config:
        return config[key]
    section, _, name = key.partition(".")
    inner = config.get(section)
    return inner.get(name) if isinstance(inner, Mapping) else None


def kind_of(config: Mapping[str, Any]) -> type[StageAdapter]:
    """The kind a run config (as a dict) selects; LoRA when it names none."""
    name = _setting(config, "adapter.type") or LORA
    if not isinstance(name, str) or name not in ADAPTERS:
        raise ConfigError(f"adapter.type={name!r}; choose one of {', '.join(ADAPTERS)}.")
    return ADAPTERS[name]


def method_name(config: Mapping[str, Any]) -> str | None:
    """A run's name in tables and plots: its init method for LoRA runs, its adapter type otherwise (None when a
    LoRA config names no init)."""
    kind = kind_of(config)
    return _setting(config, "init.method") if kind.name == LORA else kind.name


def method_overrides(name: str) -> list[str]:
    """The settings that select a method by its name (`run --method`, `compare --methods`): an adapter type other
    than LoRA, or a registered LoRA init."""
    if name in ADAPTERS and name != LORA:
        return [f"adapter.type={name}"]
    return [f"adapter.type={LORA}", f"init.method={name}"]


# --- LoRA --------------------------------------------------------------------------------------------------------

def library_init_config(section: InitSection, **decided: Any) -> InitConfig:
    """The init library's InitConfig from the run config's init section (every field the two share; one source
    for their names, types and defaults), with the values the loop decides (`decided`: seed, targets, ...)."""
    shared = {f.name: getattr(section, f.name) for f in fields(InitConfig) if hasattr(section, f.name)}
    return InitConfig(**{**shared, **decided})


def init_config(config: RunConfig, stage: int, shared: SharedWork | None = None) -> InitConfig:
    """The init library's settings for stage `stage`: every field the run config's init section shares with
    InitConfig, plus what the loop decides: the seed, the targets, gradient checkpointing as in training, gradient
    passes under bf16 autocast when training uses it (init.autocast), and the shared store's gradient cache."""
    return library_init_config(
        config.init, seed=config.seed + stage, targets=tuple(config.adapter.targets),
        gradient_checkpointing=config.train.gradient_checkpointing, autocast=config.init.autocast and config.train.bf16,
        gradient_cache_dir=shared.gradient_cache() if shared is not None else None)


def init_batches(learn: list[Task], past: list[Task], config: RunConfig, tokenizer, stage: int):
    """The init's batches, as its method needs them: S of the current task(s), and for methods that read replay
    batches (SLICE, CorDA) S per past task (each_task) or S in all (all_tasks)."""
    cfg = config.init
    method = get_init(cfg.method)
    if method.data == "none":
        return [], []
    kw = dict(tokenizer=tokenizer, batch_size=cfg.batch_size, max_length=config.train.max_length,
              loss_on=cfg.loss_on, seed=config.seed + stage, num_batches=cfg.batches)
    current = make_batches([ex for task in learn for ex in task.train], **kw)
    if not method.uses_replay or not past:
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


class LoRAAdapter(StageAdapter):
    """A LoRA adapter per stage, set by the registered init `init.method` (with the methods' input subspaces)."""

    name = LORA
    title = "LoRA"
    settings = ("adapter.rank", "adapter.alpha", "adapter.dropout", "init.")
    summary = "a LoRA adapter per stage (adapter.rank, alpha, dropout), initialised by init.method"
    readme = """# A slicelora stage adapter

This LoRA adapter (PEFT format) is one stage of a slicelora run. It fits no model saved anywhere: its base is the
run's model merged up to the previous stage, and for absorbing inits (init.json: "absorbs": true) with this stage's
initial factors subtracted (W - s B0 A0, from init_factors.safetensors). So `base_model_name_or_path` names no model.

- Rebuild its base in Python: `slicelora.loop.stages.stage_base_model(run_folder, stage)`, then
  `PeftModel.from_pretrained(base, this_folder)`.
- Or export standard folders: `slicelora export RUN --stage t --merged DIR` (the model after the stage) or
  `--adapter DIR` (the stage's change as a LoRA adapter on the exported model of the previous stage).
"""

    def check(self, model: torch.nn.Module) -> None:
        """adapter.rank fits the smallest target layer (2 * rank for LoRA-GA's reference and peft variants)."""
        config = self.config
        layers = target_layers(model, resolve_targets(model, config.adapter.targets))
        name, layer = min(layers.items(), key=lambda item: min(item[1].weight.shape))
        limit = min(layer.weight.shape)
        if config.init.method == "lora_ga" and config.init.lora_ga_variant != "paper":
            limit //= 2  # these variants take the singular vectors r..2r of the gradient
        if config.adapter.rank > limit:
            raise ConfigError(f"adapter.rank={config.adapter.rank} is too large for model {config.model}: layer "
                              f"{name!r} is {tuple(layer.weight.shape)}, so adapter.rank must be <= {limit}. Lower "
                              "adapter.rank.")

    def wrap(self, model: torch.nn.Module, stage: int) -> PeftModel:
        with peft_wrapping():
            return get_peft_model(model, lora_config(self.config, model))

    def start(self, model: PeftModel, stage: Stage, *, tokenizer, shard: tuple[int, int],
              methods: list[ContinualMethod], shared: SharedWork | None) -> Start:
        """The init on this process's share of its batches; the methods name the input directions A must not read."""
        config, (rank, world) = self.config, shard
        current, replay = init_batches(stage.learn, stage.past, config, tokenizer, stage.number)
        subspaces = {name: u for method in methods for name, u in method.input_subspaces(stage).items()}
        report = init_adapter(model, config.init.method, init_config(config, stage.number, shared),
                              current=current[rank::world], replay=replay[rank::world] or None,
                              input_subspaces=subspaces or None)
        record = {k: v for k, v in report.to_dict().items() if k not in RUN_DEPENDENT}
        return Start({**record, "tau": config.init.gate}, adapter_factors(model), report.absorbs,
                     report.gradient_sets_from_cache)

    @property
    def data(self) -> Data:
        return get_init(self.config.init.method).data

    @property
    def uses_replay(self) -> bool:
        return get_init(self.config.init.method).uses_replay

    def signature(self, stage: int) -> tuple:
        """The method's settings and, for methods with data, how its gradient batches are made (replay ones only
        from stage 2, the first stage having no past tasks)."""
        c, spec = self.config.init, get_init(self.config.init.method)
        replay = spec.uses_replay and stage > 1
        out = (c.method, sorted(settings_of(spec, init_config(self.config, stage), combined=replay).items()))
        if spec.data != "none":
            out += ((c.batches, c.batch_size, c.loss_on, c.autocast),)
        if replay:
            out += ((c.replay_buffer, c.replay_batching),)
        return out

    @classmethod
    def describe(cls, config: Mapping[str, Any]) -> str:
        return f"LoRA adapters initialised by `{_setting(config, 'init.method')}`"


# --- OSF ---------------------------------------------------------------------------------------------------------

class OSFAdapter(StageAdapter):
    """PEFT's OSF per stage: stage t keeps each target layer's top k_t singular directions of the merged weight and
    trains the rest, with gradients projected off the kept ones. k_t = the fraction f_t = osf.preserve +
    (t - 1) * osf.preserve_step (default step (1 - osf.preserve) / stages: PEFT's progressive budget) of
    min(d_out, d_in), rounded down and kept between 1 (PEFT keeps at least one) and min(d_out, d_in) - 1."""

    name = "osf"
    title = "OSF"
    settings = ("osf.",)
    summary = ("PEFT's OSF (orthogonal subspace fine-tuning), which starts from the SVD of the weights and has no "
               "LoRA factors to initialise")
    readme = """# A slicelora stage adapter (OSF)

This OSF adapter (PEFT format, orthogonal subspace fine-tuning) is one stage of a slicelora run. It fits no model
saved anywhere: its base is the run's model merged up to the previous stage, and PEFT recomputes the SVD split of
those very weights when it loads the adapter (each layer's preserved rank is in adapter_config.json's rank_pattern).
So `base_model_name_or_path` names no model.

- Rebuild its base in Python: `slicelora.loop.stages.stage_base_model(run_folder, stage)`, then
  `PeftModel.from_pretrained(base, this_folder)`.
- Or export standard folders: `slicelora export RUN --stage t --merged DIR` (the model after the stage) or
  `--adapter DIR` (this adapter on the exported model of the previous stage).
"""

    def __init__(self, config: RunConfig, stages: int) -> None:
        super().__init__(config, stages)
        last = self.fraction(stages)
        if last >= 1:
            raise ConfigError(f"osf.preserve={config.osf.preserve} and osf.preserve_step={config.osf.preserve_step} "
                              f"keep a fraction {last:g} >= 1 of every layer at stage {stages} of {stages}: nothing "
                              "would be left to train. Lower osf.preserve_step (null: spread what is left over the "
                              "stages) or osf.preserve.")

    @classmethod
    def check_config(cls, config: RunConfig) -> None:
        method = CL_METHODS.get(config.cl.method)
        if method is not None and method.lora_only:
            raise ConfigError(f"cl.method={config.cl.method} works on LoRA adapters only: {method.lora_only}. "
                              f"adapter.type=osf trains {cls.summary}. Set cl.method=none (experience replay, "
                              "train.replay_examples > 0, combines with OSF) or adapter.type=lora.")

    def check(self, model: torch.nn.Module) -> None:
        """PEFT's OSF wraps nn.Linear layers only (it would leave GPT-2's Conv1D layers untouched)."""
        transposed = [name for name, layer in target_layers(model, self.config.adapter.targets).items()
                      if is_transposed(layer)]
        if transposed:
            raise ConfigError(f"adapter.type=osf: PEFT's OSF wraps nn.Linear layers only, and {transposed[0]!r} of "
                              f"model {self.config.model} is a Conv1D (GPT-2 style). Use adapter.type=lora on this "
                              "model.")

    def fraction(self, stage: int) -> float:
        """f_t: the fraction of every layer's singular directions kept at stage `stage`."""
        osf = self.config.osf
        step = (1 - osf.preserve) / self.stages if osf.preserve_step is None else osf.preserve_step
        return osf.preserve + (stage - 1) * step

    def preserved_rank(self, stage: int, shape: tuple[int, ...]) -> int:
        """k_t of a layer with weight `shape` (the 1e-9 keeps f * m = 16 from rounding down to 15)."""
        m = min(shape)
        return min(m - 1, max(1, math.floor(self.fraction(stage) * m + 1e-9)))

    def wrap(self, model: torch.nn.Module, stage: int) -> PeftModel:
        """PEFT's OSF with each layer's k_t as an exact-name rank_pattern entry (saved in adapter_config.json)."""
        targets = self.config.adapter.targets
        ranks = {f"^{re.escape(name)}$": self.preserved_rank(stage, tuple(layer.weight.shape))
                 for name, layer in target_layers(model, targets).items()}
        with peft_wrapping():
            return get_peft_model(model, OSFConfig(target_modules=list(resolve_targets(model, targets)),
                                                   rank_pattern=ranks))

    def start(self, model: PeftModel, stage: Stage, **_: Any) -> Start:
        """Nothing to compute: PEFT's wrap made the split. The record holds f_t and the rank each layer keeps, as
        PEFT applied it; those ranks are the start's tensors."""
        ranks = {canonical_name(name): module.effective_rank["default"] for name, module in model.named_modules()
                 if isinstance(module, OSFLayer)}
        record = {k: v for k, v in InitReport(method=self.name).to_dict().items() if k not in RUN_DEPENDENT}
        return Start({**record, "preserved_fraction": self.fraction(stage.number), "preserved_ranks": ranks},
                     {f"{name}.preserved_rank": torch.tensor([k]) for name, k in ranks.items()})

    def signature(self, stage: int) -> tuple:
        return (self.name, self.fraction(stage))

    @classmethod
    def describe(cls, config: Mapping[str, Any]) -> str:
        return "PEFT's OSF (orthogonal subspace fine-tuning) adapters"


register_adapter(LoRAAdapter)
register_adapter(OSFAdapter)
