"""Fixed 2D sine-cosine position embeddings (MAE's layout), shared by the models."""
from __future__ import annotations

import numpy as np


def sincos_2d(height: int, width: int, dim: int) -> np.ndarray:
  """float32 [height * width, dim] positions of a grid in raster order.

  The first half of the channels encodes the column, the second half the
  row; each half is [sin(pos * omega), cos(pos * omega)] with
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
  return np.concatenate([encode(cols), encode(rows)], axis=1).astype(np.float32)
