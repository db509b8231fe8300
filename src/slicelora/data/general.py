"""Loaders of the general-ability sets (HellaSwag, CommonsenseQA, BBH object counting, Alpaca).

The files ship inside the package, in `slicelora/datasets/general/` (see its README for sources and licences), each
as `.json` / `.jsonl` or gzipped. Every loader validates what it reads and raises DataError naming the file, the line or item,
and the field, so a malformed file never surfaces as a KeyError or JSONDecodeError.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError
from .tasks import SHIPPED_DATA_DIR

HELLASWAG_FILE = "hellaswag/hellaswag_val_first1000.jsonl"
COMMONSENSEQA_FILE = "commonsenseqa/dev_rand_split.jsonl"
BBH_OBJECT_COUNTING_FILE = "bbh/object_counting.json"
BBH_COT_PROMPT_FILE = "bbh/object_counting_cot_prompt.txt"
ALPACA_FILE = "alpaca/alpaca_data_first200.json"


@dataclass(frozen=True)
class HellaSwagItem:
    context: str                 # "{activity_label}: {ctx}", the text every ending continues
    endings: tuple[str, ...]
    label: int                   # index of the right ending


@dataclass(frozen=True)
class MultipleChoiceItem:
    question: str
    labels: tuple[str, ...]      # "A".."E"
    texts: tuple[str, ...]       # the answer texts, in label order
    answer: int                  # index of the right choice


@dataclass(frozen=True)
class CountingItem:
    input: str
    target: int


@dataclass(frozen=True)
class InstructionItem:
    instruction: str
    input: str
    output: str


def general_data_dir() -> Path:
    """The shipped general-ability sets: the package's `datasets/general` folder."""
    return SHIPPED_DATA_DIR / "general"


def find_general_file(name: str, data_dir: str | Path | None = None) -> Path:
    """`data_dir/name`, or its gzipped copy `name.gz`."""
    root = Path(data_dir) if data_dir is not None else general_data_dir()
    for path in (root / name, root / (name + ".gz")):
        if path.is_file():
            return path
    raise DataError(
        f"general-ability file {name!r} not found: looked for {root / name} and {root / name}.gz. "
        f"Pass the folder that holds the general-ability sets (default: the shipped {general_data_dir()}; "
        "reinstall slicelora if a file is missing there)."
    )


