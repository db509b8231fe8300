"""Cost of the gradient-based initialisers: peft's LoRA-GA against our LoRA-GA and SLICE, on one model and batches.

    python benchmarks/init_cost.py --layers 6 --batches 3 --json runs/bench/init_cost.json
    python benchmarks/init_cost.py --device cuda --layers 30 --batches 4     # full SmolLM2-135M shape on a GPU

Every variant runs in a fresh subprocess on the same model (same seed, or the same --model folder) and the same
token batches, after the same warm-up pass, so no variant inherits another's caches:

    peft           peft.tuners.lora.loraga.preprocess_loraga (gradients) + get_peft_model (SVD, adapter, absorption)
    lora_ga        get_peft_model (default LoRA) + slicelora.init.init_adapter(method="lora_ga")
    slice          the same with method="slice": current batches and as many replay batches (two gradient sets);
                   --gate defaults to 1.0 so that the projection always fires and its cost is counted
    pissa, eva     the same with method="pissa" (PEFT's PiSSA: an SVD of every weight, no data) and "eva" (PEFT's
                   EVA: an incremental SVD of every layer's inputs over the current batches)
    corda          the same with method="corda" in its default kpm mode (PEFT's CorDA: one forward per example of the
                   replay batches for each layer's input covariance, then an SVD of W C per layer)
    lora_ga_offload, slice_offload (CUDA only)   the same with InitConfig(offload_to_cpu=True)
    floor          (CUDA only) one forward/backward per batch whose target-weight gradients are dropped as soon as
                   they are made: the device memory that any gradient method needs for activations anyway

Time: wall seconds of the whole init (from the plain model to the initialised PEFT model) divided by the number of
gradient batches it consumed, and the same for the gradient phase alone (CUDA: synchronised).

Memory, always the PEAK ABOVE what was live right before the init started (model, batches, warm-up freed):
  * CPU: live tensor bytes counted by PyTorch's own allocator hook (torch.profiler with profile_memory=True is
    switched on before the model is built, so every CPU tensor allocation and free is seen with its size). This is
    the high-water mark of the bytes held by tensors, not of the process; a separate unprofiled run gives the timing
    and, as a cross-check, the peak RSS above the RSS at the start of the init (VmHWM after resetting it through
    /proc/self/clear_refs, after malloc_trim; "n/a" where the kernel refuses).
  * CUDA: torch.cuda.max_memory_allocated() minus memory_allocated() at the start (the caching allocator's live
    bytes, exact), per phase: during the gradient passes and during the rest (decomposition, absorption).

Target set: the bytes of one float32 buffer per target weight (what one gradient set costs). Pass criteria printed:
our LoRA-GA <= peft in time per batch and in peak; SLICE peak - LoRA-GA peak <= one target set; with offload,
device peak <= floor peak + the largest layer's float32 gradient (i.e. the device holds the model, the activations
that one backward needs anyway, and one layer's gradient).

`--json PATH` writes every figure and ratio as flat keys.

`--autocast` measures instead what InitConfig(autocast=True) changes, in this process, on real data: the embedded
SmolLM2-135M-Instruct in float32 (or --model), --batches batches of --batch-size task examples of --seq-len tokens
at most, for the current task (--current-task, default 1687) and the replay task (--replay-task, default 363), with
each --loss-on:

    OMP_NUM_THREADS=1 python benchmarks/init_cost.py --autocast --batches 3 --batch-size 8 --json runs/bench/ac.json

  * time per batch of the gradient passes, float32 and under bf16 autocast (median over the passes, both modes
    alternating, after one warm-up batch each), and the speed-up;
  * per-layer cosine of the autocast gradients to the float32 ones (min and median over the target layers);
  * SLICE's gate input: the global cosine between current and replay gradients, both ways, and whether the
    projection fires at tau = 0 in both;
  * the factors' subspaces at each of --ranks: for LoRA-GA paper (from the current gradients) and SLICE (from the
    projected ones, --gate), the overlap of A's row spaces and of B's column spaces between float32 and autocast
    (the mean of the squared cosines of the principal angles, 1 = the same subspace), per layer min / median /
    mean; as yardsticks, the same overlap between two SVD seeds on the float32 gradients, and (LoRA-GA) between
    float32 gradients of all current batches and of all but the last one (the per-layer gradient cosine too).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 2 ** 20
CPU_VARIANTS = ("peft", "lora_ga", "slice", "pissa", "eva", "corda")
CUDA_VARIANTS = ("peft", "lora_ga", "slice", "pissa", "eva", "corda", "lora_ga_offload", "slice_offload", "floor")
SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                     vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5,
                     rope_theta=100000.0)


# --- the worker: one variant in this process -----------------------------------------------------------------------

class Meter:
    """Wall time and (CUDA) device peaks of the gradient phase versus the rest of the init."""

    def __init__(self, device):
        import torch

        self.torch, self.device = torch, device
        self.cuda = device.type == "cuda"
        self.grad_seconds = 0.0
        self.grad_peak = 0
        self.other_peak = 0
        self.base = 0

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def start(self):
        self.sync()
        if self.cuda:
            self.base = self.torch.cuda.memory_allocated(self.device)
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def _take_peak(self) -> int:
        peak = self.torch.cuda.max_memory_allocated(self.device) - self.base
        self.torch.cuda.reset_peak_memory_stats(self.device)
        return peak

    @contextlib.contextmanager
    def gradients(self):
        from torch.profiler import record_function

        self.sync()
        if self.cuda:
            self.other_peak = max(self.other_peak, self._take_peak())
        t0 = time.perf_counter()
        with record_function("bench::gradients"):
            yield
        self.sync()
        self.grad_seconds += time.perf_counter() - t0
        if self.cuda:
            self.grad_peak = max(self.grad_peak, self._take_peak())

    def stop(self) -> dict:
        self.sync()
        if not self.cuda:
            return {}
        self.other_peak = max(self.other_peak, self._take_peak())
        return {"dev_peak": max(self.grad_peak, self.other_peak), "dev_grad_peak": self.grad_peak,
                "dev_other_peak": self.other_peak,
                "dev_retained": self.torch.cuda.memory_allocated(self.device) - self.base,
                "dev_base": self.base}


def build_model(args, device):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    dtype = getattr(torch, args.dtype)
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    else:
        torch.manual_seed(0)
        config = LlamaConfig(num_hidden_layers=args.layers, **SMOLLM2_SHAPE)
        model = LlamaForCausalLM(config).to(dtype)
    return model.to(device).eval()


def make_batches(vocab: int, args, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(args.batches):
        ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def target_modules(model, targets):
    return {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets}


def forward_backward(model, batch, device):
    model(**{k: v.to(device) for k, v in batch.items()}).loss.backward()


def warm_up(model, batch, targets, device):
    """One forward/backward with only the target weights requiring grad, then one small SVD: every variant pays
    the same first-call costs (kernel selection, LAPACK set-up) before its clock starts."""
    import torch

    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for m in target_modules(model, targets).values():
        m.weight.requires_grad_(True)
    with torch.enable_grad():
        forward_backward(model, batch, device)
    for p, f in zip(model.parameters(), flags):
        p.grad = None
        p.requires_grad_(f)
    torch.svd_lowrank(torch.randn(64, 48, device=device), q=8, niter=2)


def release_freed_heap():
    """Give glibc's freed heap back to the kernel, so the RSS cross-check starts from the live set."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def rss_kib(field: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def reset_rss_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_variant(variant, model, current, replay, args, meter, device):
    """Initialise `model` by `variant`; returns how many batches it consumed (gradient or, for EVA and CorDA,
    forward-only)."""
    import torch
    from peft import LoraConfig, get_peft_model

    import slicelora.init.adapter as methods
    from slicelora.init import InitConfig, get_init, init_adapter

    targets = list(args.targets)
    lora = dict(r=args.rank, lora_alpha=args.alpha, target_modules=targets, lora_dropout=0.0)

    if variant == "peft":
        try:
            from peft import LoraGAConfig
            from peft.tuners.lora.loraga import preprocess_loraga
        except ImportError as exc:
            raise SystemExit(f"this peft ({__import__('peft').__version__}) has no LoRA-GA (needs peft>=0.18): {exc}")
        config = LoraConfig(**lora, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())

        def train_step():
            for batch in current:
                forward_backward(model, batch, device)

        with meter.gradients():
            preprocess_loraga(model, config, train_step)
        get_peft_model(model, config)
        return len(current)

    if variant == "floor":
        modules = list(target_modules(model, targets).values())
        for p in model.parameters():
            p.requires_grad_(False)
        handles = []
        for m in modules:
            m.weight.requires_grad_(True)
            handles.append(m.weight.register_post_accumulate_grad_hook(lambda w: setattr(w, "grad", None)))
        with meter.gradients(), torch.enable_grad():
            for batch in current:
                forward_backward(model, batch, device)
        for h in handles:
            h.remove()
        return len(current)

    method = variant.removesuffix("_offload")
    spec = get_init(method)
    real = methods.accumulate_gradients

    def timed(*a, **k):
        with meter.gradients():
            return real(*a, **k)

    methods.accumulate_gradients = timed
    try:
        peft_model = get_peft_model(model, LoraConfig(**lora))
        config = InitConfig(lora_ga_variant=args.variant, gate=args.gate, offload_to_cpu=variant.endswith("_offload"),
                            targets=tuple(targets))
        report = init_adapter(peft_model, method, config, current=current if spec.data != "none" else None,
                              replay=replay if spec.uses_replay else None)
    finally:
        methods.accumulate_gradients = real
    if method == "slice" and not (report.surgery and report.surgery.fired):
        print(f"note: the SLICE projection did not fire (cos={report.surgery.cosine:.3f} >= gate {args.gate})",
              file=sys.stderr)
    return report.current_batches + report.replay_batches


