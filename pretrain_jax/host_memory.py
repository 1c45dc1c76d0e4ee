"""Host memory of a training process on the CPU backend: glibc keeps freed memory.

XLA's CPU runtime allocates the temporaries of every call of a compiled step as one block
(0.86 GB for the 4M step of `benchmarks/vs_official.py`, 4.0 GB for its AIM step) and
frees it at the end of the call. glibc serves any block over 32 MiB with a fresh mmap and
unmaps it on free, so every step touches all of its temporaries' pages anew, each first
touch a page fault: about 210,000 per 4M step and 1,000,000 per AIM step. With the
settings below freed memory stays in the process, the next step reuses it, and the faults
go (on this project's 2-core CPU machine, two runs of `benchmarks/vs_official.py
--only=train` back to back, `--malloc=default` then `keep`: our AIM step 9.78 -> 8.24 s,
our 4M step 1.32 -> 1.11 s; through the command line, `aimjax.train` at that AIM size,
four runs alternating: 9.05-9.19 -> 8.13-8.14 s a step, 9.7-9.9M -> 1.4M page faults a
nine-step run).

The cost: memory freed during the run is not given back to the system, so the resident
size stays at its peak, all threads share one malloc arena, and blocks freed in one order
and asked for in another leave holes: in `pretrain_jax.plan --measure` (tiny AIM, 8 CPU
devices) the growth of the peak resident size came to 123 MB a device against the 84 MB
the arrays need, which is within 10% without these settings. So the planner leaves glibc
alone.

The settings must come before JAX starts its CPU backend: glibc serves a block too large
for a thread's own arena with a fresh mmap whatever the settings say, so XLA's threads must
be created under M_ARENA_MAX 1, sharing the main arena (applied after the backend had
started, they left all 210,000 faults of the 4M step in place). So the command line
(`pretrain_jax.cli.run`) applies them at its start, before JAX's backend exists, when the
backend will be the CPU (`--host_malloc=auto`, the default: JAX_PLATFORMS names cpu first,
or no accelerator device node is present); `--host_malloc=default` leaves glibc alone. On
GPU and TPU the step's temporaries live in device memory and nothing changes. The settings
last for the life of the process, which is why they belong to an entry point and not to an
import.
"""
from __future__ import annotations

import ctypes
import glob
import logging
import os

MODES = ("auto", "keep", "default")

# glibc mallopt parameters (malloc.h) and the values applied
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
KEEP = {"M_MMAP_MAX": (M_MMAP_MAX, 0),             # no mmap of its own for a large block
        "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, -1),  # never give the heap's top back
        "M_ARENA_MAX": (M_ARENA_MAX, 1)}             # a block freed on one thread serves the
#                                                      next step's allocation on another


def keep_freed_memory() -> dict[str, int]:
  """Applies the glibc settings above to this process; returns them {name: value}.

  Raises RuntimeError where the C library has no mallopt (not glibc) or refuses a value.
  """
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    raise RuntimeError("keeping freed host memory needs glibc's mallopt (Linux with glibc); "
                       "this C library has none") from None
  for name, (param, value) in KEEP.items():
    if mallopt(ctypes.c_int(param), ctypes.c_int(value)) != 1:
      raise RuntimeError(f"mallopt({name}, {value}) was refused")
  return {name: value for name, (_, value) in KEEP.items()}


# device nodes of accelerators JAX would use instead of the CPU: NVIDIA and AMD GPUs, TPUs
# (older generations as /dev/accel*, newer through VFIO groups)
ACCELERATOR_NODES = ("/dev/nvidia[0-9]*", "/dev/kfd", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")


def expected_backend(platforms: str | None = None, nodes=ACCELERATOR_NODES) -> str:
  """'cpu' or 'accelerator': the backend JAX will start, told without starting it.

  platforms: JAX's platform list, by default JAX_PLATFORMS or jax.config's jax_platforms;
  when set, its first entry decides. Otherwise any accelerator device node (`nodes`, glob
  patterns) counts as an accelerator (JAX may still fall back to the CPU there: then nothing
  is applied, which only costs speed).
  """
  if platforms is None:
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if not platforms:
      import jax
      platforms = jax.config.jax_platforms or ""
  if platforms:
    return "cpu" if platforms.split(",")[0].strip() == "cpu" else "accelerator"
  if any(glob.glob(pattern) for pattern in nodes):
    return "accelerator"
  return "cpu"


def backend_started() -> bool:
  """Whether this process has started a JAX backend (False when it cannot tell)."""
  import sys
  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge
  except ImportError:
    return False
  return bool(getattr(xla_bridge, "_backends", None))


def configure(mode: str, backend: str | None = None) -> dict[str, int] | None:
  """Applies `mode`; call it before JAX's backend starts (see the module's docstring).

  'auto': keep freed memory when the backend will be the CPU (`backend`, default
  `expected_backend()`) and glibc allows it, otherwise leave the allocator alone (a C
  library without mallopt is logged, not an error); 'keep': always (a ValueError where
  impossible); 'default': never. Returns the settings applied, or None.
  """
  if mode not in MODES:
    raise ValueError(f"host memory mode must be one of {MODES}, got {mode!r}")
  if mode == "default":
    return None
  if mode == "auto":
    backend = backend or expected_backend()
    if backend != "cpu":
      logging.info("host memory: allocator left as it is (backend: %s)", backend)
      return None
  if backend_started():
    logging.warning("host memory: JAX's backend has started already; its threads keep their "
                    "own malloc arenas, so most of the per-step page faults will remain")
  try:
    applied = keep_freed_memory()
  except RuntimeError as e:
    if mode == "keep":
      raise ValueError(f"--host_malloc=keep: {e}") from None
    logging.info("host memory: allocator left as it is (%s)", e)
    return None
  logging.info("host memory: glibc keeps freed memory %s (--host_malloc=%s)", applied, mode)
  return applied
