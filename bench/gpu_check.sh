#!/usr/bin/env bash
# Every GPU measurement of the project, in one prepared run of about 5-7 minutes on a lent
# H100/H200. Writes JSON to $OUT when set (the device tool's output folder), else bench/results/.
#
#   bash bench/gpu_check.sh            # on the GPU machine; carries .whl (../shared/device/make-wheels.sh)
#   bash bench/gpu_check.sh --dry-run  # CPU: the same harness on the tiny model, small sizes (CI)
#
# Steps: (1) install the carried wheels (DeepSpeed, webdataset; no DALI: its wheel cannot travel);
# (2) model step (bench.model_step) for ViT-B/16 and ViT-L/16, DeepMIM-CLIP and DeepMIM-pixel,
# fused vs reference, compiled or eager, at the largest micro-batch that fits, plus the same step
# through DeepSpeed ZeRO-2 (framework overhead); (3) GPU JPEG decoding on shards made from the
# bundled photos; (4) the real trainer end to end for a short run with host-sync counting.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
RES=${OUT:-bench/results}
mkdir -p "$RES"
export PYTHONUNBUFFERED=1
if [ -x .venv/bin/python ] && [ $DRY = 1 ]; then PY=.venv/bin/python; else PY=${PYTHON:-python3}; fi
if [ $DRY = 0 ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || { echo "wheel install failed" >&2; exit 1; }
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
start=$(date +%s)
stage() { echo "=== $(( $(date +%s) - start ))s: $*"; }

if [ $DRY = 1 ]; then
  export DS_ACCELERATOR=cpu
  stage "model step (dry run)"
  $PY -m bench.model_step --arch deepmim_vit_test_patch4 --targets clip,pixel --batches 8 \
    --configs fused-compile,fused,reference --deepspeed fused --compile-backend aot_eager \
    --warmup 1 --iters 2 --json "$RES/model_step_dryrun.json" || exit 1
  stage "decode (dry run)"
  $PY -m bench.gpu_decode --per-class 4 --rounds 1 --limit 32 --json "$RES/gpu_decode_dryrun.json" || exit 1
  stage "done"
  exit 0
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
stage "model step ViT-B/16"
timeout 260 $PY -m bench.model_step --arch deepmim_vit_base_patch16 --targets clip,pixel --batches 256,192,128 \
  --configs fused-compile,fused,reference --deepspeed fused-compile --time-budget 190 \
  --json "$RES/model_step_vit_b16.json"
stage "model step ViT-L/16"
timeout 170 $PY -m bench.model_step --arch deepmim_vit_large_patch16 --targets clip,pixel --batches 256,192,128 \
  --configs fused-compile,reference --time-budget 100 --json "$RES/model_step_vit_l16.json"
stage "GPU JPEG decode"
timeout 60 $PY -m bench.gpu_decode --per-class 64 --rounds 4 --json "$RES/gpu_decode.json"
stage "trainer end to end (fallback loader, sync counting)"
$PY -m data_pipeline.demo_data /tmp/e2e_src --per-class 64 --size 256 >/dev/null 2>&1
timeout 30 $PY -m data_pipeline.make_shards /tmp/e2e_src /tmp/e2e_shards --shard-size-mb 8 --workers 8 --no-progress >/dev/null 2>&1
timeout 100 $PY -m engine.pretrain --preset deepmim_vit_b16_pixel --run-dir /tmp/e2e_run \
  --set data.shards=/tmp/e2e_shards --set data.loader=torch --set data.num_threads=12 \
  --set data.global_batch=128 --set data.micro_batch=128 --set schedule.max_steps=24 --set log.interval=8 \
  --set checkpoint.interval=1000 --set log.reconstructions=false --set log.sync_debug=true \
  > "$RES/e2e_log.txt" 2>&1
cp /tmp/e2e_run/metrics.jsonl "$RES/e2e_metrics.jsonl" 2>/dev/null
tail -5 "$RES/e2e_log.txt"
stage "done"
$PY -m bench.report "$RES"/*.json | tail -60
