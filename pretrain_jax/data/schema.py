"""Schemas of multimodal records: what each field of a shard must hold.

A schema maps field names to `FieldSpec`s and is stored beside the shards as
`schema.json`, written by the pseudo-labelling pipeline, so readers can check
every record they decode. Kinds:

  image   encoded PNG/JPEG bytes of uint8 [H, W, 3] (`shape` is the decoded shape)
  array   numpy array of `dtype` and `shape` (None: any length along that axis)
  text    str
  scalar  int or float
  map     {name: number} with exactly the names in `keys` (e.g. metadata)
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np
from etils import epath

from pretrain_jax import paths

KINDS = ("image", "array", "text", "scalar", "map")
SCHEMA_FILE = "schema.json"


@dataclasses.dataclass(frozen=True)
class FieldSpec:
  kind: str
  dtype: str = ""
  shape: tuple[int | None, ...] = ()
  keys: tuple[str, ...] = ()

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"unknown field kind {self.kind!r}; kinds: {KINDS}")
    if self.kind == "array" and not self.dtype:
      raise ValueError("an array field needs a dtype")

  def to_json(self) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": self.kind}
    if self.dtype:
      out["dtype"] = self.dtype
    if self.shape:
      out["shape"] = list(self.shape)
    if self.keys:
      out["keys"] = list(self.keys)
    return out

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> "FieldSpec":
    return cls(d["kind"], d.get("dtype", ""), tuple(d.get("shape", ())), tuple(d.get("keys", ())))

  def check(self, value: Any) -> str | None:
    """None if `value` (decoded; images as uint8 arrays) fits, else what is wrong."""
    if self.kind == "text":
      return None if isinstance(value, str) else f"expected text, got {type(value).__name__}"
    if self.kind == "scalar":
      ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
      ok = ok or (isinstance(value, np.ndarray) and value.ndim == 0)
      return None if ok else f"expected a number, got {type(value).__name__}"
    if self.kind == "map":
      if not isinstance(value, dict):
        return f"expected a map, got {type(value).__name__}"
      missing = sorted(set(self.keys) - set(value))
      extra = sorted(set(value) - set(self.keys))
      if missing or extra:
        return f"map keys differ: missing {missing}, unexpected {extra}"
      bad = [k for k, v in value.items() if not isinstance(v, (int, float))]
      return f"non-numeric values for {bad}" if bad else None
    if not isinstance(value, np.ndarray):
      return f"expected an array, got {type(value).__name__}"
    dtype = "uint8" if self.kind == "image" else self.dtype
    if value.dtype != np.dtype(dtype):
      return f"dtype {value.dtype}, expected {dtype}"
    if len(value.shape) != len(self.shape) or any(
        want is not None and got != want for got, want in zip(value.shape, self.shape)):
      want = ["*" if s is None else s for s in self.shape]
      return f"shape {list(value.shape)}, expected {want}"
    return None


Schema = dict[str, FieldSpec]


def write_schema(directory: str, schema: Schema) -> None:
  """Writes `directory/schema.json` atomically (directory: local or gs://...)."""
  paths.write_text(os.path.join(directory, SCHEMA_FILE), json.dumps(
      {"fields": {k: v.to_json() for k, v in sorted(schema.items())}}, indent=1))


def read_schema(directory: str) -> Schema:
  path = epath.Path(directory) / SCHEMA_FILE
  if not path.exists():
    raise FileNotFoundError(f"no {SCHEMA_FILE} in {directory}: these shards were not written by "
                            "the pseudo-labelling pipeline (pass the fields' specs explicitly)")
  return {k: FieldSpec.from_json(v) for k, v in json.loads(path.read_text())["fields"].items()}


def problems(record: dict[str, Any], schema: Schema) -> list[str]:
  """Every way `record` (decoded) differs from `schema`: 'field: what is wrong'."""
  out = [f"{name}: missing" for name in schema if name not in record]
  for name, spec in schema.items():
    if name in record:
      msg = spec.check(record[name])
      if msg:
        out.append(f"{name}: {msg}")
  return out
