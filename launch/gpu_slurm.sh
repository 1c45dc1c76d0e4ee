#!/usr/bin/env bash
# A SLURM GPU job: one process per GPU (default) or per host, all running the same command.
#
#   sbatch --nodes=4 --gpus-per-node=8 launch/gpu_slurm.sh MODULE [ARGS...]
#   launch/gpu_slurm.sh --dry-run [--nodes=N] [--gpus-per-node=G] [--per-host] MODULE [ARGS...]
#
# Inside the allocation it runs `srun` with one task per GPU (each sees one GPU) or, with
# --per-host, one task per node (each sees all of its node's GPUs). Every task calls
# jax.distributed.initialize() (--distributed=on), which reads the coordinator, process
# count and process id from SLURM's environment. JAX would give each task the GPU
# ordinal SLURM_LOCALID, which is wrong both ways (a task bound to one GPU sees it as
# ordinal 0; a per-host task must drive all G), so JAX_LOCAL_DEVICE_IDS is set: 0 per GPU,
# 0,...,G-1 per host. If one task fails, srun ends the others (--kill-on-bad-exit=1).
# mesh.dcn_* degrees count nodes, whichever mode. Performance settings (override by
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
while [[ $# -gt 0 && "$1" == -* ]]; do   # options, then MODULE
  case "$1" in
    --dry-run) dry=1 ;;
    --per-host) per_host=1 ;;
    --nodes=*) nodes="${1#*=}" ;;
    --gpus-per-node=*) gpus="${1#*=}" ;;
    -h|--help) sed -n '2,/^#SBATCH/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
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
if ! [[ "$gpus" =~ ^[1-9][0-9]*$ && "$nodes" =~ ^[1-9][0-9]*$ ]]; then
  echo "gpu_slurm.sh: --nodes and --gpus-per-node must be positive integers" >&2
  exit 2
fi
if [[ "$per_host" -eq 1 ]]; then
  tasks=1
  gpu_bind=()
  JAX_LOCAL_DEVICE_IDS="$(seq -s, 0 $((gpus - 1)))"
else
  tasks="$gpus"
  gpu_bind=(--gpus-per-task=1)
  JAX_LOCAL_DEVICE_IDS=0
fi
export JAX_LOCAL_DEVICE_IDS
cmd=(srun --nodes="$nodes" --ntasks-per-node="$tasks" ${gpu_bind[@]+"${gpu_bind[@]}"} --kill-on-bad-exit=1
     python -m "$module" "$@" --distributed=on)
if [[ "$dry" -eq 1 ]]; then
  echo "XLA_FLAGS=$XLA_FLAGS NCCL_DEBUG=$NCCL_DEBUG XLA_PYTHON_CLIENT_MEM_FRACTION=$XLA_PYTHON_CLIENT_MEM_FRACTION JAX_LOCAL_DEVICE_IDS=$JAX_LOCAL_DEVICE_IDS"
  echo "${cmd[*]}"
  exit 0
fi
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
exec "${cmd[@]}"
