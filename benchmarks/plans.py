"""Ahead-of-time plans of the full-size runs (pretrain_jax.plan), written to markdown.

  python benchmarks/plans.py [--only=aim-7B,...] [--rerun]      # TPU compiler (default)
  python benchmarks/plans.py --compiler=cpu [--only=...]        # CPU compiler

TPU (needs `pip install -e ".[tpu]"`, no TPU): each model's full-size step is compiled by
libtpu for the TPU topologies listed in TPU_PLANS (the smallest v5p and v4 slices that
fit, and the next smaller one, which does not), with block remat and scanned layers, one
subprocess per plan. Results are kept in benchmarks/results/plans_tpu.json with the commit
they were compiled at; a plan already there is not compiled again unless --rerun.
benchmarks/plans.md is then written from that JSON alone (--render_only: without
compiling). Each compile takes 2-7 minutes on a 2-core machine.

CPU: each plan compiles the step for a mesh of fake CPU devices under each remat policy
and searches the smallest mesh that fits (an upper bound on memory: the CPU compiler
schedules differently); written to benchmarks/plans_cpu.md and
benchmarks/results/plans.json, about half an hour in all.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

AIM = "configs/aim/pretrain.py:variant="
FOURM = "configs/fourm/pretrain.py:variant="
# model: (config, the topologies to compile). Chips: v5p:2x2x1 = 4 (v5p-8, the smallest
# v5p slice), 2x2x2 = 8, 2x2x4 = 16, 4x4x2 = 32, 4x4x4 = 64; v4 likewise (v4-8 = 4 chips).
TPU_PLANS = {  # the slice expected to be the smallest that fits first, then smaller ones
    "aim-0.6B": (AIM + "0.6B", ["v5p:2x2x2", "v5p:2x2x1", "v4:2x2x4", "v4:2x2x2"]),
    "aim-1B": (AIM + "1B", ["v5p:2x2x2", "v5p:2x2x1", "v4:2x4x4", "v4:2x2x4", "v4:2x2x2"]),
    "aim-3B": (AIM + "3B", ["v5p:2x2x4", "v5p:2x2x2", "v5p:2x2x1", "v4:2x4x4", "v4:2x2x4"]),
    "aim-7B": (AIM + "7B", ["v5p:2x2x4", "v5p:2x2x2", "v4:4x4x4", "v4:2x4x4"]),
    "4m7-B": (FOURM + "4m7_B", ["v5p:2x2x1", "v4:2x2x4", "v4:2x2x2", "v4:2x2x1"]),
    "4m7-L": (FOURM + "4m7_L", ["v5p:2x2x2", "v5p:2x2x1", "v4:2x2x4", "v4:2x2x2"]),
    "4m7-XL": (FOURM + "4m7_XL", ["v5p:2x2x4", "v5p:2x2x2", "v4:2x4x4", "v4:2x2x4"]),
    "4m21-B": (FOURM + "4m21_B", ["v5p:2x2x2", "v5p:2x2x1", "v4:2x4x4", "v4:2x2x4"]),
    "4m21-L": (FOURM + "4m21_L", ["v5p:2x2x4", "v5p:2x2x2", "v4:2x4x4", "v4:2x2x4"]),
    "4m21-XL": (FOURM + "4m21_XL", ["v5p:4x4x4", "v5p:4x4x2", "v4:4x4x8", "v4:4x4x4",
                                    "v5p:2x2x4"]),
}

# CPU compiler: name: (config, devices, device kind)
CPU_PLANS = {
    "aim-0.6B": ("configs/aim/pretrain.py:variant=0.6B", 64, "h100"),
    "aim-1B": ("configs/aim/pretrain.py:variant=1B", 64, "h100"),
    "aim-3B": ("configs/aim/pretrain.py:variant=3B", 256, "tpu-v5p"),
    "aim-7B": ("configs/aim/pretrain.py:variant=7B", 256, "tpu-v5p"),
    "4m-B": ("configs/fourm/pretrain.py:variant=4m7_B", 64, "h100"),
    "4m-L": ("configs/fourm/pretrain.py:variant=4m7_L", 64, "h100"),
    "4m-XL": ("configs/fourm/pretrain.py:variant=4m7_XL", 128, "tpu-v5p"),
    "4m21-XL": ("configs/fourm/pretrain.py:variant=4m21_XL", 128, "tpu-v5p"),
}

CPU_HEADER = """# Ahead-of-time plans of the full-size runs: CPU compiler (an upper bound)

The plans from the target's own compiler are in `plans.md`; these are kept for machines
without libtpu and for the GPU device kinds.

Written by `python benchmarks/plans.py --compiler=cpu` on {date} ({machine}); each section
is the output of `python -m pretrain_jax.plan --config=CONFIG --devices=N --device_kind=KIND`.

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


