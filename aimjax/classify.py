"""Classifying images with an attentive-probe head on AIM features: a released head
converted by aimjax.convert, or one trained by aimjax.probe.

  python -m aimjax.classify --workdir=ckpt/aim_600m photo1.jpg photo2.png

  result = aimjax.classify.classify("ckpt/aim_600m", images)   # uint8 [B, H, W, 3]
  result["classes"], result["scores"]                          # top-5 ids and probabilities

The workdir holds probe.safetensors, whose metadata names the blocks the head
reads (the mean of their outputs, the official AverageLayers) and, for a probe
workdir, the backbone it was trained on (`init_from`); a converted workdir is its
own backbone. A 1000-class head is taken to use the ImageNet-1k class order of
the official evaluation (torchvision ImageFolder: the synset ids sorted), and its
ids are named by the sorted synset list that tensorflow-datasets ships
(datasets/imagenet2012/labels.txt, read from the installed package, nothing
downloaded).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from aimjax import inference
from aimjax import model as model_lib
from pretrain_jax import backbones, export, heads

TOP_K = 5


@dataclasses.dataclass(frozen=True)
class Classifier:
  """A backbone, its params, and the head applied to the mean of `layers`."""
  backbone: Any
  params: Any = dataclasses.field(hash=False, compare=False)
  head: Any
  head_vars: Any = dataclasses.field(hash=False, compare=False)
  layers: tuple[int, ...]
  num_classes: int

  @property
  def image_size(self):
    return self.backbone.image_size

  def logits(self, images) -> np.ndarray:
    """images: float32 [B, H, W, 3], preprocessed (`inference.preprocessing`) ->
    float32 [B, classes]."""
    return np.asarray(_logits_fn(self)(self.params, self.head_vars, jnp.asarray(images)))


@functools.lru_cache(maxsize=4)
def _logits_fn(clf: Classifier):
  def fn(params, head_vars, images):
    feats = clf.backbone.features(params, images, clf.layers)
    pooled = heads.average_layers(dict(zip(clf.layers, feats)), clf.layers)
    return clf.head.apply(head_vars, pooled.astype(jnp.float32))
  return jax.jit(fn)


def _head_module(info: dict):
  if info.get("kind", "attentive") == "attentive":
    return heads.AttentiveProbe(int(info["num_heads"]), int(info["num_classes"]),
                                linear_bias=bool(info.get("linear_bias", False)))
  if info["kind"] == "linear":
    return heads.LinearProbe(int(info["num_classes"]))
  raise ValueError(f"unknown probe kind {info['kind']!r} in the head's metadata")


def load(workdir: str, image_size: int | tuple[int, int] = 0) -> Classifier:
  """The classifier of `workdir` (a converted workdir, or a probe workdir whose head names
  its backbone). image_size: the resolution to read images at, S or (H, W) (0: the
  backbone's own); the sin-cos positions follow the patch grid."""
  head_path = os.path.join(workdir, "probe.safetensors")
  if not epath.Path(head_path).exists():
    raise FileNotFoundError(
        f"{head_path} not found: {workdir} has no classifier head; convert a released head "
        "(python -m aimjax.convert --input=BACKBONE --head=HEAD --out=DIR) or train one "
        "(python -m aimjax.probe)")
  head_vars, meta = export.load_safetensors(head_path)
  info = (meta or {}).get("probe")
  if not info or "layers" not in info:
    raise ValueError(f"{head_path} has no 'probe' metadata naming the blocks it reads; "
                     "rewrite it with aimjax.convert or aimjax.probe")
  if (epath.Path(workdir) / "config.json").exists() and "model" in json.loads(
      (epath.Path(workdir) / "config.json").read_text()):
    name, init_from, step = "aim", workdir, None   # a converted workdir is its own backbone
  else:
    name, init_from = info.get("backbone", "aim"), info.get("init_from", "")
    step = info.get("init_step") or None
    if info.get("merged_params"):   # trained with LoRA: the adapted trunk, folded in
      init_from, step = os.path.join(workdir, info["merged_params"]), None
    elif info.get("lora_rank"):
      raise ValueError(f"{head_path} was trained with LoRA adapters that {workdir} does not "
                       "hold merged; the head needs them")
  options = {"causal": True} if info.get("causal") else {}
  size = image_size or info.get("image_size") or 0
  if np.ndim(size):
    h, w = model_lib.image_hw(size)
    size = h if h == w else (h, w)
  backbone, params = backbones.load(name, init_from, size, step, **options)
  layers = tuple(int(l) for l in info["layers"])
  if max(layers) >= backbone.depth:
    raise ValueError(f"{head_path} reads blocks {list(layers)} but the backbone has "
                     f"{backbone.depth}")
  head_vars = {k: v for k, v in head_vars.items() if k in ("params", "batch_stats")}
  return Classifier(backbone, params, _head_module(info), head_vars, layers,
                    int(info["num_classes"]))


def imagenet_synsets() -> list[str] | None:
  """The 1000 ImageNet-1k synset ids in class-index order (sorted, as ImageFolder orders
  them), from the labels file tensorflow-datasets installs; None when it is absent."""
  spec = importlib.util.find_spec("tensorflow_datasets")   # located, not imported (slow)
  for root in (spec.submodule_search_locations or []) if spec else []:
    path = os.path.join(root, "datasets", "imagenet2012", "labels.txt")
    if os.path.exists(path):
      ids = open(path).read().split()
      if len(ids) == 1000 and ids == sorted(ids):
        return ids
  return None


def read_images(paths: Sequence[str]) -> list[np.ndarray]:
  """Image files -> uint8 [H, W, 3] arrays (RGB)."""
  from PIL import Image
  out = []
  for p in paths:
    if not epath.Path(p).exists():
      raise FileNotFoundError(f"image not found: {p}")
    with epath.Path(p).open("rb") as f:
      out.append(np.asarray(Image.open(f).convert("RGB")))
  return out


def classify(workdir: str | Classifier, images, top_k: int = TOP_K) -> dict:
  """Top-k classes of `images` under the head of `workdir` (or a loaded Classifier).

  images: uint8 [B, H, W, 3] or a list of uint8 [H, W, 3] of any sizes (resized and
  centre-cropped as the official evaluation), a list of image paths, or float32
  [B, h, w, 3] already preprocessed at the backbone's size.
  Returns {"logits": [B, C], "classes": int [B, k], "scores": softmax [B, k],
  "synsets": [B][k] ImageNet synset ids or None (heads of other than 1000 classes)}.
  """
  clf = workdir if isinstance(workdir, Classifier) else load(workdir)
  if isinstance(images, (list, tuple)) and images and isinstance(images[0], (str, os.PathLike)):
    images = read_images(images)
  if isinstance(images, np.ndarray) and images.dtype != np.uint8:
    x = images.astype(np.float32)   # already preprocessed
  else:   # one at a time: images of different sizes
    preprocess = inference.preprocessing(clf.image_size)
    x = np.concatenate([preprocess(im) for im in images])
  logits = clf.logits(x)
  k = min(top_k, logits.shape[-1])
  classes = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))
  scores = np.take_along_axis(probs, classes, axis=-1)
  synsets = imagenet_synsets() if logits.shape[-1] == 1000 else None
  return {"logits": logits, "classes": classes, "scores": scores,
          "synsets": None if synsets is None else [[synsets[c] for c in row] for row in classes]}


