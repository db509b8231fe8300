"""Shared fixtures: a tiny random Llama, its byte-level tokenizer, small batches of real-looking examples."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from slicelora.data.prompts import make_batches
from slicelora.data.tasks import Example
from slicelora.models import LLAMA_TARGETS, tiny_llama, tiny_tokenizer

torch.set_num_threads(1)  # tiny models gain nothing from threads, and threads contend badly on a busy machine


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
