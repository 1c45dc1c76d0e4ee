"""Model FLOPs utilisation of the AIM and 4M train steps on the accelerator at hand.

  python benchmarks/mfu.py [--steps=5] [--out=benchmarks/results/mfu_<platform>.json]

Runs the training loop's own step (`loop.jit_train_step`: sharded over every device with
FSDP, state donated) on a fixed device-resident batch, and reports step time, achieved
FLOP/s and MFU against the peak: on CPU the measured f32 matmul rate of the whole machine
(timed in the same run), on GPU/TPU the bf16 spec-sheet peak per device. Model FLOPs are
AIM's analytic count and, for 4M, XLA's count of the compiled step (remat off in both, so
no recomputation is counted). It also compiles each step with scan over layers and
reports both compile times.

Cases (by platform):
  cpu  aim-mid: width 384, depth 12, 12 head blocks of 512, 224 px, batch 16, f32 (as aim_step.py)
       4m-B-width: 4M-7 B (dim 768) with 2 + 2 blocks, batch 8, f32
  gpu  aim-0.6B-width: width 1536, 12 heads, depth 8 (of 24), batch 64, bf16
       4m-B: 4M-7 B (12 + 12 blocks), batch 128, bf16
The 4M batches have the masking's shapes (fixed token budgets) with nothing given, so the
dense work is that of a real step.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import flax.linen as nn
import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import timing  # noqa: E402
from pretrain_jax import cli, flops as flops_lib, loop, mesh as mesh_lib  # noqa: E402
from pretrain_jax import partitioning, plan, train_state as ts  # noqa: E402

CASES = {
    "cpu": {
        "aim-mid": ("configs/aim/pretrain.py:variant=0.6B", {
            "batch_size": 16, "model.width": 384, "model.num_heads": 6, "model.depth": 12,
            "model.head_width": 512, "model.head_depth": 12, "model.dtype": "float32"}),
        "4m-B-width": ("configs/fourm/pretrain.py:variant=4m7_B", {
            "batch_size": 8, "model.encoder_depth": 2, "model.decoder_depth": 2,
            "model.dtype": "float32"}),
    },
    "gpu": {
        "aim-0.6B-width": ("configs/aim/pretrain.py:variant=0.6B", {
            "batch_size": 64, "model.depth": 8, "model.attention_impl": "auto"}),
        "4m-B": ("configs/fourm/pretrain.py:variant=4m7_B", {
            "batch_size": 128, "model.attention_impl": "auto"}),
    },
}


def build(spec: str, overrides: dict, scan_layers: bool):
  path, _, arg = spec.partition(":")
  config = cli.config_from_file(os.path.join(ROOT, path), arg)
  with config.unlocked():
    for key, value in {**overrides, "model.remat": "none",
                       "model.scan_layers": scan_layers}.items():
      node = config
      *parents, leaf = key.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = value
  return config, plan.task_module(path).build_task(config)


def run_case(name: str, spec: str, overrides: dict, steps: int) -> dict:
  devices = jax.devices()
  mesh = mesh_lib.create_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices)
  compile_s = {}
  for scan_layers in (True, False):     # the unrolled step is the one timed
    config, task = build(spec, overrides, scan_layers)
    jitted, abstract, batch, tx = plan.abstract_step(config, task, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.RULES):
      t0 = time.perf_counter()
      compiled = jitted.lower(abstract, batch).compile()
      compile_s["scan" if scan_layers else "unrolled"] = time.perf_counter() - t0
  state, _ = ts.create_train_state(task.init_params, tx, jax.random.key(0), mesh,
                                   partitioning.RULES, task.init_extra)
  rng = np.random.default_rng(0)

  def fill(s):
    if s.dtype == np.uint8:
      return rng.integers(0, 256, s.shape, np.uint8)
    return np.zeros(s.shape, s.dtype)
  batch = jax.tree.map(lambda s: jax.device_put(fill(s), s.sharding), batch)
  with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.RULES):
    step_s, state, metrics = timing.time_steps(compiled, state, batch, steps)
  model_flops = task.flops_per_step or loop.xla_flops(compiled, mesh.size)
  return {"case": name, "config": spec, "overrides": overrides, "devices": len(devices),
          "params": ts.count_params(state.params), "step_s": step_s,
          "model_flops": model_flops,
          "flops_source": "analytic" if task.flops_per_step else "XLA",
          "achieved_flops": model_flops / step_s,
          "mfu": flops_lib.mfu(model_flops, step_s, devices),
          "compile_s_unrolled": compile_s["unrolled"], "compile_s_scan": compile_s["scan"],
          "loss_finite": bool(np.isfinite(float(metrics["loss"])))}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--only", default="", help="comma-separated case names")
  ap.add_argument("--out", default="")
  args = ap.parse_args()
  device = jax.devices()[0]
  kind = "cpu" if device.platform == "cpu" else "gpu"
  cases = {k: v for k, v in CASES[kind].items() if not args.only or k in args.only.split(",")}
  peak, how = flops_lib.peak_flops_per_device(device)
  print(f"{device.device_kind} x {jax.device_count()}: peak {peak / 1e12:.3g} TFLOP/s ({how})")
  print("| case | params | step s | model FLOPs | achieved TFLOP/s | MFU | compile s "
        "(unrolled / scan) |")
  print("|---|---|---|---|---|---|---|")
  rows = []
  for name, (spec, overrides) in cases.items():
    r = run_case(name, spec, overrides, args.steps)
    rows.append(r)
    print(f"| {name} | {r['params'] / 1e6:.1f}M | {r['step_s']:.3g} | {r['model_flops']:.3g} "
          f"({r['flops_source']}) | {r['achieved_flops'] / 1e12:.3g} | {r['mfu']:.1%} | "
          f"{r['compile_s_unrolled']:.1f} / {r['compile_s_scan']:.1f} |", flush=True)
  out = args.out or os.path.join(ROOT, "benchmarks", "results", f"mfu_{device.platform}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
               "device": device.device_kind, "platform": device.platform,
               "device_count": jax.device_count(), "host": platform.machine(),
               "cpu_count": os.cpu_count(), "peak_flops": peak, "peak_note": how,
               "rows": rows}, f, indent=1)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
