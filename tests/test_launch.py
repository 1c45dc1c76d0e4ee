"""launch/*.sh: every --dry-run shown in the README prints exactly what the README says."""
import re
import shlex
import subprocess

import pytest

from conftest import ROOT

README = (ROOT / "README.md").read_text()
CHECKOUT = "/path/to/pretrain-jax"     # how the README writes this checkout's path


def _examples():
  """(command, expected output lines) of every '$ launch/...' line in README console blocks."""
  out = []
  for block in re.findall(r"```console\n(.*?)```", README, flags=re.S):
    cmd, lines = None, []
    for line in block.splitlines():
      if line.startswith("$ "):
        if cmd:
          out.append((cmd, lines))
        cmd, lines = line[2:], []
      else:
        lines.append(line)
    if cmd:
      out.append((cmd, lines))
  return out


EXAMPLES = _examples()


def test_the_readme_shows_a_dry_run_of_every_launch_script():
  scripts = {shlex.split(c)[0] for c, _ in EXAMPLES}
  assert scripts == {"launch/local.sh", "launch/gpu_slurm.sh", "launch/tpu_pod.sh"}


@pytest.mark.parametrize("cmd,expected", EXAMPLES, ids=[c.split()[0] + str(i)
                                                         for i, (c, _) in enumerate(EXAMPLES)])
def test_dry_run_prints_what_the_readme_says(cmd, expected):
  args = shlex.split(cmd)
  proc = subprocess.run(["bash", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.replace(str(ROOT), CHECKOUT).splitlines() == expected


@pytest.mark.parametrize("args,message", [
    (["launch/local.sh"], "usage"),
    (["launch/gpu_slurm.sh", "--bogus", "x"], "unknown option --bogus"),
    (["launch/local.sh", "-x", "aimjax.train"], "unknown option -x"),
    (["launch/tpu_pod.sh", "--dry-run", "aimjax.train"], "--name and --zone are required"),
    (["launch/tpu_pod.sh", "--dry-run", "--name=a", "--zone=b"], "give MODULE"),
])
def test_bad_launch_arguments_exit_2_naming_the_problem(args, message):
  proc = subprocess.run(["bash", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2 and message in proc.stderr


@pytest.mark.parametrize("accelerator,runtime", [
    ("v4-32", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-256", "v2-alpha-tpuv5"), ("v6e-256", "v2-alpha-tpuv6e")])
def test_tpu_pod_runtime_follows_the_generation_and_runs_in_a_python311_venv(accelerator, runtime):
  proc = subprocess.run(
      ["bash", "launch/tpu_pod.sh", "--dry-run", "--name=n", "--zone=z", f"--type={accelerator}",
       "aimjax.train", "--workdir=gs://b/w"], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  create, pack, _, install, run, _ = proc.stdout.splitlines()
  assert create.endswith(f"--accelerator-type={accelerator} --version={runtime}")
  assert "ls-files" in pack and "--exclude-standard" in pack     # no ignored data or outputs
  assert "python3.11 -m venv ~/pretrain-jax-venv" in install
  assert "~/pretrain-jax-venv/bin/pip install -q -e '.[tpu]'" in install
  assert "~/pretrain-jax-venv/bin/python -m aimjax.train" in run


@pytest.mark.parametrize("mode,ids,tasks", [([], "0", "--ntasks-per-node=8 --gpus-per-task=1"),
                                            (["--per-host"], "0,1,2,3,4,5,6,7",
                                             "--ntasks-per-node=1")])
def test_gpu_slurm_gives_every_process_the_right_local_device_ids(mode, ids, tasks):
  """JAX's SLURM detection would use SLURM_LOCALID as the GPU ordinal: wrong when a task is
  bound to one GPU (it is ordinal 0 there) and when one task drives all 8."""
  proc = subprocess.run(["bash", "launch/gpu_slurm.sh", "--dry-run", "--nodes=2",
                         "--gpus-per-node=8", *mode, "aimjax.train"], cwd=ROOT,
                        capture_output=True, text=True, timeout=60)
  env, srun = proc.stdout.splitlines()
  assert env.endswith(f"JAX_LOCAL_DEVICE_IDS={ids}")
  assert srun.startswith(f"srun --nodes=2 {tasks} --kill-on-bad-exit=1 ")


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("script", ["launch/local.sh", "launch/gpu_slurm.sh", "launch/tpu_pod.sh"])
def test_launch_scripts_answer_help(script, flag):
  proc = subprocess.run(["bash", script, flag], cwd=ROOT, capture_output=True, text=True,
                        timeout=60)
  assert proc.returncode == 0, proc.stderr
  assert f"{script} " in proc.stdout and "--dry-run" in proc.stdout     # the usage lines
  assert "set -euo" not in proc.stdout and "#SBATCH" not in proc.stdout and not proc.stderr


def test_what_the_readme_writes_into_the_checkout_is_not_packed_for_a_pod():
  """tpu_pod.sh packs what git tracks or would track: outputs must be ignored by .gitignore."""
  outputs = ["data/scenes_4m/train-00000.array_record", "workdir/aim_tiny/config.json",
             "ckpt/aim_600m/config.json", "text.json", "plan.json", "scene.png",
             "aim_600m.safetensors", "slurm-123.out"]
  sources = ["configs/aim/pretrain.py", "pretrain_jax/data/records.py", "README.md"]
  check = lambda p: subprocess.run(["git", "check-ignore", "-q", "--no-index", p], cwd=ROOT,
                                   timeout=60).returncode
  assert {p: check(p) for p in outputs} == {p: 0 for p in outputs}       # 0: ignored
  assert {p: check(p) for p in sources} == {p: 1 for p in sources}
