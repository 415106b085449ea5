#!/usr/bin/env bash
# Second, shorter GPU run after the first gpu_check.sh: measures the changes made from its
# findings (DeepSpeed overflow check and grad norm replaced by engine.guard; compiled reference
# path for a like-for-like fused comparison), profiles one step, and recounts host syncs.
set -uo pipefail
cd "$(dirname "$0")/.."
RES=${OUT:-bench/results}
mkdir -p "$RES"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
timeout 200 $PY -m bench.model_step --arch deepmim_vit_base_patch16 --targets clip,pixel --batches 256 \
  --configs fused-compile,reference-compile --deepspeed fused-compile --time-budget 140 \
  --json "$RES/model_step_vit_b16_run2.json"
timeout 90 $PY -m bench.profile_step --arch deepmim_vit_base_patch16 --target clip --config fused-compile \
  --batch 256 --json "$RES/profile_vit_b16_clip_run2.json"
$PY -m data_pipeline.demo_data /tmp/e2e_src --per-class 64 --size 256 >/dev/null 2>&1
timeout 30 $PY -m data_pipeline.make_shards /tmp/e2e_src /tmp/e2e_shards --shard-size-mb 8 --workers 8 --no-progress >/dev/null 2>&1
timeout 75 $PY -m engine.pretrain --preset deepmim_vit_b16_pixel --run-dir /tmp/e2e_run \
  --set data.shards=/tmp/e2e_shards --set data.loader=torch --set data.num_threads=12 \
  --set data.global_batch=128 --set data.micro_batch=128 --set schedule.max_steps=16 --set log.interval=8 \
  --set checkpoint.interval=1000 --set log.reconstructions=false --set log.sync_debug=true > "$RES/e2e_log_run2.txt" 2>&1
cp /tmp/e2e_run/metrics.jsonl "$RES/e2e_vit_b16_metrics_run2.jsonl" 2>/dev/null
grep -E "step [0-9]+/" "$RES/e2e_log_run2.txt" | tail -2
$PY -m bench.report "$RES"/model_step_vit_b16_run2.json
