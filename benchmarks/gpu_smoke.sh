#!/usr/bin/env bash
# GPU smoke test of the stage loop: every init (slice, lora_ga, loram, vanilla) on a short sequence, with a
# SmolLM2-135M-shaped RANDOM model, through `slicelora run`; prints per-stage init and train seconds. Then the
# init library on an FSDP2-sharded model on the GPU(s) against the unsharded model (tests/dist_init.py, nccl).
# Sized to finish within 5 minutes on one GPU (a few minutes of a lent machine), nothing downloaded.
#
#   benchmarks/gpu_smoke.sh                       # on the GPU machine, from the repository root
#   benchmarks/gpu_smoke.sh --wheels shared/wheels # first install the wheels of any missing package from that folder
#   benchmarks/gpu_smoke.sh --cpu --tiny          # a dry run of the same steps on the CPU with a tiny model (~1 min)
#
# Options:
#   --wheels DIR   a folder of .whl files, installed (pip --no-index --no-deps) only if an import is missing
#   --cpu          run on the CPU (hides the GPUs); without it a missing CUDA device is an error
#   --tiny         a tiny model (2 layers, hidden 64) and 2 stages instead of the SmolLM2 shape and 3 stages
#   --methods LIST comma-separated, default slice,lora_ga,loram,vanilla (SLICE first: its stages 2-3 are the
#                  path with replay and surgery)
#   --no-fsdp      skip the FSDP init check
#   --out DIR      output folder (default: $OUT/gpu_smoke if $OUT is set, else runs/gpu_smoke)
#   --keep-adapters  keep the saved adapters and initial factors (by default they are removed after the summary,
#                  so that the output folder stays small)
# Environment: PYTHON (default python3), SMOKE_BUDGET_S (default 280: total seconds for all runs).
#
# Our package comes from src/ through PYTHONPATH (no install, no build step), so the CLI is `python -m slicelora.cli`.
# The real SmolLM2 weights (the GGUF wheel) are too large to travel: the model is random with SmolLM2-135M's config
# values (30 layers, hidden 576, MLP 1536, 9/3 heads, vocab 49152, rope theta 1e5) and the byte-level test
# tokenizer. Scores are therefore meaningless; the point is that every step runs on the GPU, and how long it takes.
# Output: OUT_DIR/summary.json, OUT_DIR/summary.md, OUT_DIR/logs/<method>.log, OUT_DIR/runs/<method>/ (run folders).
# Exit status: 0 when every method finished, 1 otherwise (the summary still lists what did finish).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
BUDGET="${SMOKE_BUDGET_S:-280}"
WHEELS=""
CPU=0
TINY=0
KEEP=0
FSDP=1
METHODS="slice,lora_ga,loram,vanilla"
if [[ -n "${OUT:-}" ]]; then OUT_DIR="$OUT/gpu_smoke"; else OUT_DIR="$ROOT/runs/gpu_smoke"; fi

while [[ $# -gt 0 ]]; do
  case "$1" in
    --wheels) WHEELS="${2:?--wheels needs a folder}"; shift 2 ;;
    --cpu) CPU=1; shift ;;
    --tiny) TINY=1; shift ;;
    --keep-adapters) KEEP=1; shift ;;
    --no-fsdp) FSDP=0; shift ;;
    --methods) METHODS="${2:?--methods needs a list}"; shift 2 ;;
    --out) OUT_DIR="${2:?--out needs a folder}"; shift 2 ;;
    -h|--help) sed -n '2,30p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_smoke: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

START=$SECONDS
log() { printf '[gpu_smoke %3ds] %s\n' "$((SECONDS - START))" "$*"; }

export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export SLICELORA_CACHE="$OUT_DIR/cache"
if [[ $CPU -eq 1 ]]; then
  export CUDA_VISIBLE_DEVICES=""
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
mkdir -p "$OUT_DIR/logs" "$OUT_DIR/runs"
# A run folder that holds an earlier run is refused by the loop: start clean (only our own sub-folders).
rm -rf "$OUT_DIR/runs" "$OUT_DIR/model" "$OUT_DIR/summary.json" "$OUT_DIR/summary.md"
mkdir -p "$OUT_DIR/runs"

# --- 1. packages ----------------------------------------------------------------------------------------------------
# Imported for real (not just found), with our own modules, so that a missing dependency of a dependency (e.g.
# rouge_score's nltk and absl) is named too.
MODULES="torch transformers peft accelerate safetensors yaml typer rich rouge_score matplotlib tqdm numpy
         slicelora.cli slicelora.loop.stages slicelora.eval.scoring slicelora.report.plots"
