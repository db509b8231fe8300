"""`slicelora study --plan`: the cells, the work they share, and a time estimate from a short calibration.

Sharing is predicted from settings alone (what is known before running): cells whose effective settings agree up
to a stage share it, e.g. SLICE variants that differ only in their surgery settings share the first stage (no
replay yet). The run itself shares at least this much, and more, since it keys stages by their actual initial
factors: SLICE's first stage equals LoRA-GA paper's, and a stage where SLICE's gate does not fire equals the other
SLICE variants' and LoRA-GA's.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import time
from collections import Counter
from dataclasses import dataclass

from ..data.prompts import make_batches
from ..data.sequences import load_sequence
from ..data.tasks import load_task, search_dirs
from ..loop.adapters import ADAPTERS
from ..loop.config import RunConfig, flatten
from ..loop.stages import stage_groups, stage_settings
from .spec import Study


def _h(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Work:
    """Unique units of work of a grid (after sharing) and their counts before sharing."""

    stages: Counter          # (signature) -> cells that reach it
    gradient_batches: int    # after sharing
    gradient_batches_all: int
    train_batches: int
    train_batches_all: int
    eval_examples: int
    eval_examples_all: int

    def seconds(self, cost: dict[str, float], shared: bool = True) -> float:
        """Estimated compute at `cost` (seconds per unit, from `calibrate`), after sharing or without it."""
        if shared:
            return (self.gradient_batches * cost["gradient_batch"] + self.train_batches * cost["train_batch"]
                    + self.eval_examples * cost["eval_example"])
        return (self.gradient_batches_all * cost["gradient_batch"] + self.train_batches_all * cost["train_batch"]
                + self.eval_examples_all * cost["eval_example"])


def wall_seconds(group_seconds: list[float], workers: int) -> float:
    """When the last of `workers` finishes, each taking the next group in order as soon as it is free (as the
    study's workers claim groups)."""
    free = [0.0] * max(workers, 1)
    for seconds in group_seconds:
        heapq.heappush(free, heapq.heappop(free) + seconds)
    return max(free)


def count_work(study: Study) -> Work:
    """Walk every cell's stages with predicted signatures; return the unique work."""
    stages: Counter = Counter()
    grads_seen = set()
    work = Work(stages, 0, 0, 0, 0, 0, 0)
    for cell in study.cells():
        config = study.config(cell)
        refs = load_sequence(config.sequence).tasks
        dirs = search_dirs(config.data_dirs, config.data_only)
        tasks = [load_task(r, dirs, heldout_size=config.eval.heldout_size, seed=config.seed,
                           allow_reasoning_variant=config.allow_reasoning_variant) for r in refs]
        sig = _h(config.model, config.seed)
        groups = stage_groups(tasks, config)
        adapter = ADAPTERS[config.adapter.type](config, len(groups))
        for t, learn in enumerate(groups, start=1):
            seen = [task for group in groups[:t] for task in group]
            past = seen[:len(seen) - len(learn)]
            n_train = sum(min(len(task.train), config.train.max_examples or len(task.train)) for task in learn)
            n_train += sum(min(config.train.replay_examples, len(p.train)) for p in past)
            train = math.ceil(n_train / config.train.batch_size) * config.train.epochs
            evals = sum(min(config.eval.examples, len(s.heldout)) for s in seen)
            names = tuple(task.name for task in learn)
            grad_sets = []
            if adapter.data != "none":
                # gradient passes are shared between methods (the gradient cache); a prepare pass is its method's own
                kind = "gradients" if adapter.data in ("current", "replay") else adapter.data
                grad_sets.append(((sig, kind, "current", names, config.init.batches, config.init.batch_size,
                                   config.init.loss_on, config.init.autocast), config.init.batches))
                if adapter.uses_replay and t > 1:
                    n = config.init.batches * ((t - 1) if config.init.replay_batching == "each_task" else 1)
                    grad_sets.append(((sig, kind, "replay", config.init.batch_size, config.init.loss_on,
                                       config.init.replay_buffer, config.init.replay_batching,
                                       config.init.autocast), n))
            new = _h(sig, adapter.signature(t), stage_settings(config), t, names)
            first = new not in stages
            stages[new] += 1
            for key, n in grad_sets:
                work.gradient_batches_all += n
                if key not in grads_seen:
                    grads_seen.add(key)
                    work.gradient_batches += n
            work.train_batches_all += train
            work.eval_examples_all += evals
            if first:
                work.train_batches += train
                work.eval_examples += evals
            sig = new
    return work


def calibrate(study: Study) -> dict[str, float]:
    """Seconds per training batch, per gradient batch and per scored example, measured on the first cell's model,
    adapter and first task (a few batches each)."""
    import torch

    from ..eval.tasks import evaluate_task
    from ..init.gradients import accumulate_gradients
    from ..init.gradients import bf16_supported
    from ..models import load_model

    config = study.config(study.cells()[0])
    task = load_task(load_sequence(config.sequence).tasks[0], search_dirs(config.data_dirs, config.data_only),
                     heldout_size=config.eval.heldout_size, seed=config.seed,
                     allow_reasoning_variant=config.allow_reasoning_variant)
    model, tokenizer = load_model(config.model)
    peft_model = ADAPTERS[config.adapter.type](config, 1).wrap(model, 1)
    device = torch.device("cpu")
    autocast = config.train.bf16 and bf16_supported(device)
    batches = make_batches(task.train, tokenizer, config.train.batch_size, config.train.max_length,
                           config.train.loss_on, seed=0, num_batches=3)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-6)
    times = []
    for batch in batches:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = peft_model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    train = sum(times[1:]) / len(times[1:])
    grad_batches = make_batches(task.train, tokenizer, config.init.batch_size, config.train.max_length,
                                config.init.loss_on, seed=0, num_batches=2)
    start = time.perf_counter()
    accumulate_gradients(peft_model, grad_batches, targets=tuple(config.adapter.targets),
                         autocast=config.init.autocast and autocast)
    grad = (time.perf_counter() - start) / len(grad_batches)
    n = min(config.eval.batch_size, len(task.heldout), 16)
    start = time.perf_counter()
    evaluate_task(peft_model, tokenizer, task, examples=n, metric=task.metric,
                  max_new_tokens=config.eval.max_new_tokens, batch_size=config.eval.batch_size,
                  max_prompt_length=config.train.max_length)
    return {"train_batch": train, "gradient_batch": grad,
            "eval_example": (time.perf_counter() - start) / n}


