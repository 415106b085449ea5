#!/usr/bin/env bash
# Launch pretraining, fine-tuning or linear probing under the `deepspeed` launcher, on one node or several.
#
#   launchers/pretrain.sh [--gpus N] [--hostfile FILE] [--master-addr HOST] [--master-port PORT] \
#       [--node-rank K --no-ssh] [--module engine.finetune] [--transient-restarts N] [--transient-wait S] \
#       -- --preset NAME --run-dir DIR [--set key=value ...]
#
# One node:       launchers/pretrain.sh --gpus 8 -- --preset deepmim_vit_b16_pixel --run-dir runs/b16
# Several nodes:  launchers/pretrain.sh --hostfile hostfile --master-addr node0 -- --preset ... --run-dir ...
#                 (hostfile lines: "<host> slots=<gpus>"; run on node0, which starts the others by ssh;
#                 the hostfile's slots decide the processes per node, --gpus is not used)
# Without ssh:    run on every node with --no-ssh --node-rank K (0 on the master) and the same hostfile;
#                 launchers/slurm.sbatch does this with srun.
# Fine-tuning:    the module follows the preset (finetune_* and linprobe_* run engine.finetune).
# Without a GPU, DS_ACCELERATOR=cpu is set and --gpus counts CPU processes (default 2).
#
# Paths are relative to the directory you run this from. The config and every path it names are
# checked before the launcher starts (a mistake is one line and exit code 2). Without --master-port
# (or MASTER_PORT) a free port is picked; a port that is taken is refused at once.
#
# Preemption: SIGTERM, SIGUSR1 or SIGINT (one Ctrl-C) sent to this script or to its process group is
# forwarded to the training processes once; they finish the current step, save a checkpoint, write
# RUN_DIR/PREEMPTED and exit 0, and so does this script, however long the save takes. DeepSpeed's
# launcher runs in a session of its own, so a terminal's Ctrl-C or a process-group SIGTERM never
# reaches it (it would SIGKILL the ranks 30 s later, cutting a long save short). A signal that comes
# while the ranks are still starting is passed on as soon as their handlers are in place. A second Ctrl-C, seconds
# later, aborts without saving.
#
# Conditions of the moment: when object storage throttles or stays unreachable (or the node's cache disk stays
# full) for longer than data.fetch_patience_s, the ranks save their last common step and exit 75 (EX_TEMPFAIL);
# this script then starts the run again after a wait, --transient-restarts times (default 3; waits of about
# --transient-wait seconds, default 60, doubling, jittered). It exits 75 if the condition outlasts them all:
# requeue the job (launchers/slurm.sbatch does).
set -uo pipefail
# Stop signals are taken from the start (before the checks): one that comes early is remembered and
# passed on as soon as the ranks can take it (see Preemption above).
pending="" sent=" " child=""
on_signal() { pending=$1; sent=" "; [ -n "$child" ] && forward; }  # a new signal goes to every rank again
trap 'on_signal TERM' TERM
trap 'on_signal USR1' USR1
trap 'on_signal INT' INT
# the launch time of this attempt, for the run's goodput account (start-up includes the checks below)
export DEEPMIM_LAUNCHED_AT="${EPOCHREALTIME:-$(date +%s.%N)}"
REPO="$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd)"
DS=${DEEPSPEED:-$REPO/.venv/bin/deepspeed}
[ -x "$DS" ] || DS=deepspeed
PY=${PYTHON:-$REPO/.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

usage() { sed -n '2,/^[^#]/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

gpus="" hostfile="" addr="" port="${MASTER_PORT:-}" node_rank="" no_ssh=0 module="" restarts=3 restart_wait=60
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --gpus) gpus="$2"; shift 2 ;;
    --hostfile) hostfile="$2"; shift 2 ;;
    --master-addr) addr="$2"; shift 2 ;;
    --master-port) port="$2"; shift 2 ;;
    --node-rank) node_rank="$2"; shift 2 ;;
    --no-ssh) no_ssh=1; shift ;;
    --module) module="$2"; shift 2 ;;
    --transient-restarts) restarts="$2"; shift 2 ;;
    --transient-wait) restart_wait="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "launchers/pretrain.sh: unknown option $1 (training arguments go after --; see --help)" >&2; exit 2 ;;
  esac
