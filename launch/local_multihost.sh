#!/usr/bin/env bash
# A pod rehearsal on this machine: N `crosswrite train` processes on the CPU, joined by jax.distributed (gloo),
# exactly the code path of a multi-host TPU pod or GPU cluster (each process reads its own share of every batch,
# Orbax coordinates the checkpoint writes).
#   launch/local_multihost.sh N CONFIG WORKDIR [--config.KEY=VALUE ...]
# Process 0 logs to this terminal; process K>0 to WORKDIR/logs/process_K.log.
# Environment: DEVICES_PER_PROCESS (CPU devices each process simulates, default 1), PORT (coordinator port,
# default: a free one), CROSSWRITE (the command, default: crosswrite on PATH, else python -m crosswrite_jax.cli).
# If any process fails, the others are stopped; the exit status is the first failure's (0 when all succeed).
set -uo pipefail

usage() { echo "usage: launch/local_multihost.sh N CONFIG WORKDIR [--config.KEY=VALUE ...]" >&2; exit 2; }
[ $# -ge 3 ] || usage
num=$1 config=$2 workdir=$3
shift 3
[[ $num =~ ^[1-9][0-9]*$ ]] || { echo "local_multihost.sh: N must be a positive whole number, got '$num'" >&2; exit 2; }
[ -f "$config" ] || { echo "local_multihost.sh: config file '$config' not found" >&2; exit 2; }
devices=${DEVICES_PER_PROCESS:-1}
[[ $devices =~ ^[1-9][0-9]*$ ]] || { echo "local_multihost.sh: DEVICES_PER_PROCESS must be a positive whole number" >&2; exit 2; }

if [ -n "${CROSSWRITE:-}" ]; then read -r -a command <<<"$CROSSWRITE"
elif command -v crosswrite >/dev/null; then command=(crosswrite)
else command=(python -m crosswrite_jax.cli); fi
port=${PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

mkdir -p "$workdir/logs"
export JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices"
export CROSSWRITE_COORDINATOR=127.0.0.1:$port CROSSWRITE_NUM_PROCESSES=$num

declare -A running=()  # pid -> process index
stop_all() { for pid in "${!running[@]}"; do kill "$pid" 2>/dev/null; done; }
trap 'stop_all; exit 130' INT TERM
for ((k = num - 1; k >= 0; k--)); do
  if [ "$k" -eq 0 ]; then
    CROSSWRITE_PROCESS_ID=0 "${command[@]}" train --config "$config" --workdir "$workdir" "$@" &
  else
    CROSSWRITE_PROCESS_ID=$k "${command[@]}" train --config "$config" --workdir "$workdir" "$@" \
      >"$workdir/logs/process_$k.log" 2>&1 &
  fi
  running[$!]=$k
done

status=0
while [ "${#running[@]}" -gt 0 ]; do
  wait -n -p finished "${!running[@]}"
  code=$?
  who=${running[$finished]}
  unset "running[$finished]"
  if [ "$code" -ne 0 ] && [ "$status" -eq 0 ]; then
    status=$code
    echo "local_multihost.sh: process $who exited with status $code; stopping the others (logs: $workdir/logs/)" >&2
    stop_all
  fi
done
exit "$status"
