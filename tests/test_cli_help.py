"""Every `python -m` entry point answers --help with its usage and its own flags, and exits 0."""
import subprocess
import sys

import pytest

from conftest import ROOT, subprocess_env

ENTRY_POINTS = {   # module: flags its --help must list (shared ones from pretrain_jax.cli too)
    "aimjax.train": ["--config", "--workdir", "--distributed"],
    "aimjax.probe": ["--config", "--workdir"],
    "aimjax.convert": ["--input", "--head", "--variant", "--out", "--probe_layers"],
    "aimjax.classify": ["--workdir", "--top_k"],
    "fourm_jax.train": ["--config", "--workdir"],
    "fourm_jax.generate": ["--workdir", "--targets", "--condition", "--tokenizers"],
    "fourm_jax.retrieval": ["--workdir", "--target", "--gallery"],
    "fourm_jax.convert": ["--input", "--out", "--[no]to_official"],
    "fourm_jax.evaluate": ["--workdir", "--data", "--targets"],
    "fourm_jax.pseudo_label": ["--config", "--input", "--out"],
    "tokenizers_jax.train": ["--config", "--workdir"],
    "tokenizers_jax.tokenize": ["--config", "--input", "--out"],
    "tokenizers_jax.fit_text": ["--config", "--input", "--out"],
    "tokenizers_jax.convert": ["--input", "--out", "--modality"],
    "pretrain_jax.plan": ["--config", "--topology", "--devices"],
    "pretrain_jax.data.make_scenes": ["--out", "--num", "--workers"],
    "fourm_jax.ml4m_export": ["--input", "--out", "--shard_size"],
}


def _help(module, flag="--help"):
  return subprocess.run([sys.executable, "-m", module, flag], cwd=ROOT, capture_output=True,
                        text=True, timeout=120, env=subprocess_env(JAX_PLATFORMS="cpu"))


def test_every_entry_point_is_checked():
  found = set()
  for package in ("pretrain_jax", "aimjax", "fourm_jax", "tokenizers_jax"):
    for path in (ROOT / package).rglob("*.py"):
      if "app.run(" in path.read_text() or "cli.run(" in path.read_text():
        found.add(".".join(path.relative_to(ROOT).with_suffix("").parts))
  assert found - {"pretrain_jax.cli"} == set(ENTRY_POINTS)


@pytest.mark.parametrize("module", list(ENTRY_POINTS))
def test_help_prints_the_usage_and_the_modules_own_flags(module):
  proc = _help(module)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"python -m {module} " in proc.stdout     # the docstring's usage line
  for flag in ENTRY_POINTS[module]:
    assert f"  {flag}:" in proc.stdout, (flag, proc.stdout)


def test_short_help_is_help_too():
  proc = _help("pretrain_jax.data.make_scenes", "-h")
  assert proc.returncode == 0 and "  --num:" in proc.stdout, proc.stderr[-2000:]
