"""Backbones: image encoders that turn images into block features, found by name.

A backbone is any object with

  image_size, num_patches, width, depth, num_heads      ints
  features(params, images, layers) -> list of [B, K, D]  traceable; images float32
      [B, S, S, 3] normalised with the ImageNet mean/std, S = image_size; one array
      per entry of `layers` (block indices in 0..depth-1), K = num_patches, D = width

and, for LoRA probing (optional): `with_lora(rank, alpha, targets)` -> the backbone
with adapters, whose `init_adapters(rng)` returns their parameters,
`features(params, images, layers, adapters=...)` reads them, and
`save_merged(params, adapters, path)` writes the adapted weights folded into params.

A project registers a loader for its model family under a name, as an entry point
in the group `pretrain_jax.backbones` (pretrain_jax.registry):

  load(init_from, image_size=0, step=None, **options) -> (backbone, params)

init_from: what the project can load (a training workdir, a checkpoint, a variant);
image_size: the resolution to read images at (0: the checkpoint's own); step: a
workdir's checkpoint step (None: the latest). The probe (pretrain_jax.probe) and
the feature labellers use only this interface:

  backbone, params = backbones.load("aim", "workdir/aim_tiny")
  feats = backbones.extract_features(backbone, params, backbones.preprocessing(
      backbone.image_size)(images_uint8), layers=(-1,))
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Protocol, Sequence

import flax.linen as nn
import jax
import numpy as np

from pretrain_jax import partitioning, registry
from pretrain_jax.data import transforms


class Backbone(Protocol):
  image_size: int
  num_patches: int
  width: int
  depth: int
  num_heads: int

  def features(self, params, images, layers: Sequence[int]) -> list[jax.Array]:
    ...


def names() -> list[str]:
  """The registered backbone names (e.g. 'aim', 'fourm')."""
  return registry.names(registry.BACKBONES)


def load(name: str, init_from: str, image_size: int = 0, step: int | None = None,
         **options) -> tuple[Backbone, Any]:
  """(backbone, params) of `init_from` through the loader registered as `name`."""
  loader = registry.load(registry.BACKBONES, name, "config key 'backbone':")
  try:
    return loader(init_from, image_size=image_size, step=step, **options)
  except TypeError as e:
    if "unexpected keyword argument" not in str(e):
      raise
    raise ValueError(f"backbone {name!r} takes no option among {sorted(options)}: {e}") from None


def layer_indices(layers: Sequence[int], depth: int) -> tuple[int, ...]:
  """Block indices (negative counts from the last) -> sorted distinct indices in 0..depth-1."""
  out = tuple(sorted({int(l) % depth for l in layers}))
  if not out:
    raise ValueError("config key 'layers' must list at least one block")
  return out


def preprocessing(image_size: int) -> Callable[[np.ndarray], np.ndarray]:
  """uint8 [B, H, W, 3] (or one [H, W, 3]) -> float32 [B, S, S, 3]: the evaluation
  transform (shorter side to S/0.875, centre crop, ImageNet mean/std)."""
  def preprocess(images):
    images = np.asarray(images)
    if images.ndim == 3:
      images = images[None]
    return np.stack([transforms.normalize(transforms.resize_center_crop(im, image_size))
                     for im in images])
  return preprocess


@functools.lru_cache(maxsize=16)
def _features_fn(backbone, layers: tuple[int, ...]):
  return jax.jit(lambda params, images: tuple(backbone.features(params, images, layers)))


def extract_features(backbone: Backbone, params, images, layers: Sequence[int] = (-1,),
                     chunk: int = 32, mesh: jax.sharding.Mesh | None = None) -> list[np.ndarray]:
  """Block outputs of `backbone` for `images`: float [N, S, S, 3], normalised.

  Returns a list (one per entry of `layers`, in its order; negative counts from
  the last block) of float32 [N, K, D] numpy arrays. Images go through in chunks
  of exactly `chunk` (the last one padded), so an image's features do not depend
  on how many images are passed; with `mesh`, each chunk is sharded over its
  ('data', 'fsdp') axes (chunk must divide evenly). The backbone must be hashable
  (a frozen dataclass): its jitted function is cached per (backbone, layers).
  """
  layers = tuple(int(l) % backbone.depth for l in layers)
  fn = _features_fn(backbone, layers)
  images = np.asarray(images, np.float32)
  outs = [[] for _ in layers]
  for start in range(0, images.shape[0], chunk):
    part = images[start:start + chunk]
    pad = chunk - part.shape[0]
    if pad:
      part = np.concatenate([part, np.zeros((pad, *part.shape[1:]), part.dtype)])
    if mesh is not None:
      with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.RULES):
        feats = fn(params, partitioning.shard_batch({"x": part}, mesh)["x"])
    else:
      feats = fn(params, part)
    for o, f in zip(outs, feats):
      o.append(np.asarray(jax.device_get(f))[:chunk - pad])
  return [np.concatenate(o) for o in outs]
