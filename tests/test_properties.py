"""Property tests of the input boundary: malformed task files, sequence files and run configs either load or raise
one of our error types (SliceLoraError subclasses) with a message, never a raw KeyError/TypeError/JSONDecodeError/
yaml error from deep inside the loaders.

Every property writes its files into a fresh temporary folder, so examples do not see each other's files.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from slicelora.data.sequences import Sequence, load_sequence
from slicelora.data.tasks import Task, load_task
from slicelora.errors import SliceLoraError
from slicelora.loop.config import RunConfig, _keys, load_config
from slicelora.loop.stages import run

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def outcome(fn, *args, **kwargs):
    """The result, or our error (with a message); any other exception fails the property."""
    try:
        return fn(*args, **kwargs)
    except SliceLoraError as exc:
        assert str(exc).strip(), f"{type(exc).__name__} without a message"
        return exc


@contextmanager
def scratch():
    with tempfile.TemporaryDirectory(prefix="slicelora-prop-") as d:
        yield Path(d)


# --- strategies: values ------------------------------------------------------------------------------------------

short_text = st.text(max_size=24)
few_words = st.sampled_from(["", " ", "a", "b", "yes", "no", "POS", " NEG ", "x" * 40])  # duplicates happen
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), short_text)
json_value = st.recursive(
    json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(short_text, inner, max_size=4)),
    max_leaves=10)
# Payloads that once escaped a parser's own error handling (recursion, int digits limit, bad bytes).
NASTY_JSON = [b"[" * 50_000, b"1" * 5000, b'{"a": ' + b"1" * 5000 + b"}", b"\xff\xfe{}", b"", b"   ", b"\x00",
              b"NaN", b'"\\ud800"', b"{" * 50_000]


def maybe(good, bad=json_value):
    """Mostly the right shape, sometimes any JSON value."""
    return st.one_of(good, good, bad)


text_field = maybe(st.one_of(short_text, few_words))
output_field = maybe(st.one_of(few_words, st.lists(few_words, max_size=3), st.lists(json_value, max_size=2)))
superni_instance = maybe(st.fixed_dictionaries(
    {}, optional={"input": text_field, "output": output_field, "id": json_value}))
superni_object = maybe(st.fixed_dictionaries({}, optional={
    "Definition": maybe(st.one_of(short_text, st.lists(short_text, max_size=2), st.lists(json_value, max_size=2))),
    "Instances": maybe(st.lists(superni_instance, max_size=8)),
    "Positive Examples": json_value,
}))
trace_item = maybe(st.fixed_dictionaries({}, optional={"prompt": text_field, "answer": text_field}))
trace_list = maybe(st.lists(trace_item, max_size=6))


# --- strategies: bytes on disk -----------------------------------------------------------------------------------

MODES = ("json", "json", "json", "truncated", "garbage", "bad_utf8", "nasty",
         "gzip", "gzip", "gzip_truncated", "gzip_corrupt", "gzip_of_garbage", "garbage_as_gz")


class Blob(tuple):
    """(bytes, suffix), with a short repr so that a failing example stays readable."""

    def __repr__(self) -> str:
        raw, suffix = self
        head = raw[:80] + (b"..." if len(raw) > 80 else b"")
        return f"Blob({head!r} ({len(raw)} bytes), {suffix!r})"


@st.composite
def encoded(draw, value_strategy):
    """Blob(bytes, suffix) of a JSON value, well formed or damaged in one of several ways."""
    mode = draw(st.sampled_from(MODES))
    raw = json.dumps(draw(value_strategy)).encode()
    gz = mode.startswith("gzip") or mode == "garbage_as_gz"
    if mode == "truncated":
        raw = raw[: draw(st.integers(0, max(0, len(raw) - 1)))]
    elif mode in ("garbage", "garbage_as_gz"):
        raw = draw(st.binary(max_size=64))
    elif mode == "bad_utf8":
        cut = draw(st.integers(0, len(raw)))
        raw = raw[:cut] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"])) + raw[cut:]
    elif mode == "nasty":
        raw = draw(st.sampled_from(NASTY_JSON))
    elif mode == "gzip":
        raw = gzip.compress(raw)
    elif mode == "gzip_truncated":
        packed = gzip.compress(raw)
        raw = packed[: draw(st.integers(0, len(packed) - 1))]
    elif mode == "gzip_corrupt":
        packed = bytearray(gzip.compress(raw + b" " * 200))
        for _ in range(draw(st.integers(1, 4))):
            packed[draw(st.integers(10, len(packed) - 1))] = draw(st.integers(0, 255))
        raw = bytes(packed)
    elif mode == "gzip_of_garbage":
        raw = gzip.compress(draw(st.binary(max_size=64)))
    if draw(st.integers(0, 9)) == 0:
        gz = not gz  # the suffix lies about the content
    return Blob((raw, ".json.gz" if gz else ".json"))


def write(path_without_suffix: Path, blob: tuple[bytes, str]) -> Path:
    raw, suffix = blob
    path = path_without_suffix.with_name(path_without_suffix.name + suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw)
    return path


# --- task loaders ------------------------------------------------------------------------------------------------

@SETTINGS
@given(blob=encoded(superni_object), by_name=st.booleans(), heldout=st.integers(1, 5), seed=st.integers(0, 3))
def test_superni_single_file(blob, by_name, heldout, seed):
    with scratch() as root:
        path = write(root / "tasks" / "task901_prop_check", blob)
        ref = "901" if by_name else path
        result = outcome(load_task, ref, [root], heldout_size=heldout, seed=seed)
        if isinstance(result, Task):
            assert result.train and result.heldout and result.family == "superni"
            assert all(isinstance(ex.answer, str) and ex.references for ex in result.train + result.heldout)


@SETTINGS
@given(train=st.one_of(st.none(), encoded(superni_object)), test=encoded(superni_object),
       extra=st.one_of(st.none(), encoded(json_value)))
def test_superni_split_folder(train, test, extra):
    with scratch() as root:
        folder = root / "task902_prop_folder"
        write(folder / "test", test)
        if train is not None:
            write(folder / "train", train)
        if extra is not None:
            write(folder / "dev", extra)
        result = outcome(load_task, folder)
        if isinstance(result, Task):
            assert result.family == "superni" and result.train and result.heldout


@SETTINGS
@given(splits=st.dictionaries(st.sampled_from(["train", "eval", "test", "train_reasoning_variant"]),
                              st.one_of(encoded(trace_list), encoded(superni_object)), min_size=0, max_size=4),
       allow_variant=st.booleans(), by_name=st.booleans())
def test_trace_folder(splits, allow_variant, by_name):
    with scratch() as root:
        folder = root / "trace" / "MeetingBank"
        folder.mkdir(parents=True)
        for split, blob in splits.items():
            write(folder / split, blob)
        ref = "meetingbank" if by_name else folder
        result = outcome(load_task, ref, [root], allow_reasoning_variant=allow_variant)
        if isinstance(result, Task):
            assert result.train and result.heldout and result.native_metric == "rouge_l"


@FEW
@given(ref=st.one_of(short_text, st.sampled_from(["task", "task0", "0", "901", "task901", "x.json", "a\x00b",
                                                 "a\x00.json", "x/" + "a" * 300, "a" * 300, ".", "..", " ",
                                                 "~nosuchuser_slicelora/x", "~nosuchuser_slicelora.json"])),
       content=encoded(superni_object))
def test_task_references(ref, content):
    with scratch() as root:
        write(root / "task901_prop_ref", content)
        (root / "task902_twin").mkdir()  # a folder without splits is not a task
        cwd = os.getcwd()
        os.chdir(root)  # relative path references resolve inside the scratch folder
        try:
            outcome(load_task, ref, [root])
        finally:
            os.chdir(cwd)


# --- sequences ---------------------------------------------------------------------------------------------------

ref_value = maybe(st.one_of(short_text, st.integers(), st.sampled_from(["002", "363", "C-STANCE", ""])))
sequence_doc = st.one_of(
    st.fixed_dictionaries({}, optional={"name": maybe(short_text), "tasks": maybe(st.lists(ref_value, max_size=4))}),
    st.fixed_dictionaries({"sequences": maybe(st.dictionaries(
        maybe(short_text, json_leaf), maybe(st.lists(ref_value, max_size=4)), max_size=3))}),
    json_value,
)
# YAML that PyYAML's own constructors reject with a raw ValueError/KeyError/AttributeError, or recurses on.
NASTY_YAML = ["!!timestamp foo", "tasks: [!!int abc]", "!!bool maybe", "tasks: !!float x", "[" * 5000,
              "tasks: &a [*a]", "a: &x\n  b: *x\n", "? [1]\n: 2", "tasks: [a, a]", "\t- x", "tasks:\n- !!binary ???",
              "sequences: {a: [1], A: [2]}", "sequences: {}", "name: null\ntasks: [x]", "tasks: [!!python/name:os.system]",
              "\x00", "\ufeff", "%YAML 9.9\n---\ntasks: [a]", "tasks: [002, 0x1f, 1e3, .inf]"]
yaml_text = st.one_of(
    sequence_doc.map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
    st.sampled_from(NASTY_YAML),
    short_text,
)


@SETTINGS
@given(text=st.one_of(yaml_text.map(str.encode), st.binary(max_size=64)),
       pick=st.one_of(st.none(), short_text.filter(lambda s: ":" not in s and "/" not in s and "\\" not in s)))
def test_sequence_files(text, pick):
    with scratch() as root:
        path = root / "seq.yaml"
        path.write_bytes(text)
        ref = str(path) if pick is None else f"{path}:{pick}"
        result = outcome(load_sequence, ref)
        if isinstance(result, Sequence):
            assert result.tasks and all(isinstance(t, str) and t for t in result.tasks)
        outcome(load_sequence, path)  # a Path is always a file


@FEW
@given(name=st.one_of(short_text, st.sampled_from(["x.yaml", "missing.yaml:a", "a\x00.yaml", "\x00", "NI_SEQ_G1",
                                                  "trace", ".yaml", ":", "a" * 300 + ".yaml",
                                                  "~nosuchuser_slicelora.yaml", "~nosuchuser_slicelora/x.yaml:a"])))
def test_sequence_names(name):
    with scratch() as root:
        cwd = os.getcwd()
        os.chdir(root)
        try:
            result = outcome(load_sequence, name)
        finally:
            os.chdir(cwd)
        if isinstance(result, Sequence):
            assert result.tasks


# --- run configs -------------------------------------------------------------------------------------------------

VALID_KEYS = _keys(RunConfig)
config_key = st.one_of(st.sampled_from(VALID_KEYS), st.sampled_from(VALID_KEYS).map(lambda k: k.upper()),
                       short_text, st.sampled_from(["train.", ".lr", "train.lr.x", "adapter.rank.a.b", "init"]))
odd_scalars = st.sampled_from([".inf", "-.inf", ".nan", "1e999", "1" * 5000, "0x10", "true", "yes", "null", "~", "",
                               "[1, 2]", "{a: 1}", "2001-12-14", "!!timestamp x", "!!int abc", "[", "'", ": :", "&a [*a]",
                               "slice", "pissa", "-1", "0", "1.5", "2e-4"])
config_value = st.one_of(json_value, odd_scalars)


def nest(flat: dict) -> dict:
    """{"a.b": v} -> {"a": {"b": v}} where possible (a YAML file may use either form)."""
    out: dict = {}
    for key, value in flat.items():
        head, dot, tail = key.partition(".")
        if dot and isinstance(out.setdefault(head, {}), dict):
            out[head][tail] = value
        else:
            out[key] = value
    return out


config_doc = st.one_of(
    st.dictionaries(config_key, config_value, max_size=5),
    st.dictionaries(config_key, config_value, max_size=5).map(nest),
    json_value,
)
config_file_text = st.one_of(
    config_doc.map(lambda d: yaml.safe_dump(d, allow_unicode=True).encode()),
    st.sampled_from(NASTY_YAML + ["adapter:\n  rank: .inf\n", "adapter: {rank: " + "1" * 5000 + "}",
                                  "a: &x\n  b: *x\n", "train: &t {lr: *t}", "adapter: {rank: !!int x}",
                                  "init:\n  method: !!timestamp q\n"]).map(str.encode),
    st.binary(max_size=64),
)
override = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", config_key, st.one_of(odd_scalars, short_text)),
    short_text,
    st.sampled_from(["=", "==", "train.lr==1", " train.lr = 1e-4 ", "adapter.rank=", "a.b=c", "adapter.targets=[[1]]",
                     "init.method=[", "train.max_examples=null", "train.bf16=maybe", "adapter.rank=1" + "0" * 5000]),
)


@SETTINGS
@given(text=st.one_of(st.none(), config_file_text), overrides=st.lists(override, max_size=3))
def test_run_configs(text, overrides):
    with scratch() as root:
        path = None
        if text is not None:
            path = root / "run.yaml"
            path.write_bytes(text)
        result = outcome(load_config, path, overrides)
        if isinstance(result, RunConfig):
            assert result.adapter.rank >= 1 and 0 < result.init.strength <= 1


@FEW
@given(where=st.sampled_from(["missing.yaml", "folder", "a\x00.yaml", "a" * 300 + ".yaml", "~nosuchuser_slicelora.yaml"]))
def test_run_config_paths(where):
    with scratch() as root:
        (root / "folder").mkdir()
        outcome(load_config, root / where)


# --- the harness is not vacuous: well-formed inputs of every kind load ---------------------------------------------

def test_well_formed_inputs_load(tmp_path):
    instances = [{"input": f"in {i}", "output": ["POS" if i % 2 else "NEG"]} for i in range(8)]
    task = {"Definition": ["Classify."], "Instances": instances}
    single = write(tmp_path / "task901_ok", (json.dumps(task).encode(), ".json"))
    assert load_task(single).family == "superni"
    write(tmp_path / "task902_ok" / "train", (gzip.compress(json.dumps(task).encode()), ".json.gz"))
    write(tmp_path / "task902_ok" / "test", (json.dumps(task).encode(), ".json"))
    assert len(load_task(tmp_path / "task902_ok").heldout) == 8
    items = [{"prompt": f"p{i}", "answer": "A"} for i in range(3)]
    for split in ("train", "test"):
        write(tmp_path / "FOMC" / split, (json.dumps(items).encode(), ".json"))
    assert load_task("fomc", [tmp_path]).native_metric == "accuracy"
    seq = tmp_path / "s.yaml"
    seq.write_text("sequences:\n  mine: [002, C-STANCE]\n  other: [363]\n")
    assert load_sequence(f"{seq}:mine").tasks == ["002", "C-STANCE"]
    cfg = tmp_path / "c.yaml"
    cfg.write_text("adapter: {rank: 4}\ntrain.lr: 2e-4\n")
    assert load_config(cfg, ["init.method=lora_ga"]).adapter.rank == 4


# --- the whole config surface, through a run ---------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
SURFACE = {  # each key's values: valid ones, edges and invalid ones
    "adapter.rank": [0, 1, 4, 24, 48, -1],
    "adapter.alpha": [2.0, 0.0, -1.0, NAN, INF],
    "adapter.dropout": [0.0, 0.1, 1.0, 1.5],
    "adapter.targets": [["q_proj"], ["q_proj", "down_proj"], ["nope"], []],
    "init.method": ["vanilla", "lora_ga", "loram", "slice", "pissa", "eva", "corda", "slcie"],
    "init.corda_mode": ["kpm", "ipm", "kmp"],
    "init.gate": [0.0, 1.0, -1.0, 2.0, NAN],
    "init.strength": [0.5, 1.0, 0.0, 1.5],
    "init.surgery_mode": ["global", "per_layer", "both"],
    "init.projection": ["pcgrad", "gradvac", "null_space", "retain_add", "none"],
    "init.gate_rule": ["fixed", "median", "always"],
    "init.phi": [0.0, 0.5, 1.0, -2.0],
    "init.null_rank": [None, 1, 0, 500],
    "init.lora_ga_variant": ["paper", "reference", "peft"],
    "init.loss_on": ["full", "answer", "prompt"],
    "init.batches": [1, 0],
    "init.replay_batching": ["each_task", "all_tasks"],
    "train.lr": [1e-3, 0.0, -1e-3, NAN, INF],
    "train.epochs": [1, 0],
    "train.grad_accum": [1, 2, 0],
    "train.max_length": [96, 8, 4],
    "train.max_examples": [None, 4, 0],
    "train.replay_examples": [0, 2, -1],
    "train.multitask": [False, True],
    "train.loss_on": ["full", "answer"],
    "cl.method": ["none", "olora", "inflora", "replay", "ewc"],
    "cl.olora_lambda": [0.5, -1.0, NAN],
    "cl.inflora_rank": [4, 47, 48, 0],
    "eval.batch_size": [4, 0],
    "eval.examples": [2, 0],
    "eval.max_new_tokens": [2, 0],
}
surface = st.dictionaries(st.sampled_from(sorted(SURFACE)), st.just(None), min_size=1, max_size=5).flatmap(
    lambda keys: st.fixed_dictionaries({k: st.sampled_from(SURFACE[k]) for k in keys}))
TINY_RUN = ["sequence=[363, 1687]", "adapter.rank=4", "init.batches=1", "init.batch_size=2", "init.replay_buffer=4",
            "train.epochs=1", "train.batch_size=2", "train.grad_accum=1", "train.max_length=64",
            "train.max_examples=4", "eval.examples=2", "eval.max_new_tokens=2", "general.enabled=false",
            "cl.inflora_batches=1", "cl.inflora_batch_size=2"]


@pytest.mark.slow
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(values=surface)
@example(values={"train.multitask": True})  # found in CI: a multi-task run is one stage
def test_any_config_runs_a_tiny_model_or_fails_with_our_error(tiny_folder, values):
    """Any combination of values either runs two tiny stages or stops with our error type, never a raw
    traceback; a combination refused after the model loaded has trained nothing."""
    overrides = TINY_RUN + [f"{k}={json.dumps(v) if isinstance(v, list) or v is None else v}"
                            for k, v in values.items()]
    config = outcome(load_config, None, [f"model={tiny_folder}", *overrides])
    if isinstance(config, SliceLoraError):
        return
    with scratch() as root:
        result = outcome(run, config, root / "run")
        if isinstance(result, SliceLoraError):
            assert not (root / "run" / "stages" / "01" / "train.json").exists() or "diverged" in str(result), result
        else:
            last = "01" if values.get("train.multitask") else "02"  # a multi-task run is one joint stage
            assert (result / "stages" / last / "scores.json").is_file()
