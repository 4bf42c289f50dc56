#!/usr/bin/env bash
# The whole JAX vs PyTorch AAHR step comparison on one GPU (COCO config, batch 256 then 128),
# inside a fixed time budget; results as JSON and one Markdown table, written as they come.
#
#   benchmarks/gpu_suite.sh [OUT_DIR]              # GPU: everything within $BUDGET seconds
#   TINY=1 VARIANTS=jax_cached,torch_eager benchmarks/gpu_suite.sh /tmp/suite   # CPU rehearsal
#
# Batch 256 (the issue's criteria) runs first with about 75% of the budget; batch 128 gets the
# rest. Each run is killed at its share (`timeout`); a variant that would not fit is skipped
# and the table says so. Python packages missing on the GPU machine (ml_collections,
# open_clip and its ftfy/wcwidth) are installed from .whl/ when it is there.
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-runs/gpu_suite}}
BUDGET=${BUDGET:-330}
TINY=${TINY:-0}
PY=${PYTHON:-python3}
VARIANTS=${VARIANTS:-torch_eager,jax_cached,torch_compiled,jax_online}  # cheapest baseline first
SHARE256=${SHARE256:-75}          # percent of the budget for batch 256
EXPECTED_SCALE=${EXPECTED_SCALE:-1}  # x train_step.EXPECTED_S: the time a variant needs to start
mkdir -p "$OUT_DIR"
START=$(date +%s)
LOG="$OUT_DIR/suite.log"
export HF_HUB_OFFLINE=1 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2

if ! "$PY" -c 'import ml_collections, open_clip' 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/bench_site .whl/*.whl >>"$LOG" 2>&1
    export PYTHONPATH=/tmp/bench_site${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
{ echo "suite start $(date -u)"; nvidia-smi --query-gpu=name,driver_version,memory.total \
    --format=csv 2>/dev/null || echo 'no nvidia-smi'; } >>"$LOG"

if [ "$TINY" = 1 ]; then
  COMMON=(--config configs/coco.py --tiny --steps 2 --expected_scale 0)
else
  COMMON=(--config configs/coco.py --steps 10 --expected_scale "$EXPECTED_SCALE")
  # One scanned BERT layer: the unrolled 12-layer step did not finish compiling within ~170 s
  # on an H200 (2026-11-27); BERT_SCAN=0 measures the unrolled one when time allows.
  [ "${BERT_SCAN:-1}" = 1 ] && COMMON+=(--bert_scan)
fi

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

run_batch() {  # run_batch BATCH SECONDS [extra args]
  local batch=$1 seconds=$2
  shift 2
  echo "== batch $batch: ${seconds}s" >>"$LOG"
  timeout --signal=KILL "$seconds" "$PY" -m benchmarks.train_step "${COMMON[@]}" \
    --batch_size "$batch" --time_budget $(( seconds - 15 )) \
    --variants "$VARIANTS" --json "$OUT_DIR/b$batch.json" "$@" >>"$LOG" 2>&1
  echo "== batch $batch exit $?" >>"$LOG"
}

run_batch 256 $(( $(left) * SHARE256 / 100 )) --trace "$OUT_DIR/b256_jax_cached"
run_batch 128 $(( $(left) - 10 ))
"$PY" -m benchmarks.suite_report "$OUT_DIR"/b256.json "$OUT_DIR"/b128.json \
  --markdown "$OUT_DIR/results.md" >>"$LOG" 2>&1
echo "suite end $(date -u), $(( $(date +%s) - START ))s" >>"$LOG"
cat "$OUT_DIR/results.md" 2>/dev/null
