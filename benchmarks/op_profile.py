"""Per-op time of one train step, ours (XLA, from a jax.profiler trace) and the official
(PyTorch, from torch.profiler), grouped the same way on both sides: by phase (forward,
backward, loss, update) and by kind (matmul or other).

Used by `benchmarks/vs_official.py --ops=PATH`. Phases, ours: from each HLO instruction's
`op_name` metadata: `transpose(jvp(...))` is the backward pass, `jvp(Model)` the forward,
`jvp()` (no module: a custom_vjp body, here fourm_jax.xent's loss with its gradient computed
in the same loop) the loss, anything else the update (clipping, AdamW, metrics). Official:
the `record_function` ranges vs_official's torch stepper opens ("forward", "backward",
"update"; the loss is part of the official forward). Kind: an XLA instruction is a matmul
when it is a dot or convolution or a fusion whose computation holds one; a torch op when it
is one of the BLAS-backed aten ops (`MATMUL_OPS`).

Units differ and the JSON says so: XLA's CPU runtime records each op on the thread that ran
it and runs independent ops concurrently, so our op times sum to more than the step's wall
time; torch records each op once on the calling thread (its intra-op threads inside). Each
side's `scaled_ms` is its op time share times its own step wall time, for a comparison in
one unit.
"""
from __future__ import annotations

import collections
import glob
import re
import tempfile
import time

import jax

PHASES = ("forward", "loss", "backward", "update")
MATMUL_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
                        "aten::addbmm", "aten::_mkldnn_matmul", "aten::mkldnn_matmul",
                        "aten::convolution_overrideable", "aten::mkldnn_convolution",
                        "aten::_convolution", "aten::convolution_backward",
                        "aten::mkldnn_convolution_backward", "aten::addmv", "aten::mv",
                        "aten::dot"})

_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) [^\n]*\{\n(.*?)^\}", re.M | re.S)
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+) ([\w\-]+)\(([^\n]*)$", re.M)


def hlo_ops(hlo_text: str) -> dict[str, dict]:
  """Optimized HLO text -> {instruction name: {'phase', 'kind', 'op_name', 'shape'}}."""
  has_dot = {}
  for m in _COMPUTATION.finditer(hlo_text):
    has_dot[m.group(1)] = bool(re.search(r" (?:dot|convolution)\(", m.group(2)))
  ops = {}
  for m in _INSTRUCTION.finditer(hlo_text):
    name, shape, opcode, rest = m.groups()
    called = re.search(r"calls=%([\w.\-]+)", rest)
    matmul = opcode in ("dot", "convolution") or bool(
        opcode == "fusion" and called and has_dot.get(called.group(1)))
    op_name = re.search(r'op_name="([^"]*)"', rest)
    op_name = op_name.group(1) if op_name else ""
    ops[name] = {"phase": phase_of(op_name), "kind": "matmul" if matmul else "other",
                 "op_name": op_name, "shape": shape}
  return ops


def phase_of(op_name: str) -> str:
  """The train-step phase of an XLA op from its op_name metadata (see the module doc)."""
  if "transpose(jvp(" in op_name:
    return "backward"
  if "jvp()" in op_name:
    return "loss"
  if "jvp(" in op_name:
    return "forward"
  return "update"


def _summary(per_op: dict[str, float], info: dict[str, dict], wall_s: float,
             top: int) -> dict:
  total = sum(per_op.values())
  groups = collections.defaultdict(float)
  for name, ms in per_op.items():
    i = info.get(name, {"phase": "update", "kind": "other"})
    groups[(i["phase"], i["kind"])] += ms
  scale = 1e3 * wall_s / total if total else 0.0
  return {
      "step_wall_s": wall_s, "op_time_ms": total,
      "by_phase_kind": {f"{p}/{k}": {"ms": groups[(p, k)], "scaled_ms": groups[(p, k)] * scale}
                        for p in PHASES for k in ("matmul", "other")},
      "top": [{"op": n, "ms": ms, **info.get(n, {})}
              for n, ms in sorted(per_op.items(), key=lambda kv: -kv[1])[:top]]}


def ours(compiled, run, top: int = 25) -> dict:
  """Profile one call of `run` (a warmed-up, no-argument call of the compiled step)."""
  from jax.profiler import ProfileData
  info = hlo_ops(compiled.as_text())
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp)
    t0 = time.perf_counter()
    run()
    wall = time.perf_counter() - t0
    jax.profiler.stop_trace()
    paths = glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)
    if not paths:
      raise RuntimeError(f"jax.profiler wrote no trace under {tmp}")
    data = ProfileData.from_file(paths[0])
  per_op = collections.defaultdict(float)
  for plane in data.planes:
    for line in plane.lines:
      if "XLA" not in line.name:
        continue
      for event in line.events:
        if event.name in info:
          per_op[event.name] += event.duration_ns / 1e6
  if not per_op:
    raise RuntimeError("the trace holds no XLA op of the compiled step")
  out = _summary(per_op, info, wall, top)
  out["units"] = ("ms: XLA op time summed over the threads that ran the ops (concurrent ops "
                  "overlap); scaled_ms: share of that total times the step's wall time")
  return out


def official(run, top: int = 25) -> dict:
  """Profile one call of vs_official's torch stepper (its phases are record_function
  ranges): self CPU time of each aten op, by the phase range it ran in."""
  import torch
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    t0 = time.perf_counter()
    run()
    wall = time.perf_counter() - t0
  events = list(prof.events())
  ranges = [(e.time_range.start, e.time_range.end, e.name) for e in events
            if e.name in PHASES]
  per_op, info = collections.defaultdict(float), {}
  for e in events:
    if e.name in PHASES or not e.name.startswith("aten::") or e.self_cpu_time_total <= 0:
      continue
    start = e.time_range.start
    phase = next((p for lo, hi, p in ranges if lo <= start <= hi), "update")
    key = f"{phase}:{e.name}"
    per_op[key] += e.self_cpu_time_total / 1e3
    info[key] = {"phase": phase, "kind": "matmul" if e.name in MATMUL_OPS else "other",
                 "op_name": e.name, "shape": ""}
  out = _summary(per_op, info, wall, top)
  out["units"] = ("ms: self CPU time of the aten ops on the calling thread (intra-op threads "
                  "inside); scaled_ms: share of that total times the step's wall time")
  return out


def print_comparison(case: str, table: dict):
  print(f"  {case}: per phase, ms scaled to each side's step ({table['ours']['step_wall_s']:.2f}"
        f" s ours, {table['official']['step_wall_s']:.2f} s official)")
  print(f"    {'phase/kind':18s} {'ours':>8s} {'official':>9s}")
  for key, row in table["ours"]["by_phase_kind"].items():
    theirs = table["official"]["by_phase_kind"][key]["scaled_ms"]
    if row["scaled_ms"] or theirs:
      print(f"    {key:18s} {row['scaled_ms']:8.0f} {theirs:9.0f}")
