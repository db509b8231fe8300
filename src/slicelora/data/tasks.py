"""Task loaders: Super-NI and TRACE tasks read from data directories into `Task` records of `Example`s.

Supported layouts (every file may be `.json` or `.json.gz`):
- Super-NI single file, the official allenai/natural-instructions schema: `tasks/taskNNN_slug.json`, a JSON object with
  `Definition` (a string or a list whose first string is used) and `Instances` (`{input, output}`, `output` a string or
  a list of acceptable strings). There is no held-out split in the file, so we make one (`split_heldout`).
- Super-NI split folder, SAPT's layout: `taskNNN_slug/{train,test}.json` (each in the schema above; held-out = test).
- TRACE folder: `<Task>/{train,eval,test}.json`, each a JSON list of `{prompt, answer}` (held-out = test; eval unused).
A folder's family is decided by its content: a `test` file holding an object is Super-NI, one holding a list is TRACE.

Prompts follow docs/method.md (Protocol): Super-NI "<Definition>\\n\\nInput: <input>" with the first output as the answer and every output
as a reference; TRACE "TRACE task: <name>\\n\\n<prompt>". Surrounding whitespace of the definition, input and outputs is
stripped (some SAPT outputs carry stray spaces that would otherwise become training targets). An instance with no
non-empty output has nothing to learn or score: it is dropped with a counted warning (a split with none left is an
error), and repeated Super-NI instance ids are counted in a warning.
"""

from __future__ import annotations

import difflib
import gzip
import json
import os
import random
import re
import warnings
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from slicelora.errors import ConfigError, DataError

ENV_VAR = "SLICELORA_DATA"
SHIPPED_DATA_DIR = Path(__file__).resolve().parents[1] / "datasets"  # the package data: slicelora/datasets
SEARCH_DEPTH = 3  # folder levels below a data dir searched for tasks: <dir>/superni/tasks/<task> is depth 3
# Super-NI classification rule (our choice; the paper only says "classification tasks"): over the train split, the distinct
# outputs number at most MAX_LABELS, each at most MAX_LABEL_CHARS long, and each label is used twice on average.
MAX_LABELS = 10
MAX_LABEL_CHARS = 30
TRACE_NATIVE_METRICS = {
    "c-stance": "accuracy",
    "fomc": "accuracy",
    "numglue-cm": "accuracy",
    "numglue-ds": "accuracy",
    "scienceqa": "accuracy",
    "meetingbank": "rouge_l",
    "py150": "fuzz_ratio",
    "20minuten": "sari",
}
REASONING_VARIANT = "train_reasoning_variant"  # TRACE's reasoning-augmented MeetingBank train split (shipped instead)
NATURAL_INSTRUCTIONS_HINT = (
    "Only 15 Super-NI tasks ship with slicelora. For any other Super-NI task, clone "
    "https://github.com/allenai/natural-instructions and point --data-dir (or the SLICELORA_DATA variable, "
    f"{os.pathsep!r}-separated) at its `tasks/` folder."
)
_SUPERNI_NAME = re.compile(r"task(\d+)(?:_.*)?", re.IGNORECASE)
_NUMBER_REF = re.compile(r"(?:task)?(\d+)", re.IGNORECASE)


@dataclass(frozen=True)
class Example:
    """One (prompt, answer) pair in the protocol's layout, with every acceptable answer kept for scoring."""

    prompt: str
    answer: str
    references: tuple[str, ...]
    source: str = ""


@dataclass
class Task:
    """A task's train and held-out examples with the scorers that apply to it."""

    name: str
    family: str
    train: list[Example]
    heldout: list[Example]
    metric: str
    native_metric: str
    path: Path
    definition: str = ""


def default_data_dirs() -> list[Path]:
    """The folders searched for tasks: entries of $SLICELORA_DATA first, then the data shipped in the package."""
    dirs = [_expand(p, ENV_VAR) for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p.strip()]
    if SHIPPED_DATA_DIR.is_dir():
        dirs.append(SHIPPED_DATA_DIR)
    return dirs


