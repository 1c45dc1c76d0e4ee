"""AIM's trunk as a backbone (pretrain_jax.backbones), registered as 'aim'.

  backbone, params = aimjax.backbone.load("workdir/aim_tiny")   # or a checkpoint, a variant
  feats = aimjax.extract_features(model, params, images, layers=(-1,))

Block outputs with bidirectional attention (as downstream), or the plain causal
mask with `causal=True` (paper Table 3d); LoRA adapters on the trunk for probing
with adapters (paper Sec. 5.4).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aimjax import inference
from aimjax import model as model_lib
from pretrain_jax import backbones, export


@dataclasses.dataclass(frozen=True)
class Backbone:
  """An AIM trunk seen as a backbone: images -> block features."""
  model: model_lib.AIM
  causal: bool = False

  @property
  def image_size(self) -> int | tuple[int, int]:
    """The side of the square images read, or (H, W)."""
    return self.model.image_size

  @property
  def num_patches(self) -> int:
    return self.model.num_patches

  @property
  def width(self) -> int:
    return self.model.width

  @property
  def depth(self) -> int:
    return self.model.depth

  @property
  def num_heads(self) -> int:
    return self.model.num_heads

  def features(self, params, images, layers: Sequence[int], adapters=None):
    """Normalised float images [B, H, W, 3] -> one block output [B, K, D] per entry of
    `layers` (indices in 0..depth-1); `adapters`: LoRA parameters (with_lora)."""
    variables = {"params": params, **({"lora": adapters} if adapters else {})}
    blocks = self.model.apply(variables, images, max(layers) + 1, self.causal,
                              method=self.model.features)
    return [blocks[l] for l in layers]

  def with_lora(self, rank: int, alpha: float, targets: Sequence[str]) -> Backbone:
    """This backbone with LoRA adapters of `rank` on `targets` (qkv, proj, mlp)."""
    lora = model_lib.LoRA(rank, alpha, tuple(targets))
    return dataclasses.replace(self, model=self.model.clone(lora=lora))

  def init_adapters(self, rng):
    """The LoRA parameters at initialisation (B = 0: the adapted trunk starts as the base)."""
    dummy = jnp.zeros((2, *model_lib.image_hw(self.image_size), 3))
    return nn.unbox(jax.jit(self.model.init)(rng, dummy, jnp.ones((2,), jnp.int32))["lora"])

  def save_merged(self, params, adapters, path: str) -> None:
    """Writes params with the adapters folded in (model_lib.merge_lora) as safetensors
    that aimjax.load reads."""
    merged = model_lib.merge_lora(params, adapters, self.model.lora)
    keys = ("image_size", "patch_size", "width", "depth", "num_heads", "mlp_ratio")
    export.save_safetensors(merged, path, {
        "model": {k: getattr(self.model, k) for k in keys} | {"head": "none"}})


def load(init_from: str, image_size: int | tuple[int, int] = 0, step: int | None = None,
         causal: bool = False, num_heads: int | None = None):
  """(Backbone, params) of any checkpoint kind aimjax.load reads (a workdir, safetensors,
  an official checkpoint, or a variant name: random init). image_size: the resolution to
  read images at, S or (H, W) (0: the checkpoint's own; 224 for a variant or an official
  checkpoint); the fixed sin-cos positions re-grid to any size. The loader registered as
  'aim'."""
  if image_size and np.ndim(image_size):
    h, w = model_lib.image_hw(image_size)
    image_size = h if h == w else (h, w)
  model, params, _ = inference.load(init_from, image_size=image_size or 224,
                                    num_heads=num_heads, step=step)
  if image_size and model.image_size != image_size:
    model = model.clone(image_size=image_size)
  return Backbone(model, causal), params


def extract_features(model: model_lib.AIM, params, images, layers: Sequence[int] = (-1,),
                     chunk: int = 32, mesh: jax.sharding.Mesh | None = None):
  """Block outputs (bidirectional attention) of AIM `model` for `images`: float
  [N, S, S, 3], preprocessed (aimjax.preprocessing). Returns a list (one per entry of
  `layers`, negative counts from the last block) of float32 [N, K, D] numpy arrays;
  chunking and sharding as pretrain_jax.backbones.extract_features."""
  return backbones.extract_features(Backbone(model), params, images, layers, chunk, mesh)