def cpu_tracked_peaks(prof) -> dict:
    """Peak of live CPU tensor bytes inside the 'bench::init' range (and its gradient phases), above its start."""
    events = prof.profiler.kineto_results.events()
    ranges = {"init": [], "grad": []}
    memory = []
    for e in events:
        name = e.name()
        if name == "[memory]":
            if e.device_type() == 0 or str(e.device_type()).endswith("CPU"):
                memory.append((e.start_ns(), e.nbytes()))
        elif name == "bench::init":
            ranges["init"].append((e.start_ns(), e.end_ns()))
        elif name == "bench::gradients":
            ranges["grad"].append((e.start_ns(), e.end_ns()))
    if len(ranges["init"]) != 1:
        raise RuntimeError(f"expected one bench::init range in the profile, found {len(ranges['init'])}")
    (w0, w1), = ranges["init"]
    memory.sort()
    live, base, peak, grad_peak, other_peak, end = 0, None, 0, 0, 0, 0
    for t, nbytes in memory:
        if t >= w0 and base is None:
            base = live
        live += nbytes
        if w0 <= t <= w1:
            extra = live - base
            peak = max(peak, extra)
            if any(a <= t <= b for a, b in ranges["grad"]):
                grad_peak = max(grad_peak, extra)
            else:
                other_peak = max(other_peak, extra)
            end = extra
    base = live if base is None else base
    return {"cpu_peak": peak, "cpu_grad_peak": grad_peak, "cpu_other_peak": other_peak, "cpu_retained": end,
            "cpu_base": base}


