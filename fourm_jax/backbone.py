"""The 4M encoder as a transfer backbone on RGB pixels (4M Sec. 3, App. D).

  backbone, params = fourm_jax.backbone.load("workdir/4m_tiny")
  feats = backbone.extract(params, images_uint8, layers=(-1,))   # list of [N, K, D]

The encoder reads every patch of the image through its pixel input (the
patch projection of `rgb@224`, or of the tiny config's `rgb@32`) with full
attention; block outputs are the features (the last one after the
encoder's final norm). `aimjax.probe` trains attentive or linear probes on
them with `--config.backbone=fourm`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import numpy as np

from fourm_jax import model as model_lib
from pretrain_jax.data import transforms


@dataclasses.dataclass(frozen=True)
class Backbone:
  """A 4M model's encoder seen through one pixel input modality."""
  model: model_lib.FourM
  modality: str

  @property
  def _row(self):
    return {m.name: m for m in self.model.inputs}[self.modality]

  @property
  def image_size(self) -> int:
    return self._row.grid[0] * self._row.patch_size

  @property
  def num_patches(self) -> int:
    return self._row.num_tokens

  @property
  def width(self) -> int:
    return self.model.dim

  @property
  def depth(self) -> int:
    return self.model.encoder_depth

  @property
  def num_heads(self) -> int:
    return self.model.num_heads

  def features(self, params, images, num_blocks: int | None = None):
    """Normalised float images [B, S, S, 3] -> list of block outputs [B, K, D] (traceable)."""
    return self.model.apply({"params": params}, images, self.modality, num_blocks,
                            method=self.model.encoder_features)

  def extract(self, params, images_uint8, layers: Sequence[int] = (-1,), chunk: int = 32):
    """uint8 [N, S, S, 3] -> list (one per layer) of float32 [N, K, D] numpy arrays, in
    fixed-size chunks (the last padded), so features do not depend on N."""
    layers = tuple(int(l) % self.depth for l in layers)
    fn = _features_fn(self, layers)
    images = np.asarray(images_uint8)
    outs = [[] for _ in layers]
    for start in range(0, len(images), chunk):
      part = images[start:start + chunk]
      pad = chunk - len(part)
      if pad:
        part = np.concatenate([part, np.zeros((pad, *part.shape[1:]), part.dtype)])
      for o, f in zip(outs, fn(params, part)):
        o.append(np.asarray(f)[:chunk - pad])
    return [np.concatenate(o) for o in outs]


@functools.lru_cache(maxsize=16)
def _features_fn(backbone: Backbone, layers: tuple[int, ...]):
  @jax.jit
  def fn(params, images):
    blocks = backbone.features(params, transforms.normalize_images(images), max(layers) + 1)
    return tuple(blocks[l] for l in layers)
  return fn


def load(workdir: str, step: int | None = None, modality: str | None = None):
  """(Backbone, params) of a fourm_jax.train workdir (its config.json and a checkpoint:
  the latest, or `step`). modality: the pixel input to read images through (default: the
  model's first pixel input)."""
  from fourm_jax import load as load_lib
  model, params, _ = load_lib.load(workdir, step)
  pixels = [m.name for m in model.inputs if m.kind == "pixels"]
  if not pixels:
    raise ValueError(f"the 4M model of {workdir} has no pixel input (inputs: "
                     f"{[m.name for m in model.inputs]}); it cannot read images")
  modality = modality or pixels[0]
  if modality not in pixels:
    raise ValueError(f"{modality!r} is not a pixel input of {workdir}'s model ({pixels})")
  return Backbone(model, modality), params
