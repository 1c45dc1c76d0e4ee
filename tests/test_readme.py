"""The README's commands run exactly as written, so the README cannot drift from the code.

Every ```bash and ```python block of README.md carries a marker on the line above it:
`<!-- readme-test: run -->` (a user runs it on this machine) or `<!-- readme-test: skip:
why -->` (it needs released weights, your data, accelerators, or it runs this suite).
The slow test runs the `run` blocks in the README's order, in one fresh directory that
holds links to the checkout's configs/ and launch/, so the README's relative paths
(workdir/..., data/..., text.json) resolve as they do for a user in the checkout: the
quickstart AIM, its probe and features, the whole 4M path from pseudo-labelling to
generation, retrieval and evaluation, the other tokenizers, and the two-process run.

The one substitution: a leading `pip install ... &&` is dropped (the suite runs inside
the installed project). Nothing else is changed: no size, step count or path.

`python tests/test_readme.py DIR [LINE]` runs the same blocks in DIR (from the block at
README line LINE on) and prints each block's time and the end of its output (how the
README's figures are measured).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"<!-- readme-test: (run|skip: (.+)) -->")
PIP_PREFIX = re.compile(r"^pip install [^&\n]*&&\s*", re.MULTILINE)


def blocks(readme: Path = ROOT / "README.md") -> list[dict]:
  """The README's ```bash / ```python blocks: {"lang", "code", "line", "marker", "reason"}
  (marker: 'run', 'skip' or None when the line above the fence has none)."""
  lines = readme.read_text().splitlines()
  out, i = [], 0
  while i < len(lines):
    fence = re.fullmatch(r"```(\w*)\s*", lines[i])
    if not fence:
      i += 1
      continue
    end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
    prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
    m = MARKER.fullmatch(prev.strip())
    if fence.group(1) in ("bash", "python"):
      out.append({"lang": fence.group(1), "code": "\n".join(lines[i + 1:end]), "line": i + 1,
                  "marker": None if m is None else ("run" if m.group(1) == "run" else "skip"),
                  "reason": m.group(2) if m else None})
    i = end + 1
  return out


def runnable(code: str) -> str:
  """A block's text as it is run: the README's text, less a leading `pip install ... &&`."""
  return PIP_PREFIX.sub("", code)


def prepare(directory: Path) -> None:
  """A user's view of the checkout: configs/ and launch/ where the README expects them."""
  directory.mkdir(parents=True, exist_ok=True)
  for name in ("configs", "launch"):
    link = directory / name
    if not link.exists():
      link.symlink_to(ROOT / name)


def run_block(block: dict, directory: Path, env: dict, timeout: float = 1800):
  """Runs one block in `directory` (bash -euo pipefail, or python reading stdin); returns
  (CompletedProcess, seconds)."""
  code = runnable(block["code"])
  cmd = (["bash", "-euo", "pipefail", "-c", code] if block["lang"] == "bash"
         else [sys.executable, "-"])
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=directory, env=env, text=True, capture_output=True,
                        input=code if block["lang"] == "python" else None, timeout=timeout)
  return proc, time.perf_counter() - t0


def _env() -> dict:
  env = dict(os.environ)
  env.update({"TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)})
  env.pop("XLA_FLAGS", None)   # as a user's shell: one CPU device
  return env


def test_every_code_block_is_marked_run_or_skip_with_a_reason():
  found = blocks()
  unmarked = [b["line"] for b in found if b["marker"] is None]
  assert not unmarked, f"README.md code blocks without a readme-test marker at lines {unmarked}"
  assert all(b["reason"].strip() for b in found if b["marker"] == "skip")
  run = [b for b in found if b["marker"] == "run"]
  assert len(run) >= 8
  text = "\n".join(b["code"] for b in run)
  for command in ("aimjax.train", "aimjax.probe", "fourm_jax.pseudo_label", "tokenizers_jax.train",
                  "tokenizers_jax.fit_text", "tokenizers_jax.tokenize", "fourm_jax.train",
                  "fourm_jax.generate", "fourm_jax.retrieval", "fourm_jax.evaluate",
                  "launch/local.sh"):
    assert command in text, f"no README block the suite runs uses {command}"


def test_only_a_leading_pip_install_is_substituted():
  code = 'pip install -e . && python -m aimjax.train --workdir=workdir/x\npython -c "pip"'
  assert runnable(code) == 'python -m aimjax.train --workdir=workdir/x\npython -c "pip"'
  assert runnable("python -m x && pip install y") == "python -m x && pip install y"


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path):
  prepare(tmp_path)
  env = _env()
  outputs = []
  for b in (b for b in blocks() if b["marker"] == "run"):
    proc, _ = run_block(b, tmp_path, env)
    assert proc.returncode == 0, (f"README.md block at line {b['line']} failed "
                                  f"(exit {proc.returncode}):\n{b['code']}\n"
                                  f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n"
                                  f"{proc.stderr[-3000:]}")
    outputs.append(proc.stdout + proc.stderr)
  log = "\n".join(outputs)
  w = tmp_path / "workdir"
  # the quickstart: 300 steps, the loss falls, resumable checkpoints
  rows = [json.loads(l) for l in (w / "aim_tiny/metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in rows if "loss" in r]
  assert rows[-1]["step"] == 300 and losses[-1] < 0.8 * losses[0]
  probe = json.loads((w / "aim_tiny_probe/probe_results.json").read_text())
  assert probe
  assert "(2, 16, 64)" in log                                  # the features snippet's shapes
  # the 4M path: token shards with every modality of the tiny config, a validation loss,
  # a labelled figure, retrieval results and the evaluation table
  schema = json.loads((tmp_path / "data/scenes_4m_tokens/schema.json").read_text())["fields"]
  assert {"image", "tok_rgb", "tok_depth", "tok_aim_global", "caption"} <= set(schema)
  rows = [json.loads(l) for l in (w / "4m_tiny/metrics.jsonl").read_text().splitlines()]
  assert any(k.startswith("eval/") for r in rows for k in r), "no validation line in 4M's log"
  assert (w / "gen/generations.png").stat().st_size > 0
  gen = json.loads((w / "gen/generations.json").read_text())
  assert len(gen["sequences"]["caption"]) == 4
  assert re.search(r"tok_depth@32\s+standardised L1", log)
  assert (tmp_path / "data/scenes_4m_val_sam/schema.json").exists()
  assert (w / "aim_2proc/logs/process_1.log").exists()


def main(argv):
  """Runs the README's blocks in argv[1] (default: a fresh temporary directory), from the
  block at README line argv[2] on (default: all)."""
  import tempfile
  directory = Path(argv[1] if len(argv) > 1 else tempfile.mkdtemp(prefix="readme_"))
  first = int(argv[2]) if len(argv) > 2 else 0
  prepare(directory)
  env = _env()
  total = 0.0
  for b in (b for b in blocks() if b["marker"] == "run" and b["line"] >= first):
    proc, seconds = run_block(b, directory, env)
    total += seconds
    print(f"=== README.md line {b['line']}: exit {proc.returncode}, {seconds:.0f} s", flush=True)
    print("\n".join((proc.stdout + proc.stderr).splitlines()[-15:]), flush=True)
    if proc.returncode:
      sys.exit(1)
  print(f"=== all blocks in {total / 60:.1f} min, in {directory}")


if __name__ == "__main__":
  main(sys.argv)
