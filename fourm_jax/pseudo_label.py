"""Pseudo-labelling: images -> aligned multimodal ArrayRecord shards, one field per modality.

  python -m fourm_jax.pseudo_label --config=configs/fourm/pseudo_label.py \\
      --input=folder:/data/my_images --out=/data/my_images_4m

Input specs are those of the training pipelines (`folder:`, `arrayrecord:`,
`tfds:name/split`, `webdataset:ROOT` in ml-4m's layout) plus `scenes:N`,
whose exact depth, normals, segmentation, instances, boxes, caption and
label are written as they are. Every image is resized (shorter side) and
centre-cropped to `resolution`; the labellers in `config.labellers` then run
in order on batches, each able to read the fields of the ones before it
(fourm_jax/labellers.py). Every record is checked against the output schema
(`OUT/schema.json`) before it is written.

Shard i of K holds the images of input indices [i*N//K, (i+1)*N//K). A shard
is written to `.tmp` (a local temporary file when OUT is gs://...), then its
summary `.json`, then renamed (uploaded): a final name
only ever names a complete shard, so running the same command again skips
finished shards and redoes a half-written one, and the result is byte-
identical to an uninterrupted run. Unreadable images are skipped, listed in
the shard summary and counted at the end; they never stop the run.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

import numpy as np
from etils import epath

from fourm_jax import labellers as labellers_lib
from pretrain_jax import paths
from pretrain_jax.data import pipeline, records, schema as schema_lib, transforms
from pretrain_jax.data.schema import FieldSpec

WRITER_OPTIONS = "group_size:1"
MANIFEST = "pseudo_label.json"


class ScenesInput:
  """`scenes:N` as pseudo-labelling input: every exact label of scenes.render_scene."""

  def __init__(self, num: int, seed: int, resolution: int):
    if num <= 0:
      raise ValueError(f"scenes input needs a positive number of scenes, got {num}")
    self.num, self.seed, self.resolution = num, seed, resolution

  def __len__(self) -> int:
    return self.num

  def __getitem__(self, index: int):
    return f"scenes(seed={self.seed})[{index}]", int(index)

  def decode(self, index: int) -> dict[str, Any]:
    from pretrain_jax.data import scenes
    s = scenes.render_scene(self.seed, index, self.resolution)
    return {"image": s["rgb"], "label": s["label"], **{k: s[k] for k in EXACT_FIELDS}}


EXACT_FIELDS = ("depth", "normals", "semantic", "instance", "boxes", "box_classes", "caption")


def base_schema(resolution: int, exact: bool, captions: bool) -> dict[str, FieldSpec]:
  """Fields every record has before the labellers run (and how they are stored)."""
  r = resolution
  out = {"index": FieldSpec("scalar"), "key": FieldSpec("text"),
         "image": FieldSpec("image", shape=(r, r, 3)),
         "original_size": FieldSpec("array", "int32", (2,)), "label": FieldSpec("scalar")}
  if captions or exact:
    out["caption"] = FieldSpec("text")
  if exact:
    out.update({
        "depth": FieldSpec("array", "float16", (r, r)),
        "normals": FieldSpec("array", "float16", (r, r, 3)),
        "semantic": FieldSpec("array", "uint8", (r, r)),
        "instance": FieldSpec("array", "uint8", (r, r)),
        "boxes": FieldSpec("array", "float32", (None, 4)),
        "box_classes": FieldSpec("array", "int32", (None,)),
    })
  return out


def make_input(spec: str, config):
  kind, _, arg = spec.partition(":")
  if kind == "scenes":
    return ScenesInput(int(arg or 1000), config.scenes_seed, config.resolution)
  pipeline.parse_spec(spec)   # a clear error for unknown kinds
  if "@" in spec or "," in spec:
    raise ValueError(f"pseudo-labelling reads one source, not a mixture: {spec!r}")
  return pipeline.make_source(kind, arg, config, "train", key="input")   # --input / config.input


def build_labellers(config, available: set[str]) -> list[labellers_lib.Labeller]:
  """Creates config.labellers in order, checking each one's inputs exist by then."""
  out = []
  for name in config.labellers:
    options = dict(config.labeller_options.get(name) or {})
    lab = labellers_lib.create(name, config.resolution, **options)
    missing = [f for f in lab.requires if f not in available]
    if missing:
      raise ValueError(
          f"labeller {name!r} needs {missing}, which neither the input nor an earlier labeller "
          f"provides (available: {sorted(available)}); put a labeller producing them first, or "
          "use an input with exact labels (scenes:N)")
    clash = sorted(set(lab.outputs) & available)
    if clash:
      raise ValueError(f"labeller {name!r} would overwrite {clash}")
    available |= set(lab.outputs)
    out.append(lab)
  return out


