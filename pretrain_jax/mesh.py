"""Device mesh from config: ('data', 'fsdp', 'tensor') with ICI and DCN degrees.

`config.mesh.{data,fsdp,tensor}` are the per-slice (ICI) degrees; one of them
may be -1 to take the remaining devices. `config.mesh.dcn_{data,fsdp,tensor}`
are the degrees across slices (TPU multi-slice) or hosts (GPU clusters);
their product must equal the number of slices/hosts. Data parallelism across
slices and FSDP within a slice is the usual choice, as in MaxText.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import socket
from typing import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils

AXES = ("data", "fsdp", "tensor")

# Environment variables that say a launcher started several processes that
# must join one JAX job. A TPU pod slice is detected by JAX itself.
_MULTI_PROCESS_HINTS = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def maybe_initialize_distributed(mode: str = "auto") -> None:
  """Calls `jax.distributed.initialize()` for multi-process jobs.

  mode: 'auto' initialises when the environment describes several processes:
  an `srun` step with more than one task (`SLURM_STEP_NUM_TASKS`), an
  explicit `JAX_COORDINATOR_ADDRESS` (set by `launch/` scripts), or a TPU VM
  that is one worker of several (`TPU_WORKER_HOSTNAMES`, or
  `MEGASCALE_COORDINATOR_ADDRESS` for multi-slice). 'on' always
  initialises (JAX then auto-detects the cluster: TPU pods via the metadata
  server, SLURM, ...); 'off' never does. A single process does nothing in
  'auto', so the same entry point runs on a laptop and on a pod.

  Any launcher can describe the job itself, as `launch/local.sh --processes=N` does:
  `JAX_COORDINATOR_ADDRESS` (host:port of process 0), `JAX_NUM_PROCESSES`,
  `JAX_PROCESS_ID` and optionally `JAX_LOCAL_DEVICE_IDS` (comma-separated GPU ordinals
  this process drives) and `JAX_HEARTBEAT_TIMEOUT_SECONDS` (how long the others wait
  for a silent process before failing; JAX's default is 100).
  """
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"--distributed must be auto, on or off, got {mode!r}")
  if mode == "off":
    return
  env = os.environ
  multi = (int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1
           or any(env.get(k) for k in _MULTI_PROCESS_HINTS)
           or "," in env.get("TPU_WORKER_HOSTNAMES", "")
           or bool(env.get("MEGASCALE_COORDINATOR_ADDRESS")))
  if mode == "on" or multi:
    kwargs = _explicit_job(env)
    logging.info("Multi-process job: jax.distributed.initialize(%s)",
                 ", ".join(f"{k}={v}" for k, v in kwargs.items()))
    jax.distributed.initialize(**kwargs)


def _explicit_job(env) -> dict:
  """jax.distributed.initialize arguments from JAX_NUM_PROCESSES / JAX_PROCESS_ID /
  JAX_HEARTBEAT_TIMEOUT_SECONDS (JAX itself reads the coordinator address and the
  local device ids from the environment, but not these)."""
  kwargs = {}
  for key, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id"),
                   ("JAX_HEARTBEAT_TIMEOUT_SECONDS", "heartbeat_timeout_seconds")):
    if env.get(key):
      try:
        kwargs[arg] = int(env[key])
      except ValueError:
        raise ValueError(f"environment variable {key}={env[key]!r} is not an integer") from None
  if ("num_processes" in kwargs) != ("process_id" in kwargs):
    raise ValueError("set both JAX_NUM_PROCESSES and JAX_PROCESS_ID, or neither")
  if "num_processes" in kwargs and not 0 <= kwargs["process_id"] < kwargs["num_processes"]:
    raise ValueError(f"JAX_PROCESS_ID={kwargs['process_id']} is not in "
                     f"[0, JAX_NUM_PROCESSES={kwargs['num_processes']})")
  return kwargs


def _resolve(degrees: Sequence[int], total: int, what: str) -> tuple[int, ...]:
  """Replaces a single -1 in `degrees` so that the product equals `total`."""
  degrees = [int(d) for d in degrees]
  for name, d in zip(AXES, degrees):
    if d == 0 or d < -1:
      raise ValueError(f"config key 'mesh.{what}{name}' must be a positive int or -1, got {d}")
  if degrees.count(-1) > 1:
    raise ValueError(f"at most one of mesh.{what}{{data,fsdp,tensor}} may be -1, got {degrees}")
  known = math.prod(d for d in degrees if d != -1)
  if -1 in degrees:
    if total % known:
      raise ValueError(
          f"mesh.{what}* degrees {degrees}: {total} devices are not divisible by {known}")
    degrees[degrees.index(-1)] = total // known
  if math.prod(degrees) != total:
    raise ValueError(
        f"mesh.{what}{{data,fsdp,tensor}} = {degrees} multiply to {math.prod(degrees)}, "
        f"but there are {total} {'slices' if what else 'devices per slice'}; use -1 on one "
        "axis to fill the rest")
  return tuple(degrees)


def _is_tpu(device) -> bool:
  return getattr(device, "platform", "") == "tpu" and hasattr(device, "coords")


def process_hosts() -> list[int]:
  """Host index of every process (index = process id), hosts numbered in order of their
  first process. One process per GPU puts several processes on a host; the DCN degrees
  count hosts, not processes. The host's name is `PRETRAIN_JAX_HOST` when set (the
  local simulation of several hosts, `launch/local.sh --hosts`) or the machine's
  hostname, exchanged through jax.distributed's key-value store."""
  return list(_process_hosts())


