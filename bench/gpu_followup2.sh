#!/usr/bin/env bash
# Third, shortest GPU run: the decoder GEMM layout (one batched GEMM vs a loop of GEMMs with a
# fused bias, inside the otherwise batched decoder pass) against the compiled reference path,
# and the trainer end to end after the guard fix (bf16 gradients), counting host syncs.
set -uo pipefail
cd "$(dirname "$0")/.."
RES=${OUT:-bench/results}
mkdir -p "$RES"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
timeout 110 $PY -m bench.model_step --arch deepmim_vit_base_patch16 --targets clip --batches 256 \
  --configs fused-loop-compile,fused-compile,reference-compile --time-budget 80 \
  --json "$RES/model_step_vit_b16_run3.json"
$PY -m data_pipeline.demo_data /tmp/e2e_src --per-class 64 --size 256 >/dev/null 2>&1
timeout 30 $PY -m data_pipeline.make_shards /tmp/e2e_src /tmp/e2e_shards --shard-size-mb 8 --workers 8 --no-progress >/dev/null 2>&1
timeout 60 $PY -m engine.pretrain --preset deepmim_vit_b16_pixel --run-dir /tmp/e2e_run \
  --set data.shards=/tmp/e2e_shards --set data.loader=torch --set data.num_threads=12 \
  --set data.global_batch=128 --set data.micro_batch=128 --set schedule.max_steps=16 --set log.interval=8 \
  --set checkpoint.interval=1000 --set log.reconstructions=false --set log.sync_debug=true > "$RES/e2e_log_run3.txt" 2>&1
cp /tmp/e2e_run/metrics.jsonl "$RES/e2e_vit_b16_metrics_run3.jsonl" 2>/dev/null
grep -E "step [0-9]+/|Error" "$RES/e2e_log_run3.txt" | tail -3
tail -1 "$RES/e2e_vit_b16_metrics_run3.jsonl" | cut -c1-900
$PY -m bench.report "$RES"/model_step_vit_b16_run3.json
