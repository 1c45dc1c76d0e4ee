"""Writes the procedural scenes dataset (scenes.py) as ArrayRecord shards in records.py's format.

  python -m pretrain_jax.data.make_scenes --out=/data/scenes --num=100000 --workers=8

Shard i of K is `OUT/scenes-{i:05d}-of-{K:05d}.array_record` and holds the
contiguous scene indices [i * N // K, (i + 1) * N // K), so record g of the
sorted shards (as `ArrayRecordSource` reads them) is `render_scene(seed, g,
resolution)`. Each shard is written to `path.tmp` and renamed when complete:
a killed run leaves no truncated shard under a final name, and running the
same command again skips the finished shards and writes the rest.
"""
from __future__ import annotations

import math
import multiprocessing
import os
import sys
import time

import numpy as np

from pretrain_jax.data import records, scenes

RECORDS_PER_SHARD = 1000   # default shard size; one shard is one unit of parallel work
WRITER_OPTIONS = "group_size:1"   # one record per chunk: random access reads only that record


def shard_path(out: str, shard: int, num_shards: int) -> str:
  return os.path.join(out, f"scenes-{shard:05d}-of-{num_shards:05d}.array_record")


def shard_range(shard: int, num: int, num_shards: int) -> range:
  """Global scene indices stored in `shard`; shards differ in size by at most one."""
  return range(shard * num // num_shards, (shard + 1) * num // num_shards)


def scene_record(seed: int, index: int, resolution: int) -> bytes:
  """One encoded record: image uint8 [R, R, 3] (PNG), depth/normals float16, masks, boxes, text."""
  s = scenes.render_scene(seed, index, resolution)
  return records.encode_record({
      "image": s["rgb"],
      "depth": s["depth"].astype(np.float16),
      "normals": s["normals"].astype(np.float16),
      "semantic": s["semantic"],
      "instance": s["instance"],
      "boxes": s["boxes"],
      "box_classes": s["box_classes"],
      "caption": s["caption"],
      "label": s["label"],
  })


def _existing_shard_ok(path: str, expected: int, resolution: int) -> bool:
  """True if `path` is a finished shard of this dataset; raises if it belongs to another one."""
  if not os.path.exists(path):
    return False
  from array_record.python import array_record_module as arm
  reader = arm.ArrayRecordReader(path)
  try:
    count = reader.num_records()
    first = reader.read([0])[0] if count else None
  finally:
    reader.close()
  image = None if first is None else records.decode_image(records.decode_record(first)["image"])
  shape = None if image is None else list(image.shape)
  if count != expected or (shape is not None and shape[:2] != [resolution, resolution]):
    raise ValueError(
        f"existing shard {path} has {count} records of {shape} images, but this run writes "
        f"{expected} records of [{resolution}, {resolution}, 3] images into it; delete the "
        "shard or pass the --num/--resolution/--shards it was written with")
  return True


def _write_shard(args: tuple[str, int, int, int, int, int]) -> tuple[str, int]:
  """Writes one shard unless it already exists; returns (path, records written)."""
  out, shard, num_shards, num, seed, resolution = args
  from array_record.python import array_record_module as arm
  path = shard_path(out, shard, num_shards)
  indices = shard_range(shard, num, num_shards)
  if _existing_shard_ok(path, len(indices), resolution):
    return path, 0
  tmp = path + ".tmp"
  writer = arm.ArrayRecordWriter(tmp, WRITER_OPTIONS)
  try:
    for index in indices:
      writer.write(scene_record(seed, index, resolution))
  finally:
    writer.close()
  os.replace(tmp, path)   # atomic on POSIX: the final name only ever names a complete shard
  return path, len(indices)


def write_scenes(out: str, num: int, seed: int = 0, resolution: int = 224,
                 shards: int | None = None, workers: int = 0) -> list[str]:
  """Writes scenes 0..num-1 of `seed` at `resolution` into `shards` shards under `out`.

  shards: None or 0 for ceil(num / RECORDS_PER_SHARD). workers: processes
  writing shards in parallel (0: this process). Returns the shard paths in
  order; shards that already exist are checked and kept.
  """
  if num <= 0:
    raise ValueError(f"--num must be a positive number of scenes, got {num}")
  if resolution <= 0:
    raise ValueError(f"--resolution must be a positive number of pixels, got {resolution}")
  num_shards = shards or math.ceil(num / RECORDS_PER_SHARD)
  if not 0 < num_shards <= num:
    raise ValueError(f"--shards must be between 1 and --num={num}, got {num_shards}")
  os.makedirs(out, exist_ok=True)
  jobs = [(out, i, num_shards, num, seed, resolution) for i in range(num_shards)]
  start, written = time.perf_counter(), 0
  if workers > 0:
    # spawn, not fork: the caller may hold JAX/Grain threads that a forked child would inherit
    with multiprocessing.get_context("spawn").Pool(min(workers, num_shards)) as pool:
      for _, n in pool.imap_unordered(_write_shard, jobs):
        written += n
  else:
    for job in jobs:
      written += _write_shard(job)[1]
  seconds = time.perf_counter() - start
  print(f"wrote {written} of {num} records ({num - written} already present) in {num_shards} "
        f"shards under {out} in {seconds:.1f} s: {written / max(seconds, 1e-9):.1f} records/s",
        flush=True)
  return [shard_path(out, i, num_shards) for i in range(num_shards)]


def main(argv):
  from absl import app
  from absl import flags
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    write_scenes(f.out, f.num, seed=f.seed, resolution=f.resolution, shards=f.shards,
                 workers=f.workers)
  except ValueError as e:   # a bad flag or a shard from another run: one line, no traceback
    sys.exit(f"make_scenes: {e}")


if __name__ == "__main__":   # flags only here: spawned workers import this module too
  from absl import app
  from absl import flags
  from pretrain_jax import cli
  flags.DEFINE_string("out", None, "Directory for the shards (created if missing).")
  flags.DEFINE_integer("num", None, "Number of scenes to write.")
  flags.DEFINE_integer("seed", 0, "Scenes dataset seed (scenes.render_scene).")
  flags.DEFINE_integer("resolution", 224, "Rendered image size in pixels (square).")
  flags.DEFINE_integer("shards", None,
                       f"Number of shards (default: about {RECORDS_PER_SHARD} records each).")
  flags.DEFINE_integer("workers", 0, "Processes writing shards in parallel (0: this process).")
  flags.mark_flags_as_required(["out", "num"])
  app.run(main, flags_parser=cli.parse_flags)