def worker(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    prof = None
    if args.mode == "memory":
        from torch.profiler import ProfilerActivity, profile

        prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False)
        prof.__enter__()
    from torch.profiler import record_function

    # Import everything a variant uses before its clock starts (peft and transformers load modules lazily).
    with contextlib.suppress(ImportError):  # an old peft without LoRA-GA fails in the peft variant, with a message
        import peft.tuners.lora.loraga  # noqa: F401
    import slicelora.init  # noqa: F401
    from peft import LoraConfig, get_peft_model  # noqa: F401
    from slicelora.models import LLAMA_TARGETS

    args.targets = LLAMA_TARGETS
    model = build_model(args, device)
    vocab = model.config.vocab_size
    current, replay = make_batches(vocab, args, seed=1), make_batches(vocab, args, seed=2)
    weights = [m.weight for m in target_modules(model, LLAMA_TARGETS).values()]
    out = {
        "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "target_set_bytes": sum(w.numel() for w in weights) * 4,
        "largest_grad_bytes": max(w.numel() for w in weights) * 4,
        "n_target_layers": len(weights),
    }
    warm_up(model, current[0], LLAMA_TARGETS, device)
    release_freed_heap()
    meter = Meter(device)
    rss0 = rss_kib("VmRSS")
    rss_reset = reset_rss_peak()
    meter.start()
    t0 = time.perf_counter()
    with record_function("bench::init"):
        n = run_variant(args.variant_name, model, current, replay, args, meter, device)
    cuda_stats = meter.stop()
    seconds = time.perf_counter() - t0
    hwm = rss_kib("VmHWM")
    out.update(cuda_stats)
    out.update(seconds=seconds, grad_seconds=meter.grad_seconds, batches=n)
    out["rss_peak"] = (hwm - rss0) * 1024 if (rss_reset and hwm is not None and rss0 is not None) else None
    if prof is not None:
        prof.__exit__(None, None, None)
        out.update(cpu_tracked_peaks(prof))
    return out


# --- bf16 autocast against float32 gradient passes -----------------------------------------------------------------

def subspace_overlap(x, y) -> float:
    """Mean squared cosine of the principal angles between the column spaces of two orthonormal-column matrices."""
    return float((x.double().T @ y.double()).square().sum()) / x.shape[1]


