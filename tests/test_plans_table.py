"""benchmarks/plans.py: the TPU plans' summary (smallest slice that fits per model and TPU
generation) and the markdown written from the JSON, on made-up plans (no compile)."""
import importlib.util
import json
import os
import subprocess
import sys

from conftest import ROOT, subprocess_env

GiB = 2 ** 30


def _module():
  spec = importlib.util.spec_from_file_location("plans_script",
                                                os.path.join(ROOT, "benchmarks", "plans.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _plan(config, topology, peak_gib, fits, params=1.2e9):
  from pretrain_jax import plan
  row = {"mesh": [1, 4, 1], "per_device_batch": 1, "num_params": params, "params": GiB,
         "opt_state": 2 * GiB, "batch": 0, "gradients": GiB, "temp": 0,
         "peak": peak_gib * GiB, "xla_flops": 1e15, "lower_s": 1.0, "compile_s": 60.0,
         "bytes_per_device": peak_gib * GiB, "activations": GiB, "fits": fits,
         "model_flops": 1e15, "step_s_at_mfu": 1.0}
  return {"title": f"{config} on {plan.slice_name(topology)} ({topology}, TPU compiler)",
          "compiler": "tpu", "compiler_note": "the TPU compiler's memory analysis",
          "topology": topology, "accelerator": plan.slice_name(topology), "devices": 4,
          "chips": 4, "hosts": 1, "device_kind": "tpu-v5p", "memory_per_device": 95e9,
          "peak_flops_per_device": 459e12, "mfu": 0.4, "headroom": 0.9, "batch_size": 4096,
          "grad_accum_steps": 1, "mesh": [1, 4, 1], "policies": {"block": row},
          "model_flops": 1e15, "model_flops_source": "analytic", "suggestions": [],
          "commit": "abc1234"}


def test_summary_names_the_smallest_fitting_slice_and_the_one_below():
  m = _module()
  cfg = m.TPU_PLANS["aim-1B"][0]
  results = {
      "aim-1B v5p:2x2x4": _plan(cfg, "v5p:2x2x4", 30.0, True),
      "aim-1B v5p:2x2x2": _plan(cfg, "v5p:2x2x2", 50.0, True),
      "aim-1B v5p:2x2x1": _plan(cfg, "v5p:2x2x1", 99.0, False),
      "aim-1B v4:2x4x4": _plan(cfg, "v4:2x4x4", 25.0, True),
      "aim-3B v4:2x2x4": _plan(m.TPU_PLANS["aim-3B"][0], "v4:2x2x4", 40.0, False),
  }
  rows = {line.split(" | ")[0].strip("| "): line for line in m.summary(results).splitlines()}
  assert rows["aim-1B"] == ("| aim-1B | 1.20 B | v5p-16 (8 chips): 50.0 GiB | v5p-8 (4 chips): "
                            "99.0 GiB | v4-64 (32 chips): 25.0 GiB | (smaller not compiled) |")
  assert "| not compiled |" in rows["aim-0.6B"]
  assert rows["aim-3B"].endswith("| none of those compiled | v4-32 (16 chips): 40.0 GiB |")
  # a fit on the generation's smallest slice (4 chips) needs no smaller one
  results = {"4m7-B v5p:2x2x1": _plan(m.TPU_PLANS["4m7-B"][0], "v5p:2x2x1", 51.0, True)}
  assert "v5p-8 (4 chips): 51.0 GiB | (the smallest slice)" in m.summary(results)


def test_render_only_writes_the_markdown_from_the_json(tmp_path):
  m = _module()
  cfg = m.TPU_PLANS["aim-7B"][0]
  results = {"aim-7B v5p:2x2x4": _plan(cfg, "v5p:2x2x4", 54.4, True),
             "aim-7B v5p:2x2x2": _plan(cfg, "v5p:2x2x2", 108.0, False)}
  (tmp_path / "plans.json").write_text(json.dumps(results))
  out = tmp_path / "plans.md"
  proc = subprocess.run([sys.executable, "benchmarks/plans.py", "--render_only",
                         f"--json={tmp_path / 'plans.json'}", f"--out={out}"], cwd=ROOT,
                        env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  text = out.read_text()
  assert "| aim-7B | 1.20 B | v5p-32 (16 chips): 54.4 GiB | v5p-16 (8 chips): 108.0 GiB |" in text
  # both plans' sections, smaller slice first, each with its commit; the rest listed as missing
  first, second = text.index("on v5p-16 (v5p:2x2x2"), text.index("on v5p-32 (v5p:2x2x4")
  assert first < second and text.count("Compiled at commit abc1234") == 2
  assert "Not compiled yet: aim-0.6B v5p:2x2x1" in text and "aim-7B v5p:2x2x4," not in text