def search_dirs(extra: Sequence[str | Path] | None = None, only: bool = False) -> list[Path]:
    """The data dirs of a run or command: `extra` (--data-dir, config `data_dirs`) before the defaults, so its
    tasks win a name clash; with `only` (--data-only, config `data_only`) the defaults are left out."""
    extra = [_expand(d, "data_dirs") for d in extra or []]
    if only and not extra:
        raise ConfigError("data_only (--data-only) needs at least one data folder: give --data-dir PATH "
                          "(config key data_dirs), or drop data_only to use the shipped data.")
    dirs = extra if only else extra + default_data_dirs()
    return list(dict.fromkeys(dirs))


def list_tasks(data_dirs: Sequence[str | Path] | None = None) -> list[str]:
    """Names of every task found in the data dirs: Super-NI by task number, then the others alphabetically. Data dirs
    given here must be existing folders."""
    dirs = _dirs(data_dirs)
    missing = [str(d) for d in dirs if not d.is_dir()] if data_dirs is not None else []
    if missing:
        raise DataError(f"data folder(s) {', '.join(missing)} do not exist or are not folders; give existing folders "
                        "of task files (--data-dir).")
    names = _discover(dirs)
    return sorted(names, key=lambda n: (_task_number(n) is None, _task_number(n) or 0, n.lower()))


def load_task(
    ref: str | Path,
    data_dirs: Sequence[str | Path] | None = None,
    *,
    heldout_size: int = 200,
    seed: int = 42,
    allow_reasoning_variant: bool = False,
) -> Task:
    """Load a task by reference: a Super-NI number ("363", "task363", "002" or "2"), a full Super-NI name, a TRACE name
    (any case), or a path to a task file or folder. `data_dirs` (default `default_data_dirs()`) are searched as given.
    Any of these may end in a label transform, "REF+swap_labels" or "REF+relabel(OLD=NEW;...)" (see transforms.py).

    `heldout_size` and `seed` only apply to single-file Super-NI tasks (see `split_heldout`). TRACE's MeetingBank ships
    without `train.json`; `allow_reasoning_variant=True` trains on `train_reasoning_variant.json` instead.
    """
    if isinstance(heldout_size, bool) or not isinstance(heldout_size, int) or heldout_size < 1:
        raise ConfigError(f"heldout_size must be a positive integer, got {heldout_size!r}.")
    if isinstance(ref, str):
        from .transforms import split_ref, transform_task  # transforms.py imports this module

        transformed = split_ref(ref)
        if transformed is not None:
            base, transform = transformed
            task = load_task(base, data_dirs, heldout_size=heldout_size, seed=seed,
                             allow_reasoning_variant=allow_reasoning_variant)
            return transform_task(task, transform)
    path = _resolve(ref, _dirs(data_dirs))
    if path.is_file():
        return _load_superni_file(path, heldout_size, seed)
    test_file = _split_file(path, "test")
    if test_file is None:
        raise DataError(
            f"{path}: no test.json or test.json.gz in this folder. A task folder holds train and test splits "
            "(Super-NI: {train,test}.json; TRACE: {train,eval,test}.json); a single Super-NI task is one "
            "taskNNN_slug.json file."
        )
    test = _read_json(test_file)
    if isinstance(test, dict):
        return _load_superni_folder(path, test_file, test)
    if isinstance(test, list):
        return _load_trace_folder(path, test_file, test, allow_reasoning_variant)
    raise DataError(
        f"{test_file}: expected a JSON object (Super-NI task schema) or a JSON list of {{prompt, answer}} (TRACE), "
        f"got {_kind(test)}."
    )