def record_overlaps(out: dict, prefix: str, exact: dict, others: dict[str, tuple[dict, int]], ranks: list[int]):
    """out[{prefix}_r{r}_{A,B}_overlap{label}_*]: per layer, the overlap of LoRA-GA paper's A row spaces and B column
    spaces between the factors of the `exact` gradients (SVD seed 42) and those of each `others[label]` = (gradients,
    SVD seed); min / median / mean over the layers, and the layer of the minimum for label ""."""
    from slicelora.init import lowrank_svd, select_factors

    def factors(grad, r: int, seed: int):
        return select_factors(*lowrank_svd(grad, r, seed)[::2], r, "lora_ga")

    for r in ranks:
        overlaps: dict[str, list[float]] = {f"{factor}{label}": [] for label in others for factor in "AB"}
        for name, g in exact.items():
            a, b = factors(g, r, 42)
            for label, (grads, seed) in others.items():
                a_other, b_other = factors(grads[name], r, seed)
                overlaps[f"A{label}"].append(subspace_overlap(a.T, a_other.T))
                overlaps[f"B{label}"].append(subspace_overlap(b, b_other))
        names = list(exact)
        for key, values in overlaps.items():
            factor, label = key[0], key[1:]
            for stat, value in stats(values, 4).items():
                out[f"{prefix}_r{r}_{factor}_overlap{label}_{stat}"] = value
            if not label:
                out[f"{prefix}_r{r}_{factor}_overlap_min_layer"] = names[values.index(min(values))]


def stats(values: list[float], digits: int = 6) -> dict[str, float]:
    import statistics

    return {"min": round(min(values), digits), "median": round(statistics.median(values), digits),
            "mean": round(statistics.fmean(values), digits)}


def autocast_section(args) -> dict:
    """The figures of --autocast, as flat keys."""
    import statistics

    import torch

    from slicelora.data.prompts import make_batches as task_batches
    from slicelora.data.tasks import load_task
    from slicelora.init import accumulate_gradients, project_conflicting
    from slicelora.init.gradients import bf16_supported
    from slicelora.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, tokenizer = load_model(args.model, torch.float32, device)
    model.eval()
    tasks = {"current": load_task(args.current_task), "replay": load_task(args.replay_task)}
    out: dict[str, object] = {
        "section": "autocast", "device": args.device, "bf16_supported": bf16_supported(device),
        "model": args.model or "smollm2-135m-instruct", "current_task": tasks["current"].name,
        "replay_task": tasks["replay"].name, "batches_per_set": args.batches, "batch_size": args.batch_size,
        "max_length": args.seq_len, "threads": args.threads, "ranks": ",".join(map(str, args.ranks)),
        "gate": args.gate}
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    seconds: dict[bool, list[float]] = {False: [], True: []}
    warm = task_batches(tasks["current"].train, tokenizer, args.batch_size, args.seq_len, seed=0, num_batches=1)
    for autocast in (False, True):
        accumulate_gradients(model, warm, autocast=autocast)
    for loss_on in args.loss_on:
        sets = {role: task_batches(task.train, tokenizer, args.batch_size, args.seq_len, loss_on, seed=i + 1,
                                   num_batches=args.batches) for i, (role, task) in enumerate(tasks.items())}
        grads: dict[tuple[str, bool], dict] = {}
        for role, batches in sets.items():
            for autocast in (False, True):
                sync()
                t0 = time.perf_counter()
                grads[role, autocast] = accumulate_gradients(model, batches, autocast=autocast)
                sync()
                seconds[autocast].append((time.perf_counter() - t0) / len(batches))
            cosines = {name: float(torch.nn.functional.cosine_similarity(
                g.flatten(), grads[role, True][name].flatten(), dim=0)) for name, g in grads[role, False].items()}
            for key, value in stats(list(cosines.values())).items():
                out[f"{loss_on}_{role}_grad_cos_{key}"] = value
            out[f"{loss_on}_{role}_grad_cos_min_layer"] = min(cosines, key=cosines.get)
        # A yardstick for the autocast figures: the float32 gradients of all but the last current batch.
        fewer = accumulate_gradients(model, sets["current"][:-1])
        for key, value in stats([float(torch.nn.functional.cosine_similarity(g.flatten(), fewer[name].flatten(), dim=0))
                                 for name, g in grads["current", False].items()]).items():
            out[f"{loss_on}_current_grad_cos_drop_one_batch_{key}"] = value
        record_overlaps(out, f"{loss_on}_lora_ga", grads["current", False], {
            "": (grads["current", True], 42), "_seed_floor": (grads["current", False], 43),
            "_drop_one_batch": (fewer, 42)}, args.ranks)
        del fewer
        for autocast in (False, True):  # SLICE: projected in place (the replay gradients are no longer needed)
            _, report = project_conflicting(grads["current", autocast], grads.pop(("replay", autocast)),
                                            gate=args.gate, inplace=True)
            mode = "bf16" if autocast else "float32"
            out[f"{loss_on}_gate_cos_{mode}"] = round(report.cosine, 6)
            out[f"{loss_on}_gate_fires_at_0_{mode}"] = report.cosine < 0
        out[f"{loss_on}_gate_cos_abs_diff"] = round(abs(out[f"{loss_on}_gate_cos_float32"]
                                                        - out[f"{loss_on}_gate_cos_bf16"]), 6)
        out[f"{loss_on}_gate_decision_agrees"] = (out[f"{loss_on}_gate_fires_at_0_float32"]
                                                  == out[f"{loss_on}_gate_fires_at_0_bf16"])
        record_overlaps(out, f"{loss_on}_slice", grads["current", False], {
            "": (grads["current", True], 42), "_seed_floor": (grads["current", False], 43)}, args.ranks)
        del grads
    out["s_per_batch_float32"] = round(statistics.median(seconds[False]), 3)
    out["s_per_batch_bf16"] = round(statistics.median(seconds[True]), 3)
    out["ratio_speedup_bf16_over_float32"] = round(out["s_per_batch_float32"] / out["s_per_batch_bf16"], 2)
    return out


