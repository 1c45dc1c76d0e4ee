"""Fixed 1D and 2D sine-cosine position embeddings, shared by the models."""
from __future__ import annotations

import numpy as np


def sincos_2d(height: int, width: int, dim: int, rows_first: bool = False) -> np.ndarray:
  """float32 [height * width, dim] positions of a grid in raster order.

  The first half of the channels encodes the column and the second half the
  row (MAE's and AIM's layout), or the other way round with `rows_first`
  (4M's layout); each half is [sin(pos * omega), cos(pos * omega)] with
  omega_i = 1 / 10000^(i / (dim/4)). Computed for any grid, so models using
  it run at any resolution.
  """
  if dim % 4:
    raise ValueError(f"sin-cos positions need a width divisible by 4, got {dim}")
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
  rows, cols = np.divmod(np.arange(height * width, dtype=np.float64), width)

  def encode(pos):
    out = pos[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  first, second = (rows, cols) if rows_first else (cols, rows)
  return np.concatenate([encode(first), encode(second)], axis=1).astype(np.float32)


def sincos_1d(length: int, dim: int) -> np.ndarray:
  """float32 [length, dim]: [sin(p * omega), cos(p * omega)], omega_i = 1 / 10000^(i / (dim/2))."""
  if dim % 2:
    raise ValueError(f"1D sin-cos positions need an even width, got {dim}")
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
  out = np.arange(length, dtype=np.float64)[:, None] * omega[None]
  return np.concatenate([np.sin(out), np.cos(out)], axis=1).astype(np.float32)
