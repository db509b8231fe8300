"""Study files: a grid of run configs, variant x sequence x seed, checked whole before any model is loaded.

    base:                       # run config keys (nested mappings or dotted keys), shared by every cell
      adapter: {rank: 8}
      train.epochs: 1
    variants:                   # name -> dotted overrides of the base
      lora_ga: {init.method: lora_ga}
      slice-c0.5: {init.method: slice, init.strength: 0.5}
    sequences:                  # label -> a registered name, a YAML ref, or an inline list of task refs
      conflict: ["363", "363+swap_labels", "591"]
      mined: smollm2-opp-answer-1
    seeds: [1, 2, 3]
    reference: lora_ga          # the variant (or list of variants) that differences are taken against
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from ..data.sequences import inline_sequence, load_sequence
from ..errors import ConfigError, SliceLoraError
from ..loop.config import RunConfig, check_adapter_settings, config_from_items, flatten

KEYS = ("base", "variants", "sequences", "seeds", "reference")
GRID_AXES = ("sequence", "seed")  # set by the grid, not by a variant or the base
_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]*")


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a mapping key given twice (plain YAML keeps the last one silently)."""


def _mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict:
    seen: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise ConfigError(f"{loader.name}: {key!r} is given twice (line {key_node.start_mark.line + 1}); "
                              "names in a mapping must be unique.")
        seen[key] = loader.construct_object(value_node, deep=True)
    return seen


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


@dataclass(frozen=True)
class Cell:
    """One run of the grid: its sequence label, variant name, seed and folder (relative to the study folder)."""

    sequence: str
    variant: str
    seed: int

    @property
    def dir(self) -> str:
        return f"cells/{self.sequence}/{self.variant}/seed{self.seed}"


@dataclass
class Study:
    """A parsed, checked study file."""

    base: dict[str, Any]
    variants: dict[str, dict[str, Any]]
    sequences: dict[str, str]
    seeds: list[int]
    reference: list[str]
    source: str = "study"

    def cells(self) -> list[Cell]:
        """Every cell, grouped by (sequence, seed) so that cells that can share work run close together."""
        return [Cell(seq, variant, seed) for seq in self.sequences for seed in self.seeds for variant in self.variants]

    def groups(self) -> list[tuple[str, int]]:
        """The (sequence, seed) groups, in order: a worker claims a whole group, whose cells share work."""
        return [(seq, seed) for seq in self.sequences for seed in self.seeds]

    def group(self, sequence: str, seed: int) -> Study:
        """The study restricted to one group."""
        return replace(self, sequences={sequence: self.sequences[sequence]}, seeds=[seed])

    def config(self, cell: Cell) -> RunConfig:
        """The run config of a cell: the paper's defaults, the base, the variant, then the grid's sequence and seed."""
        items = [(k, v, f"{self.source} base") for k, v in self.base.items()]
        items += [(k, v, f"{self.source} variant {cell.variant!r}") for k, v in self.variants[cell.variant].items()]
        items += [("sequence", self.sequences[cell.sequence], self.source), ("seed", cell.seed, self.source)]
        return config_from_items(items)

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base, "variants": self.variants, "sequences": self.sequences, "seeds": self.seeds,
                "reference": self.reference}


def load_study(path: str | Path, overrides: list[str] | None = None, seeds: str | None = None) -> Study:
    """Read and check a study file; every error is a ConfigError that names the file, the key and the fix.
    `overrides` ("key=value") change the base, `seeds` ("1,2,3") replace the seeds: the same study at another size."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"study file {str(path)!r} cannot be read ({exc}); give a UTF-8 YAML file's path.") from None
    loader = _UniqueKeyLoader(text)
    loader.name = str(path)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    finally:
        loader.dispose()
    if isinstance(data, dict) and (overrides or seeds):
        data["base"] = flatten(data.get("base") or {}) if isinstance(data.get("base") or {}, dict) else data["base"]
        for item in overrides or []:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"override {item!r} must look like key=value, e.g. train.max_examples=256.")
            data["base"][key.strip()] = yaml.safe_load(value) if value.strip() else None
        if seeds is not None:
            try:
                data["seeds"] = [int(s) for s in seeds.split(",") if s.strip()]
            except ValueError:
                raise ConfigError(f"--seeds {seeds!r}: give comma-separated integers, e.g. 1,2,3.") from None
    return parse_study(data, str(path))


def parse_study(data: Any, where: str = "study") -> Study:
    """Check a study mapping (see the module docstring) and build every cell's config once, so a bad key or value
    anywhere in the grid fails here, before any model is loaded. A variant may not set what its own adapter type
    ignores (e.g. init.method with adapter.type=osf); the base's settings are shared and may concern some variants
    only."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping with keys {', '.join(KEYS)}.")
    for key in data:
        if key not in KEYS:
            near = difflib.get_close_matches(str(key), KEYS, n=1, cutoff=0.5)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"{where}: unknown key {key!r}.{hint} A study file has {', '.join(KEYS)}.")
    for key in ("variants", "sequences", "seeds"):
        if not data.get(key):
            raise ConfigError(f"{where}: {key!r} is missing or empty, so the grid has no cells; give at least one.")
    base = _settings(data.get("base") or {}, f"{where} base")
    variants = _variants(data["variants"], where)
    study = Study(base=base, variants=variants, sequences=_sequences(data["sequences"], where),
                  seeds=_seeds(data["seeds"], where), reference=_reference(data.get("reference"), variants, where),
                  source=where)
    for cell in study.cells():
        config = study.config(cell)
        try:
            check_adapter_settings(config, set(variants[cell.variant]))
        except ConfigError as exc:
            raise ConfigError(f"{where} variant {cell.variant!r}: {exc}") from None
    return study


