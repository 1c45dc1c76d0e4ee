"""Random-access image sources for Grain: ArrayRecord shards, TFDS, image folders, scenes.

Every source returns `(where, payload)` from `__getitem__`: `where` names the
record for error messages (`shard-00003.array_record[17]`, a file path,
`tfds:imagenet2012/train[5]`), and `decode(payload)` turns the payload into
`{"image": uint8 [H, W, 3], "label": int32}`. Decoding runs in Grain's map
step (worker processes when configured), not in `__getitem__`.

Paths and globs may be local or URLs (gs://...): they go through etils.epath
(pretrain_jax/paths.py). A constructor given `key` (the config key the path
came from, e.g. 'data.train') names it when a path is missing or a glob
matches nothing, so a bad path fails at start, not at the first read.
"""
from __future__ import annotations

import glob
import os
from typing import Any

import numpy as np
from etils import epath

from pretrain_jax import paths as paths_lib
from pretrain_jax.data import records

# Random access: no readahead (the default reads up to 16 MB ahead per lookup).
_READ_OPTIONS = "readahead_buffer_size:0"

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def key_prefix(key: str | None) -> str:
  """The start of an error message: "config key 'KEY': ", or '' without a key."""
  return f"config key '{key}': " if key else ""


def expand(pattern, key: str | None = None) -> list[str]:
  """Paths of a glob, a comma-separated list of paths/globs, or a list of paths, in order
  (each glob's matches sorted). Raises ValueError for an empty pattern and
  FileNotFoundError naming `key` and the path for a missing path or an empty glob."""
  globs = isinstance(pattern, str)   # the items of a list are literal paths
  parts = pattern.split(",") if globs else list(pattern)
  out = []
  for part in parts:
    part = os.fspath(part).strip()
    if not part:
      raise ValueError(f"{key_prefix(key)}names no path (got {pattern!r}); set it to a path "
                       "or a glob of shards")
    if globs and glob.has_magic(part):
      matched = paths_lib.glob(part)
      if not matched:
        raise FileNotFoundError(f"{key_prefix(key)}no files match {part}")
      out.extend(matched)
    elif epath.Path(part).exists():
      out.append(part)
    else:
      raise FileNotFoundError(f"{key_prefix(key)}path not found: {part}")
  return out


class ArrayRecordSource:
  """Records of `records.py`'s format in one or more ArrayRecord shards.

  pattern: a glob, a comma-separated list of paths, or a list of paths (local or
  gs://...). key: the config key it came from, for error messages.
  """

  def __init__(self, pattern, image_key: str = "image", label_key: str = "label",
               key: str | None = None):
    paths = expand(pattern, key)
    from array_record.python import array_record_module as arm
    self.paths = paths
    counts = []
    for p in paths:
      try:
        reader = arm.ArrayRecordReader(p, _READ_OPTIONS)
      except Exception as e:  # the C++ reader raises plain RuntimeError/ValueError
        raise ValueError(f"{key_prefix(key)}cannot open ArrayRecord shard {p}: {e}") from e
      counts.append(reader.num_records())
      reader.close()
    self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    self.image_key, self.label_key = image_key, label_key
    self._readers: dict[int, Any] = {}

  def __len__(self) -> int:
    return int(self._starts[-1])

  def locate(self, index: int) -> tuple[str, int]:
    """(shard path, index within the shard) of global record `index`."""
    shard = int(np.searchsorted(self._starts, index, side="right") - 1)
    return self.paths[shard], int(index - self._starts[shard])

  def __getitem__(self, index: int):
    from array_record.python import array_record_module as arm
    shard = int(np.searchsorted(self._starts, index, side="right") - 1)
    local = int(index - self._starts[shard])
    if shard not in self._readers:
      self._readers[shard] = arm.ArrayRecordReader(self.paths[shard], _READ_OPTIONS)
    where = f"{self.paths[shard]}[{local}]"
    try:
      data = self._readers[shard].read([local])[0]
    except Exception as e:
      return where, e   # reported by decode, with the record's name
    return where, data

  def decode(self, payload) -> dict[str, Any]:
    if isinstance(payload, Exception):
      raise payload
    record = records.decode_record(payload)
    if self.image_key not in record:
      raise KeyError(f"record has no '{self.image_key}' field (fields: {sorted(record)})")
    out = {"image": records.decode_image(record[self.image_key]),
           "label": np.int32(record.get(self.label_key, -1))}
    if isinstance(record.get("caption"), str):
      out["caption"] = record["caption"]
    return out

  def __getstate__(self):   # readers are not picklable; reopen in each worker
    state = dict(self.__dict__)
    state["_readers"] = {}
    return state


