"""benchmarks/vs_official.py as a user runs it without the official code at hand (the timed
runs need PyTorch and clones of apple/ml-aim and apple/ml-4m, which CI does not have)."""
import subprocess
import sys

from conftest import ROOT, subprocess_env


def run(*args):
  return subprocess.run([sys.executable, "benchmarks/vs_official.py", *args], cwd=ROOT,
                        capture_output=True, text=True, env=subprocess_env(), timeout=300)


def test_without_the_official_clones_it_says_what_to_pass():
  proc = run()
  assert proc.returncode != 0
  assert "--official_aim" in proc.stderr and "git clone https://github.com/apple/ml-4m" in \
      proc.stderr and 'pip install -e ".[reference]"' in proc.stderr


def test_a_path_that_is_not_a_clone_is_named(tmp_path):
  proc = run(f"--official_4m={tmp_path}")
  assert proc.returncode != 0
  assert f"--official_4m={tmp_path} has no fourm/" in proc.stderr