done
[ $# -gt 0 ] || { echo "launchers/pretrain.sh: no training arguments after -- (see --help)" >&2; exit 2; }

if [ -z "$module" ]; then
  module=engine.pretrain
  prev=""
  for a in "$@"; do
    if [ "$prev" = "--preset" ]; then case "$a" in finetune*|linprobe*) module=engine.finetune ;; esac; fi
    prev="$a"
  done
fi

gpu_visible() {  # an NVIDIA GPU the driver exposes to this process (read from /dev, not by importing torch: 1.5 s)
  case "${CUDA_VISIBLE_DEVICES-all}" in ""|-1) return 1 ;; esac
  [ "${DS_ACCELERATOR:-cuda}" = cuda ] && compgen -G "/dev/nvidia[0-9]*" >/dev/null
}
if ! gpu_visible; then
  export DS_ACCELERATOR=cpu
  [ -z "$hostfile" ] && gpus=${gpus:-2}
fi

# the hostfile, the world size, the config, the paths it names and the run plan for that world size,
# before any process group or port is set up (a mistake is one line, exit code 2)
plan=(--gpus "${gpus:-0}" --master-addr "$addr")
[ -n "$hostfile" ] && plan+=(--hostfile "$hostfile")
[ "$no_ssh" = 1 ] && plan+=(--no-ssh)
# (checks run in a session of their own: a signal to this script's process group is this script's to handle)
world=$(setsid --wait "$PY" -m engine.tools.launch_plan "${plan[@]}") || exit 2

check() {  # the run's own check, for this world size: 0, 2 (a mistake, printed once) or 75 (the storage
  # does not answer now); "run already complete" ends the script with 0
  local checked rc
  checked=$(setsid --wait "$PY" -m "$module" --check --world-size "$world" "$@")
  rc=$?
  [ "$rc" = 0 ] || return "$rc"
  case "$checked" in "run already complete"*) echo "$checked"; exit 0 ;; esac
}

local_master=1
case "${addr:-127.0.0.1}" in 127.0.0.1|localhost|"$(hostname)"|"$(hostname -f 2>/dev/null)") ;; *) local_master=0 ;; esac
pick_port() {
  if [ -z "$fixed_port" ]; then
    port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
  elif [ "$local_master" = 1 ] && [ "${node_rank:-0}" = 0 ]; then
    "$PY" -c 'import socket, sys; s = socket.socket(); s.bind(("", int(sys.argv[1])))' "$port" 2>/dev/null \
      || { echo "launchers/pretrain.sh: port $port is in use on this machine; pick another --master-port or leave it out" >&2; exit 2; }
  fi
}
fixed_port="$port"

