"""Ahead-of-time plan of a training run: per-device memory, FLOPs, step time, mesh that fits.

  pip install -e ".[tpu]"          # libtpu: the TPU compiler, on any CPU-only machine
  python -m pretrain_jax.plan --config=configs/aim/pretrain.py:variant=7B --topology=v5p:4x4x8

  python -m pretrain_jax.plan --config=configs/aim/pretrain.py:variant=7B \\
      --devices=128 --device_kind=tpu-v5p          # the CPU compiler: an upper bound

With `--topology` (any TPU topology name jax accepts: v4:2x2x4, v5e:4x4, v5p:4x4x8,
v6e:16x16, ...) the full-size train step is compiled by the TPU compiler for that
slice's chips (`jax.experimental.topologies`: abstract devices, no TPU needed), and
the memory figures are the TPU compiler's. Names are kept apart: a v5p-256 is the
topology v5p:4x4x8, 128 chips, 128 JAX devices (one per chip), 32 hosts. Without
`--topology` the step is compiled for `--devices` fake CPU devices
(`--xla_force_host_platform_device_count`), labelled "CPU compiler: an upper bound,
not the target's figure". Either way the state is abstract (ShapeDtypeStructs
carrying shardings), so no parameter is ever allocated. For each remat policy the
plan prints, per device:

  params, opt state, batch   exact: the bytes of each array's shard
  gradients                  one sharded copy of the params (inside XLA's temp)
  activations + workspace    XLA's temp allocation minus the gradients
  peak                       arguments + outputs - donated aliases + temp

and the step's FLOPs (the task's analytic model FLOPs, and XLA's count, which
includes rematerialised recomputation), the step time at `--mfu` of the
device kind's bf16 peak, and the smallest mesh that fits `--headroom` of the
device's memory. On a topology the candidates use all its chips (data x fsdp x
tensor = chips), smallest fsdp x tensor group first (the least model parallelism,
as MaxText starts); on fake CPU devices they are fsdp x tensor meshes of fewer
devices (data = 1), fewest first. Candidates are ranked by an estimate scaled from
the compiled plan (exact state bytes, the activations in proportion to the
per-device batch) and the first that fits is compiled to confirm it. When nothing
fits, the plan says what would: more chips, a smaller batch, another remat policy,
or gradient accumulation (`optimizer.grad_accum_steps`, which the compiled step
uses). Progress (which mesh and policy is compiling) goes to stderr.

The CPU compiler fuses, schedules and overlaps collectives differently from the TPU
and GPU compilers (its temporaries barely shrink under remat), so its figures are
upper bounds; keep the headroom (default 10%) for GPU targets, planned that way.
`--measure` also runs the step on the planned (fake CPU) devices and reports the
memory it really used: the growth of the process's peak resident memory, shared
over the fake devices. From Python, `measure(config, task, mesh)` on a GPU/TPU
host reads the allocator's peak instead. Callers from Python that compile on
the CPU should start JAX with `CPU_FLAGS` in XLA_FLAGS, as the command line does.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
import os
import sys
import time

from absl import flags

from pretrain_jax import registry

_DEVICES = flags.DEFINE_integer("devices", 8, "Number of devices (chips) to plan for, as fake "
                                "CPU devices; ignored with --topology.")
_TOPOLOGY = flags.DEFINE_string("topology", "", "A TPU topology (v4:2x2x4, v5e:4x4, v5p:4x4x8, "
                                "v6e:16x16, ...): compile with the TPU compiler for its chips "
                                "(needs libtpu: pip install -e '.[tpu]').")
_KIND = flags.DEFINE_string("device_kind", "tpu-v5p",
                            "Accelerator to plan for: " + ", ".join(
                                ["tpu-v4", "tpu-v5e", "tpu-v5p", "tpu-v6e", "a100-40gb",
                                 "a100-80gb", "h100", "h200", "cpu"]))
_MFU = flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation assumed for the step time.")
_HEADROOM = flags.DEFINE_float("headroom", 0.9, "Share of device memory a plan may use.")
_REMAT = flags.DEFINE_list("remat", ["none", "block", "dots"], "Remat policies to plan.")
_MESH = flags.DEFINE_string("mesh", "", "data,fsdp,tensor of the planned mesh (-1 fills); "
                            "default: the config's mesh.")
_SEARCH = flags.DEFINE_bool("search", True, "Also find the smallest mesh that fits.")
_MAX_TENSOR = flags.DEFINE_integer("max_tensor", 8, "Largest tensor-parallel degree tried.")
_TASK = flags.DEFINE_string("task", "", "A registered task (entry point group pretrain_jax.tasks: "
                            "aim, fourm, ...) or a module with build_task(config); default: the "
                            "config's directory (configs/<task>/).")
_JSON = flags.DEFINE_string("json", "", "Write the plan here as JSON.")
_MEASURE = flags.DEFINE_integer("measure", 0, "Also run this many real steps on the planned "
                                "mesh and report the memory used (tiny configs).")

GiB = 2 ** 30

# name: (memory per device in bytes, key of flops.PEAK_BF16; None: measured on this machine)
DEVICE_KINDS = {
    "tpu-v4": (32 * GiB, "tpu v4"), "tpu-v5e": (16 * GiB, "tpu v5e"),
    "tpu-v5p": (95 * 10 ** 9, "tpu v5p"), "tpu-v6e": (32 * GiB, "tpu v6e"),
    "a100-40gb": (40 * GiB, "a100"), "a100-80gb": (80 * GiB, "a100"),
    "h100": (80 * GiB, "h100"), "h200": (141 * 10 ** 9, "h200"), "cpu": (24 * GiB, None),
}
# The CPU compiler's default scheduler orders for concurrency and ignores rematerialisation's
# memory saving (remat 'block' planned as much memory as 'none'); its memory-minimising
# scheduler is closer to what the TPU/GPU schedulers do.
CPU_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)


TPU_KINDS = {"v4": "tpu-v4", "v5e": "tpu-v5e", "v5p": "tpu-v5p", "v6e": "tpu-v6e"}


def tpu_devices(name: str) -> list:
  """The chips of TPU topology `name` as libtpu's compile-only devices (one per chip,
  carrying coordinates and host ids). Raises ValueError saying how to get libtpu."""
  import importlib.util
  from pretrain_jax import topology
  gen, _ = topology.parse(name)
  if importlib.util.find_spec("libtpu") is None:
    raise ValueError("--topology compiles with the TPU compiler (libtpu), which runs on any "
                     "CPU-only machine: pip install -e '.[tpu]'")
  from jax.experimental import topologies
  kwargs = {"chip_config_name": "megacore"} if gen in ("v4", "v5p") else {}
  return list(topologies.get_topology_desc(platform="tpu", topology_name=name, **kwargs).devices)


def slice_name(name: str) -> str:
  """'v5p:4x4x8' -> 'v5p-256': Cloud TPU's accelerator type (v4 and v5p count TensorCores,
  two per chip; v5e and v6e count chips)."""
  from pretrain_jax import topology
  gen, shape = topology.parse(name)
  chips = math.prod(shape)
  return {"v4": f"v4-{2 * chips}", "v5p": f"v5p-{2 * chips}", "v5e": f"v5litepod-{chips}",
          "v6e": f"v6e-{chips}"}[gen]


def device_kind(name: str) -> tuple[float, float]:
  """(memory bytes, peak bf16 FLOP/s) of one device of kind `name` (see DEVICE_KINDS)."""
  from pretrain_jax import flops as flops_lib
  if name not in DEVICE_KINDS:
    raise ValueError(f"--device_kind must be one of {sorted(DEVICE_KINDS)}, got {name!r}")
  memory, key = DEVICE_KINDS[name]
  peak = flops_lib.PEAK_BF16[key] if key else flops_lib.measured_matmul_peak()
  return float(memory), float(peak)


def task_module(config_path: str, task: str = ""):
  """The training module (with build_task(config)) of a config file: the task registered
  (pretrain_jax.registry, group pretrain_jax.tasks) under `task`, or under the name of the
  config's directory (configs/<task>/...); `task` may also be a module path."""
  known = registry.names(registry.TASKS)
  if not task:
    parent = os.path.basename(os.path.dirname(os.path.abspath(config_path.split(":")[0])))
    if parent not in known:
      raise ValueError(f"cannot tell the task of {config_path!r} from its directory; pass "
                       f"--task ({' | '.join(known)} | a module with build_task)")
    task = parent
  if task in known or "." not in task:
    return registry.load(registry.TASKS, task, "--task")
  return importlib.import_module(task)