def print_autocast(out: dict, args) -> None:
    print(f"\n{out['model']} float32 on {out['device']} (native bf16: {out['bf16_supported']}); current "
          f"{out['current_task']}, replay {out['replay_task']}; {out['batches_per_set']} batches x "
          f"{out['batch_size']} examples, max_length {out['max_length']}; threads {out['threads'] or 'default'}")
    print(f"gradient pass time per batch: float32 {out['s_per_batch_float32']} s, bf16 autocast "
          f"{out['s_per_batch_bf16']} s: speed-up {out['ratio_speedup_bf16_over_float32']}x")
    for loss_on in args.loss_on:
        print(f"\nloss_on={loss_on}")
        for role in ("current", "replay"):
            k = f"{loss_on}_{role}_grad_cos"
            print(f"  {role:<8} per-layer cosine bf16 vs float32: min {out[k + '_min']} ({out[k + '_min_layer']}), "
                  f"median {out[k + '_median']}")
        print(f"  SLICE gate cosine(current, replay): float32 {out[f'{loss_on}_gate_cos_float32']}, bf16 "
              f"{out[f'{loss_on}_gate_cos_bf16']} (|diff| {out[f'{loss_on}_gate_cos_abs_diff']}); fires at tau=0: "
              f"{out[f'{loss_on}_gate_fires_at_0_float32']} / {out[f'{loss_on}_gate_fires_at_0_bf16']}")
        k = f"{loss_on}_current_grad_cos_drop_one_batch"
        print(f"  yardstick: current per-layer cosine float32, all batches vs all but the last: min {out[k + '_min']}, "
              f"median {out[k + '_median']}")
        print("  factor subspace overlap with float32 (min / median / mean over layers) of: bf16 autocast | float32, "
              "SVD seed 43 | float32, one batch fewer")
        for r in args.ranks:
            for method in ("lora_ga", "slice"):
                for factor in ("A", "B"):
                    k = f"{loss_on}_{method}_r{r}_{factor}_overlap"
                    print(f"    r={r:<3} {method:<8} {factor}: "
                          + " | ".join(" / ".join(str(out[f"{k}{label}_{s}"]) for s in ("min", "median", "mean"))
                                       for label in ("", "_seed_floor", "_drop_one_batch")
                                       if f"{k}{label}_min" in out)
                          + f"   (bf16 min at {out[f'{k}_min_layer']})")


# --- the driver ----------------------------------------------------------------------------------------------------

def spawn(args, variant: str, mode: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, os.path.abspath(__file__), "--device", args.device, "--layers", str(args.layers),
               "--batches", str(args.batches), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
               "--rank", str(args.rank), "--alpha", str(args.alpha), "--dtype", args.dtype, "--gate", str(args.gate),
               "--variant", args.variant, "--threads", str(args.threads),
               "--_worker", variant, "--_mode", mode, "--_out", str(result)]
        if args.model:
            cmd += ["--model", args.model]
        src = str(Path(__file__).resolve().parents[1] / "src")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
               "TQDM_DISABLE": "1", "KINETO_LOG_LEVEL": "5"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise RuntimeError(f"variant {variant} ({mode}) failed with exit code {proc.returncode}")
        for line in proc.stderr.splitlines():
            if line.startswith("note:"):
                print(f"  [{variant}] {line}", file=sys.stderr)
        return json.loads(result.read_text())


def mib(x) -> float | None:
    return None if x is None else round(x / MIB, 1)


