"""Sequence encoders: boxes, colour palettes and metadata <-> text of value tokens.

The text is then tokenised with the shared WordPiece vocabulary
(tokenizers_jax.text); value tokens v0=..v3= (1000 bins each) carry numbers.

  boxes     per object, nearest to the origin first: v0=xmin v1=ymin v2=xmax v3=ymax CLASS
  palette   v0=K then K colours as v1=R v2=G v3=B (4M-21: K in 1..7, channels 0..255)
  metadata  (type, value) pairs: v1=TYPE v0=VALUE, TYPE indexing METADATA_RANGES' keys,
            VALUE the value binned over that key's range; order optionally shuffled

Each decode inverts its encode up to binning: boxes to 1/999, palettes exactly,
metadata to half a bin of its range.
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from tokenizers_jax.text import VALUE_BINS, value_token

# key -> (low, high): the range binned into 1000 values. Counts use (0, 999), exact.
METADATA_RANGES: dict[str, tuple[float, float]] = {
    "original_height": (0, 3996), "original_width": (0, 3996),
    "brightness": (0, 255), "contrast": (0, 127.5), "saturation": (0, 255), "entropy": (0, 8),
    "colorfulness": (0, 200),
    "crowdedness": (0, 999), "sam_clutter": (0, 999), "coco_clutter": (0, 999),
    "instance_diversity": (0, 999), "semantic_diversity": (0, 999),
    "objectness": (0, 100), "walkability": (0, 100),
    "occlusion": (0, 100), "geometric_complexity": (0, 1),
    "caption_chars": (0, 999), "caption_words": (0, 999), "caption_sentences": (0, 999),
}
METADATA_KEYS = tuple(METADATA_RANGES)

_VALUE = re.compile(r"^v([0-3])=(\d+)$")


def to_bin(x: float, low: float = 0.0, high: float = 1.0) -> int:
  return int(np.clip(np.rint((x - low) / (high - low) * (VALUE_BINS - 1)), 0, VALUE_BINS - 1))


def from_bin(b: int, low: float = 0.0, high: float = 1.0) -> float:
  return low + b / (VALUE_BINS - 1) * (high - low)


def _words(text: str) -> list[str]:
  return text.split()


def _value(word: str, group: int, what: str) -> int:
  m = _VALUE.match(word)
  if not m or int(m.group(1)) != group:
    raise ValueError(f"{what}: expected a v{group}= token, got {word!r}")
  return int(m.group(2))


def encode_boxes(boxes: np.ndarray, names: Sequence[str]) -> str:
  """boxes float [N, 4] (xmin, ymin, xmax, ymax in [0, 1]), names N class names."""
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  if len(names) != len(boxes):
    raise ValueError(f"{len(boxes)} boxes but {len(names)} class names")
  return " ".join(" ".join([*(value_token(g, to_bin(c)) for g, c in enumerate(box)), name])
                  for box, name in zip(boxes, names))


def decode_boxes(text: str) -> tuple[np.ndarray, list[str]]:
  """Inverse of encode_boxes (class names may span several words)."""
  words, boxes, names, i = _words(text), [], [], 0
  while i < len(words):
    if len(words) - i < 5:
      raise ValueError(f"truncated box at word {i} of {text!r}")
    boxes.append([from_bin(_value(words[i + g], g, "box")) for g in range(4)])
    i += 4
    name = []
    while i < len(words) and not words[i].startswith("v0="):
      name.append(words[i])
      i += 1
    if not name:
      raise ValueError(f"box {len(names)} has no class name in {text!r}")
    names.append(" ".join(name))
  return np.array(boxes, np.float64).reshape(-1, 4), names


def encode_palette(colours: np.ndarray) -> str:
  """colours uint8 [K, 3], K >= 1 (one palette of the color_palette labeller's rows)."""
  colours = np.asarray(colours).reshape(-1, 3)
  words = [value_token(0, len(colours))]
  for rgb in colours:
    words += [value_token(1 + c, int(v)) for c, v in enumerate(rgb)]
  return " ".join(words)


def decode_palette(text: str) -> np.ndarray:
  words = _words(text)
  k = _value(words[0], 0, "palette size")
  if len(words) != 1 + 3 * k:
    raise ValueError(f"palette of {k} colours needs {1 + 3 * k} tokens, got {len(words)}")
  vals = [_value(words[1 + 3 * i + c], 1 + c, "palette colour") for i in range(k) for c in range(3)]
  return np.array(vals, np.uint8).reshape(k, 3)


def encode_metadata(meta: dict[str, float], rng: np.random.Generator | None = None) -> str:
  """{key: value} for keys of METADATA_RANGES -> 'v1=TYPE v0=VALUE ...' (shuffled with `rng`)."""
  unknown = sorted(set(meta) - set(METADATA_RANGES))
  if unknown:
    raise ValueError(f"unknown metadata keys {unknown}; known: {list(METADATA_KEYS)}")
  keys = [k for k in METADATA_KEYS if k in meta]
  if rng is not None:
    keys = [keys[i] for i in rng.permutation(len(keys))]
  return " ".join(f"{value_token(1, METADATA_KEYS.index(k))} "
                  f"{value_token(0, to_bin(meta[k], *METADATA_RANGES[k]))}" for k in keys)


def decode_metadata(text: str) -> dict[str, float]:
  words = _words(text)
  if len(words) % 2:
    raise ValueError(f"metadata needs (type, value) pairs, got {len(words)} tokens")
  out = {}
  for i in range(0, len(words), 2):
    t = _value(words[i], 1, "metadata type")
    if t >= len(METADATA_KEYS):
      raise ValueError(f"metadata type v1={t} is not one of the {len(METADATA_KEYS)} known types")
    key = METADATA_KEYS[t]
    out[key] = from_bin(_value(words[i + 1], 0, "metadata value"), *METADATA_RANGES[key])
  return out