@dataclasses.dataclass
class Compiled:
  """What one compilation of the train step says, per device (bytes) and per step."""
  mesh: tuple[int, int, int]
  per_device_batch: float
  num_params: int
  params: int
  opt_state: int
  batch: int
  gradients: int
  temp: int
  peak: int
  xla_flops: float
  lower_s: float
  compile_s: float
  refused: str = ""     # the compiler's out-of-memory message: it would not compile the step

  @property
  def activations(self) -> int:
    return max(self.temp - self.gradients, 0)


def _shard_bytes(tree) -> int:
  import jax
  import numpy as np
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def abstract_step(config, task, mesh):
  """(jitted step, abstract state, abstract batch, optimizer), carrying `mesh` shardings."""
  import flax.linen as nn
  import jax
  from pretrain_jax import loop, optim, partitioning, train_state as ts
  if task.batch_spec is None:
    raise ValueError("the task gives no batch_spec (batch shapes) to plan with")
  rng = jax.random.key(config.seed)
  boxed = ts.abstract_params(task.init_params, jax.random.split(rng)[0])
  tx, schedule = optim.create_optimizer(config.optimizer, config.total_steps, nn.unbox(boxed),
                                        task.num_layers, task.layer_id)
  state, shardings = ts.abstract_train_state(task.init_params, tx, rng, mesh,
                                             partitioning.RULES, task.init_extra)
  bsh = partitioning.batch_sharding(mesh)
  batch = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=bsh),
                       task.batch_spec(config.batch_size))
  accum = int(config.optimizer.get("grad_accum_steps", 1))
  return (loop.jit_train_step(task, tx, schedule, shardings, mesh, grad_accum_steps=accum),
          state, batch, tx)


