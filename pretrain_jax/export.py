"""Parameters <-> safetensors files, for inference outside this framework.

Keys are the '/'-joined parameter paths (`blocks_0/attn/qkv`); the config the
params belong to travels as JSON in the file's metadata. bfloat16 leaves are
stored as their uint16 bit patterns and listed in the metadata, so the round
trip is exact for every dtype. Files are written atomically; paths may be
local or gs://... (pretrain_jax/paths.py).
"""
from __future__ import annotations

import json
from typing import Any

import jax
import ml_dtypes
import numpy as np
from etils import epath

from pretrain_jax import paths

_BF16 = np.dtype(ml_dtypes.bfloat16)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    key = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, dict):
      out.update(flatten(v, key))
    else:
      out[key] = v
  return out


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for key, v in flat.items():
    node = tree
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def save_safetensors(params, path: str, config: dict | None = None) -> None:
  """Writes params (a nested dict of arrays, possibly sharded) to `path`."""
  from safetensors.numpy import save_file
  flat = {k: np.asarray(jax.device_get(v)) for k, v in flatten(params).items()}
  bf16 = sorted(k for k, v in flat.items() if v.dtype == _BF16)
  for k in bf16:
    flat[k] = flat[k].view(np.uint16)
  metadata = {"format": "pretrain_jax", "bfloat16": json.dumps(bf16)}
  if config is not None:
    metadata["config"] = json.dumps(config)
  tmp = paths.staging_path(path)
  save_file({k: np.ascontiguousarray(v) for k, v in flat.items()}, tmp, metadata=metadata)
  paths.publish(tmp, path)


def load_safetensors(path: str) -> tuple[dict[str, Any], dict | None]:
  """Returns (params as nested numpy dict, config dict or None)."""
  from safetensors import safe_open
  if not epath.Path(path).exists():
    raise FileNotFoundError(f"safetensors file not found: {path}")
  with paths.local_copy(path) as local, safe_open(local, "np") as f:
    metadata = f.metadata() or {}
    flat = {k: f.get_tensor(k) for k in f.keys()}
  for k in json.loads(metadata.get("bfloat16", "[]")):
    flat[k] = flat[k].view(_BF16)
  config = json.loads(metadata["config"]) if "config" in metadata else None
  return unflatten(flat), config
