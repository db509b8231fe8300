"""Score a model on a task's held-out examples: batched greedy generation, then the task's scorer per example, and
the answer's teacher-forced NLL scored on the generation's KV cache."""

from __future__ import annotations

from ..data.prompts import encode_prompt
from ..data.tasks import Task
from .loss import generate_and_score
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
    metric, score in 0..100, and the answer's per-token NLL under teacher forcing (nll, over answer_tokens tokens;
    `answer_losses` with max_length=`max_prompt_length`, the training encoding's bound)."""
    rank, world = shard
    chosen = list(enumerate(task.heldout[:examples]))[rank::world]
    predictions, losses = generate_and_score(
        model, tokenizer, [ex for _, ex in chosen], max_new_tokens=max_new_tokens, batch_size=batch_size,
        max_prompt_length=max_prompt_length, max_length=max_prompt_length,
        desc=f"eval {task.name[:28]}" if rank == 0 else None,
    )
    return [
        {"task": task.name, "index": i, "prompt": ex.prompt,
         "prompt_truncated": encode_prompt(tokenizer, ex.prompt, max_prompt_length)[1],
         "prediction": pred, "references": list(ex.references),
         "metric": metric, "score": score(metric, pred, ex.references, ex.source),
         "nll": total / count, "answer_tokens": count}
        for (i, ex), pred, (total, count) in zip(chosen, predictions, losses)
    ]
