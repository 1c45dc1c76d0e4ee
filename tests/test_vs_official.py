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


def test_a_partial_run_replaces_only_its_rows():
  """--only runs merge into the results file: the rerun rows are replaced (and say which
  run they come from), the others are kept, a new case is appended."""
  sys.path.insert(0, str(ROOT))
  from benchmarks import vs_official
  previous = {"date": "d0", "sizes": "full", "rows": [
      {"case": "aim train", "ours_s": 2.0, "official_s": 1.0, "ratio": 0.5},
      {"case": "4m train", "ours_s": 3.0, "official_s": 2.0, "ratio": 0.67}]}
  run = {"date": "d1", "load_average_start_end": [0.1, 0.2], "sizes": "full", "rows": [
      {"case": "4m train", "ours_s": 1.0, "official_s": 2.0, "ratio": 2.0},
      {"case": "4m gen roar, dim 256", "ours_s": 1.0, "official_s": 1.5, "ratio": 1.5}]}
  out = vs_official.merge_rerun(previous, run)
  assert [r["case"] for r in out["rows"]] == ["aim train", "4m train", "4m gen roar, dim 256"]
  assert out["rows"][0] == previous["rows"][0] and out["date"] == "d0"
  assert out["rows"][1]["ratio"] == 2.0 and out["rows"][1]["run"]["date"] == "d1"
  assert out["rows"][1]["run"]["command"].startswith("python ")
  assert out["rows_rerun"]["cases"] == ["4m train", "4m gen roar, dim 256"]
  assert out["rows_rerun"]["date"] == "d1"
