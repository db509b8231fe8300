"""Score a model on a task's held-out examples: batched greedy generation, then the task's scorer per example."""

from __future__ import annotations

from ..data.prompts import encode_prompt
from ..data.tasks import Task
from .generate import generate
from .scoring import score


def evaluate_task(
    model,
    tokenizer,
    task: Task,
    *,
    examples: int,
    metric: str,
    max_new_tokens: int,
    batch_size: int,
    max_prompt_length: int,
    shard: tuple[int, int] = (0, 1),
) -> list[dict]:
    """One record per scored example (the first `examples` of the held-out split; this rank's share of them):
    index, prompt, whether the prompt was cut from the left to fit `max_prompt_length`, prediction, references,
    metric and score in 0..100."""
    rank, world = shard
    chosen = list(enumerate(task.heldout[:examples]))[rank::world]
    predictions = generate(
        model, tokenizer, [ex.prompt for _, ex in chosen], max_new_tokens=max_new_tokens, batch_size=batch_size,
        max_prompt_length=max_prompt_length, desc=f"eval {task.name[:28]}" if rank == 0 else None,
    )
    return [
        {"task": task.name, "index": i, "prompt": ex.prompt,
         "prompt_truncated": encode_prompt(tokenizer, ex.prompt, max_prompt_length)[1],
         "prediction": pred, "references": list(ex.references),
         "metric": metric, "score": score(metric, pred, ex.references, ex.source)}
        for (i, ex), pred in zip(chosen, predictions)
    ]
