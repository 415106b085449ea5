#!/usr/bin/env bash
# Launch DeepMIM pretraining under the `deepspeed` launcher, on one node or several.
#
#   launchers/pretrain.sh [--gpus N] [--hostfile FILE] [--master-addr HOST] [--master-port PORT] \
#       [--node-rank K --no-ssh] -- --preset NAME --run-dir DIR [--set key=value ...]
#
# One node:       launchers/pretrain.sh --gpus 8 -- --preset deepmim_vit_b16_pixel --run-dir runs/b16
# Several nodes:  launchers/pretrain.sh --hostfile hostfile --master-addr node0 -- --preset ... --run-dir ...
#                 (hostfile lines: "<host> slots=<gpus>"; run on node0, which starts the others by ssh)
# Without ssh:    run on every node with --no-ssh --node-rank K (0 on the master) and the same hostfile;
#                 launchers/slurm.sbatch does this with srun.
# Without a GPU, DS_ACCELERATOR=cpu is set and --gpus counts CPU processes.
#
# Preemption: SIGTERM or SIGUSR1 sent to this script is forwarded to the training processes
# only (not to DeepSpeed's launcher, which would kill them); they finish the current step, save a
# checkpoint, write RUN_DIR/PREEMPTED and exit 0, and so does this script.
set -uo pipefail
cd "$(dirname "$0")/.."
DS=${DEEPSPEED:-.venv/bin/deepspeed}
[ -x "$DS" ] || DS=deepspeed
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

gpus="" hostfile="" addr="" port="${MASTER_PORT:-29500}" node_rank="" no_ssh=0
while [ $# -gt 0 ]; do
  case "$1" in
    --gpus) gpus="$2"; shift 2 ;;
    --hostfile) hostfile="$2"; shift 2 ;;
    --master-addr) addr="$2"; shift 2 ;;
    --master-port) port="$2"; shift 2 ;;
    --node-rank) node_rank="$2"; shift 2 ;;
    --no-ssh) no_ssh=1; shift ;;
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
[ -n "$node_rank" ] && args+=(--node_rank "$node_rank")
[ "$no_ssh" = 1 ] && args+=(--no_ssh)

descendants() {  # all processes below PID $1
  local kids
  kids=$(ps -o pid= --ppid "$1" 2>/dev/null)
  for k in $kids; do echo "$k"; descendants "$k"; done
}
forward() {  # send signal $1 to the training processes (they carry --local_rank), not the launchers
  local sig=$1 pid
  for pid in $(descendants "$child"); do
    if tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q -- "engine.pretrain.*--local_rank"; then
      kill -s "$sig" "$pid" 2>/dev/null
    fi
  done
}

"$DS" "${args[@]}" --module engine.pretrain "$@" &
child=$!
trap 'forward TERM' TERM
trap 'forward USR1' USR1
trap 'forward INT' INT
status=0
while true; do
  wait "$child"; status=$?
  # wait returns early (status > 128) when a trapped signal arrives; keep waiting for the launcher
  if kill -0 "$child" 2>/dev/null; then continue; fi
  break
done
exit "$status"
