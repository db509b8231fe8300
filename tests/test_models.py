"""Models beyond a local folder: model ids in the Hugging Face cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slicelora.errors import ConfigError
from slicelora.models import load_model, tiny_llama


# --- model ids in the Hugging Face cache ------------------------------------------------------------------------

@pytest.fixture
def hub(tmp_path, tokenizer) -> Path:
    """A Hugging Face cache holding the tiny Llama as "org/tiny" (models--org--tiny/snapshots/<hash>, refs/main)."""
    snapshot = tmp_path / "hf" / "hub" / "models--org--tiny" / "snapshots" / "0123abcd"
    tiny_llama(tokenizer, seed=3).save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    return tmp_path / "hf"


@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HF_HOME"])
def test_model_id_loads_from_the_hub_cache(hub, monkeypatch, variable):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv(variable, str(hub / "hub" if variable == "HF_HUB_CACHE" else hub))
    model, tokenizer = load_model("org/tiny")
    expected = tiny_llama(tokenizer, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), expected.state_dict().values()))
    assert tokenizer.pad_token is not None


def test_unknown_model_id_says_where_it_looked(hub, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(hub / "hub"))
    with pytest.raises(ConfigError) as caught:
        load_model("org/absent")
    message = str(caught.value)
    assert "'org/absent'" in message and str(hub / "hub") in message and "hf download org/absent" in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json there"):  # an existing folder is never looked up as an id
        load_model(str(tmp_path / "empty"))
