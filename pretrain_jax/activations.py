"""Activations written the way XLA compiles them fastest, with the official numerics."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_INV_SQRT2 = 1.0 / math.sqrt(2.0)


def gelu_exact(x: jnp.ndarray) -> jnp.ndarray:
  """Exact (erf) GELU, x * Phi(x) = 0.5 * x * (1 + erf(x / sqrt(2))), any shape.

  The formula torch's `nn.GELU()` (and so every official model here) evaluates.
  `jax.nn.gelu(approximate=False)` computes the same function through erfc,
  which XLA's CPU backend lowers to an exponential plus a rational polynomial
  in two fusions; with erf, the forward and backward of an AIM MLP take about
  three quarters of the time on CPU (`benchmarks/cpu_kernels.py`).
  The two forms agree to float32 rounding (max abs difference about 5e-7 on
  unit-scale inputs).
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(_INV_SQRT2, x.dtype)))
