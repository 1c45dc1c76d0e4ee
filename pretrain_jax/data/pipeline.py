"""Grain input pipelines: sources -> decode -> augment -> mixture -> batches.

A data spec is a string, so any mixture is one command-line override:

  scenes:20000                                   the embedded procedural scenes
  arrayrecord:/data/dfn/*.array_record           shards in records.py's format
  tfds:imagenet2012/train                        tfds.data_source, data.tfds_data_dir
  folder:/data/my_images                         class sub-folders
  webdataset:/data/cc12m                         ml-4m's ROOT/rgb/shard-*.tar (data/webdataset.py)
  arrayrecord:/data/dfn/*.array_record@0.8,tfds:imagenet2012/train@0.2   weighted mixture

Order and augmentation are deterministic functions of the seed and the
position in one global stream (Grain's index shuffling and per-index
random_map), so restoring the iterator state resumes exactly, and global
batch b is examples [b*B, (b+1)*B) of that stream whatever the number of
devices, threads or processes: each process reads only the rows of every
global batch that its devices hold (`rows`, see partitioning.process_rows).

Images leave the pipeline as uint8 (4x less host memory and host-to-device
traffic than float32); `transforms.normalize_images` standardises them on
the device.
"""
from __future__ import annotations

import collections
import collections.abc
import logging
import threading
from typing import Sequence

import grain
import numpy as np

from pretrain_jax.data import sources as sources_lib
from pretrain_jax.data import transforms
from pretrain_jax.data.errors import DataError


def parse_spec(spec: str, key: str | None = None) -> list[tuple[str, str, float]]:
  """'kind:arg@w,kind:arg@w' -> [(kind, arg, weight)], weights normalised. key: the
  config key the spec came from, named in the errors."""
  where = f"config key '{key}': " if key else ""
  parts = []
  for item in (s.strip() for s in spec.split(",")):
    if not item:
      continue
    weight = 1.0
    if "@" in item:
      item, w = item.rsplit("@", 1)
      try:
        weight = float(w)
      except ValueError:
        raise ValueError(f"{where}data spec '{spec}': weight '{w}' is not a number") from None
      if weight <= 0:
        raise ValueError(f"{where}data spec '{spec}': weights must be positive, got {weight}")
    kind, _, arg = item.partition(":")
    if kind not in ("scenes", "arrayrecord", "tfds", "folder", "webdataset"):
      raise ValueError(
          f"{where}data spec '{spec}': unknown source kind '{kind}' (use scenes, arrayrecord, "
          "tfds, folder or webdataset)")
    parts.append((kind, arg, weight))
  if not parts:
    hint = f"; set --config.{key}=KIND:ARG (kinds: module docstring)" if key else ""
    raise ValueError(f"{where}data spec '{spec}' names no source{hint}")
  total = sum(w for _, _, w in parts)
  return [(k, a, w / total) for k, a, w in parts]


def make_source(kind: str, arg: str, data_cfg, split: str, key: str | None = None):
  """The source of one spec item. key: the config key the spec came from (default
  'data.{split}'), named when a path is missing, a glob matches nothing or `arg` is empty."""
  key = key or f"data.{split}"
  if kind == "scenes":
    try:
      num = int(arg) if arg else data_cfg.get("scenes_num", 100_000)
    except ValueError:
      raise ValueError(f"config key '{key}': scenes:N needs a number, got 'scenes:{arg}'") from None
    return sources_lib.ScenesSource(num, seed=data_cfg.get("scenes_seed", 0),
                                    resolution=data_cfg.get("scenes_resolution", 64), split=split)
  if not arg.strip():
    raise ValueError(f"config key '{key}': '{kind}:' names no path (use {kind}:PATH)")
  if kind == "arrayrecord":
    return sources_lib.ArrayRecordSource(arg, data_cfg.get("image_key", "image"),
                                         data_cfg.get("label_key", "label"), key=key)
  if kind == "tfds":
    name, _, tfds_split = arg.partition("/")
    return sources_lib.TfdsSource(name, tfds_split or split, data_cfg.get("tfds_data_dir") or None,
                                  data_cfg.get("image_key", "image"),
                                  data_cfg.get("label_key", "label"), key=key)
  if kind == "webdataset":
    from pretrain_jax.data import webdataset
    return webdataset.WebDatasetSource(arg, data_cfg.get("webdataset_image_modality", "rgb"),
                                       key=key)
  return sources_lib.ImageFolderSource(arg, key=key)