def _settings(raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of run config keys, got {type(raw).__name__}.")
    settings = flatten(raw)
    for key in settings:
        if key in GRID_AXES:
            raise ConfigError(f"{where}: {key!r} is set by the grid; list it under 'sequences'/'seeds' instead.")
    return settings


def _variants(raw: Any, where: str) -> dict[str, dict[str, Any]]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: 'variants' must map names to overrides, e.g. lora_ga: {{init.method: lora_ga}}.")
    out = {}
    for name, overrides in raw.items():
        if not isinstance(name, str) or not _SAFE.fullmatch(name):
            raise ConfigError(f"{where}: variant name {name!r} must be letters, digits and . _ + = - (a folder name).")
        out[name] = _settings(overrides or {}, f"{where} variant {name!r}")
        try:
            config_from_items([(k, v, f"{where} variant {name!r}") for k, v in out[name].items()])
        except ConfigError as exc:
            if "unknown config key" in str(exc):
                raise ConfigError(f"{exc} (a variant may only override keys that exist)") from None
            raise
    return out


def _sequences(raw: Any, where: str) -> dict[str, str]:
    """label -> the `sequence` value of the run config (a name, a YAML ref, or an inline list)."""
    if isinstance(raw, list) and all(isinstance(r, str) for r in raw):
        raw = {Path(r.split(":")[-1]).stem if ":" in r or r.endswith((".yaml", ".yml")) else r: r for r in raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: 'sequences' must be a list of sequence names or a mapping label -> name or "
                          "list of task refs.")
    out = {}
    for label, spec in raw.items():
        if not isinstance(label, str) or not _SAFE.fullmatch(label):
            raise ConfigError(f"{where}: sequence label {label!r} must be letters, digits and . _ + = - (a folder name).")
        if isinstance(spec, list):
            if not spec or not all(isinstance(t, (str, int)) and not isinstance(t, bool) for t in spec):
                raise ConfigError(f"{where}: sequence {label!r} must list task references, got {spec!r}.")
            spec = inline_sequence([str(t) for t in spec])
        if not isinstance(spec, str):
            raise ConfigError(f"{where}: sequence {label!r} must be a name, a YAML ref or a list, got {spec!r}.")
        try:
            load_sequence(spec)
        except SliceLoraError as exc:
            raise ConfigError(f"{where}: sequence {label!r}: {exc}") from None
        out[label] = spec
    return out


def _seeds(raw: Any, where: str) -> list[int]:
    seeds = raw if isinstance(raw, list) else [raw]
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"{where}: seeds must be integers, got {seed!r}; e.g. seeds: [1, 2, 3].")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where}: seeds {seeds} repeat; give each seed once.")
    return list(seeds)


def _reference(raw: Any, variants: dict, where: str) -> list[str]:
    names = raw if isinstance(raw, list) else [raw] if raw is not None else [next(iter(variants))]
    for name in names:
        if name not in variants:
            near = difflib.get_close_matches(str(name), list(variants), n=1, cutoff=0.5)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"{where}: reference {name!r} is not a variant of the grid.{hint} "
                              f"Variants: {', '.join(variants)}.")
    return list(names)


def differing_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two study dicts (for refusing a folder that holds another study)."""
    keys = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += differing_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys
