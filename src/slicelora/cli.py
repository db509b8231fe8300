"""The `slicelora` command: run, compare, study, report, export, demo, mine; listings of tasks, methods, sequences."""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from .errors import ConfigError, DataError, SliceLoraError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Continual fine-tuning with LoRA: SLICE and its baselines (vanilla, LoRA-GA, LoRAM).")
console = Console(width=None if sys.stdout.isatty() else 160)  # logs and pipes get the whole table
METHODS = "vanilla,lora_ga,loram,slice"  # the paper's comparison: compare's and demo's default

# The embedded demo: SmolLM2-135M-Instruct on 3 short Super-NI tasks, sized for 2 idle CPU cores (full: ~13 min).
DEMO = ["sequence=demo", "adapter.rank=8", "adapter.alpha=2", "init.batches=4", "init.batch_size=8",
        "init.replay_buffer=32", "train.epochs=1", "train.lr=5e-4", "train.batch_size=8", "train.grad_accum=1",
        "train.max_length=128", "train.max_examples=96", "eval.examples=24", "eval.max_new_tokens=16",
        "eval.batch_size=32", "general.limit=8", "general.shots=3", "general.max_length=768"]
DEMO_QUICK = DEMO + ["init.batches=2", "init.replay_buffer=16", "train.max_examples=24", "eval.examples=12",
                     "general.enabled=false"]

ConfigArg = Annotated[Optional[Path], typer.Argument(help="YAML config (paper defaults for anything not set).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override: key=value, e.g. train.lr=2e-4.")]
DataDirOpt = Annotated[Optional[list[Path]], typer.Option(
    "--data-dir", help="Task data folder(s), searched before $SLICELORA_DATA and the shipped data (added to them).")]
DataOnlyOpt = Annotated[bool, typer.Option(
    "--data-only", help="Search only the --data-dir folders, not $SLICELORA_DATA nor the shipped data.")]


def _fail(exc: SliceLoraError) -> None:
    console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)  # a message's "[...]" is not markup
    raise typer.Exit(2)


@contextmanager
def _handled(resumable: bool = False) -> Iterator[None]:
    """Our errors as one line and exit code 2; Ctrl-C in a resumable command as the command that resumes it and
    exit code 130 (the shell's code for SIGINT), not a traceback."""
    try:
        yield
    except SliceLoraError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        if not resumable:
            raise
        args = sys.argv[1:] + ([] if "--resume" in sys.argv else ["--resume"])
        console.print(f"interrupted; resume with: slicelora {shlex.join(args)}", markup=False, soft_wrap=True)
        raise typer.Exit(130) from None


def _overrides(sets, method=None, sequence=None, model=None, data_dirs=None, data_only=False) -> list[str]:
    from .loop.adapters import method_overrides

    out = list(sets or []) + (method_overrides(method) if method is not None else [])
    for key, value in (("sequence", sequence), ("model", model)):
        if value is not None:
            out.append(f"{key}={value}")
    if data_dirs:
        out.append("data_dirs=" + ",".join(str(d) for d in data_dirs))
    if data_only:
        out.append("data_only=true")
    return out


def _accelerator():
    """One accelerate state per command: the device and, under torchrun / accelerate launch, the process group."""
    import torch
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())


def _finish(accelerator) -> None:
    """End a (possibly multi-process) command cleanly: all ranks meet, then the process group is torn down."""
    accelerator.wait_for_everyone()
    accelerator.end_training()


CPU_NOTE_TOKENS = 500_000  # training tokens past which a CPU run gets a note (~20 min for a 135M model)
PlanOpt = Annotated[bool, typer.Option("--plan", help="Print the stages, the work, the settings that differ from the paper's and a time estimate; run nothing.")]


def _plan_or_warn(configs: dict, plan: bool) -> bool:
    """With --plan, print the plan and say so (the command then stops). Without it, on a machine without a GPU, say
    in one line how much work is ahead when it is a lot, and how to estimate it."""
    import torch

    from .study.plan import count_work, plan_runs, runs_as_study

    if plan:
        console.print(plan_runs(configs), markup=False)
        return True
    if not torch.cuda.is_available():
        work, train = count_work(runs_as_study(configs)), next(iter(configs.values())).train
        tokens = work.train_batches * train.batch_size * train.max_length  # at most: batches padded to max_length
        if tokens > CPU_NOTE_TOKENS:
            console.print(f"note: no GPU; {work.train_batches} training batches (up to {tokens:,} tokens) and "
                          f"{work.eval_examples} scored examples ahead, which can take hours on a CPU. `--plan` "
                          "estimates the time; `slicelora demo` shows CPU-sized settings.", markup=False, soft_wrap=True)
    return False