def ratio(a, b) -> float | None:
    return None if a is None or b in (None, 0) else round(a / b, 3)


def fmt(x, suffix="") -> str:
    return "n/a" if x is None else f"{x}{suffix}"


def summarise(args, res: dict[str, dict], cuda: bool) -> dict:
    """Flat figures, ratios and pass/fail checks from the per-variant results (missing variants give None)."""
    any_run = next(iter(res.values()))
    peak_key = "dev_peak" if cuda else "cpu_peak"
    target_set, big = any_run["target_set_bytes"], any_run["largest_grad_bytes"]
    out: dict[str, object] = {
        "device": args.device, "dtype": args.dtype, "model": args.model or f"random-smollm2-shape-{args.layers}L",
        "layers": args.layers if not args.model else None, "batches_per_set": args.batches,
        "batch_size": args.batch_size, "seq_len": args.seq_len, "rank": args.rank, "lora_ga_variant": args.variant,
        "gate": args.gate, "threads": args.threads, "repeats": args.repeats,
        "memory_measure": "torch.cuda.max_memory_allocated above start" if cuda
        else "torch.profiler CPU allocator events: peak live tensor bytes above start",
        "model_mib": mib(any_run["model_bytes"]), "target_set_mib": mib(target_set), "largest_grad_mib": mib(big),
        "n_target_layers": any_run["n_target_layers"],
    }
    for v, r in res.items():
        out[f"{v}_batches"] = r["batches"]
        out[f"{v}_seconds"] = round(r["seconds"], 3)
        used = r["batches"] or None  # a data-free init (PiSSA) has no per-batch figures
        out[f"{v}_s_per_batch"] = round(r["seconds"] / used, 4) if used else None
        out[f"{v}_grad_s_per_batch"] = round(r["grad_seconds"] / used, 4) if used else None
        out[f"{v}_peak_mib"] = mib(r.get(peak_key))
        out[f"{v}_grad_phase_peak_mib"] = mib(r.get(peak_key.replace("peak", "grad_peak")))
        out[f"{v}_rest_phase_peak_mib"] = mib(r.get(peak_key.replace("peak", "other_peak")))
        out[f"{v}_retained_mib"] = mib(r.get(peak_key.replace("peak", "retained")))
        out[f"{v}_rss_peak_mib"] = mib(r.get("rss_peak"))

    def get(v, key):
        return res[v].get(key) if v in res else None

    for v in ("lora_ga", "slice"):
        out[f"ratio_{v}_peft_s_per_batch"] = ratio(out.get(f"{v}_s_per_batch"), out.get("peft_s_per_batch"))
        out[f"ratio_{v}_peft_grad_s_per_batch"] = ratio(out.get(f"{v}_grad_s_per_batch"),
                                                        out.get("peft_grad_s_per_batch"))
        out[f"ratio_{v}_peft_peak"] = ratio(get(v, peak_key), get("peft", peak_key))
        out[f"ratio_{v}_peft_rest_phase_peak"] = ratio(get(v, peak_key.replace("peak", "other_peak")),
                                                       get("peft", peak_key.replace("peak", "other_peak")))
    for v in ("pissa", "eva", "corda"):  # beside our LoRA-GA on the same model: whole-init time and peak
        out[f"ratio_{v}_lora_ga_seconds"] = ratio(get(v, "seconds"), get("lora_ga", "seconds"))
        out[f"ratio_{v}_lora_ga_peak"] = ratio(get(v, peak_key), get("lora_ga", peak_key))
    if "lora_ga" in res and "peft" in res:
        out["lora_ga_minus_peft_peak_mib"] = mib(get("lora_ga", peak_key) - get("peft", peak_key))
        out["pass_lora_ga_time_le_peft"] = out["lora_ga_s_per_batch"] <= out["peft_s_per_batch"]
        out["pass_lora_ga_peak_le_peft"] = get("lora_ga", peak_key) <= get("peft", peak_key)
        # Our API takes a PEFT model, so the adapter's own A/B weights exist during our gradient pass but only after
        # peft's; both end up holding them ("kept"). This check allows that difference (plus 64 KiB for scalars).
        adapter = get("lora_ga", peak_key.replace("peak", "retained")) or 0
        out["pass_lora_ga_peak_le_peft_plus_adapter"] = (
            get("lora_ga", peak_key) <= get("peft", peak_key) + adapter + 65536)
    if "lora_ga" in res and "slice" in res:
        for phase, key in (("", peak_key), ("_rest_phase", peak_key.replace("peak", "other_peak"))):
            diff = get("slice", key) - get("lora_ga", key)
            out[f"slice_minus_lora_ga{phase}_peak_mib"] = mib(diff)
            out[f"slice_minus_lora_ga{phase}_in_target_sets"] = round(diff / target_set, 2)
        out["pass_slice_extra_le_one_set"] = get("slice", peak_key) - get("lora_ga", peak_key) <= target_set
    if cuda and "floor" in res:
        # Offload goal: the device holds the model, the activations one backward needs anyway (the floor run),
        # the adapter's own weights (which peft allocates too), and at most one layer's float32 gradient.
        floor = res["floor"]["dev_peak"]
        out["floor_peak_mib"] = mib(floor)
        for v in ("lora_ga_offload", "slice_offload"):
            if v not in res:
                continue
            r = res[v]
            adapter = r["dev_retained"]
            grad_extra = r["dev_grad_peak"] - floor - adapter
            rest_extra = r["dev_other_peak"] - adapter
            out[f"{v}_grad_phase_minus_floor_minus_adapter_mib"] = mib(grad_extra)
            out[f"{v}_rest_phase_minus_adapter_mib"] = mib(rest_extra)
            out[f"{v}_grad_phase_extra_in_largest_grads"] = round(grad_extra / big, 2)
            out[f"{v}_rest_phase_extra_in_largest_grads"] = round(rest_extra / big, 2)
            out[f"{v}_device_total_peak_mib"] = mib(r["dev_base"] + r["dev_peak"])
            out[f"pass_{v}_device_le_model_floor_one_grad"] = max(grad_extra, rest_extra) <= big
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a local Hugging Face model folder (default: a random SmolLM2-135M-shaped Llama)")
    p.add_argument("--layers", type=int, default=6, help="decoder layers of the random model (SmolLM2-135M has 30)")
    p.add_argument("--batches", type=int, default=3, help="gradient batches per set (SLICE uses two sets)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--variant", default="paper", choices=("paper", "reference", "peft"), help="our LoRA-GA variant")
    p.add_argument("--gate", type=float, default=1.0, help="SLICE's tau; 1.0 makes the projection always fire")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per worker (default: 1 on cpu, where two OpenMP threads on a shared "
                        "machine ran up to 25x slower; torch's own choice on cuda; 0: torch's)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per variant; the fastest is kept")
    p.add_argument("--variants", nargs="+", choices=CUDA_VARIANTS,
                   help="run only these (default: every variant of the device)")
    p.add_argument("--json", type=Path, help="write the figures and ratios here as flat keys")
    p.add_argument("--autocast", action="store_true",
                   help="measure bf16 autocast against float32 gradient passes on real task batches (see above)")
    p.add_argument("--current-task", default="1687", help="--autocast: the current task")
    p.add_argument("--replay-task", default="363", help="--autocast: the replay task")
    p.add_argument("--loss-on", nargs="+", default=["full", "answer"], choices=("full", "answer"),
                   help="--autocast: which tokens the loss covers, each in turn")
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 64], help="--autocast: ranks of the factors compared")
    p.add_argument("--_worker", dest="variant_name", help=argparse.SUPPRESS)
    p.add_argument("--_mode", dest="mode", default="time", help=argparse.SUPPRESS)
    p.add_argument("--_out", dest="out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else 0
    if args.variant_name:
        Path(args.out).write_text(json.dumps(worker(args)))
        return 0
    if args.autocast:
        t_start = time.perf_counter()
        out = autocast_section(args)
        out["wall_seconds_all"] = round(time.perf_counter() - t_start, 1)
        print_autocast(out, args)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(out, indent=1) + "\n")
        return 0

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no CUDA device here; use --device cpu.")
    cuda = args.device == "cuda"
    variants = args.variants or (CUDA_VARIANTS if cuda else CPU_VARIANTS)
    if not cuda and set(variants) - set(CPU_VARIANTS):
        raise SystemExit(f"--variants {' '.join(sorted(set(variants) - set(CPU_VARIANTS)))}: CUDA only; on the CPU "
                         f"choose from {' '.join(CPU_VARIANTS)}.")
    res: dict[str, dict] = {}
    failed: list[str] = []
    t_start = time.perf_counter()
    for v in variants:
        print(f"running {v} ...", file=sys.stderr, flush=True)
        try:
            runs = [spawn(args, v, "time") for _ in range(max(1, args.repeats))]
            res[v] = min(runs, key=lambda r: r["seconds"])  # the least disturbed run on a shared machine
            if not cuda:  # the tracked-allocator run, separate so the profiler cannot slow the timed one
                res[v].update({k: x for k, x in spawn(args, v, "memory").items() if k.startswith("cpu_")})
        except RuntimeError as exc:
            print(f"  {exc}; going on without it", file=sys.stderr)
            failed.append(v)
    if not res:
        raise SystemExit("every variant failed")
    out = summarise(args, res, cuda)
    out["failed_variants"] = ",".join(failed)
    out["wall_seconds_all"] = round(time.perf_counter() - t_start, 1)
    variants = [v for v in variants if v in res]

    print_report(out, variants, cuda)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


