"""Labellers: what turns an image (and earlier labels) into aligned modalities.

A `Labeller` names the record fields it reads, the fields it writes with
their specs, and a batched call. Labellers are registered by name with a
factory `factory(resolution, **options) -> Labeller`, so a config lists them
as strings and passes options by name:

  @labellers.register("my_depth")
  def _my_depth(resolution, checkpoint=""):
    net = load(checkpoint)
    return labellers.Labeller(
        "my_depth", requires=("image",),
        outputs={"depth": FieldSpec("array", "float16", (resolution, resolution))},
        fn=lambda batch: {"depth": net(np.stack(batch["image"])).astype(np.float16)})

or, for any JAX/NumPy callable on stacked batches, `register_model(...)`.

Batches are dicts field -> list of per-sample values (uint8 [R, R, 3] images,
arrays, str, dicts); a labeller returns field -> per-sample values (a list or
an array with a leading batch axis). Built in: canny_edges, sam_edges,
color_palette, image_metadata, semantic_metadata, geometric_metadata,
caption_length (computed, exact), and backbone_features (any backbone registered
in pretrain_jax.backbones as a feature-map and global-embedding model), with
aim_features its AIM instance.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import numpy as np
from absl import logging

from fourm_jax import metadata, palette
from pretrain_jax.data import edges
from pretrain_jax.data.schema import FieldSpec

Batch = dict[str, Sequence[Any]]


@dataclasses.dataclass(frozen=True, eq=False)
class Labeller:
  name: str
  requires: tuple[str, ...]
  outputs: dict[str, FieldSpec]
  fn: Callable[[Batch], dict[str, Sequence[Any]]]

  def __call__(self, batch: Batch) -> dict[str, list[Any]]:
    """Runs `fn` on `batch`; checks it returned every output for every sample."""
    n = len(next(iter(batch.values())))
    out = self.fn({k: batch[k] for k in self.requires})
    missing = sorted(set(self.outputs) - set(out))
    if missing:
      raise ValueError(f"labeller {self.name!r} did not return {missing}")
    result = {}
    for key in self.outputs:
      values = list(out[key])
      if len(values) != n:
        raise ValueError(f"labeller {self.name!r} returned {len(values)} values of {key!r} "
                         f"for a batch of {n}")
      result[key] = values
    return result


_FACTORIES: dict[str, Callable[..., Labeller]] = {}


def register(name: str):
  """Decorator registering `factory(resolution, **options) -> Labeller` under `name`."""
  def wrap(factory):
    if name in _FACTORIES:
      raise ValueError(f"a labeller named {name!r} is already registered")
    _FACTORIES[name] = factory
    return factory
  return wrap


def register_model(name: str, fn: Callable[..., dict[str, Any]], outputs, requires=("image",)):
  """Registers a model labeller: `fn(**{field: stacked batch})` -> {field: [B, ...] array}.

  `outputs` is {field: FieldSpec} or a callable resolution -> {field: FieldSpec}.
  """
  def factory(resolution, **options):
    specs = outputs(resolution) if callable(outputs) else dict(outputs)
    def call(batch):
      return fn(**{k: np.stack(batch[k]) for k in requires}, **options)
    return Labeller(name, tuple(requires), specs, call)
  register(name)(factory)


def names() -> list[str]:
  return sorted(_FACTORIES)


def create(name: str, resolution: int, **options) -> Labeller:
  if name not in _FACTORIES:
    raise ValueError(f"unknown labeller {name!r}; registered: {names()}")
  try:
    return _FACTORIES[name](resolution, **options)
  except TypeError as e:
    raise ValueError(f"bad options {sorted(options)} for labeller {name!r}: {e}") from None


def _per_sample(name, requires, outputs, one):
  """A Labeller applying `one(**sample) -> {field: value}` to each sample of a batch."""
  def call(batch):
    n = len(batch[requires[0]])
    rows = [one(**{k: batch[k][i] for k in requires}) for i in range(n)]
    return {k: [r[k] for r in rows] for k in outputs}
  return Labeller(name, tuple(requires), outputs, call)


# ------------------------------------------------------------------ computed labellers

@register("canny_edges")
def _canny(resolution, low: float = 100, high: float = 200):
  spec = {"canny_edges": FieldSpec("array", "uint8", (resolution, resolution))}
  return _per_sample("canny_edges", ("image",), spec,
                     lambda image: {"canny_edges": edges.canny_edges(image, low, high)})


@register("sam_edges")
def _sam_edges(resolution, instance_field: str = "instance"):
  spec = {"sam_edges": FieldSpec("array", "uint8", (resolution, resolution))}
  def one(**sample):
    return {"sam_edges": edges.instance_edges(sample[instance_field])}
  return _per_sample("sam_edges", (instance_field,), spec, one)


@register("color_palette")
def _palette(resolution, max_colors: int = palette.MAX_COLORS, space: str = "lab", seed: int = 0):
  if not 1 <= max_colors <= palette.MAX_COLORS:
    raise ValueError(f"max_colors must be in 1..{palette.MAX_COLORS}, got {max_colors}")
  palette._features(np.zeros((1, 3), np.uint8), space)   # validates the colour space now
  spec = {"color_palette": FieldSpec("array", "uint8", (max_colors, max_colors, 3))}
  return _per_sample("color_palette", ("image",), spec, lambda image: {
      "color_palette": palette.palettes(image, max_colors, space, seed)})


@register("image_metadata")
def _image_metadata(resolution):
  spec = {"image_metadata": FieldSpec("map", keys=metadata.IMAGE_KEYS)}
  return _per_sample("image_metadata", ("image", "original_size"), spec,
                     lambda image, original_size: {
                         "image_metadata": metadata.image_metadata(image, tuple(original_size))})


# Class lists for semantic metadata. 'scenes': the procedural scenes' classes;
# 'coco_4m21': the COCO panoptic indices 4M-21 App. D.1 lists for objectness
# and walkability (person = 0, background ignored).
def _scenes_classes():
  from pretrain_jax.data import scenes
  ids = {name: i for i, name in enumerate(scenes.SEMANTIC_CLASSES)}
  return {"countable": tuple(ids[s] for s in scenes.OBJECT_SHAPES), "walkable": (ids["ground"],),
          "person": (), "ignore": (ids["background"],)}


CLASS_SETS: dict[str, Callable[[], dict[str, tuple[int, ...]]]] = {
    "scenes": _scenes_classes,
    "coco_4m21": lambda: {
        "countable": (87, 90, 96, 97, 98, 99, 100, 101, 102, 103, 105, 106, 109, 110, 111, 112,
                      113, 117, 118, 119, 122, 123, 124, 125, 126, 129, 131, 132),
        "walkable": (87, 90, 97, 100, 102, 105, 106, 122, 123, 125, 126, 132),
        "person": (0,), "ignore": (255,)},
}


@register("semantic_metadata")
def _semantic_metadata(resolution, classes: str = "scenes"):
  if classes not in CLASS_SETS:
    raise ValueError(f"unknown class set {classes!r} for semantic_metadata; "
                     f"known: {sorted(CLASS_SETS)}")
  sets = CLASS_SETS[classes]()
  spec = {"semantic_metadata": FieldSpec("map", keys=metadata.SEMANTIC_KEYS)}
  return _per_sample("semantic_metadata", ("semantic", "instance", "box_classes"), spec,
                     lambda semantic, instance, box_classes: {
                         "semantic_metadata": metadata.semantic_metadata(
                             semantic, instance, box_classes, **sets)})


@register("geometric_metadata")
def _geometric_metadata(resolution, threshold: float = 0.3, normalize_depth: bool = True):
  spec = {"geometric_metadata": FieldSpec("map", keys=metadata.GEOMETRIC_KEYS)}
  return _per_sample("geometric_metadata", ("depth", "normals"), spec,
                     lambda depth, normals: {"geometric_metadata": metadata.geometric_metadata(
                         depth, normals, threshold, normalize_depth)})


@register("caption_length")
def _caption_length(resolution):
  spec = {"caption_length": FieldSpec("map", keys=metadata.CAPTION_KEYS)}
  return _per_sample("caption_length", ("caption",), spec,
                     lambda caption: {"caption_length": metadata.caption_length(caption)})


# ------------------------------------------------------------------ model labellers

RANDOM = "random:"


def _trained_weights(name: str, init_from: str) -> str:
  """`init_from` of a model labeller: an existing workdir or checkpoint (local or remote).
  A bare name (a variant such as 'tiny' builds a randomly initialised model) is refused:
  labels from random weights are noise. 'random:NAME' asks for them on purpose (tests,
  smoke runs) and returns NAME."""
  from pretrain_jax import paths
  if init_from.startswith(RANDOM):
    logging.warning("labeller %r: random weights (%s), as asked", name, init_from)
    return init_from[len(RANDOM):]
  if not init_from:
    raise ValueError(f"labeller {name!r} needs the option 'init_from': a trained workdir or "
                     f"checkpoint of its backbone ('{RANDOM}VARIANT' labels with random "
                     "weights, for tests)")
  if not paths.is_remote(init_from) and not os.path.exists(init_from):
    raise ValueError(f"labeller {name!r}: init_from={init_from!r} is no workdir or checkpoint "
                     "on disk; a model labeller needs trained weights (a bare variant name "
                     f"would label with random ones: write '{RANDOM}{init_from}' if that is "
                     "what you want)")
  return init_from


def _features_labeller(name: str, backbone: str, init_from: str, layer: int, image_size: int,
                       chunk: int, prefix: str) -> Labeller:
  """The patch features of block `layer` of a registered backbone (float16 [K, D] in
  `{prefix}_features`) and their mean as the global embedding (float16 [D] in
  `{prefix}_global`); images go through the evaluation transform at `image_size` (0: the
  checkpoint's own)."""
  from pretrain_jax import backbones   # JAX, only for model labellers
  if not backbone:
    raise ValueError(f"labeller {name!r} needs the option 'backbone', one of "
                     f"{backbones.names()}")
  init_from = _trained_weights(name, init_from)
  model, params = backbones.load(backbone, init_from, image_size=image_size)
  preprocess = backbones.preprocessing(model.image_size)
  k, d = model.num_patches, model.width
  spec = {f"{prefix}_features": FieldSpec("array", "float16", (k, d)),
          f"{prefix}_global": FieldSpec("array", "float16", (d,))}
  def call(batch):
    images = preprocess(np.stack(batch["image"]))
    (feats,) = backbones.extract_features(model, params, images, layers=(layer,), chunk=chunk)
    return {f"{prefix}_features": feats.astype(np.float16),
            f"{prefix}_global": feats.mean(axis=1).astype(np.float16)}
  return Labeller(name, ("image",), spec, call)


@register("backbone_features")
def _backbone_features(resolution, backbone: str = "", init_from: str = "", layer: int = -1,
                       image_size: int = 0, chunk: int = 32, prefix: str = ""):
  """Any registered backbone (pretrain_jax.backbones: aim, fourm, ...) as a feature-map and
  global-embedding model; fields `{prefix}_features`, `{prefix}_global` (prefix: the
  backbone's name unless given)."""
  return _features_labeller("backbone_features", backbone, init_from, layer, image_size, chunk,
                            prefix or backbone)


@register("aim_features")
def _aim_features(resolution, init_from: str = "", layer: int = -1, image_size: int = 0,
                  chunk: int = 32):
  """The AIM trunk (backbone 'aim') standing in for CLIP/DINOv2/ImageBind: fields
  aim_features (float16 [K, D]) and aim_global (float16 [D]). init_from: an AIM workdir
  or checkpoint ('random:VARIANT': random weights, for tests); images are resized to
  `image_size` (default: the checkpoint's training size, 224 for a variant)."""
  return _features_labeller("aim_features", "aim", init_from, layer, image_size, chunk, "aim")
