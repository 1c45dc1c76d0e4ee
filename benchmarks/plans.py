"""Ahead-of-time plans of the full-size runs (pretrain_jax.plan), written to benchmarks/plans.md.

  python benchmarks/plans.py [--only=aim-7B,...] [--out=benchmarks/plans.md]

Each plan compiles the full-size training step for a mesh of fake CPU devices
(one subprocess per plan, since the fake-device count is fixed when JAX starts)
under each remat policy, and searches the smallest mesh that fits. The JSON of
every plan goes to benchmarks/results/plans.json. On a 2-core CPU the whole set
takes about half an hour, almost all of it XLA compiling.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (config, devices, device kind)
PLANS = {
    "aim-0.6B": ("configs/aim/pretrain.py:variant=0.6B", 64, "h100"),
    "aim-1B": ("configs/aim/pretrain.py:variant=1B", 64, "h100"),
    "aim-3B": ("configs/aim/pretrain.py:variant=3B", 256, "tpu-v5p"),
    "aim-7B": ("configs/aim/pretrain.py:variant=7B", 256, "tpu-v5p"),
    "4m-B": ("configs/fourm/pretrain.py:variant=4m7_B", 64, "h100"),
    "4m-L": ("configs/fourm/pretrain.py:variant=4m7_L", 64, "h100"),
    "4m-XL": ("configs/fourm/pretrain.py:variant=4m7_XL", 128, "tpu-v5p"),
    "4m21-XL": ("configs/fourm/pretrain.py:variant=4m21_XL", 128, "tpu-v5p"),
}

HEADER = """# Ahead-of-time plans of the full-size runs

Written by `python benchmarks/plans.py` on {date} ({machine}); each section is the
output of `python -m pretrain_jax.plan --config=CONFIG --devices=N --device_kind=KIND`.

How to read them:
- Per-device bytes. params, opt state (Adam's two moments) and batch are exact:
  each array's shard on the planned mesh. grads are one sharded copy of the params.
  activations are XLA's temporary allocation minus the grads, and peak is
  arguments + outputs − donated aliases + temp, from XLA's memory analysis.
- The compiler is the CPU's, run with its memory-minimising scheduler. TPU and
  GPU compilers fuse, schedule and overlap collectives differently. On the CPU,
  FSDP-gathered weights and bf16 copies of the weights stay alive longer than a
  latency-hiding scheduler keeps them. So read the activations as an upper
  estimate, and keep the headroom.
- Step times assume the stated MFU of the device's bf16 spec-sheet peak, for the
  model FLOPs (analytic for AIM; XLA's count with remat none for 4M). Remat's
  recomputation is extra work on top of those FLOPs: see XLA FLOPs/step.
- "Smallest mesh that fits" is at the config's global batch, over fsdp × tensor
  meshes (data = 1). Candidates are ranked by an estimate scaled from the
  compiled plan, and the first candidate that fits is compiled to confirm it.
"""


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--only", default="", help="comma-separated plan names (default: all)")
  ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "plans.md"))
  ap.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "plans.json"))
  args = ap.parse_args()
  names = [n for n in args.only.split(",") if n] or list(PLANS)
  unknown = sorted(set(names) - set(PLANS))
  if unknown:
    sys.exit(f"unknown plans {unknown}; known: {list(PLANS)}")
  sections, results = [], {}
  for name in names:
    config, devices, kind = PLANS[name]
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(tmp, "plan.json")
      cmd = [sys.executable, "-m", "pretrain_jax.plan", f"--config={config}",
             f"--devices={devices}", f"--device_kind={kind}", f"--json={out}"]
      t0 = time.perf_counter()
      proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
      wall = time.perf_counter() - t0
      if proc.returncode:
        sys.exit(f"{name}: the planner failed:\n{proc.stderr[-3000:]}")
      with open(out) as f:
        results[name] = {**json.load(f), "wall_s": wall}
    table = proc.stdout.strip()
    sections.append(f"{table}\n\nPlanned in {wall:.0f} s.\n")
    print(table, f"\n(planned in {wall:.0f} s)\n", flush=True)
  header = HEADER.format(date=datetime.date.today().isoformat(),
                         machine=f"{platform.machine()}, {os.cpu_count()} cores")
  with open(args.out, "w") as f:
    f.write(header + "\n" + "\n".join(sections))
  os.makedirs(os.path.dirname(args.json), exist_ok=True)
  with open(args.json, "w") as f:
    json.dump(results, f, indent=1)
  print(f"wrote {args.out} and {args.json}")


if __name__ == "__main__":
  main()
