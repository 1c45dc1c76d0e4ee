"""Image transforms on numpy arrays: random resized crop, flip, normalisation.

All take uint8 [H, W, 3] images and a `np.random.Generator` where random, so
Grain's `random_map` makes them deterministic per (seed, record index).
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int,
                        scale=(0.4, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
  """Inception-style crop of area fraction in `scale`, resized to [size, size, 3].

  Falls back to a centre crop of the largest valid box after 10 tries (as
  torchvision does).
  """
  h, w = image.shape[:2]
  area = h * w
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    cw = int(round(math.sqrt(target * aspect)))
    ch = int(round(math.sqrt(target / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      top = int(rng.integers(0, h - ch + 1))
      left = int(rng.integers(0, w - cw + 1))
      break
  else:
    in_ratio = w / h
    if in_ratio < ratio[0]:
      cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
      ch, cw = h, int(round(h * ratio[1]))
    else:
      cw, ch = w, h
    top, left = (h - ch) // 2, (w - cw) // 2
  crop = image[top:top + ch, left:left + cw]
  return resize(crop, size, size)


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  if image.shape[:2] == (height, width):
    return image
  return np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC))


def resize_center_crop(image: np.ndarray, size: int, crop_fraction: float = 0.875) -> np.ndarray:
  """Evaluation transform: shorter side to ceil(size / crop_fraction), centre crop."""
  h, w = image.shape[:2]
  short = math.ceil(size / crop_fraction)
  nh, nw = (short, max(short, round(w * short / h))) if h <= w else (max(short, round(h * short / w)), short)
  image = resize(image, nh, nw)
  top, left = (nh - size) // 2, (nw - size) // 2
  return image[top:top + size, left:left + size]


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  return image[:, ::-1] if rng.random() < 0.5 else image


def normalize_images(images, mean=IMAGENET_MEAN, std=IMAGENET_STD):
  """uint8 [..., 3] -> float32, per-channel standardised; numpy or jax arrays.

  Used on the device inside jitted steps, so batches cross to it as uint8.
  """
  if isinstance(images, np.ndarray):
    xp = np
  else:
    import jax.numpy as xp
  x = images.astype(xp.float32) / 255.0
  return (x - xp.asarray(mean, xp.float32)) / xp.asarray(std, xp.float32)


def normalize(image: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
  """uint8 [H, W, 3] -> float32 [H, W, 3], per-channel standardised."""
  x = image.astype(np.float32) / 255.0
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
