"""FLOPs counting and model FLOPs utilisation (MFU).

Counts are analytic (MaxText's convention): a matmul of [m, k] x [k, n] is
2*m*k*n FLOPs, the backward pass costs twice the forward, so a training step
is 3x the forward FLOPs. Attention scores and the weighted sum are counted
over the full [T, T] square (the masked half is computed too).
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

# Dense bf16 peak FLOP/s per device (vendor figures, as MaxText uses them).
PEAK_BF16 = {
    "h100": 989e12, "h200": 989e12, "h800": 989e12, "a100": 312e12, "l4": 121e12,
    "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12,
    "tpu v5": 459e12, "tpu v6 lite": 918e12, "tpu v6e": 918e12,
}


def matmul(m: int, k: int, n: int) -> float:
  return 2.0 * m * k * n


def attention(batch: int, length: int, width: int, kv_length: int | None = None) -> float:
  """Scores (q k^T) plus the weighted sum of values, all heads together: `length` queries
  over `kv_length` keys (default `length`: self-attention)."""
  return 2 * matmul(batch * length, width, length if kv_length is None else kv_length)


def train_step_flops(forward_flops: float) -> float:
  return 3.0 * forward_flops


@functools.lru_cache(maxsize=None)
def measured_matmul_peak(n: int = 2048, dtype: str = "float32", repeats: int = 5) -> float:
  """FLOP/s of a large jitted matmul on the default device, best of `repeats`.

  The practical peak on CPUs, where no vendor figure applies.
  """
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return matmul(n, n, n) / best


def peak_flops_per_device(device: jax.Device | None = None) -> tuple[float, str]:
  """(peak FLOP/s, how it was obtained) for one device of this kind.

  CPU devices share one machine, so their 'peak' is the whole machine's
  measured matmul rate; callers divide achieved FLOP/s of all CPU devices by
  it directly (see `mfu`).
  """
  device = device or jax.devices()[0]
  kind = device.device_kind.lower()
  if device.platform == "cpu":
    return measured_matmul_peak(), "measured f32 matmul (whole machine)"
  for name, peak in sorted(PEAK_BF16.items(), key=lambda kv: -len(kv[0])):
    if name in kind:
      return peak, f"bf16 spec sheet for {device.device_kind}"
  return measured_matmul_peak(dtype="bfloat16"), f"measured bf16 matmul on {device.device_kind}"


def mfu(step_flops: float, step_time_s: float, devices=None) -> float:
  """Achieved FLOP/s over peak, for a step spread over `devices`."""
  devices = devices or jax.devices()
  peak, _ = peak_flops_per_device(devices[0])
  total_peak = peak if devices[0].platform == "cpu" else peak * len(devices)
  return step_flops / step_time_s / total_peak