missing() { "$PY" - "$@" <<'EOF'
import importlib, sys
gone = set()
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        gone.add(exc.name or name)
print(" ".join(sorted(gone)))
EOF
}
if [[ $FSDP -eq 1 ]]; then MODULES="$MODULES pytest"; fi  # tests/dist_init.py imports the tests' conftest
MISSING="$(missing $MODULES)"
if [[ -n "$MISSING" ]]; then
  if [[ -z "$WHEELS" ]]; then
    echo "gpu_smoke: missing Python modules: $MISSING. Pass --wheels DIR with their wheels (made elsewhere with" \
         "pip download / pip wheel --no-deps), or install them." >&2
    exit 2
  fi
  shopt -s nullglob
  wheels=("$WHEELS"/*.whl)
  shopt -u nullglob
  if [[ ${#wheels[@]} -eq 0 ]]; then echo "gpu_smoke: no .whl files in $WHEELS" >&2; exit 2; fi
  log "installing ${#wheels[@]} wheel(s) from $WHEELS for: $MISSING"
  "$PY" -m pip install --no-index --no-deps --quiet "${wheels[@]}"
  MISSING="$(missing $MODULES)"
  if [[ -n "$MISSING" ]]; then echo "gpu_smoke: still missing after the wheels: $MISSING" >&2; exit 2; fi
fi

"$PY" - "$CPU" <<'EOF'
import sys
import accelerate, peft, torch, transformers
cpu = sys.argv[1] == "1"
print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
      f"accelerate {accelerate.__version__}")
if torch.cuda.is_available():
    print(f"device: {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, "
          f"bf16 {torch.cuda.is_bf16_supported()}, CUDA {torch.version.cuda}")
elif cpu:
    print("device: CPU (--cpu)")
else:
    sys.exit("gpu_smoke: no CUDA device is visible; pass --cpu for a CPU dry run")
EOF

# --- 2. the model: SmolLM2-135M's config values, random weights, the byte-level test tokenizer -----------------------
log "building the model in $OUT_DIR/model"
"$PY" - "$OUT_DIR/model" "$TINY" <<'EOF'
import sys
from slicelora.models import tiny_llama, tiny_tokenizer

folder, tiny = sys.argv[1], sys.argv[2] == "1"
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
                    rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu",
                    initializer_range=0.02)
tokenizer = tiny_tokenizer()
model = tiny_llama(tokenizer, seed=0) if tiny else tiny_llama(tokenizer, seed=0, **SMOLLM2_135M)
model.save_pretrained(folder)
tokenizer.save_pretrained(folder)
print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
      f"{model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}")
EOF

# --- 3. the sequence and the run settings ---------------------------------------------------------------------------
if [[ $TINY -eq 1 ]]; then
  printf 'name: smoke\ntasks: ["363", "1687"]\n' > "$OUT_DIR/sequence.yaml"
  SETTINGS=(adapter.rank=4 init.batches=2 init.batch_size=4 init.replay_buffer=8 train.epochs=1 train.batch_size=4
            train.grad_accum=1 train.max_length=96 train.max_examples=8 eval.examples=4 eval.max_new_tokens=3
            eval.batch_size=4 general.enabled=false)
else
  printf 'name: smoke\ntasks: ["363", "1687", "591"]\n' > "$OUT_DIR/sequence.yaml"
  SETTINGS=(adapter.rank=16 adapter.alpha=2 init.batches=4 init.batch_size=8 init.replay_buffer=32 train.epochs=1
            train.batch_size=8 train.grad_accum=1 train.max_length=256 train.max_examples=64 eval.examples=16
            eval.max_new_tokens=16 eval.batch_size=16 general.enabled=false)
fi
SET_ARGS=()
for s in "${SETTINGS[@]}"; do SET_ARGS+=(-s "$s"); done
printf '%s\n' "${SETTINGS[@]}" > "$OUT_DIR/settings.txt"

# --- 4. one `slicelora run` per method, within the time budget --------------------------------------------------------
FAILED=()
IFS=',' read -r -a METHOD_LIST <<< "$METHODS"
: > "$OUT_DIR/walls.tsv"
for method in "${METHOD_LIST[@]}"; do
  left=$((BUDGET - (SECONDS - START)))
  if (( left < 20 )); then
    log "$method: skipped, the ${BUDGET}s budget is spent"
    FAILED+=("$method(skipped)")
    continue
  fi
  log "$method: running (at most ${left}s)"
  t0=$SECONDS
  if timeout --signal=TERM --kill-after=10 "$left" \
      "$PY" -m slicelora.cli run --model "$OUT_DIR/model" --sequence "$OUT_DIR/sequence.yaml" --method "$method" \
      -o "$OUT_DIR/runs/$method" "${SET_ARGS[@]}" > "$OUT_DIR/logs/$method.log" 2>&1; then
    log "$method: done in $((SECONDS - t0))s"
    printf '%s\t%s\t%s\n' "$method" "$((SECONDS - t0))" ok >> "$OUT_DIR/walls.tsv"
  else
    rc=$?
    log "$method: FAILED (exit $rc) after $((SECONDS - t0))s; last lines of $OUT_DIR/logs/$method.log:"
    tail -n 15 "$OUT_DIR/logs/$method.log" | sed 's/^/    /' || true
    printf '%s\t%s\t%s\n' "$method" "$((SECONDS - t0))" "exit $rc" >> "$OUT_DIR/walls.tsv"
    FAILED+=("$method")
  fi
done

# --- 5. per-stage times from the run folders (stages/*/timing.json) ---------------------------------------------------
"$PY" - "$OUT_DIR" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
walls = {}
for line in (out / "walls.tsv").read_text().splitlines():
    method, seconds, status = line.split("\t")
    walls[method] = {"wall_s": int(seconds), "status": status}
