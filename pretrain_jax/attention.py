"""Which kernel computes attention (config key `model.attention_impl`).

  ''  or 'xla'  softmax(QK^T)V compiled by XLA, on every backend (`dot_product_attention`
                below: head-major, with a hand-written backward pass)
  'cudnn'       cuDNN's flash attention (GPU only; bf16/fp16 inputs; cuDNN's own limits on
                the head dimension apply: a multiple of 8, at most 128, 256 on Hopper)
  'auto'        'cudnn' on a GPU when the compute dtype is bf16/fp16, else XLA (it checks
                nothing more: a head dimension cuDNN refuses fails at compile time)

Both models pass the result to `dot_product_attention(implementation=...)`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

CHOICES = ("", "xla", "cudnn", "auto")


def implementation(value: str, dtype: str = "float32", backend: str | None = None) -> str | None:
  """A config value -> `jax.nn.dot_product_attention`'s implementation (None: XLA).

  dtype: the model's compute dtype name; backend: jax.default_backend() unless given.
  Raises ValueError naming the config key for an unknown value, or 'cudnn' off a GPU.
  """
  value = value or ""     # None: an older config's null
  if value not in CHOICES:
    raise ValueError(f"config key 'model.attention_impl' must be one of {CHOICES}, got {value!r}")
  backend = backend or jax.default_backend()
  half = dtype in ("bfloat16", "float16")
  if value == "cudnn":
    if backend != "gpu":
      raise ValueError(f"config key 'model.attention_impl' is 'cudnn', which needs a GPU; JAX "
                       f"runs on {backend} (use '' or 'auto')")
    if not half:
      raise ValueError(f"config key 'model.attention_impl' is 'cudnn', which needs model.dtype "
                       f"bfloat16 or float16, got {dtype}")
    return "cudnn"
  if value == "auto" and backend == "gpu" and half:
    return "cudnn"
  return None


def dot_product_attention(q, k, v, mask=None, implementation: str | None = None):
  """softmax(q k^T / sqrt(Dh)) v, as `jax.nn.dot_product_attention` computes it.

  q: [B, T, H, Dh]; k, v: [B, S, H, Dh]; mask: bool, broadcastable to [B, H, T, S]
  (True = may attend), or None. Returns [B, T, H, Dh] in v's dtype.

  implementation None is XLA: the same numerics as jax's XLA path (logits and softmax
  in float32, -0.7 * float32 max at masked positions, so a row with nothing to attend
  to averages every value), computed head-major ([B, H, T, Dh]) with the backward pass
  written out: dV^T = dO^T P, dP = dO V^T, dS = P (dP - rowsum(dO * O)), dQ = dS K,
  dK^T = Q^T dS. Every product is then a batched matmul in the layout XLA's CPU
  backend wants, so no [T, S] matrix is ever transposed in memory; autodiff of the
  [B, T, H, Dh] form transposed the scores and probabilities several times per layer
  and took about 1.5-2x the time on CPU (`benchmarks/cpu_kernels.py`).
  Anything else ('cudnn') is passed to `jax.nn.dot_product_attention`.
  """
  if implementation is not None:
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
  if mask is not None:
    mask = jnp.asarray(mask, bool)
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)
  return heads_first(_attend(heads_first(q), heads_first(k), heads_first(v), mask))


_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def _probabilities(q, k, mask):
  """[B, H, T, S] float32 softmax of the scaled, masked logits (q: [B, H, T, Dh])."""
  logits = jnp.einsum("bhtd,bhsd->bhts", q, k, preferred_element_type=jnp.float32)
  logits = logits * (q.shape[-1] ** -0.5)
  if mask is not None:
    logits = jnp.where(mask, logits, _MASKED)
  return jax.nn.softmax(logits, axis=-1)


@jax.custom_vjp
def _attend(q, k, v, mask):
  """Head-major attention: q [B, H, T, Dh], k, v [B, H, S, Dh] -> [B, H, T, Dh]."""
  return _attend_fwd(q, k, v, mask)[0]


def _attend_fwd(q, k, v, mask):
  p = _probabilities(q, k, mask)
  out = jnp.einsum("bhts,bhsd->bhtd", p.astype(v.dtype), v)
  return out, (q, k, v, mask, p, out)


def _attend_bwd(residuals, d_out):
  q, k, v, mask, p, out = residuals
  scale = q.shape[-1] ** -0.5
  t = functools.partial(jnp.swapaxes, axis1=-1, axis2=-2)
  d_out = d_out.astype(v.dtype)
  dv = t(jnp.einsum("bhtd,bhts->bhds", d_out, p.astype(v.dtype)))
  dp = jnp.einsum("bhtd,bhsd->bhts", d_out, v, preferred_element_type=jnp.float32)
  row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  ds = p * (dp - row)
  if mask is not None:
    # Masked logits are constants, so their gradient is 0. p is exactly 0 there in a row
    # with any key to attend to; a row with none has p uniform and gets no gradient at all.
    ds = ds * jnp.any(mask, axis=-1, keepdims=True)
  ds = ds.astype(q.dtype)
  dq = jnp.einsum("bhts,bhsd->bhtd", ds, k) * jnp.asarray(scale, q.dtype)
  dk = t(jnp.einsum("bhtd,bhts->bhds", q, ds)) * jnp.asarray(scale, k.dtype)
  return dq, dk, dv, None


_attend.defvjp(_attend_fwd, _attend_bwd)
