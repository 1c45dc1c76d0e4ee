"""A trained 4M from its fourm_jax.train workdir: model, params and config.

  model, params, config = fourm_jax.load.load("workdir/4m_tiny")
"""
from __future__ import annotations

import json

import ml_collections
from etils import epath

from pretrain_jax import checkpoint, scan


def load(workdir: str, step: int | None = None):
  """(FourM, params, config) of a workdir's config.json and its latest checkpoint (or `step`)."""
  from fourm_jax import train as train_lib     # the config -> model rules live there
  path = epath.Path(workdir) / "config.json"   # local or gs://...
  if not path.exists():
    raise FileNotFoundError(f"{workdir} is not a fourm_jax.train workdir (no config.json)")
  config = ml_collections.ConfigDict(json.loads(path.read_text()))
  params = checkpoint.restore_parts(workdir, ("params",), step)["params"]
  if config.model.get("attention_impl") == "cudnn":   # trained on GPUs; load on any host
    config.model.attention_impl = "auto"
  if config.model.get("scan_layers"):   # trained scanned; generation needs the blocks unrolled
    params = scan.unstack(params)
    config.model.scan_layers = False
  return train_lib.build_model(config), params, config
