"""The run configuration: one dataclass per concern, the paper's defaults, YAML files and dotted overrides.

    config = load_config("my.yaml", overrides=["init.method=slice", "train.lr=2e-4"])

An unknown key is refused with the nearest valid key suggested.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from ..errors import ConfigError, InitError
from ..eval.general import BACKENDS, BENCHMARKS, POOL_SIZE, check_backend
from ..init import get_init, init_names
from ..init.adapter import CordaSettings, LoraGASettings, PissaSettings, SliceSettings, SvdSettings
from ..init.gradients import target_layers
from .adapters import ADAPTERS, adapter_names, library_init_config, reads
from .continual import CL_METHODS, cl_names
from ..models import DEFAULT_MODEL, LLAMA_TARGETS, linear_names, resolve_targets


@dataclass
class AdapterConfig:
    type: str = "lora"  # the stage adapter (loop/adapters.py): lora (rank, alpha, dropout, init.*) | osf (osf.*)
    rank: int = 64
    alpha: float = 2.0  # s = alpha / sqrt(r) (rsLoRA)
    dropout: float = 0.0
    # the Llama names; on a model without them: PEFT's defaults for its model_type, else every linear layer but the
    # LM head (models.resolve_targets). Set explicitly, they are taken as they are.
    targets: list[str] = field(default_factory=lambda: list(LLAMA_TARGETS))


@dataclass
class OSFSection:
    # adapter.type=osf: stage t keeps the fraction preserve + (t - 1) * preserve_step of each layer's top singular
    # directions (at least one, at most all but one); null step: (1 - preserve) / stages, PEFT's progressive budget
    preserve: float = 0.0
    preserve_step: float | None = None


@dataclass
class InitSection(SvdSettings, LoraGASettings, SliceSettings, PissaSettings, CordaSettings):
    """The init: which registered method, the batches it reads, and every method's own settings, declared once in
    the init library (init.adapter: SvdSettings, LoraGASettings, SliceSettings, ...) and inherited here, so the
    run config's init.* keys, types, defaults and choices are the library's. The seed is the run's."""

    method: str = "slice"  # a registered init (slicelora.init.registry): vanilla | lora_ga | loram | slice | ...
    batches: int = 8  # S: gradient batches of the current task (and per past task for each_task replay)
    batch_size: int = 16
    replay_batching: str = "each_task"  # each_task: S batches per past task; all_tasks: S batches in all
    replay_buffer: int = 128  # examples kept per past task (a fixed, seeded sample)
    offload_to_cpu: bool = False
    loss_on: str = "full"  # gradients of the loss on the full text (paper) or on answer tokens
    autocast: bool = True  # gradient passes under bf16 autocast when training uses it (train.bf16, device support)


@dataclass
class TrainSection:
    epochs: int = 3
    lr: float = 1e-4
    warmup_ratio: float = 0.01
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 16
    grad_accum: int = 2
    max_length: int = 256
    loss_on: str = "full"
    bf16: bool = True  # autocast to bfloat16 where the device supports it
    max_examples: int | None = None  # cap on training examples per task (None: the whole train split)
    replay_examples: int = 0  # experience replay: examples per past task mixed into training (off in the paper)
    gradient_checkpointing: bool = False  # in training and in the init's gradient passes
    multitask: bool = False  # one stage learning every task of the sequence jointly: the upper-bound reference


@dataclass
class EvalSection:
    heldout_size: int = 200  # held out per task when a file has no split of its own
    examples: int = 64  # scored per task
    max_new_tokens: int = 64
    batch_size: int = 16
    scoring: str = "paper"  # paper: the paper's scorers; native: official Super-NI / TRACE's own metrics


@dataclass
class GeneralSection:
    enabled: bool = True
    limit: int = 100  # items per benchmark
    shots: int = 5  # IP; BBH object counting uses its 3-shot CoT prompt
    batch_size: int = 16
    max_length: int = 1024
    benchmarks: list[str] = field(default_factory=lambda: ["hellaswag", "commonsenseqa", "bbh_object_counting", "alpaca"])
    backend: str = "native"  # native: our own scoring; lm_eval: the same items through lm-evaluation-harness


