#!/usr/bin/env bash
# The whole JAX vs PyTorch AAHR step comparison on one GPU (COCO config, batch 256 then 128)
# inside a fixed time budget; results as JSON and one Markdown table, written as they come.
#
#   benchmarks/gpu_suite.sh [OUT_DIR]              # GPU: everything within $BUDGET seconds
#   TINY=1 VARIANTS=jax_cached,torch_eager benchmarks/gpu_suite.sh /tmp/suite   # CPU rehearsal
#
# Batch 256 (the issue's criteria) runs first with SHARE256 percent of the budget; batch 128
# gets the rest, then the evaluator benchmark (COCO-5K-sized embeddings to the metric table, on
# the GPU and on the host's CPU cores) if time is left. One variant at a time on an otherwise
# idle machine: compilation dominates (H200, batch 256: JAX step with BERT scanned 71-97 s,
# torch.compile 145 s; the unrolled BERT, the trainer's default, not yet measured there: 1.4x
# the scanned compile time on a CPU), and of six compilations run in parallel none finished in
# 190 s (2026-11-27), so nothing is compiled in parallel. Variants run in the order given; one
# that would not fit in what is left of its batch's time is skipped and the table says so.
# Compilation caches live in $CACHE: a rerun on the same machine starts in seconds.
# First benchmarks.selection_ops and benchmarks.bert_layer (under two minutes; their tables go
# to suite.log), last benchmarks.trace_report on the batch-256 JAX trace (also into suite.log).
# Files (the device tool returns at most 8): suite.log, b256.json, b128.json, results.md,
# b256_jax_cached.trace.json.gz, b256_jax_cached.hlo.txt.gz, evaluate.log.
# Python packages missing on the GPU machine (ml_collections, open_clip and its ftfy/wcwidth)
# are installed from .whl/ when it is there.
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-runs/gpu_suite}}
BUDGET=${BUDGET:-480}
SHARE256=${SHARE256:-80}            # percent of the budget (after EVAL_S) for batch 256
EVAL_S=${EVAL_S:-0}                 # seconds kept for the evaluator benchmark (0: skip it)
TINY=${TINY:-0}
PY=${PYTHON:-python3}
VARIANTS=${VARIANTS:-torch_eager,jax_cached,torch_compiled,jax_cached_scan,jax_online}
EXPECTED_SCALE=${EXPECTED_SCALE:-1}  # x train_step.EXPECTED_S: the time a variant needs to start
CACHE=${CACHE:-/tmp/aahr_bench_cache}
mkdir -p "$OUT_DIR"
START=$(date +%s)
LOG="$OUT_DIR/suite.log"
export HF_HUB_OFFLINE=1 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
note() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" >>"$LOG"; }

if ! "$PY" -c 'import ml_collections, open_clip' 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/bench_site .whl/*.whl >>"$LOG" 2>&1
    export PYTHONPATH=/tmp/bench_site${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
note "suite start, budget ${BUDGET}s"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >>"$LOG" 2>&1 \
  || echo 'no nvidia-smi' >>"$LOG"

if [ "$TINY" = 1 ]; then
  COMMON=(--config configs/coco.py --tiny --steps 2 --expected_scale 0)
  size() { echo 8; }  # batch 8 stands in for both sizes
else
  COMMON=(--config configs/coco.py --steps 10 --expected_scale "$EXPECTED_SCALE")
  size() { echo "$1"; }
fi

run_batch() {  # run_batch BATCH SECONDS [extra args]
  local batch=$1 seconds=$2
  shift 2
  if [ "$seconds" -lt 30 ]; then note "batch $batch skipped: ${seconds}s left"; return; fi
  note "batch $batch: at most ${seconds}s"
  timeout --signal=KILL "$seconds" "$PY" -m benchmarks.train_step "${COMMON[@]}" \
    --batch_size "$(size "$batch")" --time_budget $(( seconds - 10 )) --cache_dir "$CACHE" \
    --variants "$VARIANTS" --json "$OUT_DIR/b$batch.json" "$@" >>"$LOG" 2>&1
  note "batch $batch exit $?"
}

# MaxK pooling and the negative draws against their earlier forms, and the word-region
# relevance in caption chunks (4: the CPU's cache-sized choice; 32: about 38 MB of scores, inside
# an H100/H200's L2) against all at once, the GPU step's way (about 25 s; suite.log).
SEL_ARGS=(--chunks 4,32)
[ "$TINY" = 1 ] && SEL_ARGS=(--batch_size 16 --dim 64 --repeats 2 --chunks 4)
timeout --signal=KILL 60 "$PY" -m benchmarks.selection_ops "${SEL_ARGS[@]}" >>"$LOG" 2>&1
note "selection_ops exit $?"
# One BERT-base layer's forward + backward with the step's LayerNorm / GELU / dropout against
# flax's and jax's forms: bytes kept for the backward pass and time (about 15 s; suite.log).
LAYER_ARGS=()
[ "$TINY" = 1 ] && LAYER_ARGS=(--batch_size 4 --tokens 8 --hidden 64 --repeats 2)
timeout --signal=KILL 45 "$PY" -m benchmarks.bert_layer "${LAYER_ARGS[@]}" >>"$LOG" 2>&1
note "bert_layer exit $?"

run_batch 256 $(( ($(left) - EVAL_S) * SHARE256 / 100 )) --trace "$OUT_DIR/b256_jax_cached"
run_batch 128 $(( $(left) - EVAL_S ))
"$PY" -m benchmarks.suite_report "$OUT_DIR"/b256.json "$OUT_DIR"/b128.json \
  --markdown "$OUT_DIR/results.md" >>"$LOG" 2>&1
# Where the profiled JAX step's time goes (model parts, kernel categories): into suite.log.
if [ -f "$OUT_DIR/b256_jax_cached.trace.json.gz" ]; then
  "$PY" -m benchmarks.trace_report "$OUT_DIR/b256_jax_cached" >>"$LOG" 2>&1
  note "trace_report exit $?"
fi

if [ "$EVAL_S" -gt 0 ]; then
  EVAL_ARGS=()
  [ "$TINY" = 1 ] && EVAL_ARGS=(--images 500 --dim 64)
  for platform in cuda cpu; do
    [ "$(left)" -lt 20 ] && { note "evaluator on $platform skipped: $(left)s left"; continue; }
    [ "$TINY" = 1 ] && [ "$platform" = cuda ] && continue
    echo "== evaluator, JAX_PLATFORMS=$platform, $(nproc) host cores" >>"$OUT_DIR/evaluate.log"
    JAX_PLATFORMS=$platform timeout --signal=KILL $(( $(left) - 5 )) "$PY" \
      -m benchmarks.evaluate "${EVAL_ARGS[@]}" >>"$OUT_DIR/evaluate.log" 2>&1
    note "evaluator on $platform exit $?"
  done
fi
note "suite end"
cat "$OUT_DIR/results.md" 2>/dev/null