class Decode(grain.transforms.Map):
  """(where, payload) -> {"image": uint8, "label": int32, "valid": float32}.

  A record that fails to decode raises DataError naming it, or, with
  `skip_corrupt`, becomes an all-zero example with valid=0 that losses mask
  out and the loop counts (metric `data/invalid`).
  """

  def __init__(self, source, image_size: int, skip_corrupt: bool):
    self.source, self.image_size, self.skip_corrupt = source, image_size, skip_corrupt

  def map(self, element):
    where, payload = element
    try:
      example = self.source.decode(payload)
      image = example["image"]
      if image.ndim != 3 or image.shape[-1] != 3 or min(image.shape[:2]) < 1:
        raise ValueError(f"image has shape {list(image.shape)}, expected [H, W, 3]")
    except Exception as e:  # every failure of one record is reported the same way
      if not self.skip_corrupt:
        raise DataError(f"bad record {where}: {type(e).__name__}: {str(e).rstrip('.')}. Set "
                        "data.skip_corrupt=True to skip such records.") from e
      logging.warning("skipping bad record %s: %s", where, e)
      size = self.image_size
      return {"image": np.zeros((size, size, 3), np.uint8), "label": np.int32(-1),
              "valid": np.float32(0.0)}
    return {"image": image, "label": np.int32(example["label"]), "valid": np.float32(1.0)}


class Augment(grain.transforms.RandomMap):
  """Training transform: random resized crop and optional flip (uint8 out)."""

  def __init__(self, size: int, scale, flip: bool):
    self.size, self.scale, self.flip = size, tuple(scale), flip

  def random_map(self, element, rng: np.random.Generator):
    image = element["image"]
    if element["valid"] > 0:
      image = transforms.random_resized_crop(image, rng, self.size, self.scale)
      if self.flip:
        image = transforms.random_flip(image, rng)
    return {**element, "image": np.ascontiguousarray(image)}


class EvalTransform(grain.transforms.Map):
  """Evaluation transform: resize the shorter side, centre crop (uint8 out)."""

  def __init__(self, size: int):
    self.size = size

  def map(self, element):
    image = element["image"]
    if element["valid"] > 0:
      image = transforms.resize_center_crop(image, self.size)
    return {**element, "image": image}


class ProcessRows(grain.MapDataset):
  """This process's share of every global batch.

  rows: the sorted global row indices this process feeds (`partitioning.process_rows`;
  any set, contiguous or not). Element i is element (i // n) * batch + rows[i % n] of
  the parent (n = len(rows)): the process's rows of each global batch, in order.
  """

  def __init__(self, parent: grain.MapDataset, batch: int, rows: Sequence[int]):
    super().__init__(parent)
    rows = tuple(int(r) for r in rows)
    if not rows or list(rows) != sorted(set(rows)) or rows[0] < 0 or rows[-1] >= batch:
      raise ValueError(f"rows {_short(rows)} are not sorted distinct rows of a global batch "
                       f"of {batch}")
    self._batch, self._rows = batch, rows
    self._length = (len(parent) // batch) * len(rows)

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    b, j = divmod(index, len(self._rows))
    return self._parent[b * self._batch + self._rows[j]]

  def __str__(self) -> str:
    return f"ProcessRows(batch={self._batch}, rows={_short(self._rows)})"


def _short(rows) -> str:
  return str(list(rows)) if len(rows) <= 8 else f"[{rows[0]}, ..., {rows[-1]}] ({len(rows)})"


class RepeatEach(grain.MapDataset):
  """Each element of the parent `n` times in a row: element i is parent[i // n].

  Repeated sampling (4M App. E.7, after Feichtenhofer et al.): put it before
  the per-index random transform (masking), so each record is seen n times an
  epoch, each time with fresh randomness, and follow it by a window shuffle
  (`repeated`) that mixes the copies with those of nearby records. The last
  `cache` records read are kept, so the copies of a record decode it once.
  """

  def __init__(self, parent: grain.MapDataset, n: int, cache: int = 64):
    super().__init__(parent)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
      raise ValueError(f"repeats must be a positive int, got {n!r}")
    self._n, self._size = n, max(int(cache), 1)
    self._cache: collections.OrderedDict = collections.OrderedDict()
    self._lock = threading.Lock()
    self.reads = 0          # parent reads (decodes), for tests and benchmarks

  def __len__(self) -> int:
    return len(self._parent) * self._n

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    j = index // self._n
    with self._lock:
      if j in self._cache:
        self._cache.move_to_end(j)
        return self._cache[j]
    value = self._parent[j]
    with self._lock:
      self.reads += 1
      self._cache[j] = value
      while len(self._cache) > self._size:
        self._cache.popitem(last=False)
    return value

  def __str__(self) -> str:
    return f"RepeatEach(n={self._n})"


class Chain(collections.abc.Sequence):
  """The elements of several datasets one after another (e.g. the eval batches of each of
  4M's datasets). Lazy: building it reads nothing; each iteration reads afresh."""

  def __init__(self, parts):
    self._parts = list(parts)
    self._starts = np.cumsum([0] + [len(p) for p in self._parts])

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    if not -len(self) <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} elements")
    index %= len(self)
    k = int(np.searchsorted(self._starts, index, side="right") - 1)
    return self._parts[k][int(index - self._starts[k])]

  def __iter__(self):
    for part in self._parts:
      yield from part


