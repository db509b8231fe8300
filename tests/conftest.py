"""Shared fixtures and helpers: a tiny random Llama, its byte-level tokenizer, small batches of real-looking
examples, small runs and their comparison, crashes and kills of a run in a fresh process, toy gradients."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import settings
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from slicelora.data.prompts import make_batches
from slicelora.data.tasks import Example
from slicelora.loop.config import RunConfig, load_config
from slicelora.loop.runfolder import read_run
from slicelora.models import LLAMA_TARGETS, tiny_llama, tiny_tokenizer

torch.set_num_threads(1)  # tiny models gain nothing from threads, and threads contend badly on a busy machine

# The same draws on every machine, so a property test fails in CI only where it fails here; HYPOTHESIS_PROFILE=explore
# draws fresh examples each run when hunting for new failures.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def toy_examples(kind: str, n: int = 24) -> list[Example]:
    """Two toy tasks with different mappings, so their gradients differ."""
    words = ["good film", "bad plot", "great cast", "awful pacing", "lovely score", "dull script"]
    out = []
    for i in range(n):
        w = words[i % len(words)]
        if kind == "sentiment":
            ans = "POS" if w.split()[0] in ("good", "great", "lovely") else "NEG"
            out.append(Example(f"Classify the review.\n\nInput: {w} #{i}", ans, (ans,)))
        else:
            out.append(Example(f"Repeat the words backwards.\n\nInput: {w} #{i}", " ".join(w.split()[::-1]), (w,)))
    return out


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """The tiny random Llama and its tokenizer saved as a model folder (what run configs point at)."""
    folder = tmp_path_factory.mktemp("tiny")
    tokenizer = tiny_tokenizer()
    tiny_llama(tokenizer, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def model(tokenizer):
    return tiny_llama(tokenizer, seed=0)


def wrap(model, r: int = 4, alpha: float = 2.0):
    config = LoraConfig(r=r, lora_alpha=alpha, use_rslora=True, target_modules=list(LLAMA_TARGETS), lora_dropout=0.0)
    return get_peft_model(model, config)


@pytest.fixture
def batches(tokenizer):
    return make_batches(toy_examples("sentiment"), tokenizer, batch_size=4, max_length=64, seed=1, num_batches=3)


@pytest.fixture
def replay_batches(tokenizer):
    return make_batches(toy_examples("reverse"), tokenizer, batch_size=4, max_length=64, seed=2, num_batches=3)


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def kill_at(command: list[str], delays: list[float], after_each=None) -> int:
    """Start `command` once per delay and SIGKILL it after that many seconds unless it ended first (one thread);
    `after_each()` runs after every attempt. Returns how many attempts were killed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    kills = 0
    for delay in delays:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            process.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            kills += 1
        if after_each is not None:
            after_each()
    return kills


# A run small enough for a test on the tiny model: the 3 tasks of `demo`, 12 training and 3 scored examples each
SMALL = ["sequence=demo", "adapter.rank=4", "init.batches=2", "init.batch_size=4", "init.replay_buffer=8",
         "train.epochs=1", "train.batch_size=4", "train.grad_accum=2", "train.max_length=96", "train.max_examples=12",
         "eval.examples=3", "eval.max_new_tokens=3", "general.enabled=false"]
# Run (or resume) a run in a fresh process: argv[1] is the run folder, argv[2:] the settings
RESUME_SCRIPT = ("import sys; from slicelora.loop.config import load_config; from slicelora.loop.stages import run;"
                 "run(load_config(None, sys.argv[2:]), sys.argv[1], resume=True)")


def small_config(model: Path, *extra: str) -> RunConfig:
    return load_config(None, [f"model={model}", *SMALL, *extra])


def probe(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        return model(input_ids=ids).logits


def assert_same_run(reference: Path, other: Path) -> None:
    """Same R, same generations (text) and bitwise the same adapters at every stage."""
    np.testing.assert_array_equal(read_run(reference).R, read_run(other).R)
    for t in (1, 2, 3):
        a, b = reference / "stages" / f"{t:02d}", other / "stages" / f"{t:02d}"
        assert (a / "generations.jsonl").read_text() == (b / "generations.jsonl").read_text()
        ours = load_file(str(b / "adapter" / "adapter_model.safetensors"))
        theirs = load_file(str(a / "adapter" / "adapter_model.safetensors"))
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def crash_at(step: str, command: list[str]) -> None:
    """Run `command` (one thread) with the stage loop's fault point `step` ("2:train") armed: it must die there."""
    env = {**os.environ, "SLICELORA_FAULT": step, "OMP_NUM_THREADS": "1"}
    crashed = subprocess.run(command, env=env, capture_output=True, timeout=600)
    assert crashed.returncode == -9, crashed.stderr.decode()[-2000:]  # SIGKILLed at the fault point


def random_grads(seed: int, shapes=((6, 5), (4, 7), (3, 3))) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"l{i}": torch.randn(s, generator=g) for i, s in enumerate(shapes)}


def global_dot(a, b) -> float:
    return sum(float((a[k].double() * b[k].double()).sum()) for k in a)