@dataclass
class CLSection:
    method: str = "none"  # a training-time method (loop/continual.py): none | replay | olora | ...
    olora_lambda: float = 0.5  # O-LoRA's weight of the orthogonality loss (the official default)
    inflora_rank: int = 64  # InfLoRA: past input directions kept out of the new adapter's A (the official k)
    inflora_batches: int = 32  # InfLoRA: batches of each task's training inputs for its covariance (official: 32 x 8)
    inflora_batch_size: int = 8


@dataclass
class TrackSection:
    tensorboard: bool = False  # TensorBoard logs in RUN/tensorboard (pip install tensorboard)
    wandb: bool = False  # Weights & Biases (pip install wandb; its own login and mode settings apply)
    wandb_project: str = "slicelora"


@dataclass
class RunConfig:
    sequence: str = "demo"
    model: str = DEFAULT_MODEL
    data_dirs: list[str] = field(default_factory=list)  # task folders, searched before $SLICELORA_DATA and shipped data
    data_only: bool = False  # search data_dirs alone (leave out $SLICELORA_DATA and the shipped data)
    allow_reasoning_variant: bool = False  # MeetingBank: train on TRACE's reasoning-augmented split
    seed: int = 42
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    osf: OSFSection = field(default_factory=OSFSection)
    init: InitSection = field(default_factory=InitSection)
    train: TrainSection = field(default_factory=TrainSection)
    cl: CLSection = field(default_factory=CLSection)
    eval: EvalSection = field(default_factory=EvalSection)
    general: GeneralSection = field(default_factory=GeneralSection)
    track: TrackSection = field(default_factory=TrackSection)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Settings that may change when a run is resumed, since finished work does not depend on them: the evaluation batch
# size, and the general-ability evaluation (its scores are recomputed when its settings change).
RESUMABLE = ("eval.batch_size", "general.", "track.")