def split_heldout(items: Sequence[Any], keys: Sequence[str], heldout_size: int, seed: int) -> tuple[list, list]:
    """Split items into (train, heldout) by a seeded shuffle; both keep file order.

    Hold out `heldout_size` items, or a quarter of them (at least one) when there are fewer than 4 * heldout_size,
    so that small tasks keep most of their data for training. Items with equal keys (the same input text) stay on one
    side, so no held-out input is ever trained on.
    """
    if len(items) < 2:
        raise DataError(f"cannot split {len(items)} instance(s) into train and held-out; a task needs at least 2.")
    target = min(heldout_size, max(1, len(items) // 4))
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    held: set[int] = set()
    for group in order:
        if len(held) >= target:
            break
        held.update(group)
    if len(held) == len(items):
        raise DataError(f"all {len(items)} instances share one input, so no train/held-out split is possible.")
    train = [x for i, x in enumerate(items) if i not in held]
    heldout = [x for i, x in enumerate(items) if i in held]
    return train, heldout


# ---------------------------------------------------------------- discovery and resolution


def _dirs(data_dirs: Sequence[str | Path] | None) -> list[Path]:
    if data_dirs is None:
        return default_data_dirs()
    if isinstance(data_dirs, (str, Path)):
        data_dirs = [data_dirs]
    return [_expand(d, "data_dirs") for d in data_dirs]


def _expand(folder: str | Path, where: str) -> Path:
    """`~` expanded; an unknown `~user` is our error, not a RuntimeError from pathlib."""
    try:
        return Path(folder).expanduser()
    except (RuntimeError, ValueError) as exc:
        raise DataError(f"{where}: data folder {str(folder)!r} cannot be expanded ({exc}); give a plain path.") from None


def _strip_json(name: str) -> str | None:
    for suffix in (".json.gz", ".json"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def _split_file(folder: Path, split: str) -> Path | None:
    for suffix in (".json", ".json.gz"):
        candidate = folder / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _discover(data_dirs: Iterable[Path]) -> dict[str, Path]:
    """Task name -> path, for task folders (holding a test split) and single Super-NI files; earlier dirs win."""
    found: dict[str, Path] = {}
    for root in data_dirs:
        _scan(root, 0, found)
    return found


def _scan(folder: Path, depth: int, found: dict[str, Path]) -> None:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = Path(entry.path)
        if entry.is_dir():
            if _split_file(path, "test") is not None:
                found.setdefault(entry.name, path)
            elif depth < SEARCH_DEPTH:
                _scan(path, depth + 1, found)
        else:
            stem = _strip_json(entry.name)
            if stem is not None and _SUPERNI_NAME.fullmatch(stem):
                found.setdefault(stem, path)


def _task_number(name: str) -> int | None:
    match = _SUPERNI_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def _looks_like_path(ref: str | Path) -> bool:
    if isinstance(ref, Path):
        return True
    return "/" in ref or os.sep in ref or _strip_json(ref) is not None or ref.startswith("~")


def _resolve(ref: str | Path, data_dirs: list[Path]) -> Path:
    if not isinstance(ref, (str, Path)):
        raise DataError(f"a task reference must be a string or a path, got {_kind(ref)} {ref!r}.")
    if _looks_like_path(ref):
        try:
            path = Path(ref).expanduser()
            exists = path.exists()
        except (OSError, ValueError, RuntimeError) as e:  # an unknown ~user, a NUL byte, an over-long name
            raise DataError(f"task path {str(ref)!r} cannot be looked up ({e}). Give an existing file or folder.") from e
        if not exists:
            raise DataError(f"task path {path} does not exist. Give an existing task file or folder, or a task name.")
        return path
    key = ref.strip()
    match = _NUMBER_REF.fullmatch(key)
    number = int(match.group(1)) if match else None
    found: dict[str, Path] = {}
    for root in data_dirs:  # the first folder holding the task wins, as for names in _discover
        here = _discover([root])
        if number is not None:
            matches = [n for n in here if _task_number(n) == number]
        else:
            matches = [n for n in here if n.lower() == key.lower()]
        if len(matches) == 1:
            return here[matches[0]]
        if len(matches) > 1:
            listing = ", ".join(f"{n} ({here[n]})" for n in matches)
            raise DataError(f"task reference {ref!r} is ambiguous: it matches {listing}. Use the full task name.")
        found = {**here, **found}
    raise DataError(_not_found_message(key, number, found, data_dirs))


def _not_found_message(key: str, number: int | None, found: dict[str, Path], data_dirs: list[Path]) -> str:
    """Name the dirs searched, the nearest task names (by name, or by digits for a number) and the fix."""
    if number is None:
        lowered = {n.lower(): n for n in found}
        near = [lowered[n] for n in difflib.get_close_matches(key.lower(), list(lowered), n=5, cutoff=0.6)]
    else:
        by_number = {str(_task_number(n)): n for n in found if _task_number(n) is not None}
        near = [by_number[d] for d in difflib.get_close_matches(str(number), list(by_number), n=5, cutoff=0.5)]
    searched = ", ".join(f"{d}{'' if d.is_dir() else ' (missing)'}" for d in data_dirs) or "none"
    hint = f" Nearest names: {', '.join(near)}." if near else ""
    if number is not None or key.lower().startswith("task"):
        fix = NATURAL_INSTRUCTIONS_HINT
    else:
        fix = "Give a Super-NI number or name, a TRACE task name, or a path to a task file or folder."
    return f"task {key!r} was not found in the data dirs searched (to depth {SEARCH_DEPTH}): {searched}.{hint} {fix}"


# ---------------------------------------------------------------- reading and validation


def _read_json(path: Path) -> Any:
    """Parse a .json or .json.gz file; every failure becomes a DataError naming the file."""
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return json.load(f)
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}). Repair the file or copy it again "
            "from its source."
        ) from e
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as e:
        raise DataError(
            f"{path}: cannot be read ({e}). Check that it is a complete UTF-8 .json file or a gzip'd .json.gz file."
        ) from e
    except (ValueError, RecursionError) as e:  # an integer over Python's digit limit, or nesting too deep to parse
        raise DataError(
            f"{path}: not valid task JSON ({type(e).__name__}: {str(e)[:200]}). A task file holds strings, lists and "
            "objects of modest depth; repair the file or copy it again from its source."
        ) from e