def compile_step(config, task, mesh) -> Compiled:
  """Lowers and compiles the train step for `mesh` with abstract inputs."""
  import flax.linen as nn
  import jax
  from pretrain_jax import loop, partitioning
  jitted, state, batch, _ = abstract_step(config, task, mesh)
  degrees = "x".join(str(mesh.shape[a]) for a in ("data", "fsdp", "tensor"))
  compiler = "TPU" if mesh.devices.flat[0].platform == "tpu" else "CPU"
  progress(f"compiling: remat {config.model.get('remat', 'none')}, mesh {degrees} "
           f"({mesh.size} devices), {compiler} compiler ...")
  with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.RULES):
    t0 = time.perf_counter()
    lowered = jitted.lower(state, batch)
    t1 = time.perf_counter()
    try:
      compiled, refused = lowered.compile(), ""
    except jax.errors.JaxRuntimeError as e:
      refused, temp = _out_of_memory(str(e))
      if not refused:
        raise
    t2 = time.perf_counter()
  params, opt_state, batch_bytes = (_shard_bytes(state.params), _shard_bytes(state.opt_state),
                                    _shard_bytes(batch))
  if refused:   # the TPU compiler refuses a step whose temporaries exceed the chip's HBM
    peak, flops = params + opt_state + batch_bytes + temp, 0.0
    progress(f"  refused after {t2 - t0:.0f} s: {refused}")
  else:
    mem = compiled.memory_analysis()
    temp = mem.temp_size_in_bytes
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
            + temp)
    flops = loop.xla_flops(compiled, mesh.size)
    progress(f"  compiled in {t2 - t0:.0f} s: peak {peak / GiB:.2f} GiB per device")
  return Compiled(
      mesh=tuple(mesh.shape[a] for a in ("data", "fsdp", "tensor")),
      per_device_batch=config.batch_size / partitioning.data_parallel_size(mesh),
      num_params=sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)),
      params=params, opt_state=opt_state, batch=batch_bytes,
      gradients=params, temp=int(temp), peak=int(peak),
      xla_flops=flops, lower_s=t1 - t0, compile_s=t2 - t1, refused=refused)