rows, summary = [], {}
for method, wall in walls.items():
    stages = []
    for folder in sorted((out / "runs" / method / "stages").glob("[0-9]*")):
        def read(name):
            path = folder / name
            return json.loads(path.read_text()) if path.is_file() else {}
        init, train, scores = read("init.json"), read("train.json"), read("scores.json")
        timing = read("timing.json")
        stage = {"stage": int(folder.name), "task": init.get("task"), "init_s": timing.get("init"),
                 "train_s": timing.get("train"), "train_steps": train.get("steps"), "bf16": train.get("bf16"),
                 "evaluated": bool(scores)}
        stages.append(stage)
        rows.append((method, stage))
    summary[method] = {**wall, "stages": stages}
(out / "summary.json").write_text(json.dumps(summary, indent=1))
fmt = lambda v: "-" if v is None else f"{v:.2f}"
lines = ["| method | stage | task | init s | train s | steps | bf16 | evaluated |", "|---|---|---|---|---|---|---|---|"]
for method, s in rows:
    lines.append(f"| {method} | {s['stage']} | {s['task']} | {fmt(s['init_s'])} | {fmt(s['train_s'])} | "
                 f"{s['train_steps']} | {s['bf16']} | {s['evaluated']} |")
lines += ["", "| method | wall s (whole `slicelora run`) | status |", "|---|---|---|"]
lines += [f"| {m} | {w['wall_s']} | {w['status']} |" for m, w in walls.items()]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF

# --- 6. the init library on an FSDP2-sharded model (every GPU, nccl) against the unsharded model ------------------------
if [[ $FSDP -eq 1 ]]; then
  NPROC=1
  DEVICE=cpu
  if [[ $CPU -eq 0 ]]; then
    DEVICE=cuda
    NPROC="$("$PY" -c 'import torch; print(min(torch.cuda.device_count(), 2))')"
  fi
  log "FSDP init check: $NPROC process(es) on $DEVICE"
  mkdir -p "$OUT_DIR/fsdp"
  if SLICELORA_TEST_DEVICE=$DEVICE timeout 120 "$PY" "$ROOT/tests/dist_init.py" "$OUT_DIR/fsdp/one.safetensors" \
        > "$OUT_DIR/logs/fsdp.log" 2>&1 \
      && SLICELORA_TEST_DEVICE=$DEVICE timeout 180 "$PY" -m torch.distributed.run --nproc_per_node "$NPROC" \
        "$ROOT/tests/dist_init.py" "$OUT_DIR/fsdp/sharded.safetensors" fsdp >> "$OUT_DIR/logs/fsdp.log" 2>&1 \
      && "$PY" - "$OUT_DIR/fsdp" <<'EOF' | tee -a "$OUT_DIR/summary.md"
import sys
from pathlib import Path
from safetensors.torch import load_file

folder = Path(sys.argv[1])
one, sharded = load_file(str(folder / "one.safetensors")), load_file(str(folder / "sharded.safetensors"))
flags = {k: bool(sharded.pop(k)) for k in list(sharded) if k.startswith("refused/") or k == "sharded_buffers"}
worst = {}
for name, tensor in one.items():
    run = name.split("/")[0]
    worst[run] = max(worst.get(run, 0.0), float((sharded[name].float() - tensor.float()).abs().max()))
print("\nFSDP init check: max |sharded - unsharded| per init (adapters, absorbed weights, SLICE cosines)")
print("\n".join(f"- {run}: {diff:.2e}" for run, diff in worst.items()))
if flags:
    print("- checks on 2 ranks: " + ", ".join(f"{k}={v}" for k, v in flags.items()))
sys.exit(0 if max(worst.values()) < 1e-3 and all(flags.values()) else 1)
EOF
  then
    log "FSDP init check: done"
  else
    log "FSDP init check: FAILED; last lines of $OUT_DIR/logs/fsdp.log:"
    tail -n 15 "$OUT_DIR/logs/fsdp.log" | sed 's/^/    /' || true
    FAILED+=("fsdp")
  fi
fi

if [[ $KEEP -eq 0 ]]; then
  find "$OUT_DIR/runs" -type d -name adapter -prune -exec rm -rf {} + 2>/dev/null || true
  find "$OUT_DIR/runs" -name 'init_factors.safetensors' -delete 2>/dev/null || true
  rm -rf "$OUT_DIR/model" "$OUT_DIR/cache"
fi
log "total $((SECONDS - START))s; summary in $OUT_DIR/summary.md"
if [[ ${#FAILED[@]} -gt 0 ]]; then
  log "failed: ${FAILED[*]}"
  exit 1
fi