TPU_HEADER = """# Ahead-of-time plans of the full-size runs: the TPU compiler

Written by `python benchmarks/plans.py` ({machine}) from
`benchmarks/results/plans_tpu.json`. Each plan is the output of

    python -m pretrain_jax.plan --config=CONFIG --config.model.scan_layers=True \\
      --topology=T --remat=block --nosearch --json=...

compiled by the real TPU compiler (libtpu, `pip install -e ".[tpu]"`) for the
topology's compile-only devices, on a CPU machine: no TPU is needed. Per-chip
memory is the TPU compiler's memory analysis (arguments + outputs - donated
aliases + temporaries); one JAX device per chip (v4 and v5p megacore), so a
v5p-256 is 128 chips = 128 devices. Every plan is at the config's global batch
(AIM 4096 as in the paper, 4M 8192), block remat, scanned layers, fsdp over every
chip; `fits` = peak under 90% of HBM (v5p 95 GB, v4 32 GiB). Scanned layers keep the
compile time flat in depth; XLA's FLOP count of a scanned step counts the loop body
once, so read the model FLOPs (analytic), not XLA's. The plans of the CPU compiler
(an upper bound, and for GPU device kinds) are in `plans_cpu.md`.
"""


def _chips(topology: str) -> int:
  from pretrain_jax import topology as topology_lib
  return math.prod(topology_lib.parse(topology)[1])


def _commit() -> str:
  """HEAD, with '+changes' when tracked files other than this script's own outputs differ
  from it (the plan then did not compile that commit's code)."""
  git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True,
                                  check=True).stdout
  try:
    head = git("rev-parse", "--short", "HEAD").strip()
    changed = set(git("diff", "--name-only", "HEAD").split()) - {
        "benchmarks/plans.md", "benchmarks/results/plans_tpu.json"}
  except (OSError, subprocess.CalledProcessError):
    return "unknown"
  return head + ("+changes" if changed else "")


def summary(results: dict) -> str:
  """Per model and TPU generation: the smallest compiled slice that fits, and the largest
  compiled smaller one that does not."""
  from pretrain_jax import plan as plan_lib
  gib = lambda p: p["policies"]["block"]["peak"] / 2 ** 30
  rows = ["| model | parameters (all) | v5p: smallest slice that fits | v5p: does not fit | "
          "v4: smallest slice that fits | v4: does not fit |", "|---|---|---|---|---|---|"]
  for model in TPU_PLANS:
    cells, params = [], ""
    for gen in ("v5p", "v4"):
      plans = sorted(((_chips(p["topology"]), p) for key, p in results.items()
                      if key.startswith(model + " ") and p["topology"].startswith(gen + ":")),
                     key=lambda cp: cp[0])
      if plans:
        params = f"{plans[0][1]['policies']['block']['num_params'] / 1e9:.2f} B"
      fit = next((cp for cp in plans if cp[1]["policies"]["block"]["fits"]), None)
      name = lambda cp: (f"{plan_lib.slice_name(cp[1]['topology'])} ({cp[0]} chips): "
                         f"{gib(cp[1]):.1f} GiB")
      if fit is None:
        cells += ["not compiled", ""] if not plans else ["none of those compiled",
                                                         name(plans[-1])]
        continue
      smaller = [cp for cp in plans if cp[0] < fit[0]]
      cells.append(name(fit))
      cells.append(name(smaller[-1]) if smaller else
                   "(the smallest slice)" if fit[0] == 4 else "(smaller not compiled)")
    rows.append(f"| {model} | {params} | " + " | ".join(cells) + " |")
  return "\n".join(rows)


def run_tpu(args) -> None:
  from pretrain_jax import plan as plan_lib
  names = [n for n in args.only.split(",") if n] or list(TPU_PLANS)
  unknown = sorted(set(names) - set(TPU_PLANS))
  if unknown:
    sys.exit(f"unknown plans {unknown}; known: {list(TPU_PLANS)}")
  results = {}
  if os.path.exists(args.json):
    with open(args.json) as f:
      results = json.load(f)
  redo = args.rerun
  if not args.render_only:
    import importlib.util
    if importlib.util.find_spec("libtpu") is None:
      sys.exit("the TPU plans compile with libtpu, which runs on any CPU-only machine: "
               "pip install -e '.[tpu]' (or --compiler=cpu, or --render_only)")
  for name in [] if args.render_only else names:
    config, topologies = TPU_PLANS[name]
    for topology in topologies:
      key = f"{name} {topology}"
      if key in results and not redo:
        continue
      with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "plan.json")
        cmd = [sys.executable, "-m", "pretrain_jax.plan", f"--config={config}",
               "--config.model.scan_layers=True", f"--topology={topology}", "--remat=block",
               "--nosearch", f"--json={out}"]
        print(f"{key}: compiling ...", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "JAX_PLATFORMS": "cpu"})
        wall = time.perf_counter() - t0
        if proc.returncode:
          sys.exit(f"{key}: the planner failed:\n{proc.stderr[-3000:]}")
        with open(out) as f:
          results[key] = {**json.load(f), "wall_s": wall, "commit": _commit(),
                          "command": " ".join(cmd[1:-1])}
      print(proc.stdout.strip(), f"\n({key}: {wall:.0f} s)\n", flush=True)
      os.makedirs(os.path.dirname(args.json), exist_ok=True)
      with open(args.json, "w") as f:         # after every plan: an interrupted run keeps them
        json.dump(results, f, indent=1)
  order = lambda t: (t.split(":")[0] != "v5p", _chips(t))     # v5p first, then by size
  known = [f"{m} {t}" for m, (_, ts) in TPU_PLANS.items() for t in sorted(ts, key=order)]
  sections = []
  for key in known:
    if key in results:
      p = results[key]
      sections.append(plan_lib.format_plan(p, p["title"]).strip() +
                      f"\n\nCompiled at commit {p.get('commit', 'unknown')} in "
                      f"{p['policies']['block']['compile_s']:.0f} s.\n")
  missing = [k for k in known if k not in results]
  text = TPU_HEADER.format(machine=f"{platform.machine()}, {os.cpu_count()} cores")
  text += "\n## Where each model fits\n\n" + summary(results) + "\n"
  if missing:
    text += "\nNot compiled yet: " + ", ".join(missing) + ".\n"
  text += NOTES + "\n## The plans\n\n" + "\n".join(sections)
  with open(args.out, "w") as f:
    f.write(text)
  print(f"wrote {args.out} from {args.json}")