@functools.cache
def _process_hosts() -> tuple[int, ...]:
  n = jax.process_count()
  if n == 1:
    return (0,)
  from jax._src import distributed   # the coordinator's key-value store
  client = distributed.global_state.client
  name = os.environ.get("PRETRAIN_JAX_HOST") or socket.gethostname()
  client.key_value_set(f"pretrain_jax/host/{jax.process_index()}", name)
  names = [client.blocking_key_value_get(f"pretrain_jax/host/{p}", 300_000) for p in range(n)]
  order = {h: i for i, h in enumerate(dict.fromkeys(names))}
  return tuple(order[h] for h in names)


def granules(devices: Sequence, hosts: Sequence[int] | None = None) -> list[int]:
  """The DCN granule of each device: its slice on TPU (`slice_index`; a slice's hosts
  share ICI, so one slice is one granule however many hosts it has), its host
  elsewhere (`hosts[process_index]`, default `process_hosts()`)."""
  if _is_tpu(devices[0]):
    return [int(getattr(d, "slice_index", 0) or 0) for d in devices]
  hosts = process_hosts() if hosts is None else list(hosts)
  return [hosts[d.process_index] for d in devices]


def mesh_shapes(mesh_cfg, num_devices: int, num_slices: int = 1):
  """Returns (ici_shape, dcn_shape) for the three axes.

  `mesh_cfg` has `data`, `fsdp`, `tensor` and optional `dcn_data`, `dcn_fsdp`,
  `dcn_tensor`. With one slice the DCN degrees must all be 1.
  """
  dcn = [int(mesh_cfg.get(f"dcn_{a}", 1)) for a in AXES]
  dcn = _resolve(dcn, num_slices, "dcn_")
  if num_devices % num_slices:
    raise ValueError(f"{num_devices} devices do not split into {num_slices} slices")
  ici = _resolve([mesh_cfg[a] for a in AXES], num_devices // num_slices, "")
  return ici, dcn


def create_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None,
                hosts: Sequence[int] | None = None) -> jax.sharding.Mesh:
  """Builds the ('data', 'fsdp', 'tensor') mesh with Auto axis types.

  devices: default all of the job's devices (in jax's topology-aware order on TPU);
  an explicit list keeps its order unless the devices are TPU chips (then jax's mesh
  utilities order them along the torus). hosts: host index per process (default
  `process_hosts()`), for the DCN split of GPU/CPU jobs.

  The DCN degrees (`mesh.dcn_*`) split slices (TPU) or hosts (GPU, CPU): with one
  process per GPU, 4 hosts of 8 GPUs are 4 granules, not 32. Without DCN degrees, the
  hosts of a GPU job form one mesh.

  Auto (not Explicit) axes are needed so that flax linen's logical
  constraints act as sharding hints rather than assertions.
  """
  mesh_cfg = dict(mesh_cfg)
  default = devices is None
  devices = list(jax.devices() if default else devices)
  array, ici, dcn = device_array(mesh_cfg, devices, hosts, topology_order=default)
  mesh = jax.sharding.Mesh(array, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))
  logging.info("Mesh %s over %d devices (ici=%s, dcn=%s)", dict(mesh.shape), len(devices), ici, dcn)
  return mesh


def device_array(mesh_cfg, devices: Sequence, hosts: Sequence[int] | None = None,
                 topology_order: bool = True):
  """(devices arranged [data, fsdp, tensor], ici degrees, dcn degrees); works on mock
  devices (tests of real TPU host layouts)."""
  dcn_requested = any(int(mesh_cfg.get(f"dcn_{a}", 1)) != 1 for a in AXES)
  groups = granules(devices, hosts) if len(devices) > 1 else [0]
  num = len(set(groups))
  if not dcn_requested and num > 1 and not _is_tpu(devices[0]):
    num = 1   # several GPU/CPU hosts and no DCN split asked for: one big mesh
  ici, dcn = mesh_shapes(mesh_cfg, len(devices), num)
  if num == 1:
    return _ici_array(ici, devices, topology_order), ici, dcn
  members: dict[int, list] = {}
  for g, d in zip(groups, devices):
    members.setdefault(g, []).append(d)
  sizes = {len(v) for v in members.values()}
  if len(sizes) != 1:
    raise ValueError(f"the DCN granules (slices or hosts) hold different numbers of devices: "
                     f"{ {g: len(v) for g, v in members.items()} }")
  # As jax's create_hybrid_device_mesh: one ICI mesh per granule, the granules laid out
  # over the DCN degrees, each axis = dcn * ici.
  per = [_ici_array(ici, members[g], topology_order) for g in sorted(members)]
  layout = np.arange(len(per)).reshape(dcn)
  blocks = np.vectorize(lambda i: per[i], otypes=[object])(layout)
  return np.block(blocks.tolist()), ici, dcn


def _ici_array(shape, devices, topology_order: bool) -> np.ndarray:
  if _is_tpu(devices[0]):
    try:
      return mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, AssertionError, NotImplementedError):
      return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  if topology_order:
    return mesh_utils.create_device_mesh(shape, devices)
  return np.asarray(devices, dtype=object).reshape(shape)