def _manifest(config, spec: str, num: int, num_shards: int) -> dict[str, Any]:
  return {"input": spec, "num": num, "shards": num_shards, "resolution": config.resolution,
          "labellers": list(config.labellers),
          "labeller_options": {k: dict(v) for k, v in config.labeller_options.items()},
          "captions": bool(config.captions)}


def shard_path(out: str, shard: int, num_shards: int) -> str:
  return os.path.join(out, f"shard-{shard:05d}-of-{num_shards:05d}.array_record")


def _prepare(example: dict[str, Any], resolution: int, exact: bool) -> dict[str, Any]:
  image = example["image"]
  if image.ndim != 3 or image.shape[-1] != 3 or min(image.shape[:2]) < 1:
    raise ValueError(f"image has shape {list(image.shape)}, expected [H, W, 3]")
  sample = dict(example)
  sample["original_size"] = np.array(image.shape[:2], np.int32)
  if not exact and image.shape[:2] != (resolution, resolution):
    sample["image"] = transforms.resize_center_crop(image, resolution, crop_fraction=1.0)
  return sample


def _store(sample: dict[str, Any], schema: dict[str, FieldSpec]) -> dict[str, Any]:
  """Keeps the schema's fields, cast to their stored dtypes (exact depth is float32 -> float16)."""
  out = {}
  for name, spec in schema.items():
    value = sample.get(name)
    if spec.kind == "array" and isinstance(value, np.ndarray) and value.dtype != spec.dtype:
      value = value.astype(spec.dtype)
    elif spec.kind == "scalar" and isinstance(value, np.ndarray) and value.ndim == 0:
      value = value.item()
    out[name] = value
  return out


