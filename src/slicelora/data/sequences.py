"""Task sequences: the registry of named sequences (sequences.yaml, shipped in the package) and user YAML files.

A sequences file holds either several sequences or one:

    sequences:                      # several; pick one with "path.yaml:name"
      mine: ["363", "1687", C-STANCE]
      other: [task591_sciq_answer_generation, "073"]

    name: mine                      # one (name defaults to the file's stem)
    tasks: ["363", "1687", C-STANCE]

Task references are resolved later by `load_task`. Bare numbers stay text exactly as written (002 is "002", not the
YAML octal 2), so quoting them is optional. Sequence names are matched case-insensitively, "_" equal to "-".
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from slicelora.errors import DataError

REGISTRY = "sequences.yaml"
_FILE_REF = re.compile(r"(?P<path>.+\.ya?ml)(?::(?P<name>[^:/\\]+))?", re.IGNORECASE)


@dataclass
class Sequence:
    """A named, ordered list of task references."""

    name: str
    tasks: list[str]


class _TextLoader(yaml.SafeLoader):
    """A SafeLoader that reads numbers as text, so task refs such as 002 or 088 keep their digits."""


_TextLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def list_sequences() -> list[str]:
    """Names of the registry's sequences, in registry order."""
    return list(_registry())


def inline_sequence(tasks: list[str]) -> str:
    """The text form of an inline sequence, e.g. "[363, 363+swap_labels, 591]" (what `load_sequence` reads)."""
    return "[" + ", ".join(tasks) + "]"


def load_sequence(name_or_path: str | Path) -> Sequence:
    """A registry sequence by name ("ni-seq-g1", "trace", "demo", ...), one from a YAML file ("my.yaml" or
    "my.yaml:name" to pick one of several), or an inline YAML list of task references ("[363, 1687, 591]")."""
    if isinstance(name_or_path, Path):
        return _from_file(name_or_path, None)
    if not isinstance(name_or_path, str):
        raise DataError(f"a sequence is a name or a YAML path, got {type(name_or_path).__name__} {name_or_path!r}.")
    if name_or_path.strip().startswith("["):
        try:
            tasks = yaml.load(name_or_path, Loader=_TextLoader)  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as e:
            raise DataError(f"inline sequence {name_or_path!r} is not a YAML list ({e}); write [task, task, ...].") from e
        return Sequence("inline", _task_refs(tasks, f"inline sequence {name_or_path!r}"))
    match = _FILE_REF.fullmatch(name_or_path.strip())
    if match:
        try:
            path = Path(match["path"]).expanduser()
        except RuntimeError as e:  # "~someone/x.yaml" for an unknown user
            raise DataError(f"sequence file {match['path']!r}: {e} Give the path without ~user.") from e
        return _from_file(path, match["name"])
    registry = _registry()
    key = _normalise(name_or_path)
    if key in registry:
        return Sequence(key, list(registry[key]))
    near = difflib.get_close_matches(key, list(registry), n=4, cutoff=0.5)
    raise DataError(
        f"unknown sequence {name_or_path!r}.{_nearest(near)} Known sequences: {', '.join(registry)}. "
        "Or give a YAML file (path.yaml, or path.yaml:name to pick one of several)."
    )


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def _nearest(names: list[str]) -> str:
    return f" Did you mean: {', '.join(names)}?" if names else ""


def _registry() -> dict[str, list[str]]:
    source = resources.files("slicelora.data").joinpath(REGISTRY)
    return _parse(source.read_text(encoding="utf-8"), f"the package registry {REGISTRY}", REGISTRY)


def _from_file(path: Path, name: str | None) -> Sequence:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"sequence file {path} cannot be read ({e.strerror or e}). Check the path.") from e
    except UnicodeDecodeError as e:
        raise DataError(f"sequence file {path} is not UTF-8 text ({e}).") from e
    except ValueError as e:  # a NUL byte in the path
        raise DataError(f"sequence file {str(path)!r} cannot be read ({e}). Check the path.") from e
    sequences = _parse(text, str(path), path.stem)
    if name is None:
        if len(sequences) == 1:
            only = next(iter(sequences))
            return Sequence(only, list(sequences[only]))
        raise DataError(
            f"{path} holds {len(sequences)} sequences ({', '.join(sequences)}); pick one with {path}:<name>."
        )
    key = _normalise(name)
    if key not in sequences:
        near = difflib.get_close_matches(key, list(sequences), n=4, cutoff=0.5)
        raise DataError(f"{path} has no sequence {name!r}.{_nearest(near)} It holds: {', '.join(sequences)}.")
    return Sequence(key, list(sequences[key]))


def _parse(text: str, where: str, default_name: str) -> dict[str, list[str]]:
    """Validate a sequences document into {normalised name: task refs}."""
    try:
        data: Any = yaml.load(text, Loader=_TextLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise DataError(f"{where}: not valid YAML ({e}).") from e
    except (ValueError, LookupError, TypeError, AttributeError, RecursionError) as e:
        # PyYAML's constructors fail this way on a bad explicit tag (!!int abc, !!timestamp x, !!bool maybe) and
        # its parser on nesting too deep
        raise DataError(
            f"{where}: not valid YAML ({type(e).__name__}: {str(e)[:200]}). Remove explicit !!tags and deep nesting; "
            "write task references as plain strings."
        ) from e
    schema = 'expected "sequences: {name: [task, ...]}" or "name: ...\\ntasks: [task, ...]"'
    if not isinstance(data, dict):
        raise DataError(f"{where}: {schema}, got {type(data).__name__}.")
    if "sequences" in data:
        raw = data["sequences"]
        if not isinstance(raw, dict) or not raw:
            raise DataError(f"{where}: 'sequences' must map names to task lists; {schema}.")
        items = list(raw.items())
    elif "tasks" in data:
        items = [(data.get("name", default_name), data["tasks"])]
    else:
        raise DataError(f"{where}: neither a 'sequences' nor a 'tasks' key; {schema}.")
    sequences: dict[str, list[str]] = {}
    for name, tasks in items:
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{where}: sequence name {name!r} must be a non-empty string.")
        key = _normalise(name)
        if key in sequences:
            raise DataError(f"{where}: sequence {name!r} is defined twice.")
        sequences[key] = _task_refs(tasks, f"{where}: sequence {name!r}")
    return sequences


def _task_refs(tasks: Any, where: str) -> list[str]:
    if not isinstance(tasks, list) or not tasks:
        raise DataError(f"{where}: 'tasks' must be a non-empty list of task references, got {tasks!r}.")
    refs: list[str] = []
    for i, ref in enumerate(tasks):
        if not isinstance(ref, str) or not ref.strip():
            raise DataError(
                f"{where}: item [{i}] {ref!r} is not a task reference "
                "(a Super-NI number or name, a TRACE name, or a path)."
            )
        if ref.strip().lower() in (r.lower() for r in refs):
            raise DataError(f"{where}: task {ref!r} is listed twice; the score matrix has one column per task.")
        refs.append(ref.strip())
    return refs
