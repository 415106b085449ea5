#!/usr/bin/env bash
# The embedded default: real photos (scikit-image, scikit-learn) -> class folders -> WebDataset
# shards (a training set and a held-out validation set of other crops) -> tiny DeepMIM ViT on 2 CPU
# ranks (deepspeed launcher, DALI CPU pipeline). Leaves runs/quickstart/ with checkpoints,
# config.json, metrics.jsonl and reconstructions.png. Running it again resumes the run, or finishes
# at once when it is complete.
#
#   bash launchers/quickstart.sh              # pretrain (make quickstart)
#   bash launchers/quickstart.sh --finetune   # then fine-tune it and report top-1 (make finetune-quickstart)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
stage=pretrain
[ "${1:-}" = "--finetune" ] && { stage=finetune; shift; }
[ -f data/demo/.done ] || { "$PY" -m data_pipeline.demo_data data/demo && touch data/demo/.done; }
[ -f data/demo_val/.done ] || { "$PY" -m data_pipeline.demo_data data/demo_val --per-class 12 --seed 1 \
  && touch data/demo_val/.done; }
"$PY" -m data_pipeline.make_shards data/demo data/demo_shards --shard-size-mb 0.25 --no-progress
"$PY" -m data_pipeline.make_shards data/demo_val data/demo_val_shards --shard-size-mb 0.25 --no-progress \
  --classes data/demo_shards/classes.json
# 2 CPU processes even where a GPU exists: the quickstart is the CPU recipe.
export CUDA_VISIBLE_DEVICES="" DS_ACCELERATOR=cpu
if [ "$stage" = pretrain ]; then
  bash launchers/pretrain.sh --gpus 2 -- --preset deepmim_tiny_pixel --run-dir runs/quickstart "$@"
  "$PY" - <<'PY'
import json
rows = [json.loads(l) for l in open("runs/quickstart/metrics.jsonl")]
if rows:
    print(f"quickstart: loss {rows[0]['loss']:.3f} at step {rows[0]['step']} -> {rows[-1]['loss']:.3f} at step {rows[-1]['step']}")
print("outputs in runs/quickstart/: checkpoints/, config.json, metrics.jsonl, reconstructions.png")
PY
else
  [ -d runs/quickstart/checkpoints ] || { echo "no runs/quickstart: run make quickstart first" >&2; exit 2; }
  bash launchers/pretrain.sh --gpus 2 -- --preset finetune_tiny --run-dir runs/quickstart_finetune "$@"
  "$PY" - <<'PY'
import json
rows = [json.loads(l) for l in open("runs/quickstart_finetune/eval.jsonl")]
print(f"fine-tuned: top-1 {rows[-1]['top1']:.1f}% on {rows[-1]['val_samples']} held-out images (best {max(r['top1'] for r in rows):.1f}%)")
print("outputs in runs/quickstart_finetune/: checkpoints/, config.json, metrics.jsonl, eval.jsonl")
PY
fi