def changes(old: RunConfig, new: RunConfig) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (old value, new value) for every setting that differs."""
    a, b = flatten(old.to_dict()), flatten(new.to_dict())
    return {key: (a.get(key), b.get(key)) for key in sorted(a.keys() | b.keys()) if a.get(key) != b.get(key)}


def describe(changed: dict[str, tuple[Any, Any]]) -> str:
    """Changes as "key: old -> new" for messages."""
    return "; ".join(f"{key}: {_show(old)} -> {_show(new)}" for key, (old, new) in changed.items())


def _literal_choices(cls: type) -> dict[str, tuple]:
    """init.<field> -> the values of its Literal type (the init library's declaration)."""
    hints = typing.get_type_hints(cls)
    return {f"init.{f.name}": typing.get_args(hints[f.name]) for f in fields(cls)
            if typing.get_origin(hints[f.name]) is typing.Literal}


CHOICES = {
    "adapter.type": adapter_names,  # whatever kinds are registered (loop/adapters.py)
    "init.method": init_names,  # whatever is registered when the config is read
    "cl.method": cl_names,
    **_literal_choices(InitSection),  # surgery_mode, projection, gate_rule, lora_ga_variant, selection, corda_mode
    "init.replay_batching": ("each_task", "all_tasks"),
    "init.loss_on": ("full", "answer"),
    "train.loss_on": ("full", "answer"),
    "eval.scoring": ("paper", "native"),
    "general.backend": BACKENDS,
}


def _keys(cls: type, prefix: str = "") -> list[str]:
    out = []
    for f in fields(cls):
        sub = typing.get_type_hints(cls)[f.name]
        out += _keys(sub, f"{prefix}{f.name}.") if is_dataclass(sub) else [prefix + f.name]
    return out


def _coerce(value: Any, hint: Any, key: str, where: str) -> Any:
    """Convert a YAML/CLI value to the field's type, or say which key and file are wrong."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{where}: {key} is empty; give it a value, e.g. {key}={_show(get(RunConfig(), key))}.")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is typing.Literal:  # a choice: read as its values' type, checked against CHOICES
        hint = type(typing.get_args(hint)[0])
    if typing.get_origin(hint) is list:
        items = value if isinstance(value, list) else [v for v in str(value).split(",") if v]
        return [str(v) for v in items]
    try:
        if hint is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if hint in (int, float) and isinstance(value, bool):
            raise ValueError  # true/false is no number
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ValueError  # int(2.5) would silently give 2
        return hint(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(.inf)
        raise ConfigError(f"{where}: {key}={value!r} is not a valid {getattr(hint, '__name__', hint)}.") from None


def _set(config: Any, key: str, value: Any, where: str) -> None:
    valid = _keys(RunConfig)
    if key not in valid:
        near = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(near)}?" if near else f" Valid keys: {', '.join(valid)}."
        raise ConfigError(f"{where}: unknown config key {key!r}.{hint}")
    *path, name = key.split(".")
    target = config
    for part in path:
        target = getattr(target, part)
    value = _coerce(value, typing.get_type_hints(type(target))[name], key, where)
    choices = CHOICES.get(key, ())
    choices = choices() if callable(choices) else choices
    if key in CHOICES and value not in choices:
        near = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.5)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"{where}: {key}={value!r}; choose one of {', '.join(choices)}.{hint}")
    setattr(target, name, value)


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """Nested config mappings to dotted keys ({"train": {"lr": 1e-4}} -> {"train.lr": 1e-4})."""
    out = {}
    for k, v in data.items():
        # Valid keys are at most 2 deep; deeper nesting (or a YAML alias cycle) is left as one unknown key.
        if isinstance(v, dict) and prefix.count(".") < 2:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + str(k)] = v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *,
                strict: bool = False) -> RunConfig:
    """Paper defaults, then the YAML file's values, then `key=value` overrides (dotted keys, e.g. train.lr=2e-4).
    `strict` (one run) also refuses settings that the selected init and CL methods do not read; comparisons and
    studies apply one set of settings to several methods, so there a setting may concern only some of them."""
    config, given = RunConfig(), set()
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist.") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path} is not UTF-8 text ({exc}); save it as a UTF-8 YAML file.") from None
        except (OSError, ValueError) as exc:  # a folder, no permission, a NUL byte or an over-long name
            raise ConfigError(f"config file {str(path)!r} cannot be read ({exc}); give a YAML file's path.") from None
        data = _parse_yaml(text, str(path)) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of config keys, got {type(data).__name__}.")
        for key, value in flatten(data).items():
            _set(config, key, value, str(path))
            given.add(key)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. train.lr=2e-4.")
        _set(config, key.strip(), _parse_yaml(value, f"override {item!r}") if value.strip() else None, "override")
        given.add(key.strip())
    validate(config)
    if strict:
        check_settings_apply(config, given)
    return config


def check_adapter_settings(config: RunConfig, given: set[str]) -> None:
    """Refuse settings read only by another adapter type than the selected one (LoRA's rank and init.*, osf.*)."""
    kind = ADAPTERS[config.adapter.type]
    unused = {key: owner for key in sorted(given) for owner in ADAPTERS.values()
              if owner is not kind and reads(owner, key)}
    if unused:
        owner, one = next(iter(unused.values())), len(unused) == 1
        raise ConfigError(f"{', '.join(unused)} {'is' if one else 'are'} read only with adapter.type={owner.name}: "
                          f"{owner.summary}. This run has adapter.type={kind.name}, {kind.summary}, so it ignores "
                          f"{'it' if one else 'them'}. Remove {'it' if one else 'them'} or set "
                          f"adapter.type={owner.name}.")


def check_settings_apply(config: RunConfig, given: set[str]) -> None:
    """Refuse settings given for an adapter type (check_adapter_settings) or a method (init.* of a registered init,
    cl.* of a CL method) that is not selected: the run would silently ignore them."""
    check_adapter_settings(config, given)
    owners: dict[str, list[str]] = {}
    for name in init_names():
        spec = get_init(name)
        for field_name in spec.setting_names():
            if hasattr(config.init, field_name):
                owners.setdefault(f"init.{field_name}", []).append(f"init.method={name}")
    for name, method in CL_METHODS.items():
        for field_name in method.settings:
            owners.setdefault(f"cl.{field_name}", []).append(f"cl.method={name}")
    selected = {f"init.method={config.init.method}", f"cl.method={config.cl.method}"}
    unused = sorted(key for key in given if key in owners and not selected & set(owners[key]))
    if unused:
        detail = "; ".join(f"{key} is read only with {' or '.join(owners[key])}" for key in unused)
        raise ConfigError(f"{detail}; this run has init.method={config.init.method} and cl.method={config.cl.method}, "
                          "which ignore it. Remove the setting or choose a method that reads it.")


def _parse_yaml(text: str, where: str) -> Any:
    """yaml.safe_load, with every failure (syntax, a bad explicit !!tag, deep nesting) as a ConfigError."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {exc}") from None
    except (ValueError, LookupError, TypeError, AttributeError, RecursionError) as exc:
        # PyYAML's constructors fail this way on e.g. !!int abc, !!timestamp x, a 5000-digit integer
        raise ConfigError(f"{where} is not valid YAML ({type(exc).__name__}: {str(exc)[:200]}); remove explicit "
                          "!!tags and write numbers plainly, e.g. train.lr=2e-4.") from None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# (dotted key, test, the allowed values in words): range checks that the type alone does not catch.
RANGES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("sequence", lambda v: bool(v.strip()), "a sequence name or a YAML file (not empty)"),
    ("adapter.rank", lambda v: v >= 1, "an integer >= 1"),
    ("adapter.alpha", lambda v: _finite(v) and v > 0, "a finite number > 0"),
    ("adapter.dropout", lambda v: 0 <= v < 1, "a number in [0, 1)"),
    ("adapter.targets", lambda v: bool(v) and all(t.strip() for t in v), "a non-empty list of module names"),
    ("osf.preserve", lambda v: 0 <= v < 1, "a fraction in [0, 1)"),
    ("osf.preserve_step", lambda v: v is None or 0 <= v < 1, "null (spread over the stages) or a fraction in [0, 1)"),
    ("init.batches", lambda v: v >= 1, "an integer >= 1"),
    ("init.batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("init.replay_buffer", lambda v: v >= 1, "an integer >= 1"),
    ("init.strength", lambda v: 0 < v <= 1, "a number in (0, 1]"),
    ("init.gate", lambda v: -1 <= v <= 1, "a cosine threshold in [-1, 1]"),
    ("init.pissa_niter", lambda v: v is None or v >= 1, "null (exact SVD) or an integer >= 1"),
    ("init.niter", lambda v: v >= 0, "an integer >= 0 (subspace iterations of the randomised SVD)"),
    ("init.gamma", lambda v: math.isfinite(v) and v > 0, "a positive number"),
    ("train.epochs", lambda v: v >= 1, "an integer >= 1"),
    ("train.lr", lambda v: _finite(v) and v > 0, "a finite number > 0"),
    ("train.warmup_ratio", lambda v: 0 <= v < 1, "a number in [0, 1)"),
    ("train.weight_decay", lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    ("train.max_grad_norm", lambda v: _finite(v) and v >= 0, "a finite number >= 0 (0: no clipping)"),
    ("train.batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("train.grad_accum", lambda v: v >= 1, "an integer >= 1"),
    ("train.max_length", lambda v: v >= 8, "an integer >= 8 (tokens)"),
    ("train.max_examples", lambda v: v is None or v >= 1, "null (no cap) or an integer >= 1"),
    ("train.replay_examples", lambda v: v >= 0, "an integer >= 0 (0: no replay)"),
    ("cl.olora_lambda", lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    ("cl.inflora_rank", lambda v: v >= 1, "an integer >= 1"),
    ("cl.inflora_batches", lambda v: v >= 1, "an integer >= 1"),
    ("cl.inflora_batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("eval.heldout_size", lambda v: v >= 1, "an integer >= 1"),
    ("eval.examples", lambda v: v >= 1, "an integer >= 1"),
    ("eval.max_new_tokens", lambda v: v >= 1, "an integer >= 1"),
    ("eval.batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("general.limit", lambda v: v >= 1, "an integer >= 1 (items per benchmark)"),
    ("general.shots", lambda v: 0 <= v <= POOL_SIZE, f"an integer in [0, {POOL_SIZE}] (the few-shot pool's size)"),
    ("general.batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("general.max_length", lambda v: v >= 8, "an integer >= 8 (tokens)"),
    ("general.benchmarks", lambda v: bool(v) and set(v) <= set(BENCHMARKS) and len(set(v)) == len(v),
     f"a non-empty list of distinct names from {', '.join(BENCHMARKS)} (general.enabled=false turns them off)"),
]


def _show(value: Any) -> str:
    """A value as the user would type it in an override."""
    if isinstance(value, list):
        return ",".join(map(str, value)) or "[]"
    return "null" if value is None else str(value)


def get(config: RunConfig, key: str) -> Any:
    """The value of a dotted key (e.g. "train.lr")."""
    target = config
    for part in key.split("."):
        target = getattr(target, part)
    return target


def validate(config: RunConfig) -> None:
    """Range checks that the type alone does not catch, and combinations that cannot work, before any data or model
    is loaded. The message names the key, its value, what is allowed and the default to fall back to."""
    defaults = RunConfig()
    for key, ok, allowed in RANGES:
        value = get(config, key)
        if not ok(value):
            raise ConfigError(f"{key}={_show(value)} is not allowed: {key} must be {allowed}. Fix it in the YAML "
                              f"file or with --set {key}=VALUE (default: {_show(get(defaults, key))}).")
    if config.data_only and not config.data_dirs:
        raise ConfigError("data_only=true needs data_dirs (--data-dir PATH): with neither there would be no task "
                          "data. Give --data-dir or set data_only=false.")
    if config.train.multitask and config.train.replay_examples:
        raise ConfigError(f"train.replay_examples={config.train.replay_examples} with train.multitask=true: the one "
                          "joint stage has no past tasks to replay. Set train.replay_examples=0 or "
                          "train.multitask=false.")
    for tracker in ("tensorboard", "wandb"):
        if getattr(config.track, tracker) and importlib.util.find_spec(tracker) is None:
            raise ConfigError(f"track.{tracker}=true needs the {tracker} package: pip install {tracker} (or "
                              f"slicelora[track]), or set track.{tracker}=false.")
    if config.general.enabled:
        check_backend(config.general.backend)
    if config.cl.method == "replay" and not config.train.replay_examples:
        raise ConfigError("cl.method=replay mixes train.replay_examples past examples per task into training: set "
                          "train.replay_examples > 0 (experience replay is on whenever it is > 0).")
    ADAPTERS[config.adapter.type].check_config(config)
    try:  # the surgery's variant settings, checked as the init will check them
        library_init_config(config.init).check(config.init.surgery_mode)
    except InitError as exc:
        raise ConfigError(f"init: {exc} Set the init.* key it names.") from None


def check_against_model(config: RunConfig, model: torch.nn.Module) -> None:
    """What only the loaded model can tell about the targets, checked before any gradient or training work: every
    name in adapter.targets (the default resolved to the model's names) names layers of the model (full-precision
    nn.Linear or Conv1D). The adapter type checks the rest (loop/adapters.py: LoRA's rank fits the layers)."""
    targets = resolve_targets(model, config.adapter.targets)
    suffixes = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in suffixes]
    if missing:
        raise ConfigError(f"adapter.targets: {', '.join(missing)} name(s) no module of model {config.model}. Its "
                          f"linear layers are named {', '.join(sorted(linear_names(model)))}; set adapter.targets to "
                          "some of them.")
    try:
        target_layers(model, targets)
    except InitError as exc:
        raise ConfigError(f"adapter.targets={_show(targets)}: {exc}") from None


def config_from_items(items: list[tuple[str, Any, str]]) -> RunConfig:
    """Paper defaults, then each (dotted key, value, where) in order (values already parsed, e.g. from YAML), then
    the range checks; errors name `where`."""
    config = RunConfig()
    for key, value, where in items:
        _set(config, key, value, where)
    validate(config)
    return config


def from_dict(data: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig from its to_dict() form (a run folder's config.json)."""
    config = RunConfig()
    for key, value in flatten(data).items():
        _set(config, key, value, "config.json")
    return config