_KINDS = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer", float: "a number"}


def _kind(value: Any) -> str:
    """The JSON kind of a value, for error messages."""
    return "null" if value is None else _KINDS.get(type(value), f"a {type(value).__name__}")


def _superni_definition(data: dict, path: Path) -> str:
    if "Definition" not in data:
        raise DataError(
            f"{path}: missing field 'Definition' (the task instruction). Add \"Definition\": [\"<instruction>\"] "
            "as in the Super-NI task schema."
        )
    definition = data["Definition"]
    if isinstance(definition, list) and definition and all(isinstance(d, str) for d in definition):
        return definition[0].strip()
    if isinstance(definition, str):
        return definition.strip()
    raise DataError(
        f"{path}: field 'Definition' must be a string or a non-empty list of strings, got {_kind(definition)}."
    )


def _superni_xlingual(data: dict, path: Path) -> bool:
    """Whether the task belongs to the official evaluation's xlingual track: its input or output language (fields
    `Input_language`, `Output_language`; English when absent) is not only English."""
    for field in ("Input_language", "Output_language"):
        languages = data.get(field, ["English"])
        languages = [languages] if isinstance(languages, str) else languages
        if not isinstance(languages, list) or not all(isinstance(lang, str) for lang in languages):
            raise DataError(f"{path}: field '{field}' must be a language name or a list of them (e.g. [\"English\"]), "
                            f"got {_kind(languages)}.")
        if any(lang != "English" for lang in languages):
            return True
    return False


