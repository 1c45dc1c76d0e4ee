"""AIM's autoregressive objective: patch orders, prefix sampling, prefix-causal
masks, per-patch normalised targets and the loss (paper Sec. 3, Fig. 3, Table 3).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

ORDERS = ("raster", "spiral", "checkerboard", "random")


def patch_order(name: str, grid: int, seed: int = 0) -> np.ndarray:
  """Permutation [K] of raster patch indices (K = grid * grid): the sequence order.

  raster: row-major; spiral: from the centre outwards, turning clockwise;
  checkerboard: the 'black' squares in raster order, then the 'white' ones;
  random: a fixed permutation drawn once from `seed`.
  """
  k = grid * grid
  if name == "raster":
    return np.arange(k)
  if name == "checkerboard":
    rows, cols = np.divmod(np.arange(k), grid)
    black = (rows + cols) % 2 == 0
    return np.concatenate([np.flatnonzero(black), np.flatnonzero(~black)])
  if name == "random":
    return np.random.default_rng(seed).permutation(k)
  if name == "spiral":
    r = c = (grid - 1) // 2
    order, seen = [], set()
    moves = ((0, 1), (1, 0), (0, -1), (-1, 0))   # right, down, left, up
    step, d = 1, 0
    while len(order) < k:
      for _ in range(2):
        dr, dc = moves[d % 4]
        for _ in range(step):
          if 0 <= r < grid and 0 <= c < grid and (r, c) not in seen:
            seen.add((r, c))
            order.append(r * grid + c)
          r, c = r + dr, c + dc
        d += 1
      step += 1
    return np.asarray(order)
  raise ValueError(f"config key 'objective.order' must be one of {ORDERS}, got {name!r}")


def patchify(images: jax.Array, patch: int) -> jax.Array:
  """[B, H, W, C] -> [B, K, patch*patch*C], raster order, pixels as (row, col, channel)."""
  b, h, w, c = images.shape
  x = images.reshape(b, h // patch, patch, w // patch, patch, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def normalize_patches(patches: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Per-patch standardisation of the targets (MAE's norm_pix_loss), with the unbiased variance
  as the official training code (apple/ml-l3m, torch's `.var()`) computes it."""
  mean = patches.mean(axis=-1, keepdims=True)
  var = patches.var(axis=-1, keepdims=True, ddof=1)
  return (patches - mean) / jnp.sqrt(var + eps)


def sample_prefix_lengths(rng: jax.Array, batch: int, num_patches: int) -> jax.Array:
  """S ~ Uniform{1, ..., K-1} per sample: int32 [B]."""
  return jax.random.randint(rng, (batch,), 1, num_patches, dtype=jnp.int32)


def prefix_causal_mask(prefix_len: jax.Array, length: int) -> jax.Array:
  """bool [B, 1, T, T]: query i may attend key j iff j <= i or j < S.

  prefix_len: int [B]; 0 gives a plain causal mask.
  """
  q = jnp.arange(length)[:, None]
  k = jnp.arange(length)[None, :]
  causal = k <= q
  in_prefix = k[None] < prefix_len[:, None, None]
  return (causal[None] | in_prefix)[:, None]


def loss_weights(prefix_len: jax.Array, length: int) -> jax.Array:
  """float [B, T-1]: position i predicts patch i+1; counted iff i+1 >= S."""
  target_index = jnp.arange(1, length)[None, :]
  return (target_index >= prefix_len[:, None]).astype(jnp.float32)


def next_patch_loss(pred: jax.Array, targets: jax.Array, prefix_len: jax.Array,
                    valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Mean squared error of next-patch predictions over non-prefix patches.

  pred: [B, K, P] predictions at each sequence position (for the next patch);
  targets: [B, K, P] in the same sequence order; prefix_len: int [B];
  valid: float [B], 0 for skipped records. Returns (loss, per-position mean
  error [K-1], for the loss-along-the-sequence plots of the paper's Fig. 7).
  """
  err = jnp.mean(jnp.square(pred[:, :-1].astype(jnp.float32) - targets[:, 1:]), axis=-1)
  w = loss_weights(prefix_len, pred.shape[1])
  if valid is not None:
    w = w * valid[:, None]
  loss = jnp.sum(err * w) / jnp.maximum(jnp.sum(w), 1.0)
  per_position = jnp.sum(err * w, axis=0) / jnp.maximum(jnp.sum(w, axis=0), 1.0)
  return loss, per_position
