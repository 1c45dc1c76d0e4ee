#!/usr/bin/env bash
# A Cloud TPU VM pod slice: create (or reuse) it, copy and install the code on every
# worker, run the same command on all workers, stream the logs, stop cleanly.
#
#   launch/tpu_pod.sh [--dry-run] --name=NAME --zone=ZONE [--type=v5p-64] [--version=VERSION]
#                     [--python=python3.11] [--stop | --delete] [MODULE ARGS...]
#
#   launch/tpu_pod.sh --name=aim7b --zone=us-east5-a --type=v5p-256 aimjax.train \
#       --config=configs/aim/pretrain.py:variant=7B --workdir=gs://bucket/aim7b
#
# Steps: `describe` the TPU and `create` it if absent, with the TPU VM runtime of its
# generation (v4: tpu-ubuntu2204-base, v5e: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5,
# v6e: v2-alpha-tpuv6e; --version overrides); pack the files git tracks or would track
# (no .git, no ignored data or outputs: see .gitignore), `scp` them to every worker, unpack
# them in ~/pretrain-jax, make a Python >= 3.11 virtual environment ~/pretrain-jax-venv
# (the images' system Python is older; --python names the interpreter, installed with
# apt when missing) and `pip install -e .[tpu]` into it; run
# `~/pretrain-jax-venv/bin/python -m MODULE ARGS --distributed=on` on all workers
# (--worker=all), detached from ssh, logs appended to ~/pretrain-jax/run.log; worker 0's
# log is streamed back.
# --stop sends SIGTERM to the run on every worker: each saves a checkpoint and exits 0
# (rerunning the same command resumes). --delete deletes the TPU. --dry-run prints the
# gcloud commands instead of running them.
set -euo pipefail
dry=0
action=run
name=""
zone=""
type="v5p-8"
version=""
python="python3.11"
while [[ $# -gt 0 && "$1" == -* ]]; do   # options, then MODULE
  case "$1" in
    --dry-run) dry=1 ;;
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --type=*) type="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --python=*) python="${1#*=}" ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    --stop) action=stop ;;
    --delete) action=delete ;;
    *) echo "tpu_pod.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
if [[ -z "$name" || -z "$zone" ]]; then
  echo "tpu_pod.sh: --name and --zone are required" >&2
  exit 2
fi
if [[ "$action" == run && $# -lt 1 ]]; then
  echo "tpu_pod.sh: give MODULE [ARGS...] to run (or --stop / --delete)" >&2
  exit 2
fi
if [[ -z "$version" ]]; then   # the runtime image of the accelerator's generation
  case "$type" in
    v4-*) version="tpu-ubuntu2204-base" ;;
    v5litepod-*|v5e-*) version="v2-alpha-tpuv5-lite" ;;
    v5p-*) version="v2-alpha-tpuv5" ;;
    v6e-*) version="v2-alpha-tpuv6e" ;;
    *) echo "tpu_pod.sh: unknown accelerator type '$type' (v4-N, v5litepod-N, v5p-N, v6e-N); give --version" >&2
       exit 2 ;;
  esac
fi
tpu=(gcloud compute tpus tpu-vm)
at=(--zone="$zone")
show() {   # a command as one copy-pasteable line: words with spaces or shell characters in "..."
  local out=() a
  for a in "$@"; do
    if [[ "$a" =~ [[:space:]\'\&\|\;\<\>\(\)] ]]; then out+=("\"${a//\"/\\\"}\""); else out+=("$a"); fi
  done
  echo "${out[*]}"
}
step() {   # prints (dry run) or runs one command
  if [[ "$dry" -eq 1 ]]; then show "$@"; else "$@"; fi
}
quote() { printf '%q ' "$@"; }
case "$action" in
  stop)
    step "${tpu[@]}" ssh "$name" "${at[@]}" --worker=all \
      --command="pkill -TERM -f '[p]ython -m .*--distributed=on' || true"
    ;;
  delete)
    step "${tpu[@]}" delete "$name" "${at[@]}" --quiet
    ;;
  run)
    module="$1"; shift
    if [[ "$dry" -eq 1 ]]; then
      echo "$(show "${tpu[@]}" describe "$name" "${at[@]}") || $(show "${tpu[@]}" create "$name" "${at[@]}" --accelerator-type="$type" --version="$version")"
    elif ! "${tpu[@]}" describe "$name" "${at[@]}" >/dev/null 2>&1; then
      "${tpu[@]}" create "$name" "${at[@]}" --accelerator-type="$type" --version="$version"
    fi
    root="$(cd "$(dirname "$0")/.." && pwd)"
    if [[ "$dry" -eq 1 ]]; then
      echo "git -C $root ls-files -z --cached --others --exclude-standard | tar czf /tmp/pretrain-jax.tgz -C $root --null -T -"
    else
      git -C "$root" ls-files -z --cached --others --exclude-standard \
        | tar czf /tmp/pretrain-jax.tgz -C "$root" --null -T -
    fi
    step "${tpu[@]}" scp /tmp/pretrain-jax.tgz "$name:~/" "${at[@]}" --worker=all
    step "${tpu[@]}" ssh "$name" "${at[@]}" --worker=all \
      --command="mkdir -p ~/pretrain-jax && tar xzf ~/pretrain-jax.tgz -C ~/pretrain-jax && cd ~/pretrain-jax && (command -v $python >/dev/null || (sudo apt-get update -q && sudo apt-get install -y -q $python $python-venv)) && $python -m venv ~/pretrain-jax-venv && ~/pretrain-jax-venv/bin/pip install -q -e '.[tpu]'"
    # detached from the ssh session (a dropped connection must not kill the run), then the
    # first worker's log is streamed; ctrl-C stops the streaming, not the run
    run_cmd="cd ~/pretrain-jax && setsid nohup ~/pretrain-jax-venv/bin/python -m $(quote "$module" "$@")--distributed=on >> run.log 2>&1 < /dev/null &"
    step "${tpu[@]}" ssh "$name" "${at[@]}" --worker=all --command="$run_cmd"
    step "${tpu[@]}" ssh "$name" "${at[@]}" --worker=0 --command="tail -n +1 -F ~/pretrain-jax/run.log"
    ;;
esac
