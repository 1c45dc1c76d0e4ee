"""Scalar metadata of an image and its labels (4M-21 App. D.1), as plain numpy.

Every function takes one sample (not a batch) and returns {name: float}.
Image statistics are on the 0..255 scale; shares are percentages (0..100).
"""
from __future__ import annotations

import re

import cv2
import numpy as np

from pretrain_jax.data import colors

IMAGE_KEYS = ("original_height", "original_width", "brightness", "contrast", "saturation",
              "entropy", "colorfulness")
SEMANTIC_KEYS = ("crowdedness", "sam_clutter", "coco_clutter", "instance_diversity",
                 "semantic_diversity", "objectness", "walkability")
GEOMETRIC_KEYS = ("occlusion", "geometric_complexity")
CAPTION_KEYS = ("caption_chars", "caption_words", "caption_sentences")


def _gray(rgb: np.ndarray) -> np.ndarray:
  """uint8 [H, W, 3] -> float64 [H, W] luma (ITU-R BT.601), 0..255."""
  return np.asarray(rgb, np.float64) @ np.array([0.299, 0.587, 0.114])


def image_metadata(rgb: np.ndarray, original_size: tuple[int, int]) -> dict[str, float]:
  """rgb uint8 [H, W, 3]; original_size (height, width) before resizing and cropping.

  brightness: mean luma; contrast: RMS contrast (standard deviation of luma);
  saturation: mean HSV saturation (0..255); entropy: Shannon entropy in bits
  of the 256-bin luma histogram; colorfulness: Hasler and Suesstrunk (2003),
  sigma_rgyb + 0.3 * mu_rgyb with rg = R - G and yb = (R + G) / 2 - B.
  """
  gray = _gray(rgb)
  hist = np.bincount(np.clip(np.rint(gray), 0, 255).astype(np.int64).ravel(), minlength=256)
  p = hist[hist > 0] / gray.size
  entropy = float(-(p * np.log2(p)).sum()) + 0.0   # + 0.0 turns -0.0 into 0.0
  hsv = colors.rgb_to_hsv(rgb)
  r, g, b = (np.asarray(rgb[..., i], np.float64) for i in range(3))
  rg, yb = r - g, 0.5 * (r + g) - b
  colorfulness = np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean())
  return {"original_height": float(original_size[0]), "original_width": float(original_size[1]),
          "brightness": float(gray.mean()), "contrast": float(gray.std()),
          "saturation": float(hsv[..., 1].mean()), "entropy": entropy,
          "colorfulness": float(colorfulness)}


def semantic_metadata(semantic: np.ndarray, instance: np.ndarray, box_classes: np.ndarray, *,
                      countable: tuple[int, ...], walkable: tuple[int, ...],
                      person: tuple[int, ...] = (), ignore: tuple[int, ...] = ()) -> dict[str, float]:
  """semantic int [H, W] class ids; instance int [H, W] (0 = none); box_classes int [N].

  crowdedness: boxes of a `person` class; sam_clutter: instances in the
  instance map; coco_clutter: boxes; instance_diversity: distinct box classes;
  semantic_diversity: distinct classes in the map, less `ignore`;
  objectness / walkability: % of pixels of a `countable` / `walkable` class.
  """
  semantic, box_classes = np.asarray(semantic), np.asarray(box_classes).reshape(-1)
  present = set(np.unique(semantic).tolist()) - set(ignore)
  return {
      "crowdedness": float(np.isin(box_classes, person).sum()),
      "sam_clutter": float(len(set(np.unique(instance).tolist()) - {0})),
      "coco_clutter": float(box_classes.size),
      "instance_diversity": float(len(np.unique(box_classes))),
      "semantic_diversity": float(len(present)),
      "objectness": float(100 * np.isin(semantic, countable).mean()),
      "walkability": float(100 * np.isin(semantic, walkable).mean()),
  }


def occlusion_edges(depth: np.ndarray, threshold: float = 0.3, normalize: bool = True) -> np.ndarray:
  """bool [H, W]: magnitude of OpenCV's 3x3 Sobel response on the depth map above `threshold`.

  With `normalize` depth is first rescaled to [0, 1] by its min and max
  (relative depth, as monocular depth estimators give it). The unscaled
  Sobel kernels answer 4 * s on both sides of a step of height s, so the
  default threshold 0.3 marks steps of more than 7.5% of the depth range.
  """
  d = np.asarray(depth, np.float64)
  if normalize:
    lo, hi = float(d.min()), float(d.max())
    d = (d - lo) / (hi - lo) if hi > lo else np.zeros_like(d)
  gx = cv2.Sobel(d, cv2.CV_64F, 1, 0, ksize=3)
  gy = cv2.Sobel(d, cv2.CV_64F, 0, 1, ksize=3)
  return np.hypot(gx, gy) > threshold


def geometric_metadata(depth: np.ndarray, normals: np.ndarray, threshold: float = 0.3,
                       normalize_depth: bool = True) -> dict[str, float]:
  """depth float [H, W]; normals float [H, W, 3] (any length; zero vectors ignored).

  occlusion: % of pixels on occlusion edges (`occlusion_edges`); geometric
  complexity: spherical variance of the unit normals, 1 - |mean normal|, which
  is 0 for a plane and approaches 1 when normals point every way.
  """
  n = np.asarray(normals, np.float64).reshape(-1, 3)
  length = np.linalg.norm(n, axis=1)
  n = n[length > 1e-6] / length[length > 1e-6, None]
  complexity = float(1 - np.linalg.norm(n.mean(axis=0))) if len(n) else 0.0
  return {"occlusion": float(100 * occlusion_edges(depth, threshold, normalize_depth).mean()),
          "geometric_complexity": max(complexity, 0.0)}


def caption_length(caption: str) -> dict[str, float]:
  """Characters, whitespace-separated words, and sentences (runs ending in . ! or ?)."""
  sentences = [s for s in re.split(r"[.!?]+", caption) if s.strip()]
  return {"caption_chars": float(len(caption)), "caption_words": float(len(caption.split())),
          "caption_sentences": float(len(sentences))}
