#!/usr/bin/env bash
# The embedded default: real photos (scikit-image, scikit-learn) -> class folders -> WebDataset
# shards -> tiny DeepMIM ViT on 2 CPU ranks (deepspeed launcher, DALI CPU pipeline).
# Leaves runs/quickstart/ with checkpoints, config.json, metrics.jsonl and reconstructions.png.
# Running it again resumes the run, or finishes at once when it is complete.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -f data/demo/.done ] || { "$PY" -m data_pipeline.demo_data data/demo && touch data/demo/.done; }
"$PY" -m data_pipeline.make_shards data/demo data/demo_shards --shard-size-mb 0.25 --no-progress
# 2 CPU processes even where a GPU exists: the quickstart is the CPU recipe.
CUDA_VISIBLE_DEVICES="" DS_ACCELERATOR=cpu MASTER_PORT=${MASTER_PORT:-29511} \
  bash launchers/pretrain.sh --gpus 2 -- --preset deepmim_tiny_pixel --run-dir runs/quickstart "$@"
"$PY" - <<'PY'
import json
rows = [json.loads(l) for l in open("runs/quickstart/metrics.jsonl")]
if rows:
    print(f"quickstart: loss {rows[0]['loss']:.3f} at step {rows[0]['step']} -> {rows[-1]['loss']:.3f} at step {rows[-1]['step']}")
print("outputs in runs/quickstart/: checkpoints/, config.json, metrics.jsonl, reconstructions.png")
PY