def _out_of_memory(message: str) -> tuple[str, int]:
  """(the compiler's out-of-memory sentence, its temporaries in bytes) from a compile error,
  or ('', 0) when the error is something else. The TPU compiler says e.g. 'Ran out of memory
  in memory space hbm ... the total memory required for HLO temporaries (35.15G) exceeds
  available HBM (30.75G)' (G: GiB, as XLA prints byte counts)."""
  import re
  found = re.search(r"HLO temporaries \(([\d.]+)([KMGT]?)\)", message)
  if "RESOURCE_EXHAUSTED" not in message or not found:
    return "", 0
  scale = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}[found.group(2)]
  line = next((x for x in message.splitlines() if "HLO temporaries" in x), message)
  return line.strip()[:300], int(float(found.group(1)) * scale)


def progress(message: str) -> None:
  """A progress line on stderr (the plan itself goes to stdout)."""
  print(f"[plan] {message}", file=sys.stderr, flush=True)


def _mesh(devices, degrees):
  from pretrain_jax import mesh as mesh_lib
  cfg = dict(zip(("data", "fsdp", "tensor"), degrees))
  return mesh_lib.create_mesh(cfg, devices[:math.prod(degrees)])


def candidates(n_max: int, batch: int, max_tensor: int):
  """(data, fsdp, tensor) meshes to try, smallest device count first: fsdp x tensor with
  power-of-two sizes up to n_max (and n_max itself), fsdp dividing the global batch."""
  sizes = sorted({2 ** i for i in range(int(math.log2(n_max)) + 1)} | {n_max})
  out = []
  for n in sizes:
    for t in (1, 2, 4, 8, 16):
      if t <= max_tensor and n % t == 0 and batch % (n // t) == 0:
        out.append((1, n // t, t))
  return out


def candidates_on(n: int, batch: int, max_tensor: int):
  """(data, fsdp, tensor) meshes of all `n` chips of a slice, the smallest fsdp x tensor group
  first (then the smaller tensor degree); data x fsdp must divide the global batch."""
  out = []
  for t in (1, 2, 4, 8, 16):
    if t > max_tensor or n % t:
      continue
    for f in sorted({2 ** i for i in range(int(math.log2(n // t)) + 1)} | {n // t}):
      if (n // t) % f == 0 and batch % (n // t) == 0:
        out.append((n // (t * f), f, t))
  return sorted(out, key=lambda m: (m[1] * m[2], m[2]))


def estimate(base: Compiled, state_bytes: int, params: int, degrees) -> int:
  """Peak bytes per device on the mesh `degrees`: its exact state and gradient bytes, plus the
  base plan's activations in proportion to the per-device batch and inversely to the tensor
  degree (the residual stream is not split by tensor parallelism, so with tensor > 1 the
  estimate errs low; the confirming compile catches that)."""
  d, f, t = degrees
  scale = (base.mesh[0] * base.mesh[1]) / (d * f) * base.mesh[2] / t
  return int(state_bytes + params + base.activations * scale)


def state_bytes_on(config, task, mesh) -> tuple[int, int]:
  """(params + opt state + batch, params) bytes per device on `mesh`; raises ValueError if
  a dimension does not divide over the mesh."""
  _, state, batch, _ = abstract_step(config, task, mesh)
  params = _shard_bytes(state.params)
  return params + _shard_bytes(state.opt_state) + _shard_bytes(batch), params


def smallest_fit(config, task, devices, base: Compiled, capacity: float, max_tensor: int,
                 max_compiles: int = 3, all_devices: bool = False):
  """The first candidate mesh whose compiled peak fits `capacity`: fewest devices first, or
  with all_devices (a TPU slice) the smallest fsdp x tensor group over all of them.

  Returns (Compiled or None, tried, exhausted): tried lists (mesh, estimated bytes, compiled
  bytes) of the candidates compiled; exhausted is True when the search stopped at
  `max_compiles` confirming compiles (None then means 'not found', not 'does not fit').
  """
  tried = []
  compiles = 0
  pick = candidates_on if all_devices else candidates
  for degrees in pick(len(devices), config.batch_size, max_tensor):
    mesh = _mesh(devices, degrees)
    try:
      state, params = state_bytes_on(config, task, mesh)
    except ValueError:     # a dimension that does not divide over this mesh
      continue
    est = estimate(base, state, params, degrees)
    if est > capacity:
      continue
    if degrees == base.mesh:
      result = base
    else:
      if compiles == max_compiles:
        return None, tried, True
      compiles += 1
      result = compile_step(config, task, mesh)
    tried.append((degrees, est, result.peak))
    if result.peak <= capacity:
      return result, tried, False
  return None, tried, False


def for_cpu(config, remat: str):
  """A copy of `config` with `model.remat = remat`, compiled with XLA's attention (cuDNN's
  flash attention cannot compile for the CPU; it would need less activation memory)."""
  cfg = config.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.model.remat = remat
    if cfg.model.get("attention_impl"):
      cfg.model.attention_impl = ""
  return cfg


def plan(config, task_for, devices, kind: str, mfu: float, headroom: float, remats,
         mesh_degrees=None, search: bool = True, max_tensor: int = 8,
         topology: str = "") -> dict:
  """The plan as a dict (see the module docstring). task_for: config -> Task. devices: fake
  CPU devices, or with `topology` the slice's TPU devices (compiled by the TPU compiler)."""
  from pretrain_jax import mesh as mesh_lib
  if not remats:
    raise ValueError("--remat names no policy")
  memory, peak_flops = device_kind(kind)
  capacity = headroom * memory
  axes = ("data", "fsdp", "tensor")
  if mesh_degrees:
    ici, _ = mesh_lib.mesh_shapes(dict(zip(axes, mesh_degrees)), len(devices))
  else:   # the config's mesh; its DCN degrees (slices, hosts) fold into the same axes
    dcn = [int(config.mesh.get(f"dcn_{a}", 1)) for a in axes]
    if len(devices) % math.prod(dcn):
      raise ValueError(f"--devices={len(devices)} does not split into the config's "
                       f"mesh.dcn_* degrees {dcn}")
    per_slice, _ = mesh_lib.mesh_shapes({a: config.mesh[a] for a in axes},
                                        len(devices) // math.prod(dcn))
    ici = tuple(i * d for i, d in zip(per_slice, dcn))
  tpu = bool(topology)
  out = {"compiler": "tpu" if tpu else "cpu",
         "compiler_note": ("the TPU compiler's memory analysis for the target's chips" if tpu
                           else "CPU compiler: an upper bound, not the target's figure"),
         "topology": topology or None, "accelerator": slice_name(topology) if tpu else None,
         "devices": len(devices), "chips": len(devices),
         "hosts": len({d.process_index for d in devices}) if tpu else None,
         "device_kind": kind, "memory_per_device": memory,
         "peak_flops_per_device": peak_flops, "mfu": mfu, "headroom": headroom,
         "batch_size": config.batch_size,
         "grad_accum_steps": int(config.optimizer.get("grad_accum_steps", 1)),
         "mesh": list(ici), "policies": {}}
  for remat in remats:
    cfg = for_cpu(config, remat)
    task = task_for(cfg)
    base = compile_step(cfg, task, _mesh(devices, ici))
    model_flops = task.flops_per_step
    row = {**dataclasses.asdict(base), "bytes_per_device": base.peak,
           "activations": base.activations, "fits": base.peak <= capacity,
           "model_flops": model_flops}
    out["policies"][remat] = row
    if search:
      best, tried, exhausted = smallest_fit(cfg, task, devices, base, capacity, max_tensor,
                                            all_devices=tpu)
      row["tried"] = [{"mesh": list(m), "estimate": e, "compiled_peak": p} for m, e, p in tried]
      row["search_exhausted"] = exhausted
      row["smallest"] = None if best is None else {
          "mesh": list(best.mesh), "devices": math.prod(best.mesh), "peak": best.peak}
  name = "none" if "none" in out["policies"] else next(iter(out["policies"]))
  ref = out["policies"][name]
  flops = ref["model_flops"] or ref["xla_flops"]   # model FLOPs: no recomputation counted
  out["model_flops"] = flops
  out["model_flops_source"] = ("analytic" if ref["model_flops"] else f"XLA, remat {name}" + (
      "" if name == "none" else ", which counts the recomputation: add 'none' to --remat"))
  for row in out["policies"].values():
    row["step_s_at_mfu"] = flops / (mfu * peak_flops * len(devices))
    if row.get("smallest"):
      row["smallest"]["step_s_at_mfu"] = flops / (mfu * peak_flops * row["smallest"]["devices"])
  out["suggestions"] = suggestions(out, capacity)
  return out


def suggestions(p: dict, capacity: float) -> list[str]:
  """What would fit when no planned policy does, estimated from the leanest plan: gradient
  accumulation or a smaller batch (activations scale with the micro-batch), more chips
  (everything shards over fsdp), another remat policy."""
  rows = p["policies"]
  if any(r["fits"] or r.get("smallest") for r in rows.values()):
    return []
  name, r = min(rows.items(), key=lambda kv: kv[1]["peak"])
  state = r["params"] + r["opt_state"] + r["batch"] + r["gradients"]
  act, batch, dp = r["activations"], p["batch_size"], r["mesh"][0] * r["mesh"][1]
  gib = lambda x: f"{x / GiB:.1f} GiB"
  out = []
  if state < capacity:
    k = next((k for k in (2, 4, 8, 16, 32, 64) if state + act / k <= capacity
              and batch % (k * dp) == 0), None)
    if k:
      out.append(f"gradient accumulation with remat {name}: --config.optimizer.grad_accum_steps={k}"
                 f" (micro-batches of {batch // k}; about {gib(state + act / k)} per device)")
    smaller = int(batch * (capacity - state) / max(act, 1)) // dp * dp
    if smaller >= dp:
      out.append(f"a smaller batch with remat {name}: --config.batch_size={smaller} or less")
  need = p["devices"] * r["peak"] / capacity
  more = 2 ** math.ceil(math.log2(max(need, 1)))
  out.append(f"more chips: about {more} with remat {name} (state and activations spread over "
             f"fsdp; {gib(r['peak'])} per device on {p['devices']} now)")
  for other in ("block", "dots"):
    if other not in rows:
      out.append(f"remat {other}: add it to --remat (saves activation memory)")
  return out


def _size(x: float, unit: str) -> str:
  return f"{x / GiB:.2f}" if unit == "GiB" else f"{x / 2 ** 20:.1f}"


def format_plan(p: dict, title: str) -> str:
  """The plan as a markdown table."""
  d, f, t = p["mesh"]
  unit = "GiB" if max(r["peak"] for r in p["policies"].values()) >= GiB else "MiB"
  b = lambda x: _size(x, unit)
  if p["topology"]:
    where = (f"{p['accelerator']} (topology {p['topology']}: {p['chips']} chips = "
             f"{p['devices']} JAX devices, {p['hosts']} hosts)")
  else:
    where = f"{p['devices']} devices x {p['device_kind']}"
  accum = (f"; gradient accumulation {p['grad_accum_steps']} micro-batches"
           if p["grad_accum_steps"] > 1 else "")
  lines = [
      f"### {title}", "",
      f"**{p['compiler_note']}.** {where}, {_size(p['memory_per_device'], 'GiB')} GiB and "
      f"{p['peak_flops_per_device'] / 1e12:.3g} TFLOP/s each; global batch {p['batch_size']}"
      f"{accum}; mesh data x fsdp x tensor = {d} x {f} x {t}; model FLOPs/step "
      f"{p['model_flops']:.3g} ({p['model_flops_source']}); fits = peak <= "
      f"{p['headroom']:.0%} of memory.", "",
      "| remat | params | opt state | grads | activations | batch | peak/device | fits "
      "| XLA FLOPs/step | step s at {:.0%} MFU | compile s | {} |".format(
          p["mfu"], "smallest fsdp x tensor that fits" if p["topology"]
          else "smallest mesh that fits"),
      "|---|---|---|---|---|---|---|---|---|---|---|---|",
      f"| | {unit} | {unit} | {unit} | {unit} | {unit} | {unit} | | | | | devices (mesh): peak, "
      "step s |"]
  for remat, r in p["policies"].items():
    if "smallest" not in r:
      small = "(not searched)"
    elif r["smallest"] is None and r.get("search_exhausted"):
      small = f"not found in {len(r['tried'])} compiles"
    elif r["smallest"] is None:
      small = f"none on {p['devices']} devices"
    else:
      s = r["smallest"]
      small = (f"{s['devices']} ({' x '.join(map(str, s['mesh']))}): {b(s['peak'])} {unit}, "
               f"{s['step_s_at_mfu']:.3g} s")
    lines.append(
        f"| {remat} | {b(r['params'])} | {b(r['opt_state'])} | {b(r['gradients'])} | "
        f"{b(r['activations'])} | {b(r['batch'])} | {b(r['peak'])} | "
        f"{'yes' if r['fits'] else 'no'} | {r['xla_flops']:.3g} | {r['step_s_at_mfu']:.3g} | "
        f"{r['compile_s']:.0f} | {small} |")
  for remat, r in p["policies"].items():
    if r.get("refused"):
      lines += ["", f"remat {remat}: the compiler refused the step (out of memory): "
                f"\"{r['refused']}\". Its peak above is state + batch + those "
                "temporaries (the sum a compiled plan reports); XLA's FLOPs are unknown."]
  if p.get("suggestions"):
    lines += ["", "Nothing fits. What would:"] + [f"- {x}" for x in p["suggestions"]]
  return "\n".join(lines) + "\n"


def measure(config, task, mesh, steps: int = 2) -> dict:
  """Runs `steps` real train steps on `mesh` (random init, zero batches) and reports the
  memory used per device: the live state shards, and the peak (from the allocator on
  GPU/TPU; on CPU the growth of the process's peak RSS during the steps, divided over the
  mesh's devices, since fake CPU devices share one process)."""
  import flax.linen as nn
  import jax
  import numpy as np
  from pretrain_jax import partitioning, train_state as ts
  jitted, abstract_state, batch, tx = abstract_step(config, task, mesh)
  state, _ = ts.create_train_state(task.init_params, tx, jax.random.key(config.seed), mesh,
                                   partitioning.RULES, task.init_extra)
  with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.RULES):
    compiled = jitted.lower(abstract_state, batch).compile()
    zeros = jax.tree.map(lambda s: jax.device_put(np.zeros(s.shape, s.dtype), s.sharding), batch)
    jax.block_until_ready((state, zeros))
    device = mesh.devices.flat[0]
    live = sum(s.data.nbytes for x in jax.tree.leaves((state, zeros))
               for s in x.addressable_shards if s.device == device)
    cpu = device.platform == "cpu"
    rss0 = _reset_peak_rss() if cpu else None
    for _ in range(steps):
      state, metrics = compiled(state, zeros)
      jax.block_until_ready((state, metrics))
  out = {"live_state_and_batch": live}
  if cpu:
    out["peak"] = int(live + (_peak_rss() - rss0) / mesh.size)
    out["peak_source"] = "state + growth of peak RSS / devices"
  else:
    out["peak"] = int((device.memory_stats() or {}).get("peak_bytes_in_use", 0))
    out["peak_source"] = "allocator peak_bytes_in_use"
  return out


def _status_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> int:
  """Resets the kernel's peak-RSS mark (VmHWM) to the current RSS; returns it."""
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
  return _status_kib("VmRSS")


def _peak_rss() -> int:
  return _status_kib("VmHWM")


def _flag(argv, name: str, default: str) -> str:
  """The value of --name=V or --name V in argv (read before absl parses the flags)."""
  for i, a in enumerate(argv):
    if a.startswith(f"--{name}="):
      return a.split("=", 1)[1]
    if a == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return default


def _use_fake_devices(argv) -> None:
  """Before JAX starts: N fake CPU devices for --devices=N (the planner never needs more);
  with --topology, CPU only (the TPU devices are libtpu's compile-only ones)."""
  n = _flag(argv, "devices", "8")
  if "jax" in sys.modules:
    return
  os.environ["JAX_PLATFORMS"] = "cpu"
  if _flag(argv, "topology", ""):
    return
  os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *CPU_FLAGS,
                                      f"--xla_force_host_platform_device_count={n}"]).strip()


def main(config, workdir):
  del workdir
  import jax
  topology = _TOPOLOGY.value
  if topology:
    devices = tpu_devices(topology)
    kind = TPU_KINDS[topology.split(":")[0]]
    if _MEASURE.value:
      raise ValueError("--measure runs steps, which needs the devices: not with --topology")
    title = f"{_config_path()} on {slice_name(topology)} ({topology}, TPU compiler)"
  else:
    n = _DEVICES.value
    if n <= 0:
      raise ValueError(f"--devices must be positive, got {n}")
    devices = jax.devices()
    if len(devices) < n:
      raise ValueError(f"--devices={n} but JAX has {len(devices)} devices (it was started "
                       "before the planner could ask for fake devices)")
    devices, kind = devices[:n], _KIND.value
    title = f"{_config_path()} on {n} x {kind} (CPU compiler)"
  module = task_module(_config_path(), _TASK.value)
  degrees = tuple(int(x) for x in _MESH.value.split(",")) if _MESH.value else None
  if degrees is not None and len(degrees) != 3:
    raise ValueError(f"--mesh must be data,fsdp,tensor, got {_MESH.value!r}")
  p = plan(config, module.build_task, devices, kind, _MFU.value, _HEADROOM.value,
           _REMAT.value, degrees, _SEARCH.value, _MAX_TENSOR.value, topology)
  if _MEASURE.value:
    from pretrain_jax import mesh as mesh_lib
    cfg = for_cpu(config, _REMAT.value[0])
    mesh = mesh_lib.create_mesh(dict(zip(("data", "fsdp", "tensor"), p["mesh"])), devices)
    p["measured"] = measure(cfg, module.build_task(cfg), mesh, _MEASURE.value)
  print(format_plan(p, title))
  if "measured" in p:
    m = p["measured"]
    print(f"measured ({_REMAT.value[0]}): state+batch {_size(m['live_state_and_batch'], 'GiB')} GiB, "
          f"peak {_size(m['peak'], 'GiB')} GiB per device ({m['peak_source']})")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump({"title": title, **p}, f, indent=1)


def _config_path() -> str:
  return _flag(sys.argv, "config", "")


if __name__ == "__main__":
  _use_fake_devices(sys.argv)
  from pretrain_jax import cli
  logging.getLogger("absl").setLevel(logging.WARNING)
  # --measure reads the growth of the process's peak RSS, which memory kept after free (one
  # arena shared by the 8 device threads) inflates: the planner leaves glibc alone
  cli.FLAGS.set_default("host_malloc", "default")
  cli.run(main, require_workdir=False)