def _compare(config: Optional[Path], overrides: list[str], methods: str, output: Path, resume: bool,
             plan: bool = False) -> None:
    from .loop.adapters import method_overrides
    from .loop.config import load_config
    from .loop.runfolder import read_run
    from .loop.stages import check_collection_dir, run as run_stages
    from .report.plots import write_report
    from .report.tables import rich_table

    names = [m.strip() for m in methods.split(",") if m.strip()]
    twice = sorted({m for m in names if names.count(m) > 1})
    if not names or twice:
        raise ConfigError(f"--methods {methods!r} " + (f"names {', '.join(twice)} more than once" if twice else
                          "names no method") + f"; list each method once, e.g. --methods {METHODS}.")
    configs = {m: load_config(config, overrides + method_overrides(m)) for m in names}  # all checked up front
    if _plan_or_warn(configs, plan):
        return
    check_collection_dir(output, "comparison")
    accelerator = _accelerator()
    main = accelerator.is_main_process
    base_general = None
    for name, cfg in configs.items():
        if main:
            console.rule(f"[bold]{name}")
        start = time.perf_counter()
        folder = run_stages(cfg, output / name, resume=resume, base_general=base_general, accelerator=accelerator)
        base_general = read_run(folder).general or base_general
        if main:
            console.print(f"{name}: {time.perf_counter() - start:.0f} s")
    if main:
        written = write_report([output / m for m in names], output)
        console.print(rich_table([read_run(output / m) for m in names]))
        console.print("written: " + ", ".join(str(p) for p in written))
    _finish(accelerator)


@app.command()
def run(
    config: ConfigArg = None,
    set: SetOpt = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Run folder.")] = Path("runs/run"),
    method: Annotated[Optional[str], typer.Option(help="A registered LoRA init: vanilla | lora_ga | loram | slice | ... (see `slicelora methods`), or osf (PEFT's OSF adapter instead of LoRA).")] = None,
    sequence: Annotated[Optional[str], typer.Option(help="Sequence name or YAML file.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Local model folder or cached Hugging Face model id (default: embedded SmolLM2).")] = None,
    data_dir: DataDirOpt = None,
    data_only: DataOnlyOpt = False,
    resume: Annotated[bool, typer.Option(help="Continue a stopped run in --output.")] = False,
    plan: PlanOpt = False,
) -> None:
    """Run one method on one task sequence; writes R, metrics, generations and adapters to --output."""
    from .loop.adapters import method_name
    from .loop.config import load_config
    from .loop.runfolder import read_run
    from .loop.stages import run as run_stages
    from .report.plots import write_report
    from .report.tables import rich_table

    with _handled(resumable=True):
        cfg = load_config(config, _overrides(set, method, sequence, model, data_dir, data_only), strict=True)
        if _plan_or_warn({method_name(cfg.to_dict()): cfg}, plan):
            return
        accelerator = _accelerator()
        folder = run_stages(cfg, output, resume=resume, accelerator=accelerator)
        if accelerator.is_main_process:
            write_report([folder], folder / "report")
            console.print(rich_table([read_run(folder)]))
        _finish(accelerator)


@app.command()
def compare(
    config: ConfigArg = None,
    methods: Annotated[str, typer.Option(help="Comma-separated methods: registered LoRA inits, or osf (PEFT's OSF adapter).")] = METHODS,
    set: SetOpt = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Comparison folder (one run folder per method).")] = Path("runs/compare"),
    sequence: Annotated[Optional[str], typer.Option(help="Sequence name or YAML file.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Local model folder or cached Hugging Face model id (default: embedded SmolLM2).")] = None,
    data_dir: DataDirOpt = None,
    data_only: DataOnlyOpt = False,
    resume: Annotated[bool, typer.Option(help="Continue stopped runs in --output.")] = False,
    plan: PlanOpt = False,
) -> None:
    """Run several methods on one sequence and write one table and the plots."""
    with _handled(resumable=True):
        _compare(config, _overrides(set, None, sequence, model, data_dir, data_only), methods, output, resume, plan)


