#!/usr/bin/env bash
# A multi-host run on one machine: N `vlm-jax train` processes that talk over 127.0.0.1.
#
#   launch/local.sh 2 --config configs/clip.py:tiny --workdir runs/clip2 --config.mesh.data=2 --config.mesh.fsdp=2
#   VLM_JAX_LOCAL_DEVICE_COUNT=4 launch/local.sh 2 --config ... --workdir ...    # 8 devices in all
#
# Starts processes 0 .. N-1 with VLM_JAX_COORDINATOR_ADDRESS=127.0.0.1:<a free port>,
# VLM_JAX_NUM_PROCESSES=N and VLM_JAX_PROCESS_ID=i, on CPU (gloo collectives), each with
# VLM_JAX_LOCAL_DEVICE_COUNT fake devices (default 2). Waits for all of them; when one fails,
# the others are killed and the script exits with the failed process's status. SIGTERM / SIGINT to
# the script go to every process (they save the same step and stop, as on a preempted cluster).
# The arguments are those of `vlm-jax train`.
#
# Environment:
#   VLM_JAX_LOCAL_DEVICE_COUNT=K   fake CPU devices per process (default 2)
#   VLM_JAX_PORT=P                 the coordinator's port (default: a free one)
#   VLM_JAX_HEARTBEAT_TIMEOUT=S    seconds before a silent process stops the run (default 60)
#   PYTHON=...                     the interpreter (default: python3)
#   JAX_PLATFORMS                  default cpu (one machine's accelerators are not split here)
set -uo pipefail

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then usage; exit 2; fi
N="$1"; shift
[[ "$N" =~ ^[1-9][0-9]*$ ]] || { echo "local.sh: the number of processes must be a positive integer, got '$N'" >&2; exit 2; }

PYTHON="${PYTHON:-python3}"
PORT="${VLM_JAX_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
export VLM_JAX_LOCAL_DEVICE_COUNT="${VLM_JAX_LOCAL_DEVICE_COUNT:-2}"
export VLM_JAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT" VLM_JAX_NUM_PROCESSES="$N"

pids=()
for ((i = 0; i < N; i++)); do
  VLM_JAX_PROCESS_ID="$i" "$PYTHON" -m vlm_jax.cli train "$@" &
  pids+=("$!")
done
echo "local.sh: $N processes (${pids[*]}) on 127.0.0.1:$PORT, $VLM_JAX_LOCAL_DEVICE_COUNT devices each" >&2

forward() { kill -s "$1" "${pids[@]}" 2>/dev/null; }
trap 'forward TERM' TERM
trap 'forward INT' INT

status=0
declare -A running=()
for ((i = 0; i < N; i++)); do running[${pids[$i]}]=$i; done
while ((${#running[@]} > 0)); do
  done_pid=""
  wait -n -p done_pid "${!running[@]}"
  rc=$?
  [[ -n "${done_pid:-}" ]] || continue  # A trapped signal interrupted the wait.
  i="${running[$done_pid]}"
  unset "running[$done_pid]"
  if ((rc != 0)); then
    echo "local.sh: process $i (pid $done_pid) exited with status $rc: killing the others" >&2
    ((${#running[@]} > 0)) && kill -9 "${!running[@]}" 2>/dev/null
    wait 2>/dev/null
    status=$rc
    break
  fi
done
exit "$status"
