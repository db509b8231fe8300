"""Data-parallel scaling of the stage loop's two heavy pieces: one process against two (torchrun, gloo) on this machine.

    python benchmarks/scaling.py --json runs/bench/scaling.json                 # about 2 minutes on 2 cores
    python benchmarks/scaling.py --layers 2 --batches 4 --steps 4 --repeats 1   # a quicker look
    python benchmarks/scaling.py --configs 1p1t,1pNt,2p                         # also one process on all cores

The model is a SmolLM2-135M-shaped random Llama (hidden 576, MLP 1536, 9 query / 3 key-value heads) shrunk to
--layers layers, with the byte-level test tokenizer (so the vocabulary, embeddings and LM head are tiny and the
transformer blocks dominate, as in the real model). Every configuration uses the same saved model, the same
global batches (task363 from the shipped data) and the same seeds:

  (a) init gradient pass: `accumulate_gradients` over --batches global batches of --batch-size rows, with a
      LoRA adapter on every projection (as in the stage loop). One process takes all batches; with two, rank r
      takes batches[r::2] and the function all-reduces the float32 gradient buffers of every target weight.
      Throughput = global batches / wall seconds (barrier to barrier). The all-reduce's cost is measured apart:
      buffers of the same shapes are all-reduced again right after the pass (median of --reduce-repeats), and
      reported as a share of the two-process pass.
  (a') with two processes, the same pass with the model sharded by FSDP2 (`fully_shard` on every block and the
      root): FSDP averages each batch's gradient across ranks and the buffers stay sharded; then every layer is
      gathered once, as the init does before its SVD. Reported against the replicated two-process pass.
  (b) adapter training: `train_adapter` for --steps optimiser steps (grad_accum 1) of --batch-size rows, after one
      untimed warm-up step. With two processes each rank takes half the rows of every global batch and DDP
      averages the adapter gradients. Steps/s = steps / the loop's own seconds.

Configurations: "1p1t" (one process, one thread), "2p" (two processes, --threads // 2 threads each, at least one)
and, with --configs 1p1t,1pNt,2p, "1pNt" (one process, --threads threads; default all cores). On a 2-core machine two
processes get one core each. Each configuration runs --repeats times, interleaved; the JSON holds the median of every
figure and the best (highest) throughput. Ratios printed: 2p / 1p1t (scaling from one core to two by processes) and
2p / 1pNt (processes against threads on the same cores). The load average before and after is recorded: on a shared
machine the figures move with it.

`--json PATH` writes every figure and ratio as flat keys.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

THROUGHPUTS = ("grad_batches_per_s", "train_steps_per_s")
SMOLLM2_BLOCK = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                     rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=2048, tie_word_embeddings=True)


# --- the worker: one configuration, run by every rank -----------------------------------------------------------

def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model

    from slicelora.data.prompts import make_batches
    from slicelora.data.tasks import load_task
    from slicelora.init.gradients import accumulate_gradients
    from slicelora.loop.config import TrainSection
    from slicelora.loop.train import train_adapter
    from slicelora.models import LLAMA_TARGETS, load_model

    torch.set_num_threads(args.threads)
    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    distributed = world > 1

    def barrier() -> None:
        if distributed:
            dist.barrier()

    def fresh_peft():
        torch.manual_seed(0)
        model, tokenizer = load_model(args.model)
        config = LoraConfig(r=args.rank, lora_alpha=2.0, use_rslora=True, target_modules=list(LLAMA_TARGETS))
        return get_peft_model(model, config), tokenizer

    task = load_task(args.task)
    out: dict[str, float] = {"processes": world, "threads_per_process": args.threads}

    # (a) the init gradient pass
    model, tokenizer = fresh_peft()
    batches = make_batches(task.train, tokenizer, args.batch_size, args.max_length, "full", seed=1,
                           num_batches=args.batches)
    if len(batches) < max(2, world):
        raise SystemExit(f"need at least {max(2, world)} gradient batches, got {len(batches)}")
    accumulate_gradients(model, batches[rank:rank + 1])  # warm-up: one batch per rank
    mine = batches[rank::world]
    barrier()
    start = time.perf_counter()
    grads = accumulate_gradients(model, mine)
    barrier()
    grad_seconds = time.perf_counter() - start
    out["grad_seconds"] = grad_seconds
    out["grad_batches_per_s"] = len(batches) / grad_seconds
    out["grad_tokens"] = int(sum(int(b["attention_mask"].sum()) for b in batches))
    out["grad_buffer_mib"] = sum(g.numel() * 4 for g in grads.values()) / 2 ** 20
    if distributed:
        buffers = [torch.zeros_like(g) for g in grads.values()]
        times = []
        for _ in range(args.reduce_repeats):
            barrier()
            start = time.perf_counter()
            for b in buffers:
                dist.all_reduce(b)
            times.append(time.perf_counter() - start)
        out["allreduce_seconds"] = statistics.median(times)
        out["allreduce_share_of_grad_pass"] = out["allreduce_seconds"] / grad_seconds
    del model, grads

    if distributed:  # (a') the same pass with the model sharded by FSDP2: buffers sharded, then gathered per layer
        from torch.distributed.fsdp import fully_shard

        from slicelora.init.sharding import gather, local

        model, _ = fresh_peft()
        for block in model.base_model.model.model.layers:
            fully_shard(block)
        fully_shard(model)
        accumulate_gradients(model, batches[rank:rank + 1])  # warm-up
        barrier()
        start = time.perf_counter()
        grads = accumulate_gradients(model, mine)
        barrier()
        out["fsdp_grad_seconds"] = time.perf_counter() - start
        out["fsdp_grad_batches_per_s"] = len(batches) / out["fsdp_grad_seconds"]
        out["fsdp_grad_buffer_mib_per_rank"] = sum(local(g).numel() * 4 for g in grads.values()) / 2 ** 20
        start = time.perf_counter()
        for g in grads.values():  # what the init does before each layer's SVD
            gather(g)
        barrier()
        out["fsdp_gather_seconds"] = time.perf_counter() - start
        del model, grads

    # (b) adapter training
    model, tokenizer = fresh_peft()
    cfg = TrainSection(epochs=1, batch_size=args.batch_size, grad_accum=1, max_length=args.max_length,
                       warmup_ratio=0.0, bf16=args.bf16)
    rows = task.train[: (args.steps + 1) * args.batch_size]
    train_adapter(model, tokenizer, rows[: args.batch_size], cfg, accelerator, seed=5)  # warm-up step
    barrier()
    curve = train_adapter(model, tokenizer, rows[args.batch_size:], cfg, accelerator, seed=7)
    barrier()
    out["train_steps"] = curve["steps"]
    out["train_seconds"] = curve["seconds"]
    out["train_steps_per_s"] = curve["steps"] / curve["seconds"]
    out["train_bf16"] = bool(curve.get("bf16"))
    if accelerator.is_main_process:
        Path(args.worker_out).write_text(json.dumps(out))
    accelerator.wait_for_everyone()
    accelerator.end_training()


# --- the driver ----------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model(folder: Path, layers: int) -> None:
    from slicelora.models import tiny_llama, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tiny_llama(tokenizer, seed=0, num_hidden_layers=layers, **SMOLLM2_BLOCK).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def run_config(name: str, processes: int, threads: int, args: argparse.Namespace, model: Path, tmp: Path) -> dict:
    out = tmp / f"{name}.json"
    worker_args = ["--worker", "--worker-out", str(out), "--model", str(model), "--threads", str(threads),
                   "--task", args.task, "--rank", str(args.rank), "--batches", str(args.batches),
                   "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
                   "--steps", str(args.steps), "--reduce-repeats", str(args.reduce_repeats),
                   "--bf16" if args.bf16 else "--no-bf16"]
    script = str(Path(__file__).resolve())
    if processes == 1:
        cmd = [sys.executable, script, *worker_args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_port", str(free_port()), script, *worker_args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-5000:])
        raise SystemExit(f"configuration {name} failed (exit {done.returncode})")
    result = json.loads(out.read_text())
    result["wall_seconds"] = time.perf_counter() - start
    print(f"{name:5s} {processes}x{threads} thread(s): gradient pass {result['grad_batches_per_s']:.3f} batches/s"
          + (f" (all-reduce {result['allreduce_seconds']:.3f} s = {100 * result['allreduce_share_of_grad_pass']:.1f}%"
             " of the pass)" if processes > 1 else "")
          + f"; training {result['train_steps_per_s']:.3f} steps/s  [{result['wall_seconds']:.0f} s]", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks of the SmolLM2-shaped model")
    parser.add_argument("--task", default="363")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of the adapter")
    parser.add_argument("--batches", type=int, default=8, help="global gradient batches (S)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--reduce-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="cores to use in all")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                        help="bf16 autocast in training where the CPU supports it (the run's default)")
    parser.add_argument("--configs", default="1p1t,2p", help="comma-separated subset of 1p1t,1pNt,2p")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each configuration, interleaved")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per configuration")
    parser.add_argument("--json", type=Path, default=None, help="write figures and ratios as flat keys here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    load_before = os.getloadavg()
    print(f"load average before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f} "
          f"({os.cpu_count()} cores)", flush=True)
    configs = {"1p1t": (1, 1), "1pNt": (1, args.threads), "2p": (2, max(1, args.threads // 2))}
    chosen = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = set(chosen) - set(configs)
    if unknown:
        raise SystemExit(f"unknown configs {sorted(unknown)}; choose from {list(configs)}")
    if args.threads == 1 and "1pNt" in chosen:
        chosen.remove("1pNt")  # the same as 1p1t
    runs: dict[str, list[dict]] = {name: [] for name in chosen}
    with tempfile.TemporaryDirectory(prefix="slicelora-scaling-") as tmp_name:
        tmp = Path(tmp_name)
        build_model(tmp / "model", args.layers)
        for repeat in range(args.repeats):  # interleaved, so a burst of load elsewhere hits every configuration
            for name in chosen:
                processes, threads = configs[name]
                runs[name].append(run_config(name, processes, threads, args, tmp / "model", tmp))
    load_after = os.getloadavg()

    flat: dict[str, float | int | str | bool] = {
        "layers": args.layers, "batches": args.batches, "batch_size": args.batch_size, "max_length": args.max_length,
        "train_steps": args.steps, "lora_rank": args.rank, "cores": os.cpu_count() or 0, "threads_total": args.threads,
        "repeats": args.repeats, "load_before_1m": load_before[0], "load_before_5m": load_before[1],
        "load_after_1m": load_after[0], "load_after_5m": load_after[1],
    }
    for name, results in runs.items():
        for key, value in results[0].items():
            values = [r[key] for r in results]
            flat[f"{name}_{key}"] = statistics.median(values) if isinstance(value, float) else value
        for key in THROUGHPUTS:
            flat[f"{name}_{key}_best"] = max(r[key] for r in results)
    print(f"load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    if "2p" in runs:
        for base in ("1p1t", "1pNt"):
            if base not in runs:
                continue
            for stat, suffix in (("median", ""), ("best", "_best")):
                g = flat[f"2p_grad_batches_per_s{suffix}"] / flat[f"{base}_grad_batches_per_s{suffix}"]
                t = flat[f"2p_train_steps_per_s{suffix}"] / flat[f"{base}_train_steps_per_s{suffix}"]
                flat[f"grad_throughput_ratio_2p_over_{base}{suffix}"] = g
                flat[f"train_steps_ratio_2p_over_{base}{suffix}"] = t
                print(f"2 processes / {base} ({stat} of {args.repeats}): gradient pass x{g:.2f}, training x{t:.2f}")
        share = flat["2p_allreduce_share_of_grad_pass"]
        flat["allreduce_share_of_grad_pass"] = share
        print(f"all-reduce of the {flat['2p_grad_buffer_mib']:.0f} MiB of gradient buffers: "
              f"{flat['2p_allreduce_seconds']:.3f} s, {100 * share:.1f}% of the two-process gradient pass (medians)")
        flat["fsdp_over_replicated_grad_throughput"] = (flat["2p_fsdp_grad_batches_per_s"]
                                                        / flat["2p_grad_batches_per_s"])
        flat["fsdp_over_replicated_buffer_per_rank"] = (flat["2p_fsdp_grad_buffer_mib_per_rank"]
                                                        / flat["2p_grad_buffer_mib"])
        flat["fsdp_gather_share_of_grad_pass"] = flat["2p_fsdp_gather_seconds"] / flat["2p_fsdp_grad_seconds"]
        print(f"FSDP2 / replicated, 2 processes: gradient pass x{flat['fsdp_over_replicated_grad_throughput']:.2f}, "
              f"buffers per rank {flat['2p_fsdp_grad_buffer_mib_per_rank']:.1f} vs {flat['2p_grad_buffer_mib']:.1f} "
              f"MiB (x{flat['fsdp_over_replicated_buffer_per_rank']:.2f}); gathering every layer once: "
              f"{flat['2p_fsdp_gather_seconds']:.3f} s ({100 * flat['fsdp_gather_share_of_grad_pass']:.1f}% of the pass)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(flat, indent=1, sort_keys=True))
        print(f"written: {args.json}")


if __name__ == "__main__":
    main()
