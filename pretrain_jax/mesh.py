"""Device mesh from config: ('data', 'fsdp', 'tensor') with ICI and DCN degrees.

`config.mesh.{data,fsdp,tensor}` are the per-slice (ICI) degrees; one of them
may be -1 to take the remaining devices. `config.mesh.dcn_{data,fsdp,tensor}`
are the degrees across slices (TPU multi-slice) or hosts (GPU clusters);
their product must equal the number of slices/hosts. Data parallelism across
slices and FSDP within a slice is the usual choice, as in MaxText.
"""
from __future__ import annotations

import logging
import math
import os
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
    logging.info("Multi-process job: jax.distributed.initialize()")
    jax.distributed.initialize()


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


def _num_slices(devices: Sequence[jax.Device]) -> int:
  if hasattr(devices[0], "slice_index"):
    return len({d.slice_index for d in devices})
  return len({d.process_index for d in devices})


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


def create_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """Builds the ('data', 'fsdp', 'tensor') mesh with Auto axis types.

  Auto (not Explicit) axes are needed so that flax linen's logical
  constraints act as sharding hints rather than assertions.
  """
  devices = list(devices if devices is not None else jax.devices())
  num_slices = _num_slices(devices) if len(devices) > 1 else 1
  dcn_requested = any(int(mesh_cfg.get(f"dcn_{a}", 1)) != 1 for a in AXES)
  if not dcn_requested and num_slices > 1 and not hasattr(devices[0], "slice_index"):
    # Several GPU hosts but no DCN split asked for: treat them as one big slice.
    num_slices = 1
  ici, dcn = mesh_shapes(mesh_cfg, len(devices), num_slices)
  if num_slices > 1:
    array = mesh_utils.create_hybrid_device_mesh(
        ici, dcn, devices, process_is_granule=not hasattr(devices[0], "slice_index"))
  elif len(devices) == len(jax.devices()):
    array = mesh_utils.create_device_mesh(ici, devices)
  else:  # a subset (tests, benchmarks): keep the given order
    array = np.asarray(devices).reshape(ici)
  mesh = jax.sharding.Mesh(array, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))
  logging.info("Mesh %s over %d devices (ici=%s, dcn=%s)", dict(mesh.shape), len(devices), ici, dcn)
  return mesh
