"""LayerNorm with a hand-written gradient: the same function, parameters and numerics as
torch's `nn.LayerNorm` (two-pass variance), in fewer passes over the activations.

Differentiated by JAX, `nn.LayerNorm` keeps the broadcast normalisers of the forward pass as
residuals and XLA's CPU backend splits it into five or six loops over [..., D] in the forward
pass alone (the AIM train step of `benchmarks/vs_official.py --ops`: about 0.75 s of
LayerNorm forward against 0.08 s for torch). Here the residuals are x and the per-row mean
and 1/std ([...], float32); the backward pass recomputes x_hat inside its fused loops:

  x_hat = (x - mean) * rstd,  y = x_hat * scale + bias
  g = dy * scale
  dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))       (means over the last axis)
  dscale = sum(dy * x_hat),  dbias = sum(dy)                   (sums over all other axes)
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def _stats(x32, eps: float):
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  return mean, jax.lax.rsqrt(var + eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x, scale, bias, eps: float = 1e-6, dtype=None):
  """x [..., D]; scale [D]; bias [D] or None; statistics in float32; out in `dtype` (default
  x.dtype)."""
  return _forward(x, scale, bias, eps, dtype)[0]


def _forward(x, scale, bias, eps, dtype):
  x32 = x.astype(jnp.float32)
  mean, rstd = _stats(x32, eps)
  y = (x32 - mean) * rstd * scale.astype(jnp.float32)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(dtype or x.dtype), (x, scale, bias, mean, rstd)


def _backward(eps, dtype, res, dy):
  del eps, dtype
  x, scale, bias, mean, rstd = res
  dy32 = dy.astype(jnp.float32)
  x_hat = (x.astype(jnp.float32) - mean) * rstd
  g = dy32 * scale.astype(jnp.float32)
  dx = rstd * (g - jnp.mean(g, axis=-1, keepdims=True)
               - x_hat * jnp.mean(g * x_hat, axis=-1, keepdims=True))
  batch_axes = tuple(range(x.ndim - 1))
  dscale = jnp.sum(dy32 * x_hat, axis=batch_axes).astype(scale.dtype)
  dbias = None if bias is None else jnp.sum(dy32, axis=batch_axes).astype(bias.dtype)
  return dx.astype(x.dtype), dscale, dbias


layer_norm.defvjp(_forward, _backward)


class LayerNorm(nn.Module):
  """Drop-in for `nn.LayerNorm(epsilon, use_bias, dtype, param_dtype, scale_init,
  bias_init)` over the last axis: the same parameter names ('scale', 'bias') and shapes, so
  checkpoints and converters are unchanged. x [..., D] -> [..., D] in `dtype` (default
  x.dtype)."""
  epsilon: float = 1e-6
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  scale_init: Any = nn.initializers.ones
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = self.param("scale", self.scale_init, (d,), self.param_dtype)
    bias = self.param("bias", self.bias_init, (d,), self.param_dtype) if self.use_bias \
        else None
    dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)    # as nn.LayerNorm
    return layer_norm(x, scale, bias, self.epsilon, jnp.dtype(dtype))