def print_report(out: dict, variants, cuda: bool) -> None:
    print(f"\nmodel {out['model']} ({out['model_mib']} MiB, {out['dtype']}) on {out['device']}; "
          f"{out['batches_per_set']} batches x {out['batch_size']} x {out['seq_len']} tokens per gradient set; "
          f"rank {out['rank']}; threads {out['threads'] or 'default'}; best of {out['repeats']} timed run(s)")
    print(f"one fp32 target set ({out['n_target_layers']} layers) = {out['target_set_mib']} MiB, "
          f"largest layer gradient = {out['largest_grad_mib']} MiB")
    print(f"memory: {out['memory_measure']}; grad-ph = during the gradient passes, rest-ph = the rest of the init, "
          f"kept = left at the end (the adapter)\n")
    head = (f"{'variant':<16}{'batches':>8}{'seconds':>9}{'s/batch':>9}{'grad s/b':>9}{'peak MiB':>10}{'grad-ph':>9}"
            f"{'rest-ph':>9}{'kept':>8}{'RSS pk':>8}")
    print(head)
    print("-" * len(head))
    for v in variants:
        print(f"{v:<16}{out[f'{v}_batches']:>8}{out[f'{v}_seconds']:>9}{fmt(out[f'{v}_s_per_batch']):>9}"
              f"{fmt(out[f'{v}_grad_s_per_batch']):>9}"
              f"{fmt(out[f'{v}_peak_mib']):>10}{fmt(out[f'{v}_grad_phase_peak_mib']):>9}"
              f"{fmt(out[f'{v}_rest_phase_peak_mib']):>9}{fmt(out[f'{v}_retained_mib']):>8}"
              f"{fmt(out[f'{v}_rss_peak_mib']):>8}")
    for v in ("pissa", "eva", "corda"):
        if v in variants:
            print(f"  {v}: whole init x{fmt(out[f'ratio_{v}_lora_ga_seconds'])} of LoRA-GA's time, peak "
                  f"x{fmt(out[f'ratio_{v}_lora_ga_peak'])}")
    if "peft" in variants:
        print("\nratios ours/peft:")
        for v in ("lora_ga", "slice"):
            print(f"  {v:<8} time/batch {fmt(out.get(f'ratio_{v}_peft_s_per_batch'))}  "
                  f"(gradient phase {fmt(out.get(f'ratio_{v}_peft_grad_s_per_batch'))})  "
                  f"peak {fmt(out.get(f'ratio_{v}_peft_peak'))}  "
                  f"(rest phase {fmt(out.get(f'ratio_{v}_peft_rest_phase_peak'))})")
    if "slice_minus_lora_ga_peak_mib" in out:
        print(f"  SLICE - LoRA-GA: peak {out['slice_minus_lora_ga_peak_mib']} MiB "
              f"= {out['slice_minus_lora_ga_in_target_sets']} target sets; rest phase "
              f"{out['slice_minus_lora_ga_rest_phase_peak_mib']} MiB "
              f"= {out['slice_minus_lora_ga_rest_phase_in_target_sets']} target sets (goal <= 1)")
    if cuda and "floor_peak_mib" in out:
        print(f"  floor (forward/backward, gradients dropped): device peak {out['floor_peak_mib']} MiB above the model")
        for v in ("lora_ga_offload", "slice_offload"):
            if f"{v}_rest_phase_minus_adapter_mib" in out:
                print(f"  {v}: device above model+adapter: gradient phase - floor = "
                      f"{out[f'{v}_grad_phase_minus_floor_minus_adapter_mib']} MiB "
                      f"({out[f'{v}_grad_phase_extra_in_largest_grads']} largest-layer gradients), rest of init = "
                      f"{out[f'{v}_rest_phase_minus_adapter_mib']} MiB "
                      f"({out[f'{v}_rest_phase_extra_in_largest_grads']}) (goal <= 1 each); "
                      f"device total peak {out[f'{v}_device_total_peak_mib']} MiB, model {out['model_mib']} MiB")
    checks = {k: v for k, v in out.items() if k.startswith("pass_")}
    if checks:
        print("checks: " + ", ".join(f"{k[5:]}={'PASS' if v else 'FAIL'}" for k, v in checks.items()))
    if out.get("failed_variants"):
        print(f"FAILED variants: {out['failed_variants']}")


if __name__ == "__main__":
    sys.exit(main())