def plan_study(study: Study, *, workers: int = 1, measure: bool = True) -> str:
    """A Markdown plan: the grid, what is shared, and (with `measure`) the estimated compute and wall time."""
    return _plan(study, workers, measure)[0]


LONG_ON_CPU = 3600.0  # seconds: runs expected to take longer than this on a CPU get a warning


METHOD_KEYS = ("adapter.type", "init.method")  # what a method's name selects (adapters.method_overrides)


def runs_as_study(configs: dict[str, RunConfig]) -> Study:
    """The runs of one or more methods on one sequence (configs that differ only in what a method's name selects:
    adapter.type, init.method) as a one-seed study."""
    first = next(iter(configs.values()))
    base = {k: v for k, v in flatten(first.to_dict()).items() if k not in ("sequence", "seed", *METHOD_KEYS)}
    variants = {name: {k: v for k, v in flatten(c.to_dict()).items() if k in METHOD_KEYS}
                for name, c in configs.items()}
    return Study(base=base, variants=variants,
                 sequences={"sequence": first.sequence}, seeds=[first.seed], reference=[next(iter(configs))],
                 source="run config")


def plan_runs(configs: dict[str, RunConfig]) -> str:
    """`slicelora run/compare --plan`: the runs planned as a one-seed study, with the settings that differ from the
    paper's and a warning when a CPU would take more than an hour."""
    first = next(iter(configs.values()))
    text, seconds = _plan(runs_as_study(configs), 1, True)
    paper = flatten(RunConfig().to_dict())
    differ = [f"{k}={v!r} (paper: {paper[k]!r})" for k, v in flatten(first.to_dict()).items()
              if k in paper and v != paper[k] and k not in METHOD_KEYS]
    text += "\n## Settings that differ from the paper's\n\n" + ("".join(f"- {d}\n" for d in differ) or "- none\n")
    import torch

    if seconds > LONG_ON_CPU and not torch.cuda.is_available():
        text += (f"\n**Warning:** about {seconds / 3600:.1f} h on this CPU. The paper's settings are sized for a GPU; "
                 "for a CPU try the demo's (`slicelora demo --help`, or smaller train.max_examples, adapter.rank, "
                 "train.epochs, eval.examples).\n")
    return text


def _plan(study: Study, workers: int, measure: bool) -> tuple[str, float]:
    """The plan's text and its estimated compute in seconds (0 without `measure`)."""
    work = count_work(study)
    cells = study.cells()
    lines = [f"# Study plan: {len(cells)} cells = {len(study.variants)} variants x {len(study.sequences)} sequences "
             f"x {len(study.seeds)} seeds", "",
             "| sequence | tasks |", "| --- | --- |"]
    lines += [f"| {label} | {', '.join(load_sequence(spec).tasks)} |" for label, spec in study.sequences.items()]
    lines += ["", f"variants: {', '.join(study.variants)}; seeds: {study.seeds}; reference: {', '.join(study.reference)}",
              "", "## Shared work (predicted from the settings; the run shares at least this)", "",
              f"- stages: {sum(work.stages.values())} in all, {len(work.stages)} computed "
              f"({sum(work.stages.values()) - len(work.stages)} copied from another cell)",
              f"- gradient batches: {work.gradient_batches_all} asked, {work.gradient_batches} computed",
              f"- training batches: {work.train_batches_all} asked, {work.train_batches} computed",
              f"- scored examples: {work.eval_examples_all} asked, {work.eval_examples} computed"]
    if measure:
        cost = calibrate(study)
        seconds, alone = work.seconds(cost), work.seconds(cost, shared=False)
        per_group = [count_work(study.group(seq, seed)).seconds(cost) for seq, seed in study.groups()]
        per_group = [g * seconds / sum(per_group) for g in per_group]  # groups also share (a first stage, ...)
        lines += ["", "## Estimate (calibrated on this machine, one thread per worker)", "",
                  f"- per training batch {cost['train_batch']:.2f} s, per gradient batch "
                  f"{cost['gradient_batch']:.2f} s, per scored example {cost['eval_example']:.2f} s",
                  f"- compute: {seconds / 60:.0f} min with sharing ({alone / 60:.0f} min without); wall time with "
                  f"{workers} worker(s): about {wall_seconds(per_group, workers) / 60:.0f} min (a worker takes a "
                  f"whole (sequence, seed) group: {len(per_group)} groups of about "
                  f"{sum(per_group) / len(per_group) / 60:.0f} min), plus model loading and GP/IP evaluation when "
                  "enabled"]
        return "\n".join(lines) + "\n", seconds
    return "\n".join(lines) + "\n", 0.0
