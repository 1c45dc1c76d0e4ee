"""4M decoding throughput: MaskGIT (8 and 25 steps), ROAR and caption decoding.

  python benchmarks/fourm_generate.py [--repeats=3] [--out=benchmarks/results/fourm_generate.json]

Models with random weights (speed does not depend on them): 'tiny'
(configs/fourm/pretrain.py:variant=tiny: 4 x 4 token grids, 32-token
captions, batch 16) and a B-width model of reduced depth (dim 768, 12
heads, 2 encoder + 2 decoder blocks) over the 4M-7 modalities at 224 px
(14 x 14 grids, 256-token captions), batch 4. Each run conditions on RGB
pixels and decodes depth tokens (MaskGIT 8 / 25 steps, ROAR 8 steps, and
MaskGIT 8 steps with classifier-free guidance) or a caption (left to right
with the key/value cache, to the full length). Prints images (or captions)
per second after the first call, and the number of compilations
(`Sampler.traces`), which must not grow on repeated calls.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fourm_jax import sampler as sampler_lib, schedules  # noqa: E402
from fourm_jax import train as fourm_train  # noqa: E402
from pretrain_jax import cli  # noqa: E402


def load_config(variant: str):
  return cli.config_from_file(f"{ROOT}/configs/fourm/pretrain.py", f"variant={variant}")


def models():
  tiny = load_config("tiny")
  mid = load_config("4m7_B")
  mid.model.encoder_depth = mid.model.decoder_depth = 2
  for c in (tiny, mid):
    c.model.remat = "none"
    c.model.dtype = "bfloat16" if jax.devices()[0].platform != "cpu" else "float32"
  return {"tiny": (tiny, 16), "B width, 2+2 blocks, 4M-7 @224": (mid, 4)}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/fourm_generate.json"))
  args = parser.parse_args()
  rows = []
  for name, (cfg, batch) in models().items():
    model = fourm_train.build_model(cfg)
    sampler = sampler_lib.Sampler(model, None)
    pixels = next(m for m in model.inputs if m.kind == "pixels")
    depth = next(m.name for m in model.targets if m.name.startswith("tok_depth"))
    size = pixels.grid[0] * pixels.patch_size
    images = np.random.default_rng(0).normal(size=(batch, size, size, 3)).astype(np.float32)
    state = sampler.init_state(batch, {pixels.name: {"tensor": images}})
    dummy = fourm_train.dummy_batch(model, batch)
    sampler.params = jax.jit(lambda r: model.init(r, dummy, 8, 8))(jax.random.key(0))["params"]
    n = sampler.modalities[depth].num_tokens
    cases = {
        "maskgit 8 steps": schedules.chained([depth], [n], ["maskgit"], [8]),
        "maskgit 25 steps": schedules.chained([depth], [n], ["maskgit"], [25]),
        "roar 8 steps": schedules.chained([depth], [n], ["roar"], [8]),
        "maskgit 8 steps, guidance 3": schedules.chained([depth], [n], ["maskgit"], [8],
                                                         guidance=[3.0]),
        "caption, left to right": [schedules.Step("caption", "autoregressive",
                                                  sampler.modalities["caption"].length)],
    }
    for case, plan in cases.items():
      t0 = time.perf_counter()
      out = sampler.generate(state, plan, jax.random.key(1))
      jax.block_until_ready(out)
      first_s = time.perf_counter() - t0
      traces = sampler.traces
      times = []
      for r in range(args.repeats):
        t0 = time.perf_counter()
        out = sampler.generate(state, plan, jax.random.key(2 + r))
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
      s = float(np.median(times))
      rows.append({"model": name, "case": case, "batch": batch, "steps": len(plan),
                   "first_call_s": first_s, "seconds": s, "per_s": batch / s,
                   "compilations_total": sampler.traces,
                   "recompiled_on_repeat": sampler.traces != traces})
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({device.platform})")
  header = (f"{'model':34s} {'case':30s} {'batch':>5s} {'steps':>5s} {'first s':>8s} "
            f"{'s/call':>8s} {'items/s':>9s} {'compiles':>8s}")
  print(header)
  print("-" * len(header))
  for r in rows:
    print(f"{r['model']:34s} {r['case']:30s} {r['batch']:5d} {r['steps']:5d} "
          f"{r['first_call_s']:8.2f} {r['seconds']:8.3f} {r['per_s']:9.2f} "
          f"{r['compilations_total']:8d}{'  RECOMPILED' if r['recompiled_on_repeat'] else ''}")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
               "device": device.device_kind, "platform": device.platform,
               "cpu_count": os.cpu_count(), "rows": rows}, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
