"""Mock TPU devices with the coordinates and host ids of real TPU slices.

Multi-host code must be right on the host layouts of real slices, which no test
machine has. `mock_tpu_devices("v5p:4x4x8")` returns objects that look to jax's
mesh utilities like the chips of that slice: torus `coords`, `id`, `process_index`
(the host), `device_kind`, `core_on_chip`, `slice_index`. The layout is the one
libtpu reports for its compile-only topologies (`jax.experimental.topologies.
get_topology_desc(platform="tpu", topology_name=...)`, one device per chip):

- every host owns a 2x2x1 block of chips; hosts are numbered in raster order of
  their blocks (x fastest, then y, then z);
- a chip's id is its raster index on the torus (x + X * (y + Y * z));
- the device list runs host by host, each host's chips in raster order.

`tests/test_multihost.py` checks this against libtpu where `.[tpu]` is installed.
Topology names are jax's: `v4:2x2x4` is a v4-32 (16 chips; v4 and v5p names count
TensorCores, two per chip), `v5e:4x4` a v5litepod-16, `v5p:4x4x8` a v5p-256 (128
chips), `v6e:16x16` a v6e-256.
"""
from __future__ import annotations

import dataclasses
import math

DEVICE_KINDS = {"v4": "TPU v4", "v5e": "TPU v5 lite", "v5p": "TPU v5", "v6e": "TPU v6 lite"}
HOST_BLOCK = (2, 2, 1)   # chips of one host along (x, y, z)


@dataclasses.dataclass(frozen=True)
class MockTpuDevice:
  id: int
  process_index: int
  coords: tuple[int, int, int]
  device_kind: str
  slice_index: int = 0
  core_on_chip: int = 0
  platform: str = "tpu"

  def __repr__(self):
    return f"MockTpu(id={self.id}, host={self.process_index}, coords={self.coords})"


def parse(name: str) -> tuple[str, tuple[int, int, int]]:
  """'v5p:4x4x8' -> ('v5p', (4, 4, 8)); a 2-D torus gets z = 1."""
  gen, _, dims = name.partition(":")
  if gen not in DEVICE_KINDS or not dims:
    raise ValueError(f"topology {name!r}: expected GEN:XxY[xZ] with GEN in {list(DEVICE_KINDS)}")
  try:
    shape = tuple(int(d) for d in dims.split("x"))
  except ValueError:
    raise ValueError(f"topology {name!r}: dimensions must be integers") from None
  if len(shape) not in (2, 3) or min(shape) < 1:
    raise ValueError(f"topology {name!r}: give 2 or 3 positive dimensions")
  return gen, (shape + (1,))[:3]


def mock_tpu_devices(name: str, num_slices: int = 1) -> list[MockTpuDevice]:
  """The chips of `num_slices` slices of topology `name`, in libtpu's device order."""
  gen, (nx, ny, nz) = parse(name)
  bx, by, bz = (min(b, n) for b, n in zip(HOST_BLOCK, (nx, ny, nz)))
  if nx % bx or ny % by:
    raise ValueError(f"topology {name!r} does not split into hosts of {bx}x{by} chips")
  hosts_per_slice = (nx // bx) * (ny // by) * nz
  chips = nx * ny * nz
  out = []
  for s in range(num_slices):
    for h in range(hosts_per_slice):
      hx, rest = h % (nx // bx), h // (nx // bx)
      hy, hz = rest % (ny // by), rest // (ny // by)
      for j in range(by):
        for i in range(bx):
          x, y, z = hx * bx + i, hy * by + j, hz
          out.append(MockTpuDevice(
              id=s * chips + x + nx * (y + ny * z), process_index=s * hosts_per_slice + h,
              coords=(x, y, z), device_kind=DEVICE_KINDS[gen], slice_index=s))
  return out


def num_hosts(name: str) -> int:
  _, shape = parse(name)
  return math.prod(shape) // math.prod(min(b, n) for b, n in zip(HOST_BLOCK, shape))
