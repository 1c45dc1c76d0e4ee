"""The 4M encoder as a transfer backbone on RGB pixels (4M Sec. 3, App. D), registered
as 'fourm' (pretrain_jax.backbones).

  backbone, params = fourm_jax.backbone.load("workdir/4m_tiny")
  feats = backbone.extract(params, images_uint8, layers=(-1,))   # list of [N, K, D]

The encoder reads every patch of the image through its pixel input (the
patch projection of `rgb@224`, or of the tiny config's `rgb@32`) with full
attention; block outputs are the features (the last one after the
encoder's final norm). The core's probe (pretrain_jax.probe, or `python -m
aimjax.probe`) trains attentive or linear probes on them with
`--config.backbone=fourm`.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from fourm_jax import model as model_lib
from pretrain_jax import backbones
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

  def features(self, params, images, layers: Sequence[int]):
    """Normalised float images [B, S, S, 3] -> one block output [B, K, D] per entry of
    `layers` (indices in 0..depth-1; traceable)."""
    blocks = self.model.apply({"params": params}, images, self.modality, max(layers) + 1,
                              method=self.model.encoder_features)
    return [blocks[l] for l in layers]

  def with_lora(self, rank: int, alpha: float, targets: Sequence[str]):
    raise ValueError("config key 'lora.rank': LoRA adapters exist for AIM trunks only; "
                     "probe a 4M backbone frozen (lora.rank=0)")

  def extract(self, params, images_uint8, layers: Sequence[int] = (-1,), chunk: int = 32):
    """uint8 [N, S, S, 3] -> list (one per layer) of float32 [N, K, D] numpy arrays, in
    fixed-size chunks (the last padded), so features do not depend on N."""
    images = transforms.normalize_images(np.asarray(images_uint8))
    return backbones.extract_features(self, params, images, layers, chunk)


def load(workdir: str, step: int | None = None, modality: str | None = None,
         image_size: int = 0):
  """(Backbone, params) of a fourm_jax.train workdir (its config.json and a checkpoint:
  the latest, or `step`). modality: the pixel input to read images through (default: the
  model's first pixel input). image_size: 0, or the modality's resolution (a check: the
  learned patch grid does not re-grid). The loader registered as 'fourm'."""
  from fourm_jax import load as load_lib
  model, params, _ = load_lib.load(workdir, step)
  pixels = [m.name for m in model.inputs if m.kind == "pixels"]
  if not pixels:
    raise ValueError(f"the 4M model of {workdir} has no pixel input (inputs: "
                     f"{[m.name for m in model.inputs]}); it cannot read images")
  modality = modality or pixels[0]
  if modality not in pixels:
    raise ValueError(f"{modality!r} is not a pixel input of {workdir}'s model ({pixels})")
  backbone = Backbone(model, modality)
  if image_size and image_size != backbone.image_size:
    raise ValueError(f"image size {image_size} must be the 4M model's {modality} resolution "
                     f"({backbone.image_size})")
  return backbone, params
