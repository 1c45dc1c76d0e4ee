"""Which kernel computes attention (config key `model.attention_impl`).

  ''  or 'xla'  XLA's fused softmax(QK^T)V, on every backend
  'cudnn'       cuDNN's flash attention (GPU only; bf16/fp16 inputs; cuDNN's own limits on
                the head dimension apply: a multiple of 8, at most 128, 256 on Hopper)
  'auto'        'cudnn' on a GPU when the compute dtype is bf16/fp16, else XLA (it checks
                nothing more: a head dimension cuDNN refuses fails at compile time)

Both models pass the result to `jax.nn.dot_product_attention(implementation=...)`.
"""
from __future__ import annotations

import jax

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
