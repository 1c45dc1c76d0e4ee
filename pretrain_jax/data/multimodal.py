"""Reading pseudo-labelled multimodal shards for training, with schema checks.

  ds = multimodal.dataset("/data/scenes_4m/*.array_record", fields=("image", "depth", "caption"))
  ds[0] -> {"image": uint8 [R, R, 3], "depth": float16 [R, R], "caption": str, "valid": 1.0}

The schema comes from `schema.json` beside the shards (written by
fourm_jax.pseudo_label) unless one is passed. A record that lacks a requested
field, or holds one of the wrong dtype or shape, raises DataError naming the
shard, the record's index in it and the field; with skip_corrupt=True it
becomes a placeholder with valid=0 (zeros of the field's shape, '' for text),
is logged, and counted in `DecodeModalities.skipped` of that process.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Any, Sequence

import grain
import numpy as np

from pretrain_jax.data import records, schema as schema_lib
from pretrain_jax.data.errors import DataError
from pretrain_jax.data.sources import ArrayRecordSource


def placeholder(spec: schema_lib.FieldSpec) -> Any:
  """The value a skipped record gets for a field: zeros of its shape (unknown lengths 0)."""
  if spec.kind == "text":
    return ""
  if spec.kind == "scalar":
    return 0
  if spec.kind == "map":
    return {k: 0.0 for k in spec.keys}
  shape = tuple(0 if s is None else s for s in spec.shape)
  return np.zeros(shape, np.uint8 if spec.kind == "image" else spec.dtype)


class DecodeModalities(grain.transforms.Map):
  """(where, record bytes) -> {field: value for field in fields} | {"valid": float32}."""

  def __init__(self, schema: schema_lib.Schema, fields: Sequence[str], skip_corrupt: bool = False):
    unknown = sorted(set(fields) - set(schema))
    if unknown:
      raise ValueError(f"fields {unknown} are not in the shards' schema (fields: {sorted(schema)})")
    self.schema = {f: schema[f] for f in fields}
    self.skip_corrupt = skip_corrupt
    self.skipped = 0
    self._lock = threading.Lock()

  def map(self, element):
    where, payload = element
    try:
      if isinstance(payload, Exception):
        raise payload
      record = records.decode_record(payload)
      out = {}
      for name, spec in self.schema.items():
        if name not in record:
          raise DataError(f"{where}: field '{name}' is missing (record has {sorted(record)})")
        value = record[name]
        if spec.kind == "image":
          value = records.decode_image(value)
        problem = spec.check(value)
        if problem:
          raise DataError(f"{where}: field '{name}': {problem}")
        out[name] = value
    except Exception as e:
      err = e if isinstance(e, DataError) else DataError(f"{where}: {type(e).__name__}: {e}")
      if not self.skip_corrupt:
        raise err from e
      logging.warning("skipping bad record: %s", err)
      with self._lock:
        self.skipped += 1
      return {**{n: placeholder(s) for n, s in self.schema.items()}, "valid": np.float32(0)}
    out["valid"] = np.float32(1)
    return out


def _schema(source: ArrayRecordSource) -> schema_lib.Schema:
  dirs = sorted({os.path.dirname(p) for p in source.paths})
  schemas = [schema_lib.read_schema(d) for d in dirs]
  if any(s != schemas[0] for s in schemas[1:]):
    raise ValueError(f"the shards' directories {dirs} have different schemas; pass `schema`")
  return schemas[0]


def schema_of(pattern, key: str | None = None) -> schema_lib.Schema:
  """The schema of the shards `pattern` (as `dataset` reads it)."""
  return _schema(ArrayRecordSource(pattern, key=key))


def dataset(pattern, fields: Sequence[str] | None = None,
            schema: schema_lib.Schema | None = None, skip_corrupt: bool = False,
            seed: int | None = None, key: str | None = None) -> grain.MapDataset:
  """A Grain MapDataset of decoded, checked records (shuffled when `seed` is given).

  pattern: glob, comma-separated paths or a list, as for ArrayRecordSource (local or
  gs://...). fields: the modalities to decode (default: every field of the schema).
  key: the config key `pattern` came from, named when it is empty, a path is missing or
  a glob matches nothing. Nothing is read but the shards' record counts and schema.
  """
  source = ArrayRecordSource(pattern, key=key)
  if schema is None:
    schema = _schema(source)
  decode = DecodeModalities(schema, tuple(fields or schema), skip_corrupt)
  ds = grain.MapDataset.source(source)
  if seed is not None:
    ds = ds.shuffle(seed=seed)
  return ds.map(decode)
