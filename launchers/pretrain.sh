#!/usr/bin/env bash
# Launch DeepMIM pretraining under the `deepspeed` launcher, on one node or several.
#
#   launchers/pretrain.sh [--gpus N] [--hostfile FILE] [--master-addr HOST] [--master-port PORT] \
#       -- --preset NAME --run-dir DIR [--set key=value ...]
#
# One node:       launchers/pretrain.sh --gpus 8 -- --preset deepmim_vit_b16_pixel --run-dir runs/b16
# Several nodes:  launchers/pretrain.sh --hostfile hostfile --master-addr node0 -- --preset ... --run-dir ...
#                 (hostfile lines: "<host> slots=<gpus>"; run from node0, which reaches the others by ssh)
# Without a GPU, DS_ACCELERATOR=cpu is set and --gpus counts CPU processes.
set -euo pipefail
cd "$(dirname "$0")/.."
DS=${DEEPSPEED:-.venv/bin/deepspeed}
[ -x "$DS" ] || DS=deepspeed
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

gpus="" hostfile="" addr="" port="${MASTER_PORT:-29500}"
while [ $# -gt 0 ]; do
  case "$1" in
    --gpus) gpus="$2"; shift 2 ;;
    --hostfile) hostfile="$2"; shift 2 ;;
    --master-addr) addr="$2"; shift 2 ;;
    --master-port) port="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "unknown option $1 (pass training arguments after --)" >&2; exit 2 ;;
  esac
done

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  export DS_ACCELERATOR=cpu
  gpus=${gpus:-2}
fi

args=(--master_port "$port")
[ -n "$gpus" ] && args+=(--num_gpus "$gpus")
[ -n "$hostfile" ] && args+=(--hostfile "$hostfile")
[ -n "$addr" ] && args+=(--master_addr "$addr")
exec "$DS" "${args[@]}" --module engine.pretrain "$@"
