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
    (["launch/tpu_pod.sh", "--dry-run", "aimjax.train"], "--name and --zone are required"),
    (["launch/tpu_pod.sh", "--dry-run", "--name=a", "--zone=b"], "give MODULE"),
])
def test_bad_launch_arguments_exit_2_naming_the_problem(args, message):
  proc = subprocess.run(["bash", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2 and message in proc.stderr
