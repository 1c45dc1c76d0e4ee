"""Throughput of the pseudo-labelling pipeline's parts on this machine.

  python benchmarks/pseudo_label.py [--resolution=224] [--num=64] [--out=...]

Measures samples/s of scene rendering (one process, and the 2-process
make_scenes writer for a 10k-scene estimate) and of each computed labeller on
rendered scenes (one process, batches of 32), then of the whole pipeline.
Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fourm_jax import labellers, pseudo_label  # noqa: E402
from pretrain_jax.data import make_scenes, scenes  # noqa: E402

COMPUTED = ("canny_edges", "sam_edges", "color_palette", "image_metadata", "semantic_metadata",
            "geometric_metadata", "caption_length")


def _timed(fn, repeat: int = 1) -> float:
  best = float("inf")
  for _ in range(repeat):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return best


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--resolution", type=int, default=224)
  parser.add_argument("--num", type=int, default=64, help="scenes per measurement")
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/pseudo_label.json"))
  args = parser.parse_args()
  logging.getLogger().setLevel(logging.WARNING)
  r, n = args.resolution, args.num
  rows = []

  samples = []
  t = _timed(lambda: samples.extend(scenes.render_scene(0, i, r) for i in range(n)))
  rows.append(("render_scene, 1 process", n / t))
  with tempfile.TemporaryDirectory() as tmp:
    m = 4 * n
    t = _timed(lambda: make_scenes.write_scenes(tmp, m, resolution=r, shards=4, workers=2))
    rows.append(("make_scenes (render + encode + write), 2 processes", m / t))
  ten_k_minutes = 10_000 / rows[-1][1] / 60

  batch = {"image": [s["rgb"] for s in samples], "original_size": [(r, r)] * n,
           **{k: [s[k] for s in samples] for k in pseudo_label.EXACT_FIELDS}}
  # model labellers are timed with random weights (the speed does not depend on them)
  random = {"aim_features": {"init_from": "random:tiny"}}
  for name in COMPUTED:
    lab = labellers.create(name, r, **random.get(name, {}))
    def run(lab=lab):
      for start in range(0, n, 32):
        lab({k: batch[k][start:start + 32] for k in lab.requires})
    rows.append((f"labeller {name}", n / _timed(run, repeat=2)))

  from ml_collections import config_flags  # noqa: F401  (config module import below)
  import importlib.util
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, "configs/fourm/pseudo_label.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config("scenes")
  cfg.resolution, cfg.shards = r, 4
  cfg.labeller_options.aim_features.init_from = "random:tiny"
  with tempfile.TemporaryDirectory() as tmp:
    t = _timed(lambda: pseudo_label.pseudo_label(cfg, f"scenes:{n}", tmp))
  rows.append(("pipeline, scenes, all computed labellers, 1 process", n / t))
  cfg.workers = 2
  with tempfile.TemporaryDirectory() as tmp:
    t = _timed(lambda: pseudo_label.pseudo_label(cfg, f"scenes:{4 * n}", tmp))
  rows.append(("pipeline, scenes, all computed labellers, 2 processes", 4 * n / t))

  print(f"{'what (' + str(r) + ' px)':58s} {'samples/s':>10s}")
  for name, rate in rows:
    print(f"{name:58s} {rate:10.1f}")
  print(f"10k scenes with make_scenes on 2 processes: {ten_k_minutes:.1f} min")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "resolution": r, "samples": n,
               "rows": [{"what": w, "samples_per_s": round(v, 2)} for w, v in rows],
               "make_scenes_10k_minutes": round(ten_k_minutes, 2)}, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
