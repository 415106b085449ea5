#!/usr/bin/env bash
# Every GPU measurement of the project in one prepared run: about 7.5 minutes on a lent H100/H200
# after the install. Writes JSON (each with the device name) and a log to $OUT when set (the device
# tool's output folder), else to bench/results/.
#
#   bash bench/gpu_check.sh            # on the GPU machine (see "Running it" in bench/results/README.md)
#   bash bench/gpu_check.sh --dry-run  # CPU: the same stages on the test-size model (the tests run this)
#
# Stages (each under a timeout; a stage that fails leaves the others' results):
#  1. model step, ViT-B/16 DeepMIM-CLIP and -pixel at micro-batch 256: the research-style compiled loop,
#     the fused pass, the copy-free q/k/v layout, decoder attention kernels (cuDNN, efficient), CUDA
#     graphs, FP8 encoder linears; then the best path through DeepSpeed ZeRO-2 with the knobs that
#     matter (overlap_comm, bucket sizes, contiguous gradients) -> model_step_b16.json
#  2. model step, ViT-L/16 DeepMIM-CLIP and -pixel, the main paths -> model_step_l16.json
#  3. DALI alone on ImageNet-like JPEGs (500 x 375, ~110 KB, made here from the bundled photos):
#     mixed decode + random-resized crop + resize + normalize, hardware decoder share 0.65 and 0,
#     against the PIL fallback -> data_gpu.json
#  4. the trainer end to end with DALI (ViT-B/16 pixel): data-wait share, img/s, MFU, its goodput account, and the same run
#     with FP8 encoder linears, loss curves compared step by step over 200 steps -> e2e_dali.json
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
RES=${OUT:-bench/results}
mkdir -p "$RES"
LOG="$RES/gpu_check_log.txt"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -x .venv/bin/python ] && [ $DRY = 1 ]; then PY=.venv/bin/python; else PY=${PYTHON:-python3}; fi
if [ $DRY = 0 ] && ls .whl/*.whl >/dev/null 2>&1 && ! $PY -c 'import deepspeed' 2>/dev/null; then
  # without the DALI parts (../shared/device/dali-parts.sh), at least DeepSpeed and webdataset
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PYTHONPATH || { echo "wheel install failed" >&2; exit 1; }
fi
start=$(date +%s)
stage() { echo "=== $(( $(date +%s) - start ))s: $*" | tee -a "$LOG"; }
run() { local t=$1; shift; timeout "$t" "$@" 2>&1 | tee -a "$LOG" | grep -E "status|ratio|img/s|variant|Error" | cut -c1-240; }

if [ $DRY = 1 ]; then
  export DS_ACCELERATOR=cpu
  stage "model step (dry run)"
  run 240 $PY -m bench.model_step --arch deepmim_vit_test_patch4 --targets clip --batches 8 \
    --configs reference,fused-split,fused-split-mathattn-fp8 --deepspeed fused-split \
    --warmup 1 --iters 2 --json "$RES/model_step_dryrun.json" || exit 1
  run 120 $PY -m bench.model_step --arch deepmim_vit_test_patch4 --targets clip --batches 8 --configs fused-split \
    --deepspeed fused-split --ds-set zero_optimization.overlap_comm=false --label no-overlap --warmup 1 --iters 2 \
    --append --json "$RES/model_step_dryrun.json" || exit 1
  stage "data pipeline (dry run)"
  run 120 $PY -m bench.data_pipeline --per-class 2 --batch 4 --batches 2 --threads 1 --imagenet-like \
    --json "$RES/data_dryrun.json" || exit 1
  stage "done"
  exit 0
fi

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; $PY -c 'import torch, deepspeed; print("torch", torch.__version__, "deepspeed", deepspeed.__version__)'; $PY -c 'import nvidia.dali as d; print("dali", d.__version__)' || echo "DALI missing: stages 3-4 use what is there"; } 2>&1 | tee -a "$LOG"

stage "1. model step ViT-B/16"
B=(--arch deepmim_vit_base_patch16 --batches 256,192,128 --json "$RES/model_step_b16.json")
run 150 $PY -m bench.model_step "${B[@]}" --targets clip,pixel --time-budget 120 \
  --configs reference-compile,fused-compile,fused-split-compile,reference-split-compile
run 100 $PY -m bench.model_step "${B[@]}" --targets clip --time-budget 80 --append \
  --configs fused-split-cudnn-compile,fused-split-efficient-compile,fused-split-compile-graphs,fused-split-compile-fp8
for variant in "default:" "no-overlap:zero_optimization.overlap_comm=false" \
    "buckets-5e8:zero_optimization.reduce_bucket_size=5e8" "no-contiguous:zero_optimization.contiguous_gradients=false"; do
  label=${variant%%:*} knob=${variant#*:}
  run 45 $PY -m bench.model_step "${B[@]}" --targets clip --configs fused-split-compile --deepspeed fused-split-compile \
    --label "$label" ${knob:+--ds-set "$knob"} --append --time-budget 40
done

stage "2. model step ViT-L/16"
run 80 $PY -m bench.model_step --arch deepmim_vit_large_patch16 --targets clip,pixel --batches 256,192,128 \
  --configs fused-split-compile,reference-compile --time-budget 60 --json "$RES/model_step_l16.json"

stage "3. DALI decode on ImageNet-like JPEGs"
run 60 $PY -m bench.data_pipeline --imagenet-like --per-class 64 --batch 256 --batches 8 --threads 8 \
  --decode gpu --hw-decoder-loads 0.65,0 --json "$RES/data_gpu.json"

stage "4. trainer end to end with DALI; FP8 against bf16"
run 150 $PY -m bench.end_to_end --preset deepmim_vit_b16_pixel --shards /tmp/e2e_shards --imagenet-like --nprocs 1 --steps 200 \
  --log-interval 10 --set data.loader=dali --set data.global_batch=128 --set data.micro_batch=128 \
  --set data.num_threads=8 --set engine.compile=false --variant engine.fp8=true --json "$RES/e2e_dali.json"
stage "done"
$PY -m bench.report "$RES"/*.json | tee -a "$LOG" | tail -60
