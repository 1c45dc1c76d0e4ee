#!/usr/bin/env bash
# One host, all its accelerators (or CPU devices): one process.
#
#   launch/local.sh [--dry-run] [--fake-devices=N] MODULE [ARGS...]
#   launch/local.sh aimjax.train --config=configs/aim/pretrain.py:variant=tiny --workdir=workdir/aim_tiny
#
# --fake-devices=N splits the CPU into N XLA devices (to try a sharded mesh on a laptop).
# --dry-run prints the command instead of running it.
set -euo pipefail
dry=0
fake=0
while [[ $# -gt 0 && "$1" == --* ]]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --fake-devices=*) fake="${1#*=}" ;;
    *) echo "local.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
if [[ $# -lt 1 ]]; then
  echo "usage: launch/local.sh [--dry-run] [--fake-devices=N] MODULE [ARGS...]" >&2
  exit 2
fi
module="$1"; shift
cmd=(python -m "$module" "$@" --distributed=off)
env_prefix=()
if [[ "$fake" -gt 0 ]]; then
  env_prefix=(env "XLA_FLAGS=--xla_force_host_platform_device_count=$fake" JAX_PLATFORMS=cpu)
fi
if [[ "$dry" -eq 1 ]]; then
  printf '%s\n' "${env_prefix[*]+${env_prefix[*]} }${cmd[*]}"
  exit 0
fi
cd "$(dirname "$0")/.."
exec ${env_prefix[@]+"${env_prefix[@]}"} "${cmd[@]}"
