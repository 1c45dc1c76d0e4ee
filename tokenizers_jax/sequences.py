"""Sequence encoders: structured labels <-> text of value tokens, in 4M-21's formats.

The text is then tokenised with the shared WordPiece vocabulary
(tokenizers_jax.text); value tokens v0=..v3= (1000 bins each) carry numbers.
The formats are those of the official data pipeline, so token shards written
here mean the same to an official checkpoint:

  det          per object: v0=xmin v1=ymin v2=xmax v3=ymax CLASS (coordinates in
               [0, 1] binned to 0..999), objects nearest to the origin first
  color_palette
               v1=K then K colours as v0=R v0=G v0=B (K in 1..7, channels 0..255)
  metadata     (type, value) pairs v1=TYPE v0=VALUE with the official type ids
               (METADATA_TYPES) and per-type binning; one chunk per pair
  human_poses  'none', or per person: human v0..v3 (box) then four groups in any
               order: pose + 8 pose-tokenizer ids, global + 9 orientation values,
               camera + 3 values, shape + 10 SMPL betas
  sam_instance per query point: point v0=Y v1=X, then 'none' or, per instance
               containing it, polygon v0=xmin v1=ymin v2=xmax v3=ymax (pixels)
               and the 16 ids of the SAM-mask tokenizer

Tokenizer ids up to 1023 take two value groups: v0=i below 512, v1=i-512 above.
Each decode inverts its encode up to binning (boxes 1/999, metadata one bin,
poses one bin of their ranges); palettes, ids and SAM instances exactly.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

from tokenizers_jax.text import VALUE_BINS, value_token

_VALUE = re.compile(r"^v([0-3])=(\d+)$")


def to_bin(x: float, low: float = 0.0, high: float = 1.0) -> int:
  return int(np.clip(np.rint((x - low) / (high - low) * (VALUE_BINS - 1)), 0, VALUE_BINS - 1))


def from_bin(b: int, low: float = 0.0, high: float = 1.0) -> float:
  return low + b / (VALUE_BINS - 1) * (high - low)


def _value(word: str, group: int, what: str) -> int:
  m = _VALUE.match(word)
  if not m or int(m.group(1)) != group:
    raise ValueError(f"{what}: expected a v{group}= token, got {word!r}")
  return int(m.group(2))


class _Words:
  """A cursor over the words of a sequence, for the decoders."""

  def __init__(self, text: str, what: str):
    self.words, self.i, self.what = text.split(), 0, what

  def more(self) -> bool:
    return self.i < len(self.words)

  def peek(self) -> str | None:
    return self.words[self.i] if self.more() else None

  def word(self, expected: str | None = None) -> str:
    if not self.more():
      raise ValueError(f"{self.what}: sequence ends early (word {self.i}); truncated?")
    w = self.words[self.i]
    if expected is not None and w != expected:
      raise ValueError(f"{self.what}: expected {expected!r} at word {self.i}, got {w!r}")
    self.i += 1
    return w

  def value(self, group: int) -> int:
    return _value(self.word(), group, f"{self.what} (word {self.i - 1})")

  def token_id(self) -> int:
    w = self.word()
    m = _VALUE.match(w)
    if not m or m.group(1) not in "01":
      raise ValueError(f"{self.what}: expected a tokenizer id (v0= or v1=), got {w!r}")
    return int(m.group(2)) + (512 if m.group(1) == "1" else 0)


# --- tokenizer ids ----------------------------------------------------------------------------

def id_tokens(ids: Sequence[int]) -> list[str]:
  """Ids of a 1024-code tokenizer -> value tokens (v0=i for i < 512, else v1=i-512)."""
  out = []
  for i in ids:
    i = int(i)
    if not 0 <= i < 1024:
      raise ValueError(f"tokenizer id {i} does not fit the v0/v1 layout (0..1023)")
    out.append(value_token(0, i) if i < 512 else value_token(1, i - 512))
  return out


# --- boxes ------------------------------------------------------------------------------------

BOX_ORDERS = ("dist_to_orig", "area", "none")


def encode_boxes(boxes: np.ndarray, names: Sequence[str], order: str = "dist_to_orig") -> str:
  """boxes float [N, 4] (xmin, ymin, xmax, ymax in [0, 1]), names N class names.

  order: 'dist_to_orig' (the official default: by xmin^2 + ymin^2, nearest the top-left
  corner first), 'area' (largest first) or 'none' (as given); ties keep the given order.
  """
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  if len(names) != len(boxes):
    raise ValueError(f"{len(boxes)} boxes but {len(names)} class names")
  if order not in BOX_ORDERS:
    raise ValueError(f"unknown box order {order!r}; known: {BOX_ORDERS}")
  if order != "none" and len(boxes):
    key = (boxes[:, 0] ** 2 + boxes[:, 1] ** 2 if order == "dist_to_orig" else
           -(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    idx = np.argsort(key, kind="stable")
    boxes, names = boxes[idx], [names[i] for i in idx]
  return " ".join(" ".join([*(value_token(g, to_bin(c)) for g, c in enumerate(box)), name])
                  for box, name in zip(boxes, names))


def decode_boxes(text: str) -> tuple[np.ndarray, list[str]]:
  """Inverse of encode_boxes (class names may span several words)."""
  w, boxes, names = _Words(text, "det"), [], []
  while w.more():
    if len(w.words) - w.i < 5:
      raise ValueError(f"truncated box at word {w.i} of {text!r}")
    boxes.append([from_bin(w.value(g)) for g in range(4)])
    name = []
    while w.more() and not w.peek().startswith("v0="):
      name.append(w.word())
    if not name:
      raise ValueError(f"box {len(names)} has no class name in {text!r}")
    names.append(" ".join(name))
  return np.array(boxes, np.float64).reshape(-1, 4), names


# --- colour palettes --------------------------------------------------------------------------

def encode_palette(colours: np.ndarray) -> str:
  """colours uint8 [K, 3], K >= 1 (one palette of the color_palette labeller's rows)."""
  colours = np.asarray(colours).reshape(-1, 3)
  return " ".join([value_token(1, len(colours))] +
                  [value_token(0, int(v)) for v in colours.reshape(-1)])


def decode_palette(text: str) -> np.ndarray:
  w = _Words(text, "color_palette")
  k = w.value(1)
  if len(w.words) != 1 + 3 * k:
    raise ValueError(f"palette of {k} colours needs {1 + 3 * k} tokens, got {len(w.words)}")
  return np.array([w.value(0) for _ in range(3 * k)], np.uint8).reshape(k, 3)


# --- metadata ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MetadataType:
  """One metadata type: its official id (v1=ID) and how its value is binned (v0=BIN).

  kind 'size': value // 32; 'count': the integer itself; 'range': floor of the
  value's position in [low, high] times (bins - 1); 'thresholds': how many of
  `thresholds` the value reaches. All bins are clipped to 0..999.
  """
  id: int
  kind: str
  low: float = 0.0
  high: float = 0.0
  bins: int = 0
  thresholds: tuple[float, ...] = ()

  def to_bin(self, x: float) -> int:
    if self.kind == "size":
      b = int(x // 32)
    elif self.kind == "count":
      b = int(round(x))
    elif self.kind == "range":
      u = (min(max(x, self.low), self.high) - self.low) / (self.high - self.low)
      b = int(u * (self.bins - 1))
    else:
      b = sum(x >= t for t in self.thresholds)
    return min(max(b, 0), VALUE_BINS - 1)

  def from_bin(self, b: int) -> float:
    """A value inside bin b: its middle (open-ended threshold bins taken 0.5 wide)."""
    if self.kind == "size":
      return 32 * b + 16.0
    if self.kind == "count":
      return float(b)
    if self.kind == "range":
      step = (self.high - self.low) / (self.bins - 1)
      return min(self.low + (b + 0.5) * step, self.high)
    edges = (self.thresholds[0] - 0.5, *self.thresholds, self.thresholds[-1] + 0.5)
    return 0.5 * (edges[b] + edges[b + 1])


# The official type ids and binning (ml-4m's metadata transform).
METADATA_TYPES: dict[str, MetadataType] = {
    "original_width": MetadataType(0, "size"), "original_height": MetadataType(1, "size"),
    "caption_n_chars": MetadataType(2, "count"), "caption_n_words": MetadataType(3, "count"),
    "caption_n_sentences": MetadataType(4, "count"), "n_humans": MetadataType(5, "count"),
    "n_sam_instances": MetadataType(6, "count"), "n_coco_instances": MetadataType(7, "count"),
    "coco_instance_diversity": MetadataType(8, "count"),
    "colorfulness": MetadataType(9, "range", 0, 150, 50),
    "brightness": MetadataType(10, "range", 0, 255, 50),
    "contrast": MetadataType(11, "range", 0, 127, 50),
    "saturation": MetadataType(12, "range", 0, 255, 50),
    "entropy": MetadataType(13, "range", 0, 10, 50),
    "walkability": MetadataType(14, "range", 0, 1, 50),
    "objectness": MetadataType(15, "range", 0, 1, 50),
    "semantic_diversity": MetadataType(16, "count"),
    "geometric_complexity": MetadataType(17, "range", 0, 0.75, 50),
    "occlusion_score": MetadataType(18, "range", 0, 0.25, 50),
    "watermark_score": MetadataType(19, "thresholds", thresholds=(0.5,)),
    "aesthetic_score": MetadataType(20, "thresholds", thresholds=(4.5, 5.5)),
}
_TYPE_BY_ID = {t.id: k for k, t in METADATA_TYPES.items()}

# Our labellers' keys (fourm_jax.metadata) -> (official key, factor to its units).
LABELLER_METADATA: dict[str, tuple[str, float]] = {
    "original_height": ("original_height", 1), "original_width": ("original_width", 1),
    "brightness": ("brightness", 1), "contrast": ("contrast", 1),
    "saturation": ("saturation", 1), "entropy": ("entropy", 1),
    "colorfulness": ("colorfulness", 1),
    "crowdedness": ("n_humans", 1), "sam_clutter": ("n_sam_instances", 1),
    "coco_clutter": ("n_coco_instances", 1), "instance_diversity": ("coco_instance_diversity", 1),
    "semantic_diversity": ("semantic_diversity", 1),
    "objectness": ("objectness", 0.01), "walkability": ("walkability", 0.01),   # % -> share
    "occlusion": ("occlusion_score", 0.01), "geometric_complexity": ("geometric_complexity", 1),
    "caption_chars": ("caption_n_chars", 1), "caption_words": ("caption_n_words", 1),
    "caption_sentences": ("caption_n_sentences", 1),
}


def metadata_from_labellers(*maps: dict[str, float]) -> dict[str, float]:
  """Maps of the metadata labellers -> {official key: value in its units}; other keys dropped."""
  out = {}
  for m in maps:
    for k, v in m.items():
      if k in LABELLER_METADATA:
        name, factor = LABELLER_METADATA[k]
        out[name] = float(v) * factor
  return out


def encode_metadata(meta: dict[str, float], rng: np.random.Generator | None = None,
                    chunks: bool = False) -> str | list[str]:
  """{official key: value} -> 'v1=TYPE v0=BIN ...' in METADATA_TYPES order, or shuffled with
  `rng`; with `chunks` the list of 'v1=TYPE v0=BIN' pairs (for chunk-wise span masking)."""
  unknown = sorted(set(meta) - set(METADATA_TYPES))
  if unknown:
    raise ValueError(f"unknown metadata keys {unknown}; known: {list(METADATA_TYPES)}")
  keys = [k for k in METADATA_TYPES if k in meta]
  if rng is not None:
    keys = [keys[i] for i in rng.permutation(len(keys))]
  pairs = [f"{value_token(1, METADATA_TYPES[k].id)} "
           f"{value_token(0, METADATA_TYPES[k].to_bin(meta[k]))}" for k in keys]
  return pairs if chunks else " ".join(pairs)


def decode_metadata(text: str) -> dict[str, float]:
  """Inverse of encode_metadata: {official key: a value in the encoded bin}."""
  w, out = _Words(text, "metadata"), {}
  if len(w.words) % 2:
    raise ValueError(f"metadata needs (type, value) pairs, got {len(w.words)} tokens")
  while w.more():
    t = w.value(1)
    if t not in _TYPE_BY_ID:
      raise ValueError(f"metadata type v1={t} is not one of the {len(METADATA_TYPES)} known types")
    key = _TYPE_BY_ID[t]
    out[key] = METADATA_TYPES[key].from_bin(w.value(0))
  return out


# --- human poses ------------------------------------------------------------------------------

# group -> (number of values, low, high) binned over 0..999; 'pose' holds tokenizer ids
POSE_GROUPS: dict[str, tuple[int, float, float]] = {
    "pose": (8, 0, 0), "global": (9, -1.0, 1.0), "camera": (3, -1.0, 19.0),
    "shape": (10, -3.0, 3.0)}


@dataclasses.dataclass
class Human:
  """One person (4D-Humans' SMPL fit): box [4] in [0, 1] (xmin, ymin, xmax, ymax), 8 ids of
  the pose tokenizer, global orientation [9] (rotation matrix), camera [3], betas [10]."""
  box: np.ndarray
  pose: np.ndarray
  global_orient: np.ndarray
  camera: np.ndarray
  shape: np.ndarray

  def group(self, name: str) -> np.ndarray:
    return {"pose": self.pose, "global": self.global_orient, "camera": self.camera,
            "shape": self.shape}[name]


def encode_poses(humans: Sequence[Human], rng: np.random.Generator | None = None) -> str:
  """People -> 'none' or 'human BOX GROUP... human ...'; groups in a random order with `rng`
  (the official augmentation), else pose, global, camera, shape."""
  if not humans:
    return "none"
  words = []
  for h in humans:
    words += ["human", *(value_token(g, to_bin(c)) for g, c in enumerate(np.asarray(h.box)))]
    order = list(POSE_GROUPS)
    if rng is not None:
      order = [order[i] for i in rng.permutation(len(order))]
    for name in order:
      n, lo, hi = POSE_GROUPS[name]
      vals = np.asarray(h.group(name)).reshape(-1)
      if len(vals) != n:
        raise ValueError(f"human pose group {name!r} needs {n} values, got {len(vals)}")
      words.append(name)
      words += id_tokens(vals) if name == "pose" else [value_token(0, to_bin(v, lo, hi))
                                                       for v in vals]
  return " ".join(words)


def decode_poses(text: str) -> list[Human]:
  w, humans = _Words(text, "human_poses"), []
  if text.split() == ["none"]:
    return humans
  while w.more():
    w.word("human")
    box = np.array([from_bin(w.value(g)) for g in range(4)])
    groups = {}
    while w.more() and w.peek() != "human":
      name = w.word()
      if name not in POSE_GROUPS or name in groups:
        raise ValueError(f"human_poses: unexpected {name!r} at word {w.i - 1}; groups are "
                         f"{list(POSE_GROUPS)}, each once per person")
      n, lo, hi = POSE_GROUPS[name]
      groups[name] = (np.array([w.token_id() for _ in range(n)], np.int32) if name == "pose"
                      else np.array([from_bin(w.value(0), lo, hi) for _ in range(n)]))
    missing = sorted(set(POSE_GROUPS) - set(groups))
    if missing:
      raise ValueError(f"human_poses: person {len(humans)} lacks groups {missing}")
    humans.append(Human(box, groups["pose"], groups["global"], groups["camera"], groups["shape"]))
  return humans


# --- SAM instances ----------------------------------------------------------------------------

@dataclasses.dataclass
class Query:
  """A query point (x, y in pixels) and the instances containing it: boxes int [N, 4]
  (xmin, ymin, xmax, ymax in pixels) and their SAM-mask tokenizer ids int [N, 16]."""
  point: tuple[int, int]
  boxes: np.ndarray
  ids: np.ndarray


def sam_queries(instance: np.ndarray, boxes: np.ndarray, ids: np.ndarray, num_points: int,
                rng: np.random.Generator) -> list[Query]:
  """instance int [H, W] (0 = none, i + 1 = instance i); boxes int [N, 4] in pixels; ids
  [N, 16] -> `num_points` random query points with the instances under them."""
  h, w = instance.shape
  xs, ys = rng.integers(0, w, num_points), rng.integers(0, h, num_points)
  out = []
  for x, y in zip(xs.tolist(), ys.tolist()):
    hit = [int(instance[y, x]) - 1] if instance[y, x] > 0 else []
    out.append(Query((x, y), np.asarray(boxes, np.int64).reshape(-1, 4)[hit],
                     np.asarray(ids, np.int64).reshape(len(boxes), -1)[hit]))
  return out


def encode_sam_instances(queries: Sequence[Query]) -> str:
  words = []
  for q in queries:
    words += ["point", value_token(0, q.point[1]), value_token(1, q.point[0])]
    if not len(q.boxes):
      words.append("none")
    for box, ids in zip(q.boxes, q.ids):
      words += ["polygon", *(value_token(g, int(c)) for g, c in enumerate(box)), *id_tokens(ids)]
  return " ".join(words)


def decode_sam_instances(text: str, ids_per_instance: int = 16) -> list[Query]:
  w, out = _Words(text, "sam_instance"), []
  while w.more():
    w.word("point")
    y, x = w.value(0), w.value(1)
    boxes, ids = [], []
    if w.peek() == "none":
      w.word()
    while w.peek() == "polygon":
      w.word()
      boxes.append([w.value(g) for g in range(4)])
      ids.append([w.token_id() for _ in range(ids_per_instance)])
    out.append(Query((x, y), np.array(boxes, np.int64).reshape(-1, 4),
                     np.array(ids, np.int64).reshape(-1, ids_per_instance)))
  return out


# ---- raw values kept in token shards, for per-sample serialisation at training time --------
# (fourm_jax.sequence_augment reads them: palettes of 1..7 colours, shuffled metadata, SAM
# query points drawn per load)
RAW_FIELDS = {"color_palette": "color_palette_raw", "metadata": "metadata_raw"}
# sam_instance: the instance map (int [H, W], 0 = none, i + 1 = instance i), the instances'
# boxes in pixels (int32 [N, 4], xmin ymin xmax ymax) and their SAM-mask tokenizer ids
# (int32 [N, 16]); query points are drawn on the map
SAM_RAW_FIELDS = ("sam_instance_map", "sam_instance_boxes", "sam_instance_ids")
# human_poses: per person its box in [0, 1] (float32 [N, 4]), the pose tokenizer's ids of its
# body pose (int32 [N, 8]), global orientation [N, 9], camera [N, 3] and betas [N, 10]; the
# groups' order is drawn per load (official HumanPoseTransform)
POSE_RAW_FIELDS = ("human_poses_boxes", "human_poses_ids", "human_poses_global",
                   "human_poses_camera", "human_poses_betas")


def humans_from_raw(boxes, ids, global_orient, camera, betas) -> list["Human"]:
  """The POSE_RAW_FIELDS arrays of a record -> its people."""
  return [Human(*(np.asarray(a)[i] for a in (boxes, ids, global_orient, camera, betas)))
          for i in range(len(np.asarray(boxes).reshape(-1, 4)))]
TOKENIZER_FILE = "text_tokenizer.json"   # beside the shards: their WordPiece file
SETTINGS_FILE = "sequences.json"         # and the length their sequences were cut to


def metadata_vector(meta: dict[str, float]) -> np.ndarray:
  """{official metadata key: value} -> float32 [T] in METADATA_TYPES order (NaN: absent)."""
  return np.array([meta.get(k, np.nan) for k in METADATA_TYPES], np.float32)


def metadata_dict(vector: np.ndarray) -> dict[str, float]:
  """The inverse of metadata_vector."""
  return {k: float(v) for k, v in zip(METADATA_TYPES, np.asarray(vector)) if not np.isnan(v)}


def write_settings(directory: str, tokenizer_path: str, max_len: int, **extra) -> None:
  """Writes, beside token shards, the WordPiece file and the sequence length they used (and
  `extra` settings, e.g. sam_points and sam_max_len)."""
  import json
  from etils import epath
  d = epath.Path(directory)
  (d / TOKENIZER_FILE).write_text(epath.Path(tokenizer_path).read_text())
  (d / SETTINGS_FILE).write_text(json.dumps({"max_len": int(max_len), "raw_fields": RAW_FIELDS,
                                             **extra}, indent=1))
