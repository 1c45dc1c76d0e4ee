"""benchmarks/vs_official.py as a user runs it without the official code at hand (the timed
runs need PyTorch and clones of apple/ml-aim and apple/ml-4m, which CI does not have)."""
import subprocess
import sys

import pytest

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


def test_a_run_never_writes_into_a_file_of_another_allocator_or_settle_setting(tmp_path):
  sys.path.insert(0, str(ROOT))
  from benchmarks import vs_official
  path = tmp_path / "vs_official.json"
  # before --malloc and --settle: default and 0 (plain alternation)
  path.write_text('{"date": "d0", "sizes": "full", "rows": []}')
  vs_official.check_results_file(str(path), "default", 0)
  with pytest.raises(SystemExit, match="holds a --malloc=default run; give this "
                                       "--malloc=keep run its own file with --json=PATH"):
    vs_official.check_results_file(str(path), "keep", 0)
  with pytest.raises(SystemExit, match="holds a --settle=0 run; give this "
                                       "--settle=1 run its own file with --json=PATH"):
    vs_official.check_results_file(str(path), "default", 1)
  vs_official.check_results_file(str(tmp_path / "new.json"), "keep", 1)
  proc = run("--official_4m=/nonexistent", "--malloc=sometimes")
  assert proc.returncode != 0 and "--malloc: invalid choice: 'sometimes'" in proc.stderr


def test_generation_flops_follow_the_official_step_lengths():
  """gen_gflop against the official sampler's lengths written out by hand for two steps of
  4 + 6 of 10 target tokens from 5 given ones: ROAR's encoder holds the given tokens and those
  decoded so far (5, then 9) and its decoder the step's own tokens (4, then 6); MaskGIT's
  decoder every still-unknown position (10, then 6); guidance adds a pass whose encoder holds
  the decoded tokens alone (at least one)."""
  sys.path.insert(0, str(ROOT))
  from benchmarks import vs_official
  from fourm_jax import flops, schedules

  class Target:
    name, vocab_size = vs_official.GEN_TGT, 100

  class Model:
    dim, mlp_ratio, ffn, encoder_depth, decoder_depth = 8, 4, "swiglu", 1, 1
    targets = (Target,)
  model, b = Model, 2

  def fwd(n_enc, n_dec):
    return (flops.encoder_flops(model, b, n_enc) + flops.decoder_flops(model, b, n_enc, n_dec)
            + 2 * b * n_dec * model.dim * Target.vocab_size)
  for scheme, decoder in (("roar", (4, 6)), ("maskgit", (10, 6))):
    plan = [schedules.Step(target=vs_official.GEN_TGT, scheme=scheme, num_tokens=n)
            for n in (4, 6)]
    plain = fwd(5, decoder[0]) + fwd(9, decoder[1])
    assert vs_official.gen_gflop(model, plan, b, 5, False) * 1e9 == pytest.approx(plain)
    guided = plain + fwd(1, decoder[0]) + fwd(4, decoder[1])
    assert vs_official.gen_gflop(model, plan, b, 5, True) * 1e9 == pytest.approx(guided)


def test_settle_runs_untimed_calls_of_the_same_side_before_each_timed_call():
  """With settle=1 no timed call follows the other side's call; with 0 they alternate."""
  sys.path.insert(0, str(ROOT))
  from benchmarks import vs_official
  for settle in (0, 1):
    calls = []
    runs = vs_official.time_alternating(lambda: calls.append("ours"),
                                        lambda: calls.append("official"), 3, settle)
    assert len(runs) == 3 and all(set(r) == {"ours", "official"} for r in runs)
    assert calls[:2] == ["ours", "official"]            # one untimed call each
    rounds = calls[2:]
    per_call = settle + 1
    assert len(rounds) == 3 * 2 * per_call
    for i in range(0, len(rounds), per_call):           # each side's block: settle + timed
      block = rounds[i:i + per_call]
      assert len(set(block)) == 1
    firsts = [rounds[i] for i in range(0, len(rounds), 2 * per_call)]
    assert firsts == ["ours", "official", "ours"]       # which side goes first alternates
