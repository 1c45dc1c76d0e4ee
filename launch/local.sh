#!/usr/bin/env bash
# One host: one process driving all its accelerators (or CPU devices), or N processes
# joined into one JAX job, as on a pod or cluster (the local simulation of multi-host).
#
#   launch/local.sh [--dry-run] [--fake-devices=M] [--processes=N] [--hosts=H] [--port=P]
#                   MODULE [ARGS...]
#   launch/local.sh aimjax.train --config=configs/aim/pretrain.py:variant=tiny --workdir=workdir/aim_tiny
#   launch/local.sh --processes=2 --fake-devices=4 aimjax.train \
#       --config=configs/aim/pretrain.py:variant=tiny --workdir=workdir/aim_2proc --config.mesh.fsdp=8
#
# --fake-devices=M  split the CPU into M XLA devices (per process).
# --processes=N     start N processes on this machine, joined by jax.distributed on
#                   localhost:P (CPU collectives). Each gets JAX_COORDINATOR_ADDRESS,
#                   JAX_NUM_PROCESSES and JAX_PROCESS_ID, the variables any launcher can set.
#                   Each logs to WORKDIR/logs/process_K.log and to this terminal with a
#                   [pK] prefix. If one process fails, the others are stopped (SIGTERM,
#                   then SIGKILL after 10 s) and this script exits with its status.
# --hosts=H         with --processes: pretend the N processes run on H hosts (N/H each;
#                   PRETRAIN_JAX_HOST), so mesh.dcn_* degrees across hosts can be tried.
# --port=P          coordinator port (default: a free one).
# --dry-run         print the command(s) instead of running them.
set -euo pipefail
usage="usage: launch/local.sh [--dry-run] [--fake-devices=M] [--processes=N] [--hosts=H] [--port=P] MODULE [ARGS...]"
dry=0
fake=0
procs=1
hosts=0
port=""
while [[ $# -gt 0 && "$1" == -* ]]; do   # options, then MODULE
  case "$1" in
    --dry-run) dry=1 ;;
    --fake-devices=*) fake="${1#*=}" ;;
    --processes=*) procs="${1#*=}" ;;
    --hosts=*) hosts="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "local.sh: unknown option $1" >&2; echo "$usage" >&2; exit 2 ;;
  esac
  shift
done
if [[ $# -lt 1 ]]; then
  echo "$usage" >&2
  exit 2
fi
for v in "$fake" "$procs" "$hosts"; do
  if ! [[ "$v" =~ ^[0-9]+$ ]]; then echo "local.sh: counts must be integers, got '$v'" >&2; exit 2; fi
done
if [[ "$procs" -lt 1 ]]; then echo "local.sh: --processes must be at least 1" >&2; exit 2; fi
if [[ "$hosts" -gt 0 && ( "$procs" -lt 2 || $((procs % hosts)) -ne 0 ) ]]; then
  echo "local.sh: --hosts=$hosts must divide --processes=$procs (and needs --processes > 1)" >&2
  exit 2
fi
module="$1"; shift
env_prefix=()
if [[ "$fake" -gt 0 ]]; then
  env_prefix=(env "XLA_FLAGS=--xla_force_host_platform_device_count=$fake" JAX_PLATFORMS=cpu)
fi

if [[ "$procs" -eq 1 ]]; then
  cmd=(python -m "$module" "$@" --distributed=off)
  if [[ "$dry" -eq 1 ]]; then
    printf '%s\n' "${env_prefix[*]+${env_prefix[*]} }${cmd[*]}"
    exit 0
  fi
  cd "$(dirname "$0")/.."
  exec ${env_prefix[@]+"${env_prefix[@]}"} "${cmd[@]}"
fi

# ---- several processes ----
workdir="."
prev=""
for a in "$@"; do   # --workdir=DIR or --workdir DIR, for the logs
  case "$a" in --workdir=*) workdir="${a#*=}" ;; esac
  if [[ "$prev" == --workdir ]]; then workdir="$a"; fi
  prev="$a"
done
if [[ "$dry" -eq 0 && -z "$port" ]]; then
  port="$(python -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')"
fi
job_env() {   # the environment of process $1
  local k="$1" e=(env "JAX_COORDINATOR_ADDRESS=localhost:${port:-PORT}" "JAX_NUM_PROCESSES=$procs" "JAX_PROCESS_ID=$k")
  if [[ "$fake" -gt 0 ]]; then e+=("XLA_FLAGS=--xla_force_host_platform_device_count=$fake" JAX_PLATFORMS=cpu); fi
  if [[ "$hosts" -gt 0 ]]; then e+=("PRETRAIN_JAX_HOST=host$((k / (procs / hosts)))"); fi
  printf '%s\n' "${e[@]}"
}
cmd=(python -m "$module" "$@" --distributed=on)
if [[ "$dry" -eq 1 ]]; then
  for ((k = 0; k < procs; k++)); do
    mapfile -t e < <(job_env "$k")
    echo "${e[*]} ${cmd[*]} > $workdir/logs/process_$k.log"
  done
  exit 0
fi
cd "$(dirname "$0")/.."
mkdir -p "$workdir/logs"
pids=()
for ((k = 0; k < procs; k++)); do
  mapfile -t e < <(job_env "$k")
  log="$workdir/logs/process_$k.log"
  "${e[@]}" "${cmd[@]}" > >(tee -a "$log" | sed -u "s/^/[p$k] /") 2>&1 < /dev/null &
  pids+=("$!")
done

stop_all() {   # SIGTERM, then SIGKILL whatever is left after 10 s
  local p t
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for ((t = 0; t < 20; t++)); do
    local alive=0
    for p in "${pids[@]}"; do if kill -0 "$p" 2>/dev/null; then alive=1; fi; done
    if [[ "$alive" -eq 0 ]]; then return; fi
    sleep 0.5
  done
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
}
trap 'echo "local.sh: interrupted, stopping all processes" >&2; stop_all; exit 130' INT TERM

running=("${!pids[@]}")
status=0
while [[ "${#running[@]}" -gt 0 ]]; do
  still=()
  for k in "${running[@]}"; do
    if kill -0 "${pids[$k]}" 2>/dev/null; then still+=("$k"); continue; fi
    rc=0; wait "${pids[$k]}" || rc=$?
    if [[ "$rc" -ne 0 ]]; then
      echo "local.sh: process $k exited with status $rc; stopping the others (logs in $workdir/logs)" >&2
      stop_all
      wait 2>/dev/null || true
      exit "$rc"
    fi
  done
  running=(${still[@]+"${still[@]}"})
  if [[ "${#running[@]}" -gt 0 ]]; then sleep 0.5; fi
done
wait 2>/dev/null || true   # the log pipes
exit "$status"
