"""Label transforms: a classification task rewritten to oppose the original while both stay learnable together.

A task reference may end in "+TRANSFORM", resolved by `load_task` like any other reference:

    363+swap_labels                          exchange the two labels of a two-label task
    875+relabel(joy=sadness;sadness=joy;anger=anger;fear=fear;love=love;surprise=surprise)
                                             any permutation of the task's labels (every label mapped, none twice)

Arguments are separated by ";", never ",", so a reference survives comma-separated CLI lists and YAML lists
without quotes (the shell still wants quotes around parentheses). Every answer and reference of the train and
held-out splits is mapped; the metric is unchanged.

Each transform appends to the task's instruction (the Super-NI Definition, or TRACE's "TRACE task: NAME" header; the
result becomes the task's `definition`) a note stating the new mapping, so a model can tell the two tasks apart.
Without that note the same prompts would ask for opposite answers: a contradiction, not a conflict, that no method
can keep. The flag `keep_instruction` ("363+swap_labels(keep_instruction)") builds that contradiction for
demonstrations only; it is refused unless `transform_task(..., allow_same_instruction=True)` is called directly.

A transformed task is named "<task name>+<canonical transform>" ("task363_sst2_polarity_classification+swap_labels";
relabel pairs sorted, labels percent-encoded outside [A-Za-z0-9_.~-]), which is itself a reference that resolves to
the same task and holds only filesystem-safe characters when the base name does.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import replace
from urllib.parse import quote, unquote

from slicelora.errors import DataError

from .tasks import Example, Task, _is_classification

TRANSFORMS = ("swap_labels", "relabel")
KEEP_INSTRUCTION = "keep_instruction"
SYNTAX = "REF+swap_labels or REF+relabel(OLD=NEW;OLD=NEW;...)"
# the shortest base after which the rest is one transform; a base holding "+" is itself resolved recursively
_REF = re.compile(r"(?P<base>.+?)\+(?P<name>[A-Za-z_]\w*)(?:\((?P<args>[^()]*)\))?")
_OPENED = re.compile(r"\+[A-Za-z_]\w*\(")


def split_ref(ref: str) -> tuple[str, str] | None:
    """(base reference, transform text) for a "REF+TRANSFORM" reference; None for a plain reference or an existing
    path. A transform whose parentheses do not close is refused here (typically a ref cut at a comma)."""
    if "+" not in ref or os.path.exists(os.path.expanduser(ref)):
        return None
    match = _REF.fullmatch(ref.strip())
    if match:
        return match["base"].strip(), ref.strip()[len(match["base"]) + 1:]
    if _OPENED.search(ref):
        raise DataError(
            f"task reference {ref!r}: the transform's parentheses do not close. Write {SYNTAX}; separate the pairs "
            "with ';' (a ',' splits comma-separated task lists, which cuts the reference in two)."
        )
    return None


def transform_task(task: Task, transform: str, *, allow_same_instruction: bool = False) -> Task:
    """`task` with its labels remapped by `transform` ("swap_labels", "relabel(POS=NEG;NEG=POS)", optionally with
    ";keep_instruction" or "(keep_instruction)") and its instruction rewritten to state the new mapping.

    `allow_same_instruction=True` permits keep_instruction (the original instruction kept: a contradiction with
    the original task, for demonstrations only)."""
    name, pairs, keep = _parse(task.name, transform)
    where = f"{task.name}+{name}"
    if not _is_classification(task.train):
        distinct = len({r for ex in task.train for r in ex.references})
        raise DataError(
            f"{where}: {task.name} is not a classification task (its train split has {distinct} distinct outputs; "
            "a label transform needs a closed set of at most 10 short labels, each used twice on average), so there "
            "are no labels to remap. Fix: apply the transform to a classification task, e.g. 363, 1687, 875 or 073."
        )
    labels = sorted({r for ex in task.train + task.heldout for r in ex.references})
    mapping = _swap(where, labels) if name == "swap_labels" else _relabel(where, labels, pairs)
    spec = name if name == "swap_labels" else f"relabel({';'.join(f'{_q(a)}={_q(b)}' for a, b in mapping.items())})"
    if keep:
        spec = keep_instruction(spec)
        if not allow_same_instruction:
            raise DataError(
                f"{where}: keep_instruction keeps {task.name}'s instruction, so the same prompts would ask for the "
                f"original and the remapped answers: beside {task.name} the pair is a contradiction that no method "
                "can keep, not a conflict. Fix: drop keep_instruction (the transform then states the new mapping in "
                "the instruction). Demonstrations of the contradiction call slicelora.data.transforms.transform_task("
                "..., allow_same_instruction=True)."
            )
    head = task.definition
    if task.family == "trace" and not head:  # a TRACE prompt opens with its header (a transformed one keeps it here)
        head = f"TRACE task: {task.name}"
    new_head = head if keep else f"{head}\n\n{_note(mapping)}"
    return replace(
        task,
        name=f"{task.name}+{spec}",
        train=[_remap(ex, head, new_head, mapping, where) for ex in task.train],
        heldout=[_remap(ex, head, new_head, mapping, where) for ex in task.heldout],
        definition=new_head,
    )


def keep_instruction(transform: str) -> str:
    """The transform text with the keep_instruction flag added: "swap_labels" -> "swap_labels(keep_instruction)"."""
    return f"{transform[:-1]};{KEEP_INSTRUCTION})" if transform.endswith(")") else f"{transform}({KEEP_INSTRUCTION})"


def _q(label: str) -> str:
    return quote(label, safe="")


def _parse(task_name: str, transform: str) -> tuple[str, list[tuple[str, str]], bool]:
    """(transform name, OLD=NEW pairs as written, keep_instruction) of "name" or "name(arg;arg;...)"."""
    match = re.fullmatch(r"\s*([A-Za-z_]\w*)\s*(?:\((.*)\))?\s*", transform, re.DOTALL)
    if not match:
        raise DataError(f"{task_name}: transform {transform!r} is not of the form {SYNTAX}.")
    name, args = match[1].lower(), match[2]
    if name not in TRANSFORMS:
        near = difflib.get_close_matches(name, TRANSFORMS, n=1, cutoff=0.4)
        hint = f" Did you mean {near[0]}?" if near else ""
        raise DataError(
            f"{task_name}: unknown transform {name!r}.{hint} Known transforms: swap_labels, "
            "relabel(OLD=NEW;...)."
        )
    where = f"{task_name}+{name}"
    if args is not None and "," in args:
        raise DataError(f"{where}: separate the arguments with ';', not ',' (a ',' splits comma-separated task lists).")
    items = [a.strip() for a in (args or "").split(";") if a.strip()]
    keep = KEEP_INSTRUCTION in items
    pairs = []
    for item in items:
        if item == KEEP_INSTRUCTION:
            continue
        if name == "swap_labels":
            raise DataError(f"{where}: swap_labels takes no arguments apart from {KEEP_INSTRUCTION}, got {item!r}.")
        old, sep, new = item.partition("=")
        if not sep or "=" in new or not old.strip() or not new.strip():
            raise DataError(f"{where}: {item!r} is not a pair OLD=NEW; write relabel(OLD=NEW;OLD=NEW;...).")
        pairs.append((unquote(old.strip()), unquote(new.strip())))
    if name == "relabel" and not pairs:
        raise DataError(f"{where}: relabel needs a map of the task's labels: relabel(OLD=NEW;OLD=NEW;...).")
    return name, pairs, keep


def _swap(where: str, labels: list[str]) -> dict[str, str]:
    if len(labels) != 2:
        example = ";".join(f"{_q(a)}={_q(b)}" for a, b in zip(labels, labels[1:] + labels[:1]))
        raise DataError(
            f"{where}: swap_labels exchanges exactly two labels, but the task has {len(labels)}: {', '.join(labels)}. "
            f"Fix: map every label with relabel, e.g. relabel({example})."
        )
    return {labels[0]: labels[1], labels[1]: labels[0]}


def _relabel(where: str, labels: list[str], pairs: list[tuple[str, str]]) -> dict[str, str]:
    """The pairs as a permutation of `labels`, sorted by old label; anything else is refused."""
    known = ", ".join(labels)
    mapping: dict[str, str] = {}
    for old, new in pairs:
        for label in (old, new):
            if label not in labels:
                lowered = {known_label.lower(): known_label for known_label in labels}
                near = difflib.get_close_matches(label.lower(), list(lowered), n=1, cutoff=0.6)
                hint = f" (did you mean {lowered[near[0]]!r}?)" if near else ""
                raise DataError(
                    f"{where}: {label!r}{hint} is not one of the task's labels: {known}. A relabelling permutes "
                    "the existing labels (new label names would not oppose the original task)."
                )
        if old in mapping:
            raise DataError(f"{where}: label {old!r} is mapped twice; map each label once.")
        mapping[old] = new
    missing = [label for label in labels if label not in mapping]
    if missing:
        raise DataError(
            f"{where}: not every label is mapped (missing: {', '.join(missing)}). A relabelling maps every label of "
            f"the task ({known}); add {missing[0]}={missing[0]} to keep a label as it is."
        )
    targets: dict[str, list[str]] = {}
    for old, new in mapping.items():
        targets.setdefault(new, []).append(old)
    merged = {new: olds for new, olds in targets.items() if len(olds) > 1}
    if merged:
        new, olds = next(iter(merged.items()))
        raise DataError(
            f"{where}: {' and '.join(olds)} are each mapped to {new!r}, so they could no longer be told apart. "
            "A relabelling is a permutation: each label is the target of exactly one label."
        )
    if all(old == new for old, new in mapping.items()):
        raise DataError(f"{where}: the map keeps every label as it is, so the task would not change.")
    return dict(sorted(mapping.items()))


def _note(mapping: dict[str, str]) -> str:
    """The sentence appended to the instruction: each changed label's new answer (a permutation changes at least
    two), in words a model can follow."""
    changed = [(old, new) for old, new in mapping.items() if old != new]
    clauses = [f'"{new}" where the instructions above call for "{old}"' for old, new in changed[:1]]
    clauses += [f'"{new}" where they call for "{old}"' for old, new in changed[1:]]
    listed = f"{', '.join(clauses[:-1])}, and {clauses[-1]}"
    rest = " Every other label keeps its meaning." if len(changed) < len(mapping) else ""
    return f"Note: in this variant the labels are remapped: answer {listed}.{rest}"


def _remap(example: Example, head: str, new_head: str, mapping: dict[str, str], where: str) -> Example:
    if not example.prompt.startswith(f"{head}\n\n"):
        raise DataError(
            f"{where}: a prompt does not start with the task's instruction ({head[:60]!r}...), so the instruction "
            "cannot be rewritten. Transforms apply to tasks as load_task builds them."
        )
    return Example(
        prompt=new_head + example.prompt[len(head):],
        answer=mapping[example.answer],
        references=tuple(mapping[r] for r in example.references),
        source=example.source,
    )
