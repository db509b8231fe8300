"""The general-ability benchmarks run by lm-evaluation-harness (`general.backend: lm_eval`; the optional extra
`pip install "slicelora[lm_eval]"`, lm_eval 0.4.x).

Each benchmark setting (`eval.general.Setting`) becomes a local lm_eval task, defined in Python (lm_eval's
TaskManager with its built-in tasks left out): the setting's scored items and, for few-shot, its pool are written as
JSON lines of docs (text, answer, gold, choices) into a temporary folder and read by lm_eval's `json` dataset
builder (`dataset_path: json` with `data_files`), so the items are those of the shipped files, in the native
backend's order, and nothing is downloaded. The in-memory model runs through lm_eval's HFLM.

lm_eval does: the few-shot prompt (each example "text answer", SHOT_SEPARATOR between them, drawn from the pool by
its sampler seeded with seed + 1, which draws what the native backend draws), the chat template, tokenisation,
batching, the forward passes and greedy generation, and acc / acc_norm of multiple choice. We give it each item's
text and choices, and the score of a generated answer (`eval.general.generated_score`: BBH's count extraction,
ROUGE-L) as the task's process_results; lm_eval's own regex filter and exact_match would normalise answers
differently (e.g. "007" is not "7" to exact_match), so they are not used.

The HFLM settings that make lm_eval's inputs those of the native backend:
- multiple choice: raw text with the tokenizer's own special tokens (add_bos_token unset), log-softmax in float32,
  max_length - 1 (lm_eval feeds the last max_length + 1 tokens but the last one; the native backend feeds the last
  max_length tokens and ignores the last one's logits);
- generation: the chat template when the tokenizer has one (else the text + "\\n", as `data.prompts` does), no
  special tokens added to the templated text (add_bos_token=False), max_length + max_new_tokens (lm_eval cuts
  prompts to max_length - max_gen_toks), no stop sequence but EOS.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import Any

from lm_eval import evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from .general import METRICS, SHOT_SEPARATOR, TARGET_DELIMITER, Doc, Setting, generated_score, scored_and_pool
from .generate import evaluating

SCORED, POOL = "scored", "pool"  # the task's dataset splits


def _write_docs(path: Path, docs: list[Doc]) -> str:
    rows = ({"text": d.text, "answer": d.answer, "gold": d.gold, **({"choices": list(d.choices)} if d.choices else {})}
            for d in docs)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def task_config(setting: Setting, limit: int, seed: int, folder: Path, chat: bool) -> dict[str, Any]:
    """The lm_eval task config of `setting`, its scored docs (and pool, when it has shots) written into `folder`.
    `chat`: generation prompts go through the chat template (else the item's text ends with "\\n")."""
    scored, pool = scored_and_pool(setting, limit, seed)
    files = {SCORED: _write_docs(folder / f"{setting.name}_{SCORED}.jsonl", [setting.docs[i] for i in scored])}
    if setting.shots:
        files[POOL] = _write_docs(folder / f"{setting.name}_{POOL}.jsonl", [setting.docs[j] for j in pool])
    metrics = [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in METRICS[setting.name]]
    config: dict[str, Any] = {
        "task": f"slicelora_{setting.name}",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": files, "cache_dir": str(folder / "cache")},
        "test_split": SCORED,
        "fewshot_split": POOL if setting.shots else None,
        "num_fewshot": setting.shots,
        "doc_to_text": "text",
        "target_delimiter": TARGET_DELIMITER,
        "fewshot_delimiter": SHOT_SEPARATOR,
        "metric_list": metrics,
    }
    if not setting.max_new_tokens:
        return {**config, "output_type": "multiple_choice", "doc_to_choice": "choices", "doc_to_target": "gold"}

    def process_results(doc: dict, results: list[str]) -> dict[str, float]:
        return {METRICS[setting.name][0]: generated_score(setting, results[0].strip(), doc["gold"])}

    config.update(output_type="generate_until", doc_to_target="answer", process_results=process_results,
                  generation_kwargs={"until": [], "max_gen_toks": setting.max_new_tokens, "do_sample": False})
    if not chat:
        config.update(doc_to_text=lambda doc: doc["text"] + "\n", fewshot_config={"doc_to_text": "text"})
    return config


def run_setting(
    model, tokenizer, setting: Setting, *, limit: int, seed: int, batch_size: int, max_length: int
) -> tuple[dict[str, float], list[dict]]:
    """The setting's scores (0..100, keyed as the native backend's: the mean of lm_eval's per-item metrics) and
    lm_eval's logged samples (per scored item: its doc, the requests' arguments, the model's responses, the
    metrics), in the order of the scored items.

    The model runs in eval mode under inference_mode and gets its training mode back; lm_eval gets a copy of the
    tokenizer (it may set a pad token)."""
    generation = setting.max_new_tokens > 0
    chat = generation and bool(getattr(tokenizer, "chat_template", None))
    with tempfile.TemporaryDirectory(prefix="slicelora-lm-eval-") as folder, evaluating(model):
        tasks = TaskManager(include_defaults=False).load([task_config(setting, limit, seed, Path(folder), chat)])
        for task in tasks["tasks"].values():
            task.set_fewshot_seed(seed + 1)
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), backend="causal", batch_size=batch_size,
                  max_length=max_length + setting.max_new_tokens if generation else max_length - 1,
                  add_bos_token=False if generation else None, softmax_dtype="float32")
        results = evaluate(lm, tasks, bootstrap_iters=0, log_samples=True, apply_chat_template=chat,
                           fewshot_as_multiturn=False)
    samples = sorted(results["samples"][f"slicelora_{setting.name}"], key=lambda sample: sample["doc_id"])
    scale = 1.0 if generation else 100.0  # acc and acc_norm are 0 or 1; our process_results scores are 0..100
    # the mean of the per-item scores in item order, summed as the native backend sums them (so equal to the bit)
    scores = {f"{setting.name}_{m}": sum(scale * s[m] for s in samples) / len(samples) for m in METRICS[setting.name]}
    return scores, samples