def _read_text(path: Path) -> str:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return f.read()
        return path.read_text(encoding="utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        fix = "replace it with a valid UTF-8 (optionally gzipped) file"
        raise DataError(f"{path}: cannot be read ({e}); {fix}.") from e


def _read_jsonl(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(where, object) per non-empty line; `where` is "file line N" for error messages."""
    records = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object.") from e
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}.")
        records.append((where, obj))
    if not records:
        raise DataError(f"{path}: no records; the file is empty.")
    return records


def _read_json(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}: {e.msg}).") from e


def _field(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise DataError(f"{where}: missing field {key!r}.")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(f"{where}: field {key!r} must be {names}, got {type(value).__name__}.")
    return value


def _strings(value: list, key: str, where: str, minimum: int) -> tuple[str, ...]:
    if len(value) < minimum or not all(isinstance(v, str) for v in value):
        raise DataError(f"{where}: field {key!r} must be a list of at least {minimum} strings.")
    return tuple(value)


def load_hellaswag(data_dir: str | Path | None = None) -> list[HellaSwagItem]:
    """HellaSwag jsonl: `query` (else "{activity_label}: {ctx}", else `ctx`), the `endings`, and `label` (an int or
    a digit string)."""
    path = find_general_file(HELLASWAG_FILE, data_dir)
    items = []
    for where, obj in _read_jsonl(path):
        if "query" in obj:
            context = _field(obj, "query", str, where)
        else:
            ctx = _field(obj, "ctx", str, where)
            context = f"{obj['activity_label']}: {ctx}" if isinstance(obj.get("activity_label"), str) else ctx
        endings = _strings(_field(obj, "endings", list, where), "endings", where, 2)
        label = _field(obj, "label", (int, str), where)
        if isinstance(label, str):
            if not label.strip().isdigit():
                raise DataError(f"{where}: field 'label' must be an integer, got {label!r}.")
            label = int(label)
        if not 0 <= label < len(endings):
            raise DataError(f"{where}: field 'label' = {label} is not an index of the {len(endings)} endings.")
        items.append(HellaSwagItem(context, endings, label))
    return items


def load_commonsenseqa(data_dir: str | Path | None = None) -> list[MultipleChoiceItem]:
    """CommonsenseQA jsonl in the Hugging Face layout: question, choices.label / choices.text, answerKey."""
    path = find_general_file(COMMONSENSEQA_FILE, data_dir)
    items = []
    for where, obj in _read_jsonl(path):
        question = _field(obj, "question", str, where)
        choices = _field(obj, "choices", dict, where)
        labels = _strings(_field(choices, "label", list, f"{where} (choices)"), "choices.label", where, 2)
        texts = _strings(_field(choices, "text", list, f"{where} (choices)"), "choices.text", where, 2)
        if len(labels) != len(texts):
            raise DataError(f"{where}: choices.label has {len(labels)} entries but choices.text has {len(texts)}.")
        answer = _field(obj, "answerKey", str, where)
        if answer not in labels:
            raise DataError(f"{where}: field 'answerKey' = {answer!r} is not one of the labels {list(labels)}.")
        items.append(MultipleChoiceItem(question, labels, texts, labels.index(answer)))
    return items


def load_bbh_object_counting(data_dir: str | Path | None = None) -> list[CountingItem]:
    """BBH object counting: {"examples": [{"input": str, "target": "<integer>"}, ...]}."""
    path = find_general_file(BBH_OBJECT_COUNTING_FILE, data_dir)
    data = _read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with an 'examples' list.")
    examples = _field(data, "examples", list, str(path))
    if not examples:
        raise DataError(f"{path}: field 'examples' is empty.")
    items = []
    for number, ex in enumerate(examples):
        where = f"{path} examples[{number}]"
        if not isinstance(ex, dict):
            raise DataError(f"{where}: expected an object with 'input' and 'target'.")
        target = _field(ex, "target", str, where).strip()
        if not target.lstrip("-").isdigit():
            raise DataError(f"{where}: field 'target' must be an integer written as a string, got {target!r}.")
        items.append(CountingItem(_field(ex, "input", str, where), int(target)))
    return items


def load_bbh_cot_prompt(data_dir: str | Path | None = None) -> str:
    """The BBH object-counting 3-shot chain-of-thought prompt without its canary header (the lines up to `-----`)."""
    path = find_general_file(BBH_COT_PROMPT_FILE, data_dir)
    text = _read_text(path)
    _, sep, body = text.partition("\n-----\n")
    prompt = (body if sep else text).strip()
    if "Q:" not in prompt or "So the answer is" not in prompt:
        raise DataError(
            f"{path}: not a BBH chain-of-thought prompt (expected 'Q: ...' / 'A: ... So the answer is N.' blocks)."
        )
    return prompt


def load_alpaca(data_dir: str | Path | None = None) -> list[InstructionItem]:
    """Alpaca: a JSON list of {"instruction", "input" (may be "" or absent), "output"}."""
    path = find_general_file(ALPACA_FILE, data_dir)
    data = _read_json(path)
    if not isinstance(data, list) or not data:
        raise DataError(f"{path}: expected a non-empty JSON list of {{instruction, input, output}} objects.")
    items = []
    for number, obj in enumerate(data):
        where = f"{path} item {number}"
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected an object with 'instruction', 'input', 'output'.")
        source = _field(obj, "input", str, where) if "input" in obj else ""
        items.append(InstructionItem(_field(obj, "instruction", str, where), source, _field(obj, "output", str, where)))
    return items