class _Progress:
  def __init__(self, total: int):
    self.total, self.done, self.start, self.last = total, 0, time.perf_counter(), 0.0

  def update(self, n: int) -> None:
    self.done += n
    now = time.perf_counter()
    if now - self.last >= 5 or self.done >= self.total:
      self.last = now
      rate = self.done / max(now - self.start, 1e-9)
      eta = (self.total - self.done) / rate if rate > 0 else float("inf")
      logging.info("%d/%d images (%.1f%%), %.1f images/s, ETA %s", self.done, self.total,
                   100 * self.done / self.total, rate, _duration(eta))


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _shard_range(shard: int, num: int, num_shards: int) -> range:
  return range(shard * num // num_shards, (shard + 1) * num // num_shards)


def _plan(config, spec: str):
  """(source, exact labels?, labellers, output schema) of a run."""
  source = make_input(spec, config)
  exact = isinstance(source, ScenesInput)
  schema = base_schema(config.resolution, exact, config.captions)
  labs = build_labellers(config, set(schema))
  for lab in labs:
    schema.update(lab.outputs)
  return source, exact, labs, schema


def _shard_job(args) -> tuple[int, dict[str, Any]]:
  """Writes one shard in a worker process (config passed as a dict)."""
  import ml_collections
  config_dict, spec, out, shard, num, num_shards = args
  logging.getLogger().setLevel(logging.WARNING)
  config = ml_collections.ConfigDict(config_dict)
  source, exact, labs, schema = _plan(config, spec)
  indices = _shard_range(shard, num, num_shards)
  summary = _write_shard(shard_path(out, shard, num_shards), indices, source, labs, schema,
                         config, exact, _Progress(len(indices)))
  return shard, summary


class _Interrupted(RuntimeError):
  """Raised by the `debug.stop_after_records` fault injection (tests)."""


def _write_shard(path: str, indices: range, source, labellers, schema, config, exact: bool,
                 progress: _Progress) -> dict[str, Any]:
  from array_record.python import array_record_module as arm
  tmp = paths.staging_path(path)   # local: PATH.tmp beside it; for gs://, a local temp file
  if os.path.exists(tmp):   # left by an interrupted run: redone from the start
    os.remove(tmp)
  writer = arm.ArrayRecordWriter(tmp, WRITER_OPTIONS)
  written, skipped = 0, []
  stop_after = config.debug.stop_after_records
  try:
    for start in range(indices.start, indices.stop, config.batch_size):
      batch_idx = range(start, min(start + config.batch_size, indices.stop))
      samples = []
      for index in batch_idx:
        where, payload = source[index]
        try:
          sample = _prepare(source.decode(payload), config.resolution, exact)
          if config.captions and not isinstance(sample.get("caption"), str):
            raise ValueError("no caption")
        except Exception as e:  # an unreadable image is skipped, whatever the reason
          logging.warning("skipping %s: %s: %s", where, type(e).__name__, e)
          skipped.append([where, f"{type(e).__name__}: {e}"])
          continue
        sample.update(index=int(index), key=where)
        samples.append(sample)
      if samples:
        for lab in labellers:
          outputs = lab({k: [s[k] for s in samples] for k in lab.requires})
          for key, values in outputs.items():
            for s, v in zip(samples, values):
              s[key] = v
      for s in samples:
        record = _store(s, schema)
        bad = schema_lib.problems(record, schema)
        if bad:
          raise ValueError(f"record {s['key']} does not match the output schema: "
                           f"{'; '.join(bad)} (a labeller returned a wrong value)")
        writer.write(records.encode_record(record))
        written += 1
        if stop_after and progress.done + written >= stop_after:
          raise _Interrupted(f"debug.stop_after_records={stop_after}")
      progress.update(len(batch_idx))
  finally:
    writer.close()
  summary = {"records": written, "skipped": skipped}
  paths.write_text(path + ".json", json.dumps(summary, indent=1))
  paths.publish(tmp, path)   # atomic: the final name only ever names a complete shard
  return summary


def pseudo_label(config, spec: str, out: str) -> dict[str, Any]:
  """Runs the pipeline; returns {"records", "skipped", "skipped_examples", "shards", ...}."""
  if config.resolution <= 0:
    raise ValueError(f"resolution must be a positive number of pixels, got {config.resolution}")
  if config.batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {config.batch_size}")
  source, exact, labs, schema = _plan(config, spec)
  num = len(source) if not config.limit else min(config.limit, len(source))
  if num == 0:
    raise ValueError(f"input {spec!r} holds no images")
  num_shards = config.shards or math.ceil(num / config.records_per_shard)

  epath.Path(out).mkdir(parents=True, exist_ok=True)   # local or gs://...
  manifest = _manifest(config, spec, num, num_shards)
  mpath = os.path.join(out, MANIFEST)
  if epath.Path(mpath).exists():
    old = json.loads(epath.Path(mpath).read_text())
    diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
    if diff:
      raise ValueError(f"{out} holds shards of another pseudo-labelling run (differs in {diff}); "
                       "use a new --out or delete it")
  else:
    paths.write_text(mpath, json.dumps(manifest, indent=1))
  schema_lib.write_schema(out, schema)

  progress = _Progress(num)
  todo = []
  summaries: dict[int, dict[str, Any]] = {}
  for shard in range(num_shards):
    path = shard_path(out, shard, num_shards)
    if epath.Path(path).exists() and epath.Path(path + ".json").exists():
      summaries[shard] = json.loads(epath.Path(path + ".json").read_text())
      progress.update(len(_shard_range(shard, num, num_shards)))
    else:
      todo.append(shard)
  reused = num_shards - len(todo)
  if config.workers > 0 and len(todo) > 1:
    # shards are independent: each worker process builds its own source and labellers
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")   # fork is unsafe once JAX has started threads
    jobs = [(config.to_dict(), spec, out, shard, num, num_shards) for shard in todo]
    with ctx.Pool(min(config.workers, len(todo))) as pool:
      for shard, summary in pool.imap_unordered(_shard_job, jobs):
        summaries[shard] = summary
        progress.update(len(_shard_range(shard, num, num_shards)))
  else:
    for shard in todo:
      summaries[shard] = _write_shard(shard_path(out, shard, num_shards),
                                      _shard_range(shard, num, num_shards), source, labs, schema,
                                      config, exact, progress)
  total = sum(summaries[i]["records"] for i in range(num_shards))
  skipped = [x for i in range(num_shards) for x in summaries[i]["skipped"]]
  logging.info("wrote %d records in %d shards under %s (%d shards already done); skipped %d "
               "unreadable images%s", total, num_shards, out, reused, len(skipped),
               "".join(f"\n  {w}: {r}" for w, r in skipped[:20]))
  return {"records": total, "skipped": len(skipped), "skipped_examples": skipped[:20],
          "shards": num_shards, "reused_shards": reused, "out": out}


def main(config, workdir):
  del workdir
  from absl import flags
  spec = flags.FLAGS.input or config.input
  out = flags.FLAGS.out or config.out
  if not spec or not out:
    raise ValueError("pass --input=SPEC and --out=DIR (or config.input / config.out)")
  result = pseudo_label(config, spec, out)
  print(f"wrote {result['records']} records in {result['shards']} shards under {out}; skipped "
        f"{result['skipped']} unreadable images")


if __name__ == "__main__":
  from absl import flags as _flags
  from pretrain_jax import cli
  _flags.DEFINE_string("input", "", "Input spec: folder:, arrayrecord:, tfds:, webdataset:, scenes:N")
  _flags.DEFINE_string("out", "", "Output directory for the shards.")
  cli.run(main, require_workdir=False)
