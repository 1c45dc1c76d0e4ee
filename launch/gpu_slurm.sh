#!/usr/bin/env bash
# A SLURM GPU job: one process per GPU (default) or per host, all running the same command.
#
#   sbatch --nodes=4 --gpus-per-node=8 launch/gpu_slurm.sh MODULE [ARGS...]
#   launch/gpu_slurm.sh --dry-run [--nodes=N] [--gpus-per-node=G] [--per-host] MODULE [ARGS...]
#
# Inside the allocation it runs `srun` with one task per GPU (each sees one GPU) or, with
# --per-host, one task per node (each sees all of its node's GPUs). Every task calls
# jax.distributed.initialize() (--distributed=on), which reads the coordinator, process
# count and process id from SLURM's environment. Performance settings (override by
# exporting them before sbatch):
#   XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true   overlap collectives with compute
#   NCCL_DEBUG=WARN                                            NCCL errors only
#   XLA_PYTHON_CLIENT_MEM_FRACTION=0.95                         most of each GPU for XLA
#SBATCH --job-name=pretrain-jax
#SBATCH --exclusive
#SBATCH --output=slurm-%j.out
set -euo pipefail
dry=0
per_host=0
nodes="${SLURM_JOB_NUM_NODES:-1}"
gpus="${SLURM_GPUS_ON_NODE:-8}"
while [[ $# -gt 0 && "$1" == --* ]]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --per-host) per_host=1 ;;
    --nodes=*) nodes="${1#*=}" ;;
    --gpus-per-node=*) gpus="${1#*=}" ;;
    *) echo "gpu_slurm.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
if [[ $# -lt 1 ]]; then
  echo "usage: launch/gpu_slurm.sh [--dry-run] [--nodes=N] [--gpus-per-node=G] [--per-host] MODULE [ARGS...]" >&2
  exit 2
fi
module="$1"; shift
export XLA_FLAGS="${XLA_FLAGS:---xla_gpu_enable_latency_hiding_scheduler=true}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
if [[ "$per_host" -eq 1 ]]; then
  tasks=1
  gpu_bind=()
else
  tasks="$gpus"
  gpu_bind=(--gpus-per-task=1)
fi
cmd=(srun --nodes="$nodes" --ntasks-per-node="$tasks" ${gpu_bind[@]+"${gpu_bind[@]}"}
     python -m "$module" "$@" --distributed=on)
if [[ "$dry" -eq 1 ]]; then
  echo "XLA_FLAGS=$XLA_FLAGS NCCL_DEBUG=$NCCL_DEBUG XLA_PYTHON_CLIENT_MEM_FRACTION=$XLA_PYTHON_CLIENT_MEM_FRACTION"
  echo "${cmd[*]}"
  exit 0
fi
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
exec "${cmd[@]}"
