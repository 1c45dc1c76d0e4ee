"""Loading AIM for inference and extracting features, from any checkpoint kind.

  model, params, preprocess = aimjax.load("workdir/aim_tiny")      # a training workdir
  model, params, preprocess = aimjax.load("aim_600m.safetensors")   # official weights
  feats = aimjax.extract_features(model, params, preprocess(images), layers=(-1, 6))
"""
from __future__ import annotations

import functools
import json
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from aimjax import convert
from aimjax import model as model_lib
from pretrain_jax import checkpoint, export, partitioning, paths, scan
from pretrain_jax.data import transforms

# Official variants: width, depth, heads (paper Table 1).
VARIANTS = {"tiny": (64, 2, 2), "0.6B": (1536, 24, 12), "1B": (2048, 24, 16),
            "3B": (3072, 24, 24), "7B": (4096, 32, 32)}


def preprocessing(image_size: int) -> Callable[[np.ndarray], np.ndarray]:
  """uint8 [B, H, W, 3] (or one [H, W, 3]) -> float32 [B, S, S, 3]: the official
  evaluation transform (shorter side to S/0.875, centre crop, ImageNet mean/std)."""
  def preprocess(images):
    images = np.asarray(images)
    if images.ndim == 3:
      images = images[None]
    return np.stack([transforms.normalize(transforms.resize_center_crop(im, image_size))
                     for im in images])
  return preprocess


def _model_from_config(model_cfg: dict) -> model_lib.AIM:
  keys = ("image_size", "patch_size", "width", "depth", "num_heads", "mlp_ratio", "head",
          "head_depth", "head_width", "head_num_heads")
  return model_lib.AIM(**{k: model_cfg[k] for k in keys if k in model_cfg})


def load(path_or_variant: str, image_size: int = 224, num_heads: int | None = None,
         step: int | None = None):
  """Returns (model, params, preprocess).

  path_or_variant: a variant name (random init), a training workdir (its
  latest checkpoint and config.json), a safetensors file written by
  `pretrain_jax.export`, or an official AIM v1 checkpoint (.safetensors/.pth;
  `num_heads` defaults to width / 128, as in every released model).
  step: for a workdir, the checkpoint step to load (default: the latest).
  """
  if path_or_variant in VARIANTS:
    w, d, h = VARIANTS[path_or_variant]
    model = model_lib.AIM(image_size=image_size, width=w, depth=d, num_heads=h, head="none")
    x = jnp.zeros((1, image_size, image_size, 3))
    params = jax.jit(model.init)(jax.random.key(0), x, jnp.ones((1,), jnp.int32))["params"]
    return model, nn.unbox(params), preprocessing(image_size)
  path = path_or_variant   # local or gs://... (read through etils.epath)
  if epath.Path(path).is_dir():
    cfg = json.loads((epath.Path(path) / "config.json").read_text())
    params = checkpoint.restore_parts(path, ("params",), step)["params"]
    if cfg["model"].get("scan_layers"):   # trained scanned; features need the blocks unrolled
      params = scan.unstack(params)
    model = _model_from_config(cfg["model"])
    return model, params, preprocessing(model.image_size)
  if not epath.Path(path).exists():
    raise FileNotFoundError(f"no AIM checkpoint or variant named {path!r}; variants: "
                            f"{list(VARIANTS)}")
  if path.endswith(".safetensors"):
    from safetensors import safe_open
    with paths.local_copy(path) as local, safe_open(local, "np") as f:
      ours = (f.metadata() or {}).get("format") == "pretrain_jax"
    if ours:
      params, cfg = export.load_safetensors(path)
      if cfg is None:
        raise ValueError(f"{path} has no config in its metadata; cannot rebuild the model")
      model = _model_from_config(cfg.get("model", cfg))
      return model, params, preprocessing(model.image_size)
  sd = convert.load_state_dict(path)
  width = sd["preprocessor.patchifier.proj.weight"].shape[0]
  depth = len({k.split(".")[2] for k in sd if k.startswith("trunk.blocks.")})
  heads = num_heads or width // 128
  if heads <= 0 or width % heads:
    raise ValueError(f"cannot infer the number of heads of {path} (width {width}); pass num_heads")
  params, _ = convert.official_to_params(sd, width, depth, heads)
  model = model_lib.AIM(image_size=image_size, width=width, depth=depth, num_heads=heads,
                        head="none")
  return model, params, preprocessing(image_size)


@functools.lru_cache(maxsize=16)
def _features_fn(model: model_lib.AIM, layers: tuple[int, ...]):
  def features(params, images):
    blocks = model.apply({"params": params}, images, method=model.features)
    return tuple(blocks[i] for i in layers)
  return jax.jit(features)


def extract_features(model: model_lib.AIM, params, images, layers: Sequence[int] = (-1,),
                     chunk: int = 32, mesh: jax.sharding.Mesh | None = None):
  """Block outputs (bidirectional attention) for `images`: float [N, S, S, 3].

  Returns a list (one per entry of `layers`, negative counts from the last
  block) of float32 [N, K, D] numpy arrays. Images are processed in chunks
  of exactly `chunk` (the last one padded), so an image's features do not
  depend on how many images are passed; with `mesh`, each chunk is sharded
  over its ('data', 'fsdp') axes (chunk must divide evenly).
  """
  layers = tuple(int(l) % model.depth for l in layers)
  fn = _features_fn(model, layers)
  images = np.asarray(images, np.float32)
  n = images.shape[0]
  outs = [[] for _ in layers]
  for start in range(0, n, chunk):
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
