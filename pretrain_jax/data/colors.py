"""Colour conversions of uint8 RGB images (OpenCV's definitions), shared by the projects'
labellers, edge maps and palettes."""
from __future__ import annotations

import cv2
import numpy as np


def rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [H, W] luma (0.299 R + 0.587 G + 0.114 B, rounded)."""
  return cv2.cvtColor(np.ascontiguousarray(rgb, np.uint8), cv2.COLOR_RGB2GRAY)


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [H, W, 3]: hue in 0..179 (degrees / 2), saturation and value
  in 0..255."""
  return cv2.cvtColor(np.ascontiguousarray(rgb, np.uint8), cv2.COLOR_RGB2HSV)


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] -> float32 [..., 3] CIELAB (D65): L in 0..100, a and b about -128..127."""
  rgb = np.asarray(rgb, np.uint8)
  lab = cv2.cvtColor(rgb.reshape(-1, 1, 3).astype(np.float32) / 255, cv2.COLOR_RGB2LAB)
  return lab.reshape(rgb.shape)