def run_cpu(args) -> None:
  names = [n for n in args.only.split(",") if n] or list(CPU_PLANS)
  unknown = sorted(set(names) - set(CPU_PLANS))
  if unknown:
    sys.exit(f"unknown plans {unknown}; known: {list(CPU_PLANS)}")
  sections, results = [], {}
  for name in names:
    config, devices, kind = CPU_PLANS[name]
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
  header = CPU_HEADER.format(date=datetime.date.today().isoformat(),
                             machine=f"{platform.machine()}, {os.cpu_count()} cores")
  with open(args.out, "w") as f:
    f.write(header + "\n" + "\n".join(sections))
  os.makedirs(os.path.dirname(args.json), exist_ok=True)
  with open(args.json, "w") as f:
    json.dump(results, f, indent=1)
  print(f"wrote {args.out} and {args.json}")


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--compiler", default="tpu", choices=["tpu", "cpu"])
  ap.add_argument("--only", default="", help="comma-separated plan names (default: all)")
  ap.add_argument("--rerun", action="store_true",
                  help="TPU: compile again the plans already in the JSON")
  ap.add_argument("--render_only", action="store_true",
                  help="TPU: write the markdown from the JSON, compiling nothing")
  ap.add_argument("--out", default="", help="default benchmarks/plans.md (tpu), "
                  "benchmarks/plans_cpu.md (cpu)")
  ap.add_argument("--json", default="", help="default benchmarks/results/plans_tpu.json (tpu), "
                  "benchmarks/results/plans.json (cpu)")
  args = ap.parse_args()
  tpu = args.compiler == "tpu"
  args.out = args.out or os.path.join(ROOT, "benchmarks", "plans.md" if tpu else "plans_cpu.md")
  args.json = args.json or os.path.join(ROOT, "benchmarks", "results",
                                        "plans_tpu.json" if tpu else "plans.json")
  (run_tpu if tpu else run_cpu)(args)


NOTES = """
## What they say against the papers' hardware

- **The fewest chips that hold a model are not the chips to train it on.** The
  table is about memory; the "step s at 40% MFU" column of each plan is about
  time. AIM-7B fits 16 v5p chips (v5p-32) at batch 4096, at 14.8 s per step at 40%
  MFU: its 1.2M steps would take about 200 days there. The README's launch example
  uses a v5p-256 (128 chips, 1.85 s per step by the same count).
- **4M (both papers on A100s of 80 GB, batch 8192):** 4M-B on 64 GPUs, 4M-L and
  4M-XL on 128 (4M, appendix); 4M-21 B on 64, L and XL on 128 (4M-21). With block
  remat every 4M model fits far fewer chips than that. 4M-7 B fits the smallest v5p
  slice (4 chips, 51 GiB each), 4M-7 XL fits 16 v5p chips, and 4M-21 XL, trained
  on 128 A100s, fits 32 v5p chips (55 GiB each; a v5p chip holds 95 GB against
  the A100's 80 GB). As far as these figures go, the papers' GPU counts were
  chosen for speed (1.5 to 11 days of training), not forced by memory.
- **AIM:** the paper does not name its hardware. At batch 4096 with block remat
  (the only policy compiled here) AIM-0.6B fits the smallest v5p slice (4 chips),
  1B and 3B fit 8 v5p chips and 7B 16; on v4 (32 GiB per chip) they need 16 to 64
  chips.
- **The CPU compiler's plans (`plans_cpu.md`) are far above these.** AIM-7B there
  needs 47.7 GiB per device on 256 devices (unrolled layers), against 54.4 GiB per
  chip on 16 chips here. 4M-21 XL there finds no mesh up to 128 devices (147 GiB
  per device). The CPU compiler keeps remat's temporaries alive; the TPU
  compiler's schedule does not. Use the CPU figures only as an upper bound.
- **The 90% line is tight.** 4M-21 B on a v4-32 needs 29.0 GiB of 32: over the
  line by 0.2 GiB, so it is listed as not fitting. A smaller per-chip batch or
  `optimizer.grad_accum_steps=2` would fit it (the plan lists what would).
"""

if __name__ == "__main__":
  main()