def _superni_instances(data: dict, path: Path) -> list[tuple[str, tuple[str, ...]]]:
    """(input, outputs) per instance, validated."""
    if "Instances" not in data:
        raise DataError(
            f"{path}: missing field 'Instances'. A Super-NI task file holds \"Instances\": "
            '[{"input": "...", "output": ["..."]}, ...].'
        )
    instances = data["Instances"]
    if not isinstance(instances, list):
        raise DataError(
            f"{path}: field 'Instances' must be a list of {{input, output}} objects, got {_kind(instances)}."
        )
    if not instances:
        raise DataError(
            f"{path}: field 'Instances' is empty; the task has no instances. Add instances or drop the task."
        )
    rows = []
    for i, inst in enumerate(instances):
        where = f"{path}: Instances[{i}]"
        if not isinstance(inst, dict):
            raise DataError(f"{where} must be an object with 'input' and 'output', got {_kind(inst)}.")
        for field in ("input", "output"):
            if field not in inst:
                raise DataError(
                    f"{where} (id {inst.get('id', '?')}) has no '{field}' field. Add it or remove the instance."
                )
        text, output = inst["input"], inst["output"]
        if not isinstance(text, str):
            raise DataError(f"{where}: field 'input' must be a string, got {_kind(text)}.")
        if isinstance(output, str):
            output = [output]
        if not isinstance(output, list) or not output or not all(isinstance(o, str) for o in output):
            raise DataError(
                f"{where}: field 'output' must be a string or a non-empty list of strings, got "
                f"{'an empty list' if output == [] else _kind(output)}."
            )
        rows.append((text.strip(), tuple(o.strip() for o in output)))
    ids = Counter(json.dumps(inst["id"], sort_keys=True) for inst in instances if "id" in inst)
    repeated = sum(n - 1 for n in ids.values())
    if repeated:
        warnings.warn(f"{path}: {repeated} instance(s) repeat the id of an earlier one (e.g. "
                      f"{next(i for i, n in ids.items() if n > 1)}); check that the file holds no duplicates.",
                      stacklevel=2)
    return rows


def _answerable(examples: list[Example], where: str) -> list[Example]:
    """The examples with a non-empty reference: those whose references are all empty (after stripping) have nothing
    to learn or score and are dropped with a counted warning, and empty references beside others are dropped. A
    split with no answerable example is refused."""
    kept = []
    for ex in examples:
        refs = tuple(r for r in ex.references if r)
        if refs:
            kept.append(ex if refs == ex.references else replace(ex, answer=refs[0], references=refs))
    if not kept:
        raise DataError(f"{where}: all {len(examples)} instances have an empty output (after stripping whitespace), "
                        "so there is nothing to train on or score. Fill in the outputs or drop the task.")
    if len(kept) < len(examples):
        warnings.warn(f"{where}: {len(examples) - len(kept)} of {len(examples)} instances have an empty output and "
                      "were dropped.", stacklevel=2)
    return kept


def _superni_example(definition: str, text: str, outputs: tuple[str, ...]) -> Example:
    return Example(prompt=f"{definition}\n\nInput: {text}", answer=outputs[0], references=outputs, source=text)


def _is_classification(examples: Sequence[Example]) -> bool:
    """The train outputs form a small label set of short strings (see MAX_LABELS / MAX_LABEL_CHARS)."""
    outputs = [r for ex in examples for r in ex.references]
    labels = set(outputs)
    short = all(len(label) <= MAX_LABEL_CHARS for label in labels)
    return len(labels) <= MAX_LABELS and 2 * len(labels) <= len(outputs) and short


def _superni_task(name: str, path: Path, definition: str, xlingual: bool, train: list[Example],
                  heldout: list[Example]) -> Task:
    """A Super-NI task record. Native scoring follows the official evaluation: exact match for classification, else
    ROUGE-L of its track (default: English tokens, stemmed; xlingual: GPT-2 tokens, see eval/scoring.py)."""
    classification = _is_classification(train)
    if classification:
        native = "official_exact_match"
    else:
        native = "official_rouge_l_xlingual" if xlingual else "official_rouge_l"
    return Task(
        name=name,
        family="superni",
        train=train,
        heldout=heldout,
        metric="exact_match" if classification else "rouge_l",
        native_metric=native,
        path=path,
        definition=definition,
    )


