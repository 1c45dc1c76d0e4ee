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


def maybe_initialize_distributed() -> None:
  """Calls `jax.distributed.initialize()` when the environment is multi-process.

  Detects SLURM jobs with more than one task, explicit coordinator addresses
  (`JAX_COORDINATOR_ADDRESS`, used by `launch/`) and multi-host TPU slices
  (`TPU_WORKER_HOSTNAMES` listing more than one worker). A single process does
  nothing, so the same entry point runs on a laptop and on a pod.
  """
  if jax.distributed.is_initialized() if hasattr(jax.distributed, "is_initialized") else False:
    return
  slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1"))
  tpu_workers = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if (slurm_tasks > 1 or any(os.environ.get(k) for k in _MULTI_PROCESS_HINTS)
      or "," in tpu_workers):
    logging.info("Multi-process environment detected: jax.distributed.initialize()")
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
  dcn_requested = math.prod(abs(int(mesh_cfg.get(f"dcn_{a}", 1))) for a in AXES)
  if dcn_requested == 1 and num_slices > 1 and not hasattr(devices[0], "slice_index"):
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
