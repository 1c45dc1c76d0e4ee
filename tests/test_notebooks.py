"""The notebooks execute from nothing on tiny models, and are stored without outputs."""
import json
import os

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# every notebook is executed by one of the tests below
EXECUTED = ("aim_probe.ipynb", "fourm_generate.ipynb")


def _execute(name: str, monkeypatch, **env) -> tuple[list, str]:
  """Runs notebooks/NAME in a fresh kernel (cwd notebooks/, as a user's Jupyter does) with
  `env` set; returns its outputs and their printed text."""
  for key in [k for k in os.environ if k.startswith(("AIM_", "FOURM_"))]:
    monkeypatch.delenv(key)
  for key, value in env.items():
    monkeypatch.setenv(key, str(value))
  monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
  monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  path = ROOT / "notebooks" / name
  nb = nbformat.read(str(path), as_version=4)
  NotebookClient(nb, timeout=900, kernel_name="python3",
                 resources={"metadata": {"path": str(path.parent)}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  errors = [o for o in outputs if o.output_type == "error"]
  assert not errors, "\n".join(e.ename + ": " + e.evalue for e in errors)
  printed = "".join(o.text for o in outputs if o.output_type == "stream" and o.name == "stdout")
  return outputs, printed


def _pngs(outputs) -> int:
  return sum("image/png" in o.get("data", {}) for o in outputs)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path):
  nb = json.loads(path.read_text())
  for cell in nb["cells"]:
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None, path.name


def test_every_notebook_is_executed_by_the_suite():
  assert sorted(p.name for p in NOTEBOOKS) == sorted(EXECUTED)


@pytest.mark.slow
def test_aim_probe_notebook_trains_a_tiny_aim_then_probes_it(tmp_path, monkeypatch):
  """AIM_INIT_FROM unset: a tiny AIM is trained in AIM_WORKDIR (20 steps here), loaded, its
  features shown and probed."""
  workdir = tmp_path / "aim_tiny"
  outputs, printed = _execute("aim_probe.ipynb", monkeypatch, AIM_WORKDIR=workdir,
                              AIM_TRAIN_STEPS=20, AIM_PROBE_EPOCHS=1,
                              AIM_PROBE_SCENES=256)
  assert "training a tiny AIM for 20 steps" in printed, printed
  assert (workdir / "checkpoints" / "20").is_dir()
  assert "AIM width 64, depth 2; features (8, 16, 64)" in printed, printed
  assert _pngs(outputs) == 3   # the training loss, the PCA images, the probe accuracy


@pytest.mark.slow
def test_fourm_notebook_builds_a_tiny_4m_and_generates(tmp_path, monkeypatch):
  """From nothing: pseudo-labels, tokenizers, vocabulary, token shards, a tiny 4M, then
  generation (two labelled figures, the captions printed) and retrieval."""
  outputs, printed = _execute("fourm_generate.ipynb", monkeypatch, FOURM_DIR=tmp_path,
                              FOURM_SCENES=128, FOURM_TOKENIZER_STEPS=40,
                              FOURM_TRAIN_STEPS=60, FOURM_SAMPLES=2, FOURM_GEN_STEPS=2)
  for name in ("tok_rgb", "tok_depth", "tok_aim_global", "fourm"):
    assert (tmp_path / name / "checkpoints").is_dir(), name
  for out in ("gen_from_rgb", "gen_from_caption"):
    assert (tmp_path / out / "generations.png").stat().st_size > 0
  generated = json.loads((tmp_path / "gen_from_rgb" / "generations.json").read_text())
  for i, caption in enumerate(generated["sequences"]["caption"]):
    assert f"generated caption {i}: {caption}\n" in printed
  assert i == 1, generated["sequences"]
  assert printed.count(" cos ") == 5, printed   # the five retrieved scenes
  assert _pngs(outputs) == 3   # the two generation figures and the retrieval figure