def _superni_object(path: Path) -> dict:
    data = _read_json(path)
    if isinstance(data, list):
        raise DataError(
            f"{path}: holds a JSON list (the TRACE layout?), but a single task file must be a Super-NI task object. "
            "For a TRACE task pass its folder."
        )
    if not isinstance(data, dict):
        raise DataError(f"{path}: a Super-NI task file must hold a JSON object, got {_kind(data)}.")
    return data


def _load_superni_file(path: Path, heldout_size: int, seed: int) -> Task:
    data = _superni_object(path)
    definition = _superni_definition(data, path)
    rows = _superni_instances(data, path)
    try:
        train_rows, held_rows = split_heldout(rows, [r[0] for r in rows], heldout_size, seed)
    except DataError as e:
        raise DataError(f"{path}: {e} Add instances or drop the task.") from e
    return _superni_task(
        _strip_json(path.name) or path.stem,
        path,
        definition,
        _superni_xlingual(data, path),
        _answerable([_superni_example(definition, *r) for r in train_rows], f"{path} (train split)"),
        _answerable([_superni_example(definition, *r) for r in held_rows], f"{path} (held-out split)"),
    )


def _load_superni_folder(folder: Path, test_file: Path, test: dict) -> Task:
    train_file = _split_file(folder, "train")
    if train_file is None:
        raise DataError(f"{folder}: no train.json or train.json.gz next to {test_file.name}. Add the train split.")
    train = _superni_object(train_file)
    definition = _superni_definition(train, train_file)
    return _superni_task(
        folder.name,
        folder,
        definition,
        _superni_xlingual(train, train_file),
        *(_answerable([_superni_example(definition, *r) for r in _superni_instances(data, file)], str(file))
          for data, file in ((train, train_file), (test, test_file))),
    )


def _trace_examples(data: Any, path: Path, name: str) -> list[Example]:
    if not isinstance(data, list):
        raise DataError(f"{path}: a TRACE split must be a JSON list of {{prompt, answer}} objects, got {_kind(data)}.")
    if not data:
        raise DataError(f"{path}: the split is empty; the task has no instances. Add examples or drop the task.")
    examples = []
    for i, item in enumerate(data):
        where = f"{path}: item [{i}]"
        if not isinstance(item, dict):
            raise DataError(f"{where} must be an object with 'prompt' and 'answer', got {_kind(item)}.")
        for field in ("prompt", "answer"):
            if field not in item:
                raise DataError(
                    f"{where} has no '{field}' field. Each TRACE item is {{\"prompt\": str, \"answer\": str}}."
                )
            if not isinstance(item[field], str):
                raise DataError(f"{where}: field '{field}' must be a string, got {_kind(item[field])}.")
        prompt, answer = item["prompt"].strip(), item["answer"].strip()
        examples.append(Example(f"TRACE task: {name}\n\n{prompt}", answer, (answer,), source=prompt))
    return _answerable(examples, str(path))


def _load_trace_folder(folder: Path, test_file: Path, test: list, allow_reasoning_variant: bool) -> Task:
    name = folder.name
    train_file = _split_file(folder, "train")
    variant = _split_file(folder, REASONING_VARIANT)
    if train_file is None and allow_reasoning_variant and variant is not None:
        train_file = variant
    if train_file is None:
        fixes = [f"put TRACE's train.json (or train.json.gz) into {folder}"]
        if variant is not None:
            fixes.append(
                f"train on {variant.name} (TRACE's reasoning-augmented split, whose answers hold reasoning and then "
                "the answer) with load_task(..., allow_reasoning_variant=True) or the CLI option of that name"
            )
        fixes.append(f"drop {name} from the sequence (e.g. a user sequence YAML without it)")
        raise DataError(
            f"{folder}/train.json is missing: TRACE task {name} has no train split here. Fix: {'; or '.join(fixes)}."
        )
    return Task(
        name=name,
        family="trace",
        train=_trace_examples(_read_json(train_file), train_file, name),
        heldout=_trace_examples(test, test_file, name),
        metric="rouge_l",
        native_metric=TRACE_NATIVE_METRICS.get(name.lower(), "rouge_l"),
        path=folder,
    )