def main(argv):
  from absl import flags
  f = flags.FLAGS
  paths = argv[1:]
  if not f.workdir:
    raise SystemExit("error: --workdir is required (a converted or probe workdir)")
  if not paths:
    raise SystemExit("error: name at least one image file after the flags")
  try:
    clf = load(f.workdir)
    result = classify(clf, read_images(paths), f.top_k)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"error: {e}") from None
  if clf.num_classes == 1000 and result["synsets"] is None:
    print("note: no ImageNet synset list is installed (tensorflow-datasets' "
          "imagenet2012/labels.txt); printing class ids only")
  elif clf.num_classes != 1000:
    print(f"note: the head has {clf.num_classes} classes, not ImageNet-1k's 1000; "
          "printing class ids only")
  for i, path in enumerate(paths):
    print(path)
    for j, (c, s) in enumerate(zip(result["classes"][i], result["scores"][i])):
      name = f" {result['synsets'][i][j]}" if result["synsets"] else ""
      print(f"  {j + 1}. class {int(c):4d}{name}  p={float(s):.4f}")


if __name__ == "__main__":
  from absl import app, flags
  from pretrain_jax import cli
  flags.DEFINE_integer("top_k", TOP_K, "How many classes to print per image.")
  cli.show_in_help("workdir")
  app.run(main, flags_parser=cli.parse_flags)