class TfdsSource:
  """A TFDS dataset in array_record format, by name and `data_dir` (`tfds.data_source`)."""

  def __init__(self, name: str, split: str, data_dir: str | None = None,
               image_key: str = "image", label_key: str = "label", key: str | None = None):
    import tensorflow_datasets as tfds
    try:
      self._source = tfds.data_source(name, split=split, data_dir=data_dir or None)
    except Exception as e:
      raise FileNotFoundError(
          f"{key_prefix(key)}TFDS dataset '{name}' split '{split}' not available in "
          f"data_dir={data_dir!r}: {e}. "
          "Prepare it with `tfds build` (file_format=array_record) first.") from e
    self.name, self.split = name, split
    self.image_key, self.label_key = image_key, label_key

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int):
    where = f"tfds:{self.name}/{self.split}[{index}]"
    try:
      return where, self._source[index]
    except Exception as e:
      return where, e

  def decode(self, payload) -> dict[str, Any]:
    if isinstance(payload, Exception):
      raise payload
    return {"image": records.decode_image(payload[self.image_key]),
            "label": np.int32(payload.get(self.label_key, -1))}


class ImageFolderSource:
  """root/CLASS_NAME/*.jpg; labels are the sorted class folder indices.

  Images directly under `root` (no class folders) get label -1. root may be
  local or gs://...; key: the config key it came from, for error messages.
  """

  def __init__(self, root: str, key: str | None = None):
    if not str(root).strip():
      raise ValueError(f"{key_prefix(key)}names no image folder (use folder:DIR)")
    top = epath.Path(root)
    if not top.is_dir():
      raise FileNotFoundError(f"{key_prefix(key)}image folder not found: {root}")
    entries = sorted(p.name for p in top.iterdir())
    classes = [d for d in entries if (top / d).is_dir()]
    files, labels = [], []
    for label, cls in enumerate(classes):
      for dirpath, names in sorted((os.fspath(d), n) for d, _, n in (top / cls).walk()):
        for n in sorted(names):
          if n.lower().endswith(IMAGE_EXTENSIONS):
            files.append(os.path.join(dirpath, n))
            labels.append(label)
    for n in entries:
      if n.lower().endswith(IMAGE_EXTENSIONS):
        files.append(os.path.join(root, n))
        labels.append(-1)
    if not files:
      raise FileNotFoundError(
          f"{key_prefix(key)}no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    self.files, self.labels, self.classes = files, labels, classes

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int):
    return self.files[index], (self.files[index], self.labels[index])

  def decode(self, payload) -> dict[str, Any]:
    path, label = payload
    with epath.Path(path).open("rb") as f:
      return {"image": records.decode_image(f.read()), "label": np.int32(label)}


class ScenesSource:
  """Procedural scenes rendered on the fly (see scenes.py), `num` of them.

  split='train' and split='eval' use different seeds, so they never share a scene.
  """

  def __init__(self, num: int, seed: int = 0, resolution: int = 64, split: str = "train"):
    if num <= 0:
      raise ValueError(f"scenes source needs a positive number of samples, got {num}")
    self.num, self.resolution, self.split = num, resolution, split
    self.seed = seed if split == "train" else seed + 1_000_003

  def __len__(self) -> int:
    return self.num

  def __getitem__(self, index: int):
    return f"scenes(seed={self.seed})[{index}]", int(index)

  def decode(self, payload) -> dict[str, Any]:
    from pretrain_jax.data import scenes
    scene = scenes.render_scene(self.seed, payload, self.resolution)
    return {"image": scene["rgb"], "label": np.int32(scene["label"])}
