"""The run configuration: one dataclass per concern, the paper's defaults, YAML files and dotted overrides.

    config = load_config("my.yaml", overrides=["init.method=slice", "train.lr=2e-4"])

An unknown key is refused with the nearest valid key suggested.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from ..init import init_names
from ..models import DEFAULT_MODEL, LLAMA_TARGETS


@dataclass
class AdapterConfig:
    rank: int = 64
    alpha: float = 2.0  # s = alpha / sqrt(r) (rsLoRA)
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(LLAMA_TARGETS))


@dataclass
class InitSection:
    method: str = "slice"  # a registered init (slicelora.init.registry): vanilla | lora_ga | loram | slice | ...
    batches: int = 8  # S: gradient batches of the current task (and per past task for each_task replay)
    batch_size: int = 16
    replay_batching: str = "each_task"  # each_task: S batches per past task; all_tasks: S batches in all
    replay_buffer: int = 128  # examples kept per past task (a fixed, seeded sample)
    strength: float = 1.0  # c
    gate: float = 0.0  # tau
    surgery_mode: str = "global"
    lora_ga_variant: str = "paper"
    selection: str = "lora_ga"
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


@dataclass
class RunConfig:
    sequence: str = "demo"
    model: str = DEFAULT_MODEL
    data_dirs: list[str] = field(default_factory=list)  # task folders, searched before $SLICELORA_DATA and shipped data
    data_only: bool = False  # search data_dirs alone (leave out $SLICELORA_DATA and the shipped data)
    allow_reasoning_variant: bool = False  # MeetingBank: train on TRACE's reasoning-augmented split
    seed: int = 42
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    init: InitSection = field(default_factory=InitSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    general: GeneralSection = field(default_factory=GeneralSection)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fingerprint(self) -> str:
        """A hash of everything that determines the results (a run folder holds one run)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


CHOICES = {
    "init.method": init_names,  # whatever is registered when the config is read
    "init.replay_batching": ("each_task", "all_tasks"),
    "init.surgery_mode": ("global", "per_layer"),
    "init.lora_ga_variant": ("paper", "reference", "peft"),
    "init.selection": ("lora_ga", "top_r"),
    "init.loss_on": ("full", "answer"),
    "train.loss_on": ("full", "answer"),
    "eval.scoring": ("paper", "native"),
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
    if value is None and type(None) in args:
        return None
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        hint = next(a for a in args if a is not type(None))
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


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Paper defaults, then the YAML file's values, then `key=value` overrides (dotted keys, e.g. train.lr=2e-4)."""
    config = RunConfig()
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
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. train.lr=2e-4.")
        _set(config, key.strip(), _parse_yaml(value, f"override {item!r}") if value.strip() else None, "override")
    validate(config)
    return config


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


def validate(config: RunConfig) -> None:
    """Range checks that the type alone does not catch."""
    checks = [
        (config.adapter.rank >= 1, "adapter.rank must be >= 1"),
        (config.init.batches >= 1 and config.init.batch_size >= 1, "init.batches and init.batch_size must be >= 1"),
        (0 < config.init.strength <= 1, "init.strength (c) must lie in (0, 1]"),
        (config.train.epochs >= 1 and config.train.batch_size >= 1 and config.train.grad_accum >= 1,
         "train.epochs, train.batch_size and train.grad_accum must be >= 1"),
        (config.train.max_length >= 8, "train.max_length must be >= 8"),
        (config.eval.examples >= 1, "eval.examples must be >= 1"),
        (0 <= config.train.warmup_ratio < 1, "train.warmup_ratio must lie in [0, 1)"),
        (config.data_dirs or not config.data_only,
         "data_only=true needs data_dirs (--data-dir PATH): with neither there would be no task data"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message + ".")


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


