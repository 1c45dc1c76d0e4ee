"""Edge maps: Canny edges of an image and SAM-style edges of an instance map (4M-21 App. D.1),
used by the projects' labellers and tokenizer data."""
from __future__ import annotations

import cv2
import numpy as np

from pretrain_jax.data import colors


def canny_edges(rgb: np.ndarray, low: float = 100, high: float = 200) -> np.ndarray:
  """rgb uint8 [H, W, 3] -> uint8 [H, W], 255 on edges, 0 elsewhere (OpenCV Canny on luma)."""
  return cv2.Canny(colors.rgb_to_gray(rgb), low, high, L2gradient=True)


def instance_edges(instance: np.ndarray) -> np.ndarray:
  """instance int [H, W] -> uint8 [H, W]: 255 where a 4-neighbour belongs to another instance.

  This is what Canny finds on a piecewise-constant instance map (SAM edges),
  without its thresholds: every boundary between two segments, both sides.
  """
  ids = np.asarray(instance)
  edge = np.zeros(ids.shape, bool)
  dx = ids[:, 1:] != ids[:, :-1]
  dy = ids[1:] != ids[:-1]
  edge[:, 1:] |= dx
  edge[:, :-1] |= dx
  edge[1:] |= dy
  edge[:-1] |= dy
  return edge.astype(np.uint8) * 255
