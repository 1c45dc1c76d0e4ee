"""AIM training-step and input-pipeline throughput on the machine at hand.

  python benchmarks/aim_step.py [--steps=10] [--out=benchmarks/results/aim_step.json]

For the tiny config and a mid-size config (width 384, depth 12, 224 px,
batch 16), prints step time, images/s, achieved FLOP/s (analytic count, 3x
forward) and that as a fraction of the machine's peak: on CPU the rate of a
large f32 matmul timed in the same run, on GPU/TPU the bf16 spec-sheet peak.
Also times the Grain pipeline alone (scenes rendering, crop, normalise).
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
from aimjax import model as model_lib  # noqa: E402
from aimjax import train as aim_train  # noqa: E402
from pretrain_jax import flops as flops_lib  # noqa: E402
from pretrain_jax import loop, mesh as mesh_lib, optim, partitioning  # noqa: E402
from pretrain_jax import train_state as ts  # noqa: E402
from pretrain_jax.data import pipeline  # noqa: E402


def load_config(variant: str):
  import importlib.util
  spec = importlib.util.spec_from_file_location("aim_pretrain", f"{ROOT}/configs/aim/pretrain.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(f"variant={variant}")


def configs():
  tiny = load_config("tiny")
  mid = load_config("tiny")
  mid.batch_size = 16
  mid.data.image_size = 224
  mid.data.scenes_resolution = 256
  mid.model.width, mid.model.depth, mid.model.num_heads = 384, 12, 6
  mid.model.head_depth, mid.model.head_width, mid.model.head_num_heads = 12, 512, 8
  on_accelerator = jax.devices()[0].platform != "cpu"
  for c in (tiny, mid):
    c.model.dtype = "bfloat16" if on_accelerator else "float32"
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
  return {"tiny": tiny, "mid (w384 d12 224px b16)": mid}


def time_step(cfg, steps: int):
  model = model_lib.from_config(cfg.model, cfg.objective)
  task = aim_train.build_task(cfg)
  boxed = ts.abstract_params(task.init_params, jax.random.key(0))
  tx, schedule = optim.create_optimizer(cfg.optimizer, 10_000, nn.unbox(boxed), cfg.model.depth)
  mesh = mesh_lib.create_mesh(cfg.mesh)
  state, sh = ts.create_train_state(task.init_params, tx, jax.random.key(0), mesh)
  rng = np.random.default_rng(0)
  s = cfg.data.image_size
  batch = {"image": rng.integers(0, 256, (cfg.batch_size, s, s, 3), np.uint8),
           "valid": np.ones(cfg.batch_size, np.float32)}
  step = loop.jit_train_step(task, tx, schedule, sh, mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.RULES):
    device_batch = partitioning.shard_batch(batch, mesh)
    t0 = time.perf_counter()
    compiled = step.lower(state, device_batch).compile()
    compile_s = time.perf_counter() - t0
    step_s, state, _ = timing.time_steps(compiled, state, device_batch, steps)
  step_flops = 3 * model_lib.forward_flops(model, cfg.batch_size)
  return {"step_s": step_s, "compile_s": compile_s, "images_per_s": cfg.batch_size / step_s,
          "step_flops": step_flops, "achieved_flops": step_flops / step_s,
          "params": ts.count_params(state.params)}


def time_pipeline(cfg, batches: int):
  it = iter(pipeline.train_dataset(cfg.data, cfg.batch_size, cfg.seed))   # uint8 batches
  next(it)
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * cfg.batch_size / (time.perf_counter() - t0)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--pipeline_batches", type=int, default=10)
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/aim_step.json"))
  args = parser.parse_args()

  device = jax.devices()[0]
  if device.platform == "cpu":
    peak = flops_lib.measured_matmul_peak(n=2048, dtype="float32")
    peak_note = "measured 2048^3 f32 matmul, whole machine"
  else:
    per_device, peak_note = flops_lib.peak_flops_per_device(device)
    peak = per_device * jax.device_count()
  rows = []
  for name, cfg in configs().items():
    r = time_step(cfg, args.steps)
    r["pipeline_images_per_s"] = time_pipeline(cfg, args.pipeline_batches)
    r["fraction_of_peak"] = r["achieved_flops"] / peak
    r["config"] = name
    r["batch"] = cfg.batch_size
    rows.append(r)

  print(f"device: {device.device_kind} x{jax.device_count()} ({device.platform}); "
        f"peak {peak / 1e12:.3f} TFLOP/s ({peak_note})")
  header = (f"{'config':28s} {'params':>10s} {'batch':>5s} {'step ms':>9s} {'img/s':>9s} "
            f"{'TFLOP/s':>9s} {'of peak':>8s} {'pipeline img/s':>15s} {'compile s':>9s}")
  print(header)
  print("-" * len(header))
  for r in rows:
    print(f"{r['config']:28s} {r['params'] / 1e6:9.2f}M {r['batch']:5d} {1e3 * r['step_s']:9.2f} "
          f"{r['images_per_s']:9.1f} {r['achieved_flops'] / 1e12:9.4f} "
          f"{100 * r['fraction_of_peak']:7.1f}% {r['pipeline_images_per_s']:15.1f} "
          f"{r['compile_s']:9.1f}")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
               "device": device.device_kind, "platform": device.platform,
               "device_count": jax.device_count(), "host": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(), "peak_flops": peak, "peak_note": peak_note,
               "rows": rows}, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
