"""Timing a compiled train step, shared by the step benchmarks (aim_step, fourm_step, mfu)."""
from __future__ import annotations

import time

import jax
import numpy as np


def time_steps(compiled, state, batch, steps: int, warmup: int = 2):
  """Median seconds of `steps` calls of `compiled(state, batch) -> (state, metrics)` after
  `warmup` untimed calls, each waited for. Returns (seconds, last state, last metrics); the
  state is donated each call, so use the returned one afterwards."""
  for _ in range(warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  return float(np.median(times)), state, metrics
