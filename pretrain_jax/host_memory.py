"""Host memory of a training process on the CPU backend: glibc keeps freed memory.

XLA's CPU runtime allocates the temporaries of every call of a compiled step as one block
(0.86 GB for the 4M step of `benchmarks/vs_official.py`, 4.0 GB for its AIM step) and
frees it at the end of the call. glibc serves any block over 32 MiB with a fresh mmap and
unmaps it on free, so every step touches all of its temporaries' pages anew, each first
touch a page fault: about 210,000 per 4M step and 1,000,000 per AIM step. With the
settings below freed memory stays in the process, the next step reuses it, and the faults
go (on this project's 2-core CPU machine, two runs of `benchmarks/vs_official.py
--only=train` back to back, `--malloc=default` then `keep`: our AIM step 9.78 -> 8.24 s,
our 4M step 1.32 -> 1.11 s).

The cost: memory freed during the run is not given back to the system, so the resident
size stays at its peak (a training step reaches that peak every step anyway), and all
threads share one malloc arena.

The training entry points (`pretrain_jax.cli.run`) apply this by default when JAX's
backend is the CPU (`--host_malloc=auto`); `--host_malloc=default` leaves glibc alone. On
GPU and TPU the step's temporaries live in device memory and nothing changes. The settings
last for the life of the process, which is why they belong to an entry point and not to an
import.
"""
from __future__ import annotations

import ctypes
import logging

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


def configure(mode: str, backend: str) -> dict[str, int] | None:
  """Applies `mode` for a process whose JAX backend is `backend` ('cpu', 'gpu', 'tpu').

  'auto': keep freed memory on the CPU backend where glibc allows it, otherwise leave the
  allocator alone (a C library without mallopt is logged, not an error); 'keep': always
  (a ValueError where impossible); 'default': never. Returns the settings applied, or None.
  """
  if mode not in MODES:
    raise ValueError(f"host memory mode must be one of {MODES}, got {mode!r}")
  if mode == "default" or (mode == "auto" and backend != "cpu"):
    return None
  try:
    applied = keep_freed_memory()
  except RuntimeError as e:
    if mode == "keep":
      raise ValueError(f"--host_malloc=keep: {e}") from None
    logging.info("host memory: allocator left as it is (%s)", e)
    return None
  logging.info("host memory: glibc keeps freed memory %s (--host_malloc=%s)", applied, mode)
  return applied