def repeated(ds: grain.MapDataset, n: int, seed: int, window: int = 256) -> grain.MapDataset:
  """`ds` (already shuffled) with each record n times, the copies shuffled within windows of
  `window` records (n * window elements): like the official loader's shuffle buffer after
  repeating, copies stay close in the stream (with n * window <= the batch they share a
  global batch, spread over its rows and devices). n = 1 returns `ds` unchanged."""
  if n == 1:
    return ds
  window = max(int(window), 1)
  return grain.experimental.WindowShuffleMapDataset(
      RepeatEach(ds, n, cache=window), window_size=n * window, seed=seed)


def check_eval_size(size: int, batch_size: int, key: str, spec: str) -> None:
  """An evaluation set must hold one global batch (a partial last batch is dropped): a
  ValueError naming the config key otherwise, before the first step rather than at the
  first evaluation."""
  if size < batch_size:
    raise ValueError(f"config key '{key}' ('{spec}') has {size} examples, fewer than one "
                     f"global batch of {batch_size}")


def _rows(batch_size: int, rows: Sequence[int] | None) -> tuple[int, ...]:
  if batch_size <= 0:
    raise ValueError(f"config key 'batch_size' must be a positive int, got {batch_size}")
  return tuple(range(batch_size)) if rows is None else tuple(rows)


def train_dataset(data_cfg, batch_size: int, seed: int,
                  rows: Sequence[int] | None = None) -> grain.IterDataset:
  """Infinite, shuffled, augmented batches: this process's rows of each global batch.

  batch_size: the global batch. rows: the sorted global row indices this process
  feeds (`partitioning.process_rows`; default: all, for one process).
  data_cfg keys: train (spec), image_size, crop_scale, flip, skip_corrupt,
  workers, threads, and per-kind keys (scenes_*, tfds_data_dir, image_key...).
  Yields {"image": uint8 [n, S, S, 3], "label": int32 [n], "valid": float32 [n]},
  n = len(rows).
  """
  rows = _rows(batch_size, rows)
  lo, hi = data_cfg.crop_scale
  if not 0 < lo <= hi <= 1:
    raise ValueError(f"config key 'data.crop_scale' must satisfy 0 < lo <= hi <= 1, got {(lo, hi)}")
  parts = []
  for k, (kind, arg, weight) in enumerate(parse_spec(data_cfg.train, "data.train")):
    src = make_source(kind, arg, data_cfg, "train")
    ds = grain.MapDataset.source(src).shuffle(seed=seed + 7919 * k).repeat(None)
    ds = ds.map(Decode(src, data_cfg.image_size, data_cfg.skip_corrupt))
    ds = ds.random_map(Augment(data_cfg.image_size, data_cfg.crop_scale, data_cfg.flip),
                       seed=seed + 104729 * (k + 1))
    parts.append((ds, weight))
  ds = parts[0][0] if len(parts) == 1 else grain.MapDataset.mix(
      [d for d, _ in parts], [w for _, w in parts])
  # Selecting rows last (the datasets are lazy, so nothing else is read)
  # keeps every example, augmentation included, where it is in the global
  # stream, whatever the number of processes.
  ds = ProcessRows(ds, batch_size, rows).batch(len(rows), drop_remainder=True)
  # prefetch_buffer_size counts batches here.
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=data_cfg.threads,
                                               prefetch_buffer_size=2))
  if data_cfg.workers > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.workers))
  return it_ds


def eval_batches(data_cfg, batch_size: int, num_batches: int,
                 rows: Sequence[int] | None = None):
  """Finite, unshuffled evaluation batches of the data_cfg.eval source.

  Every process gets the same number of batches (from the global length),
  each holding its `rows` of the global batch; a partial last global batch
  is dropped. Raises ValueError when not one global batch fits.
  """
  rows = _rows(batch_size, rows)
  (kind, arg, _), *rest = parse_spec(data_cfg.eval, "data.eval")
  if rest:
    raise ValueError(f"config key 'data.eval' must name one source, got '{data_cfg.eval}'")
  src = make_source(kind, arg, data_cfg, "eval")
  check_eval_size(len(src), batch_size, "data.eval", data_cfg.eval)
  ds = grain.MapDataset.source(src)
  ds = ds.map(Decode(src, data_cfg.image_size, data_cfg.skip_corrupt))
  ds = ds.map(EvalTransform(data_cfg.image_size))
  ds = ProcessRows(ds, batch_size, rows).batch(len(rows), drop_remainder=True)
  n = min(num_batches, len(ds)) if num_batches > 0 else len(ds)
  return ds[:n]
