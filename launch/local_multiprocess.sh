#!/usr/bin/env bash
# Run N maejax processes on this machine: JAX's multi-controller runtime with
# real collectives (gloo) over localhost, one or more CPU devices each.
#
#   launch/local_multiprocess.sh 2 --config=configs/mae_fmnist.py --workdir=workdirs/mp
#
# Environment: PYTHON (default: .venv/bin/python if present, else python3),
# MAEJAX_PORT (default: a free port), DEVICES_PER_PROCESS (default 1).
# Exits non-zero if any process fails (the others are then stopped); SIGTERM
# and SIGINT are forwarded to every process, which save a checkpoint and exit.
set -uo pipefail

if [[ $# -lt 2 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NUM_PROCESSES --config=CONFIG [maejax.main flags...]" >&2
  exit 2
fi
num=$1
shift
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$([[ -x $root/.venv/bin/python ]] && echo "$root/.venv/bin/python" || echo python3)}
port=${MAEJAX_PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
per_process=${DEVICES_PER_PROCESS:-1}

pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
}
trap 'stop_all' TERM INT

for ((i = 0; i < num; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$per_process ${XLA_FLAGS:-}" \
    "$python" -m maejax.main "$@" \
    --coordinator_address="127.0.0.1:$port" --num_processes="$num" --process_id="$i" &
  pids+=("$!")
done

status=0
remaining=$num
while ((remaining > 0)); do
  wait -n -p finished "${pids[@]}"
  code=$?
  if [[ -z ${finished:-} ]]; then
    continue # interrupted by a forwarded signal: keep waiting
  fi
  remaining=$((remaining - 1))
  if ((code != 0 && status == 0)); then
    status=$code
    echo "local_multiprocess: process with pid $finished failed (exit $code); stopping the others" >&2
    stop_all
  fi
  unset finished
done
exit "$status"