@app.command()
def study(
    study_file: Annotated[Path, typer.Argument(help="Study YAML: base, variants, sequences, seeds, reference.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Study folder (one run folder per cell).")] = Path("runs/study"),
    plan: Annotated[bool, typer.Option("--plan", help="Print the cells, shared work and a time estimate; run nothing.")] = False,
    workers: Annotated[int, typer.Option(help="Worker processes (one CPU thread each); 2 uses both cores of a 2-core machine.")] = 1,
    resume: Annotated[bool, typer.Option(help="Continue a stopped study in --output.")] = False,
    set: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a base key of the study file: key=value (e.g. a larger size on a GPU).")] = None,
    seeds: Annotated[Optional[str], typer.Option(help="Comma-separated seeds instead of the study file's.")] = None,
) -> None:
    """Run a grid of variants x sequences x seeds, sharing identical work, then write study.md/.csv and plots."""
    from .report.study import write_study_report
    from .study import load_study, run_study
    from .study.plan import plan_study

    with _handled(resumable=True):
        spec = load_study(study_file, overrides=set, seeds=seeds)
        if plan:
            if workers > 1:
                import torch

                torch.set_num_threads(1)
            console.print(plan_study(spec, workers=workers), markup=False)
            return
        accelerator = _accelerator() if workers <= 1 else None
        start = time.perf_counter()
        run_study(spec, output, resume=resume, workers=workers, accelerator=accelerator,
                  log=lambda line: console.print(line, markup=False))
        written = write_study_report(output)
        console.print(f"study finished in {time.perf_counter() - start:.0f} s; written: "
                      + ", ".join(str(p) for p in written), markup=False)
        if accelerator is not None:
            _finish(accelerator)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run folder, a comparison folder or a study folder.")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Where to write (default: RUN_DIR).")] = None,
) -> None:
    """Recompute the metrics from a run, comparison or study folder and write tables (Markdown, CSV) and plots."""
    from .loop.runfolder import find_run_dirs, read_run, write_run_summary
    from .report.plots import write_report
    from .report.study import write_study_report
    from .report.tables import rich_table

    with _handled():
        if (run_dir / "study.json").is_file():
            console.print("written: " + ", ".join(str(p) for p in write_study_report(run_dir)), markup=False)
            return
        runs = find_run_dirs(run_dir)
        for folder in runs:
            write_run_summary(folder)
        written = write_report(runs, output or run_dir)
        console.print(rich_table([read_run(r) for r in runs]))
        console.print("written: " + ", ".join(str(p) for p in written))


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A run folder.")],
    stage: Annotated[Optional[int], typer.Option(help="The stage to export (default: the last finished one).")] = None,
    merged: Annotated[Optional[Path], typer.Option(help="Write the model after the stage here (a new or empty folder): AutoModelForCausalLM loads it.")] = None,
    adapter: Annotated[Optional[Path], typer.Option(help="Write the stage's change here as a PEFT adapter (LoRA; OSF for OSF runs): DIR/adapter, on DIR/base (the model before the stage; named in the adapter's config by its absolute path, so after moving the pair load it with PeftModel.from_pretrained(base, adapter)).")] = None,
    dtype: Annotated[str, typer.Option(help="The saved tensors' dtype: auto (the run's base model's, from its config.json), float32, bfloat16 or float16.")] = "auto",
) -> None:
    """Export a finished stage as standard Hugging Face folders: the merged model and/or the stage's PEFT adapter."""
    from .export import export_stage

    with _handled():
        written = export_stage(run_dir, stage, merged=merged, adapter=adapter, dtype=dtype)
    console.print("written: " + ", ".join(str(p) for p in written), markup=False)


@app.command()
def demo(
    quick: Annotated[bool, typer.Option(help="A ~3.5 minute version: fewer examples, no general-ability eval.")] = False,
    output: Annotated[Path, typer.Option("--output", "-o")] = Path("runs/demo"),
    methods: Annotated[str, typer.Option(help="Comma-separated methods.")] = METHODS,
) -> None:
    """SmolLM2-135M-Instruct (embedded) on a 3-task Super-NI sequence: vanilla, LoRA-GA, LoRAM and SLICE compared."""
    output = output / ("quick" if quick else "full")
    start = time.perf_counter()
    with _handled():
        _compare(None, DEMO_QUICK if quick else DEMO, methods, output, resume=True)
    console.print(f"demo finished in {time.perf_counter() - start:.0f} s; results in {output}")


