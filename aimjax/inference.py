"""Loading AIM for inference, from any checkpoint kind.

  model, params, preprocess = aimjax.load("workdir/aim_tiny")      # a training workdir
  model, params, preprocess = aimjax.load("aim_600m.safetensors")   # official weights
  feats = aimjax.extract_features(model, params, preprocess(images), layers=(-1, 6))

Features come from aimjax.backbone (AIM's trunk as a pretrain_jax backbone).
"""
from __future__ import annotations

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from aimjax import convert
from aimjax import model as model_lib
from pretrain_jax import backbones, checkpoint, export, paths, scan
from pretrain_jax.data import transforms

VARIANTS = convert.VARIANTS   # official variants: width, depth, heads (paper Table 1)


def preprocessing(image_size, crop_fraction: float = 0.875):
  """uint8 [B, H, W, 3] (or one [H, W, 3]) -> float32 [B, S, S, 3], or [B, h, w, 3] for
  image_size (h, w): the official evaluation transform (resize so that the crop is
  `crop_fraction` of the image along its tighter side, centre crop, ImageNet mean/std);
  for a square size exactly pretrain_jax.backbones.preprocessing."""
  h, w = model_lib.image_hw(image_size)
  if h == w:
    return backbones.preprocessing(h)

  def crop(image):
    ih, iw = image.shape[:2]
    scale = max(math.ceil(h / crop_fraction) / ih, math.ceil(w / crop_fraction) / iw)
    nh, nw = max(h, round(ih * scale)), max(w, round(iw * scale))
    image = transforms.resize(image, nh, nw)
    top, left = (nh - h) // 2, (nw - w) // 2
    return image[top:top + h, left:left + w]

  def preprocess(images):
    images = np.asarray(images)
    if images.ndim == 3:
      images = images[None]
    return np.stack([transforms.normalize(crop(im)) for im in images])
  return preprocess


def _model_from_config(model_cfg: dict) -> model_lib.AIM:
  keys = ("image_size", "patch_size", "width", "depth", "num_heads", "mlp_ratio", "head",
          "head_depth", "head_width", "head_num_heads")
  kw = {k: model_cfg[k] for k in keys if k in model_cfg}
  if "image_size" in kw:   # JSON gives (H, W) back as a list; modules must hash
    h, w = model_lib.image_hw(kw["image_size"])
    kw["image_size"] = h if h == w else (h, w)
  return model_lib.AIM(**kw)


def load(path_or_variant: str, image_size: int | tuple[int, int] = 224,
         num_heads: int | None = None, step: int | None = None):
  """Returns (model, params, preprocess).

  path_or_variant: a variant name (random init), a training workdir (its
  latest checkpoint and config.json), a safetensors file written by
  `pretrain_jax.export`, or an official AIM v1 checkpoint (.safetensors/.pth;
  `num_heads` defaults to width / 128, as in every released model).
  step: for a workdir, the checkpoint step to load (default: the latest).
  image_size: S or (H, W), for a variant or an official checkpoint.
  """
  h, w = model_lib.image_hw(image_size)
  image_size = h if h == w else (h, w)
  if path_or_variant in VARIANTS:
    w, d, h = VARIANTS[path_or_variant]
    model = model_lib.AIM(image_size=image_size, width=w, depth=d, num_heads=h, head="none")
    x = jnp.zeros((1, *model_lib.image_hw(image_size), 3))
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