descendants() {  # all processes below PID $1
  local kids
  kids=$(ps -o pid= --ppid "$1" 2>/dev/null)
  for k in $kids; do echo "$k"; descendants "$k"; done
}
ready() {  # has process $1 installed its stop handlers? (it catches SIGUSR1, which Python alone does not)
  local mask
  mask=$(awk '/^SigCgt:/ {print $2}' "/proc/$1/status" 2>/dev/null)
  [ -n "$mask" ] && (( (16#$mask >> ($(kill -l USR1) - 1)) & 1 ))
}
ranks() {  # the training processes (they carry --local_rank) that are ready for a signal; not the launchers
  local pid
  for pid in $(descendants "$child"); do
    if tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$module.*--local_rank" && ready "$pid"; then
      echo "$pid"
    fi
  done
}
forward() {  # the pending signal, once to every rank that has not had it (ranks may still be starting)
  local pid
  [ -n "$pending" ] || return 0
  for pid in $(ranks); do
    case "$sent" in *" $pid "*) ;; *) kill -s "$pending" "$pid" 2>/dev/null && sent="$sent$pid " ;; esac
  done
}
node_launcher() {  # one node without a hostfile: DeepSpeed's node launcher directly, as its runner would start
  # it (the runner's own start, about 2 s of imports, does nothing else for a single node)
  local info
  info=$("$PY" -c 'import base64, json, os, sys
n, v = int(sys.argv[1]), os.environ.get("CUDA_VISIBLE_DEVICES", "")
ids = [d.strip() for d in v.split(",") if d.strip()] if v and os.environ.get("DS_ACCELERATOR") != "cpu" else []
ids = ids or [str(i) for i in range(n)]
print(base64.urlsafe_b64encode(json.dumps({"localhost": [int(i) if i.isdigit() else i for i in ids[:n]]}).encode()).decode())' "$world")
  setsid "$PY" -u -m deepspeed.launcher.launch --world_info="$info" --master_addr=127.0.0.1 --master_port="$port" \
    --log_level="${DS_LOG_LEVEL:-warning}" --module "$module" "$@" &
}
launch() {  # one start of DeepSpeed's launcher; returns its exit code
  pick_port
  if [ -z "$hostfile" ] && [ -z "$node_rank" ] && [ "$no_ssh" = 0 ] && [ "${addr:-127.0.0.1}" = 127.0.0.1 ]; then
    node_launcher "$@"
    child=$!
    wait_for_child
    return $?
  fi
  # DeepSpeed's launcher at warning level: its per-process INFO lines say nothing a run's own log does not
  args=(--master_port "$port" --log_level "${DS_LOG_LEVEL:-warning}")
  if [ -n "$hostfile" ]; then
    args+=(--hostfile "$hostfile")  # the hostfile's slots decide the processes per node
  elif [ -n "$gpus" ]; then
    args+=(--num_gpus "$gpus")
  fi
  [ -n "$addr" ] && args+=(--master_addr "$addr")
  [ -n "$node_rank" ] && args+=(--node_rank "$node_rank")
  [ "$no_ssh" = 1 ] && args+=(--no_ssh)
  # setsid: DeepSpeed's runner and launcher get a session of their own (see Preemption above)
  setsid "$DS" "${args[@]}" --module "$module" "$@" &
  child=$!
  wait_for_child
}
wait_for_child() {  # until the launcher exits, passing stop signals on; returns its exit code
  while kill -0 "$child" 2>/dev/null; do
    forward
    sleep 1 &
    wait $! 2>/dev/null  # returns at once when a trapped signal arrives
  done
  wait "$child"
}

check "$@"
rc=$?
attempt=0
while :; do
  if [ "$rc" = 0 ]; then
    launch "$@"
    rc=$?
    child="" sent=" "
  fi
  # 75: the storage (or the cache disk) was unavailable for longer than the run's patience; a run that was
  # training saved its ranks' last common step first. Try again later, unless a stop signal came meanwhile.
  if [ "$rc" != 75 ] || [ "$attempt" -ge "$restarts" ] || [ -n "$pending" ]; then
    exit "$rc"
  fi
  attempt=$((attempt + 1))
  pause=$("$PY" -c 'import random, sys; w = float(sys.argv[1]) * 2 ** (int(sys.argv[2]) - 1); print(f"{min(w, 3600) * random.uniform(0.5, 1.5):.1f}")' "$restart_wait" "$attempt")
  echo "launchers/pretrain.sh: exit 75 (storage unavailable for longer than data.fetch_patience_s); starting again in ${pause} s (restart $attempt of $restarts)" >&2
  sleep "$pause" &
  wait $! 2>/dev/null
  [ -n "$pending" ] && exit 75  # a stop signal while waiting: the saved run stays as it is
  export DEEPMIM_LAUNCHED_AT="${EPOCHREALTIME:-$(date +%s.%N)}"  # the wait was between attempts
  check "$@"
  rc=$?
done