@app.command()
def mine(
    pool: Annotated[str, typer.Option(help="Comma-separated task refs, or 'all' for every task in the data folders.")] = "all",
    size: Annotated[int, typer.Option(help="Tasks per sequence.")] = 5,
    top: Annotated[int, typer.Option(help="How many lowest (and highest) subsets to keep.")] = 10,
    output: Annotated[Path, typer.Option("--output", "-o")] = Path("runs/mine"),
    model: Annotated[Optional[str], typer.Option(help="Local model folder or cached Hugging Face model id (default: embedded SmolLM2).")] = None,
    data_dir: DataDirOpt = None,
    data_only: DataOnlyOpt = False,
    batches: Annotated[int, typer.Option(help="Gradient batches per task.")] = 4,
    batch_size: int = 4,
    max_length: int = 256,
    loss_on: Annotated[str, typer.Option(help="full (paper) or answer: which tokens the loss covers.")] = "full",
    k: Annotated[int, typer.Option(help="CountSketch dimension.")] = 200_000,
    mode: Annotated[str, typer.Option(help="sketch, or exact (keeps full signatures; reports the sketch error).")] = "sketch",
    method: Annotated[str, typer.Option(help="exhaustive, beam or greedy subset search.")] = "exhaustive",
    seed: int = 42,
    allow_reasoning_variant: Annotated[bool, typer.Option(help="Train MeetingBank on TRACE's reasoning split.")] = True,
) -> None:
    """Find the most opposed task subsets by gradient cosine on the base model (docs/method.md, mining) and write a YAML of
    sequences that `slicelora run --sequence FILE.yaml:NAME` accepts."""
    from .data.tasks import list_tasks, load_task, search_dirs
    from .mining import SignatureSettings, mine as mine_tasks, write_mining_outputs
    from .models import load_model

    with _handled():
        dirs = search_dirs(data_dir, data_only)
        refs = list_tasks(dirs) if pool == "all" else [r.strip() for r in pool.split(",") if r.strip()]
        tasks = [load_task(r, dirs, seed=seed, allow_reasoning_variant=allow_reasoning_variant) for r in refs]
        settings = SignatureSettings(batches=batches, batch_size=batch_size, max_length=max_length, seed=seed,
                                     loss_on=loss_on, k=k, mode=mode)
        net, tokenizer = load_model(model)
        result = mine_tasks(net, tokenizer, tasks, settings, size, top, method=method)
        written = write_mining_outputs(result, output)
    for label, subsets in (("most opposed", result.lowest), ("most aligned", result.highest)):
        console.print(f"[bold]{label}[/]")
        for names, score in subsets[:5]:
            console.print(f"  {score:+.3f}  {', '.join(names)}")
    console.print("written: " + ", ".join(str(p) for p in written.values()))


@app.command()
def tasks(data_dir: DataDirOpt = None, data_only: DataOnlyOpt = False) -> None:
    """List the tasks found in the data folders."""
    from .data.tasks import list_tasks, search_dirs

    with _handled():
        dirs = search_dirs(data_dir, data_only)
        names = list_tasks(dirs)
        if not names:
            searched = ", ".join(map(str, dirs)) or "none"
            raise DataError(f"no tasks found in the data folders searched ({searched}); give --data-dir folders "
                            "that hold task files or folders.")
    for name in names:
        console.print(name, markup=False)


@app.command()
def methods() -> None:
    """List the registered LoRA initialisation methods and the other adapter types."""
    from rich.markup import escape

    from .init import get_init, init_names
    from .loop.adapters import ADAPTERS, LORA

    for name in init_names():
        spec = get_init(name)
        console.print(f"[bold]{escape(name)}[/] (data: {spec.data}{', absorbed' if spec.absorbs else ''}): "
                      f"{escape(spec.summary)}", highlight=False)
    for name, kind in ADAPTERS.items():
        if name != LORA:
            console.print(f"[bold]{escape(name)}[/] (adapter.type={name}, no LoRA init): {escape(kind.summary)}",
                          highlight=False)


@app.command()
def sequences() -> None:
    """List the registered task sequences."""
    from .data.sequences import list_sequences, load_sequence

    for name in list_sequences():
        console.print(f"[bold]{name}[/]: {', '.join(load_sequence(name).tasks)}")


if __name__ == "__main__":
    app()
