"""4M training-step and masking throughput on the machine at hand.

  python benchmarks/fourm_step.py [--steps=5] [--out=benchmarks/results/fourm_step.json]

Configs: 'tiny' (configs/fourm/pretrain.py:variant=tiny, batch 32) and a
B-width model of reduced depth (dim 768, 12 heads, 2 encoder + 2 decoder
blocks) over the 4M-7 modalities with 128 input / 128 target tokens, batch 8.
Batches are masked synthetic samples (random token grids, random captions of
30 ids), so the step sees real shapes and masks. Prints step time, tokens/s
(encoder + decoder tokens), achieved FLOP/s (XLA's count of the compiled
step) as a fraction of the peak (CPU: a large f32 matmul timed in the same
run; GPU/TPU: the bf16 spec sheet), and the masking alone in samples/s on one
process beside the samples/s the step consumes.
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

from fourm_jax import train as fourm_train  # noqa: E402
from benchmarks import timing  # noqa: E402
from pretrain_jax import cli  # noqa: E402
from pretrain_jax import flops as flops_lib  # noqa: E402
from pretrain_jax import loop, mesh as mesh_lib, optim, partitioning  # noqa: E402
from pretrain_jax import train_state as ts  # noqa: E402


def load_config(variant: str):
  return cli.config_from_file(f"{ROOT}/configs/fourm/pretrain.py", f"variant={variant}")


def configs():
  tiny = load_config("tiny")
  mid = load_config("4m7_B")
  mid.batch_size = 8
  mid.model.encoder_depth = mid.model.decoder_depth = 2
  mid.model.remat = "none"
  on_accelerator = jax.devices()[0].platform != "cpu"
  for c in (tiny, mid):
    c.model.dtype = "bfloat16" if on_accelerator else "float32"
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
  return {"tiny": tiny, "B width, 2+2 blocks, 4M-7, 128/128": mid}


def synthetic_sample(model, rng) -> dict:
  out = {}
  for m in {m.name: m for m in (*model.inputs, *model.targets)}.values():
    if m.kind == "pixels":
      out[m.name] = rng.uniform(-1, 1, (m.grid[0] * m.patch_size, m.grid[1] * m.patch_size,
                                        m.channels)).astype(np.float32)
    elif m.kind == "seq_emb":
      out[m.name] = rng.normal(size=(m.length, m.emb_dim)).astype(np.float32)
    elif m.kind == "seq":
      n = min(30, m.length - 1)
      out[m.name] = np.concatenate([rng.integers(4204, m.vocab_size, n), [3]])
    else:
      out[m.name] = rng.integers(0, m.vocab_size, m.num_tokens)
  return out


def time_masking(cfg, model, samples: int = 200) -> float:
  masker = fourm_train.build_masker(cfg, model)
  rng = np.random.default_rng(0)
  raw = [synthetic_sample(model, rng) for _ in range(samples)]
  t0 = time.perf_counter()
  for s in raw:
    masker(s, rng)
  return samples / (time.perf_counter() - t0)


def time_step(cfg, steps: int):
  model = fourm_train.build_model(cfg)
  task = fourm_train.build_task(cfg)
  boxed = ts.abstract_params(task.init_params, jax.random.key(0))
  tx, schedule = optim.create_optimizer(cfg.optimizer, 10_000, nn.unbox(boxed))
  mesh = mesh_lib.create_mesh(cfg.mesh)
  state, sh = ts.create_train_state(task.init_params, tx, jax.random.key(0), mesh)
  masker = fourm_train.build_masker(cfg, model)
  rng = np.random.default_rng(0)
  rows = [masker(synthetic_sample(model, rng), rng) for _ in range(cfg.batch_size)]
  batch = jax.tree.map(lambda *x: np.stack(x), *rows)
  batch["valid"] = np.ones(cfg.batch_size, np.float32)
  step = loop.jit_train_step(task, tx, schedule, sh, mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.RULES):
    device_batch = partitioning.shard_batch(batch, mesh)
    t0 = time.perf_counter()
    compiled = step.lower(state, device_batch).compile()
    compile_s = time.perf_counter() - t0
    step_flops = loop.xla_flops(compiled, mesh.size)
    step_s, state, _ = timing.time_steps(compiled, state, device_batch, steps)
  tokens = cfg.batch_size * (cfg.model.num_encoder_tokens + cfg.model.num_decoder_tokens)
  return {"step_s": step_s, "compile_s": compile_s, "tokens_per_s": tokens / step_s,
          "samples_per_s": cfg.batch_size / step_s, "step_flops": step_flops,
          "achieved_flops": step_flops / step_s, "params": ts.count_params(state.params),
          "masking_samples_per_s": time_masking(cfg, model)}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/fourm_step.json"))
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
    r.update(config=name, batch=cfg.batch_size, fraction_of_peak=r["achieved_flops"] / peak)
    rows.append(r)
  print(f"device: {device.device_kind} x{jax.device_count()} ({device.platform}); "
        f"peak {peak / 1e12:.3f} TFLOP/s ({peak_note})")
  header = (f"{'config':36s} {'params':>9s} {'batch':>5s} {'step ms':>9s} {'tokens/s':>10s} "
            f"{'TFLOP/s':>8s} {'of peak':>8s} {'step samples/s':>14s} {'masking samples/s':>17s}")
  print(header)
  print("-" * len(header))
  for r in rows:
    print(f"{r['config']:36s} {r['params'] / 1e6:8.1f}M {r['batch']:5d} {1e3 * r['step_s']:9.1f} "
          f"{r['tokens_per_s']:10.0f} {r['achieved_flops'] / 1e12:8.4f} "
          f"{100 * r['fraction_of_peak']:7.1f}% {r['samples_per_s']:14.1f} "
          f"{r['masking_samples_per_s']:17.0f}")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
               "device": device.device_kind, "platform": device.platform,
               "device_count": jax.device_count(), "cpu_count": os.cpu_count(),
               "host": platform.processor() or platform.machine(), "peak_flops": peak,
               "peak_note": peak_note, "rows": rows}, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
