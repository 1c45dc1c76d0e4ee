"""Colour palettes of 1..7 colours by k-means (4M-21 App. D.1), deterministic per seed."""
from __future__ import annotations

import numpy as np

from pretrain_jax.data import colors

MAX_COLORS = 7


def _features(pixels: np.ndarray, space: str) -> np.ndarray:
  """uint8 [P, 3] RGB -> float64 [P, 3] in the clustering space."""
  if space == "rgb":
    return pixels.astype(np.float64)
  if space == "lab":
    return colors.rgb_to_lab(pixels).reshape(-1, 3).astype(np.float64)
  raise ValueError(f"palette colour space must be 'lab' or 'rgb', got {space!r}")


def _sq_dist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
  """[P, 3], [k, 3] -> squared distances [P, k]."""
  return np.maximum((x * x).sum(1)[:, None] - 2 * x @ c.T + (c * c).sum(1)[None], 0)


def _kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iters: int) -> np.ndarray:
  """Lloyd's algorithm with k-means++ seeding; returns the assignment int [P]."""
  c = x[rng.integers(len(x))][None].copy()   # a copy: the updates below must not write into x
  d2 = _sq_dist(x, c)[:, 0]
  for _ in range(1, k):
    total = d2.sum()
    # all points already on a centre: repeat one (its cluster stays empty)
    nxt = x[rng.choice(len(x), p=d2 / total)] if total > 0 else c[0]
    c = np.concatenate([c, nxt[None]])
    d2 = np.minimum(d2, _sq_dist(x, nxt[None])[:, 0])
  assign = np.full(len(x), -1, np.int64)
  for _ in range(iters):
    new = np.argmin(_sq_dist(x, c), axis=1)
    if np.array_equal(new, assign):
      break
    assign = new
    counts = np.bincount(assign, minlength=k)
    sums = np.stack([np.bincount(assign, x[:, j], minlength=k) for j in range(3)], 1)
    filled = counts > 0
    c[filled] = sums[filled] / counts[filled, None]
  return assign


def palettes(rgb: np.ndarray, max_colors: int = MAX_COLORS, space: str = "lab", seed: int = 0,
             max_pixels: int = 4096, iters: int = 20) -> np.ndarray:
  """rgb uint8 [H, W, 3] -> uint8 [max_colors, max_colors, 3].

  Row k - 1 holds the k-colour palette in its first k entries (the rest are
  zero), colours ordered by the share of pixels they cover, largest first.
  Clustering runs in CIELAB (`space='lab'`, perceptual) or RGB on at most
  `max_pixels` pixels taken on a regular stride; each colour is the mean RGB
  of its cluster. A cluster left empty (fewer distinct colours than k) repeats
  the palette's first colour.
  """
  pixels = np.asarray(rgb, np.uint8).reshape(-1, 3)
  pixels = pixels[:: max(1, len(pixels) // max_pixels)]
  x = _features(pixels, space)
  out = np.zeros((max_colors, max_colors, 3), np.uint8)
  rng = np.random.default_rng(seed)
  for k in range(1, max_colors + 1):
    assign = _kmeans(x, k, rng, iters)
    counts = np.bincount(assign, minlength=k)
    order = np.argsort(-counts, kind="stable")
    sums = np.stack([np.bincount(assign, pixels[:, j].astype(np.float64), minlength=k)
                     for j in range(3)], 1)
    colours = [np.rint(sums[j] / counts[j]) if counts[j] else None for j in order]
    for i, c in enumerate(colours):
      out[k - 1, i] = c if c is not None else colours[0]
  return out
