"""Training tokenizers on the shared core: one CLI for the three kinds.

  python -m tokenizers_jax.train --config=configs/tokenizers/vqvae.py:modality=depth,variant=tiny \\
      --workdir=workdir/tok_depth
  python -m tokenizers_jax.train --config=configs/tokenizers/diffusion.py:modality=rgb ...
  python -m tokenizers_jax.train --config=configs/tokenizers/mlp_vae.py:target=pose ...

config.kind: 'vqvae' (ViT encoder and decoder), 'diffusion' (ViT encoder,
UNet diffusion decoder) or 'mlp_vae' (vectors: global embeddings, poses).
Data: `scenes:N` renders the modality on the fly; `arrayrecord:GLOB` reads
the field of pseudo-labelled shards (fourm_jax.pseudo_label);
`synthetic_poses:N` draws SMPL body poses (tokenizers_jax.poses). Targets are
prepared per modality (`prepare`): RGB to [-1, 1], depth standardised per
image, normals as unit vectors, segmentation as class ids (fewer than
model.num_classes), vectors as float32.

Losses as the official run_training_vqvae.py / run_training_divae.py: the
reconstruction loss of the modality (the diffusion decoder's on its
prediction target: `diffusion.loss`, smooth L1 for depth and edges, MSE for
RGB and normals) plus the quantizer's commitment loss (weight 1, MSE on the
raw latents); the MLP dVAEs train their Memcodes by hard Gumbel-softmax.

Multi-resolution training (ViT VQ-VAE and diffusion tokenizers), as the
official run_training_vqvae.py / run_training_divae.py with input_size_min,
input_size_max and resolution_step: `data.resolutions = (min, max, step)`
trains at range(min, max + step, step) (`resolutions`). The data is rendered
or loaded at the largest (data.resolution is set to it); every step resizes
its batch to one resolution, drawn from (seed, step) alone
(`resolution_for_step`, so a resumed run draws the same ones), bilinearly
(nearest for class ids) as PyTorch's F.interpolate(align_corners=False)
(`prepare`'s `resolution`, tokenizers_jax.vqvae.resize); the ViT's positions
are the official fixed table at the largest grid, bicubic-resized to the
step's grid (model.pos_grid, tokenizers_jax.vqvae.position_table). The train
step is compiled once, for all resolutions: the batch carries the step's
resolution index and a lax.switch runs that resolution's branch (each branch
traced at its own static shapes; only the chosen one executes). Evaluation
runs at the largest resolution.
"""
from __future__ import annotations

import dataclasses
import zlib

import grain
import jax
import jax.numpy as jnp
import numpy as np

from pretrain_jax import loop
from pretrain_jax.data import multimodal, pipeline
from tokenizers_jax import diffusion, mlp_vae, poses, vqvae

SCENE_FIELDS = {"rgb": "rgb", "depth": "depth", "normals": "normals", "semantic": "semantic",
                "edges": "edges"}
KINDS = ("vqvae", "diffusion", "mlp_vae")
# vector targets of the MLP dVAE -> their loss (4M-21 App. D.2, D.4)
VECTOR_TARGETS = {"global": "cosine", "pose": "smooth_l1"}


# the batch key holding each step's index into `resolutions(config)` (multi-resolution runs)
RESOLUTION_KEY = "resolution_index"
# modalities given as class ids: resized by nearest neighbour, the others bilinearly
CLASS_ID_MODALITIES = ("semantic", "sam_mask")


def prepare(modality: str, value: np.ndarray, resolution: int | tuple[int, int] | None = None
            ) -> np.ndarray:
  """A stored modality -> the tokenizer's input/target (float32, or int32 class ids).

  resolution (side, or (height, width); None = as stored): the prepared image resized as the
  multi-resolution training resizes its batches (PyTorch's F.interpolate, align_corners=False:
  bilinear, nearest for class ids; `vqvae.resize`), e.g. a 448 px image for a tokenizer
  trained at data.resolutions (224, 448, 32), or a stored 224 px one up to 448. For feature
  maps it is the grid side. Vector modalities have none."""
  x = _prepare(modality, value)
  if resolution is None:
    return x
  if modality in VECTOR_TARGETS:
    raise ValueError(f"{modality!r} is a vector: it has no resolution to resize to")
  size = (resolution, resolution) if np.ndim(resolution) == 0 else tuple(resolution)
  return resize_batch(modality, x[None], size)[0]


def resize_batch(modality: str, x, size: int | tuple[int, int]):
  """Prepared images [B, H, W(, C)] (numpy or jax) -> [B, *size(, C)]: bilinear, or nearest
  for class ids, as PyTorch's F.interpolate(align_corners=False) and the official tokenizer
  training. The same size returns x unchanged."""
  size = (size, size) if np.ndim(size) == 0 else tuple(size)
  mode = "nearest" if modality in CLASS_ID_MODALITIES else "bilinear"
  return vqvae.resize(x, size, mode)


def resolutions(config) -> tuple[int, ...]:
  """The training resolutions of config.data.resolutions = (min, max, step):
  range(min, max + step, step), as the official input_size_min, input_size_max and
  resolution_step; () when unset or empty (one resolution: data.resolution). ValueError
  naming the key for anything else: not three integers, step <= 0, min <= 0, min > max,
  max - min not a multiple of step, a resolution that is not a multiple of the patch size
  (for the diffusion decoder also of its UNet patch times 2^(levels - 1)), or a modality
  without image resolutions (vectors, feature maps, SAM masks)."""
  spec = config.data.get("resolutions", ()) or ()
  key = "data.resolutions"
  if isinstance(spec, str) or not hasattr(spec, "__len__"):
    raise ValueError(f"config key '{key}' must be (min, max, step), e.g. (224, 448, 32); "
                     f"got {spec!r}")
  if not len(spec):
    return ()
  if len(spec) != 3 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                               for v in spec):
    raise ValueError(f"config key '{key}' must be three integers (min, max, step), e.g. "
                     f"(224, 448, 32); got {tuple(spec)!r}")
  lo, hi, step = (int(v) for v in spec)
  if step <= 0:
    raise ValueError(f"config key '{key}': step must be positive, got {step}")
  if lo <= 0 or lo > hi:
    raise ValueError(f"config key '{key}': need 0 < min <= max, got min {lo}, max {hi}")
  if (hi - lo) % step:
    raise ValueError(f"config key '{key}': max - min ({hi - lo}) must be a multiple of the "
                     f"step {step}, so that the largest resolution is max")
  kind = config.get("kind", "vqvae")
  if kind == "mlp_vae" or config.modality in VECTOR_TARGETS or config.modality in (
      "features", "sam_mask"):
    raise ValueError(f"config key '{key}': the {config.modality!r} tokenizer has no image "
                     "resolutions to train at (multi-resolution is for image modalities)")
  choices = tuple(range(lo, hi + 1, step))
  unit, why = config.model.patch_size, f"the patch size {config.model.patch_size}"
  if kind == "diffusion":
    d = config.diffusion
    down = d.get("patch_size", diffusion.PATCH) * 2 ** (len(d.channel_mult) - 1)
    unit = int(np.lcm(unit, down))
    why = (f"{unit} (the patch size {config.model.patch_size} and the UNet's "
           f"{d.get('patch_size', diffusion.PATCH)}-pixel patches over "
           f"{len(d.channel_mult)} levels)")
  bad = [r for r in choices if r % unit]
  if bad:
    raise ValueError(f"config key '{key}' = {(lo, hi, step)}: the resolutions {bad} are not "
                     f"multiples of {why}")
  return choices


def resolution_for_step(seed: int, step: int, choices) -> int:
  """The resolution of training step `step` (1-based, as the loop counts): a choice drawn
  from (seed, step) alone (a CRC-32 of both; the official code takes hash(str(step))), so a
  resumed run trains at the same resolutions as an uninterrupted one."""
  choices = tuple(choices)
  return choices[zlib.crc32(f"{int(seed)}:{int(step)}".encode()) % len(choices)]


def pos_grid(config) -> int:
  """The ViT position table's grid (model.pos_grid): as set when >= 0 (0 = sin-cos computed
  at each call's grid); -1 or unset: the largest training resolution / patch size with
  data.resolutions, else 0."""
  g = int(config.model.get("pos_grid", -1))
  if g >= 0:
    return g
  choices = resolutions(config)
  return max(choices) // config.model.patch_size if choices else 0


def _prepare(modality: str, value: np.ndarray) -> np.ndarray:
  if modality == "rgb":
    return np.asarray(value, np.float32) / 127.5 - 1.0
  if modality == "depth":
    d = np.asarray(value, np.float32)
    return (d - d.mean()) / max(float(d.std()), 1e-6)
  if modality == "normals":
    return np.asarray(value, np.float32)
  if modality == "semantic":
    return np.asarray(value, np.int32)
  if modality == "edges":
    return np.asarray(value, np.float32) / 255.0
  if modality == "sam_mask":
    return (np.asarray(value) > 0).astype(np.int32)
  if modality in VECTOR_TARGETS:
    return np.asarray(value, np.float32).reshape(-1)
  if modality == "features":            # [K, D] patch features -> [g, g, D]
    x = np.asarray(value, np.float32)
    g = int(round(np.sqrt(x.shape[0])))
    if g * g != x.shape[0]:
      raise ValueError(f"feature map of {x.shape[0]} tokens is not a square grid")
    return x.reshape(g, g, x.shape[-1])
  raise ValueError(f"unknown tokenizer modality {modality!r}; known: "
                   f"{sorted(vqvae.MODALITIES) + sorted(VECTOR_TARGETS)}")


class _SyntheticPoses:
  def __init__(self, num: int, seed: int):
    self.num, self.seed = num, seed

  def __len__(self):
    return self.num

  def __getitem__(self, index):
    return {"x": poses.synthetic_body_pose(self.seed, int(index))}


class _Scenes:
  """Rendered scenes at `resolution` (a multi-resolution run's largest)."""

  def __init__(self, num: int, seed: int, resolution: int, modality: str):
    self.num, self.seed, self.resolution, self.modality = num, seed, resolution, modality

  def __len__(self):
    return self.num

  def __getitem__(self, index):
    from pretrain_jax.data import scenes
    s = scenes.render_scene(self.seed, int(index), self.resolution)
    if self.modality == "edges":
      from pretrain_jax.data import edges
      return {"x": prepare("edges", edges.canny_edges(s["rgb"]))}
    if self.modality == "sam_mask":
      return {"x": prepare("sam_mask", instance_mask_crop(s["instance"], s["boxes"],
                                                          int(index) % max(len(s["boxes"]), 1),
                                                          self.resolution))}
    return {"x": prepare(self.modality, s[SCENE_FIELDS[self.modality]])}


def instance_mask_crop(instance: np.ndarray, boxes: np.ndarray, i: int, size: int) -> np.ndarray:
  """Instance i + 1's mask cropped to its box and resized (nearest) to uint8 [size, size]."""
  mask = (instance == i + 1).astype(np.uint8)
  if not len(boxes):
    return np.zeros((size, size), np.uint8)
  h, w = mask.shape
  x0, y0, x1, y1 = boxes[i]
  r0, r1 = int(round(y0 * h)), max(int(round(y1 * h)), int(round(y0 * h)) + 1)
  c0, c1 = int(round(x0 * w)), max(int(round(x1 * w)), int(round(x0 * w)) + 1)
  crop = mask[r0:r1, c0:c1]
  rows = (np.arange(size) * crop.shape[0] // size)
  cols = (np.arange(size) * crop.shape[1] // size)
  return crop[rows][:, cols]


class _Field(grain.transforms.Map):
  """A record's field, prepared; resized to `resolution` (multi-resolution runs load every
  record at the largest) unless it is None."""

  def __init__(self, field: str, modality: str, resolution: int | None = None):
    self.field, self.modality, self.resolution = field, modality, resolution

  def map(self, element):
    return {"x": prepare(self.modality, element[self.field], self.resolution)}


class _StepResolution(grain.transforms.MapWithIndex):
  """Adds RESOLUTION_KEY, int32 [rows], to batch i (trained at step i + 1): the index in
  `choices` of resolution_for_step(seed, i + 1). The iterator's checkpointed position keeps
  it on resume."""

  def __init__(self, seed: int, choices: tuple[int, ...]):
    self.seed, self.choices = seed, tuple(choices)

  def map_with_index(self, index, element):
    r = resolution_for_step(self.seed, index + 1, self.choices)
    rows = len(element["x"])
    return {**element, RESOLUTION_KEY: np.full((rows,), self.choices.index(r), np.int32)}


def _dataset(data_cfg, spec: str, modality: str, split: str,
             min_len: int = 0) -> grain.MapDataset:
  """The records of config key data.{split} (`spec`) as {"x": prepared value}. Raises
  ValueError/FileNotFoundError naming the key when it is empty, a path is missing, a glob
  matches nothing or it holds fewer than `min_len` (one global batch) examples."""
  key = f"data.{split}"
  if not spec.strip():
    raise ValueError(f"config key '{key}' is empty: set --config.{key}=arrayrecord:GLOB "
                     "(pseudo-labelled shards), or scenes:N / synthetic_poses:N for a toy run")
  ds = _records(data_cfg, spec, modality, split, key)
  pipeline.check_eval_size(len(ds), min_len, key, spec)
  return ds


def _records(data_cfg, spec: str, modality: str, split: str, key: str) -> grain.MapDataset:
  kind, _, arg = spec.partition(":")
  seed = data_cfg.scenes_seed if split == "train" else data_cfg.scenes_seed + 1_000_003
  if kind == "scenes":
    if modality in VECTOR_TARGETS or modality == "features":
      raise ValueError(f"scenes data has no {modality!r}: use arrayrecord:GLOB shards (the "
                       "aim_features labeller's aim_features / aim_global) or synthetic_poses:N")
    return grain.MapDataset.source(_Scenes(int(arg or 10_000), seed, data_cfg.resolution,
                                           modality))
  if kind == "synthetic_poses":
    return grain.MapDataset.source(_SyntheticPoses(int(arg or 100_000), seed))
  if kind == "arrayrecord":
    field = data_cfg.field or modality
    size = data_cfg.resolution if data_cfg.get("resolutions", ()) else None
    return multimodal.dataset(arg, fields=(field,), key=key).map(_Field(field, modality, size))
  raise ValueError(f"config key '{key}': tokenizer data spec {spec!r}: use scenes:N, "
                   "arrayrecord:GLOB or synthetic_poses:N")


def to_rgb(modality: str, x: np.ndarray) -> np.ndarray:
  """A prepared modality (or its reconstruction; class logits for segmentation) -> uint8 [H, W, 3]."""
  x = np.asarray(x, np.float32)
  if modality == "semantic":
    ids = x.argmax(-1) if x.ndim == 3 else x.astype(np.int64)
    palette = np.array([(0, 0, 0), (120, 170, 230), (150, 140, 120), (220, 60, 60),
                        (60, 180, 80), (70, 90, 220), (230, 200, 50)], np.float32)
    extra = int(np.max(ids, initial=0)) + 1 - len(palette)
    if extra > 0:                  # more classes than the scenes' 7 (COCO: 134): fixed colours
      palette = np.concatenate([palette, np.random.default_rng(0).uniform(40, 255, (extra, 3))])
    return palette[np.clip(ids, 0, len(palette) - 1)].astype(np.uint8)
  if modality == "sam_mask":
    x = (x.argmax(-1) if x.ndim == 3 else x).astype(np.float32)
  if modality == "features":             # the first principal direction, min-max scaled
    flat = x.reshape(-1, x.shape[-1]) - x.reshape(-1, x.shape[-1]).mean(0)
    v = np.linalg.svd(flat, full_matrices=False)[2][0] if flat.any() else np.zeros(x.shape[-1])
    x = (flat @ v).reshape(x.shape[:2])
    x = (x - x.min()) / max(float(x.max() - x.min()), 1e-6)
  if x.ndim == 3 and x.shape[-1] == 1:
    x = x[..., 0]
  if modality in ("rgb", "normals"):
    out = (np.clip(x, -1, 1) + 1) / 2
  elif modality == "depth":
    lo, hi = np.percentile(x, 1), np.percentile(x, 99)
    out = np.clip((x - lo) / max(hi - lo, 1e-6), 0, 1)
  else:
    out = np.clip(x, 0, 1)
  if out.ndim == 2:
    out = np.repeat(out[..., None], 3, -1)
  return (out * 255).round().astype(np.uint8)


def reconstruction_grid(modality: str, targets: np.ndarray, recons: np.ndarray) -> np.ndarray:
  """uint8 [2 H + 2, N (W + 2), 3]: targets on the top row, reconstructions below."""
  tiles = []
  for row in (targets, recons):
    tiles.append(np.concatenate([np.pad(to_rgb(modality, x), ((1, 1), (1, 1), (0, 0)),
                                        constant_values=255) for x in row], axis=1))
  return np.concatenate(tiles, axis=0)


def modality_spec(config) -> vqvae.ModalitySpec:
  """The ModalitySpec of config.modality with the config's feature width and class count."""
  m = config.model
  spec = vqvae.modality_spec(config.modality, m.get("feature_dim", 0))
  if m.get("num_classes", 0) and spec.class_ids:   # segmentation: 7 scene classes, COCO's 134
    spec = dataclasses.replace(spec, in_channels=m.num_classes, out_channels=m.num_classes)
  return spec


class _CheckClasses(grain.transforms.Map):
  """Refuses class ids the tokenizer has no class for (they would one-hot to zeros and
  gather NaN losses)."""

  def __init__(self, num_classes: int, key: str):
    self.num_classes, self.key = num_classes, key

  def map(self, element):
    top = int(np.max(element["x"])) if np.size(element["x"]) else 0
    if top >= self.num_classes or int(np.min(element["x"])) < 0:
      raise ValueError(f"{self.key}: a record holds class id {top} but the tokenizer has "
                       f"model.num_classes={self.num_classes} (ids 0..{self.num_classes - 1}); "
                       f"set --config.model.num_classes to the data's class count")
    return element


def build_model(config):
  """The tokenizer module of `config` (config.kind, default 'vqvae')."""
  kind, m = config.get("kind", "vqvae"), config.model
  if kind not in KINDS:
    raise ValueError(f"unknown tokenizer kind {kind!r}; known: {KINDS}")
  if kind == "mlp_vae":
    if config.modality not in VECTOR_TARGETS:
      raise ValueError(f"mlp_vae target {config.modality!r} unknown; known: "
                       f"{sorted(VECTOR_TARGETS)}")
    return mlp_vae.MLPVAE(m.in_dim, m.num_tokens, m.num_codes, m.width, m.blocks, m.code_dim,
                          m.get("expansion", 4), m.get("official", False))
  spec = modality_spec(config)
  vit = dict(mlp_ratio=m.get("mlp_ratio", 4.0), qkv_bias=m.get("qkv_bias", True),
             post_mlp=m.get("post_mlp", True), pos_grid=pos_grid(config))
  if kind == "diffusion":
    if spec.class_ids:
      raise ValueError(f"the diffusion decoder is for continuous modalities, not "
                       f"{config.modality!r}")
    d = config.diffusion
    return diffusion.DiffusionTokenizer(
        spec.in_channels, spec.out_channels, m.patch_size, m.width, m.enc_depth, m.heads,
        m.num_codes, m.code_dim, m.ema_decay, m.restart_factor, m.commitment, d.base_channels,
        tuple(d.channel_mult), d.num_res_blocks, d.attn_levels, d.steps,
        tuple(d.get("attention_resolutions", ())), d.get("num_heads", 1),
        d.get("patch_size", diffusion.PATCH), d.get("beta_schedule", "linear"),
        d.get("zero_terminal_snr", False), d.get("prediction_type", "sample"),
        norm_latents=m.get("norm_latents", False), **vit)
  return vqvae.VQVAE(spec.in_channels, spec.out_channels, m.patch_size, m.width, m.enc_depth,
                     m.dec_depth, m.heads, m.num_codes, m.code_dim, spec.class_ids,
                     m.ema_decay, m.restart_factor, m.commitment,
                     class_embed_dim=m.get("class_embed_dim", 0),
                     norm_latents=m.get("norm_latents", False), **vit)


def _dummy_input(config):
  if config.get("kind", "vqvae") == "mlp_vae":
    return jnp.zeros((1, config.model.in_dim))
  spec = modality_spec(config)
  r = config.data.resolution
  if spec.class_ids:
    return jnp.zeros((1, r, r), jnp.int32)
  return jnp.zeros((1, r, r, spec.in_channels) if spec.in_channels > 1 else (1, r, r))


def build_task(config) -> loop.Task:
  kind = config.get("kind", "vqvae")
  choices = resolutions(config) if kind != "mlp_vae" else ()
  if choices:   # loaded at the largest; written back so config.json records it
    config.data.resolution = max(choices)
  if kind == "mlp_vae" and not config.model.in_dim:
    # the vector size comes from the data; written back so config.json records it
    config.model.in_dim = int(_dataset(config.data, config.data.train, config.modality,
                                       "train")[0]["x"].shape[0])
  if config.modality == "features" and not config.model.get("feature_dim", 0):
    first = _dataset(config.data, config.data.train, config.modality, "train")[0]["x"]
    config.model.feature_dim = int(first.shape[-1])
    config.data.resolution = int(first.shape[0])
  model = build_model(config)
  dummy = _dummy_input(config)
  init_args = (dummy,) if kind != "diffusion" else (
      dummy, jnp.ones((1,), jnp.int32), jnp.zeros(dummy.shape if dummy.ndim == 4 else
                                                  dummy.shape + (1,)))

  def init_params(rng):
    return model.init({"params": rng}, *init_args)["params"]

  def init_extra(rng):
    # the codebook state alone: initialising through `encode` skips the decoder (same values,
    # Flax derives each module's init rng from its path)
    return {"vq": model.init({"params": rng}, dummy, method=model.encode)["vq"]}

  spec = None if kind == "mlp_vae" else modality_spec(config)
  diffusion_rec = config.diffusion.get("loss", "mse") if kind == "diffusion" else ""
  if diffusion_rec and diffusion_rec not in ("mse", "l1", "smooth_l1"):
    raise ValueError(f"config key 'diffusion.loss' must be mse, l1 or smooth_l1, got "
                     f"{diffusion_rec!r}")

  def vqvae_loss(params, batch, rng, extra):
    (pred, aux), updates = model.apply({"params": params, **extra}, batch["x"], train=True,
                                       mutable=["vq"], rngs={"restart": rng})
    rec = vqvae.reconstruction_loss(spec.loss, pred, batch["x"], spec.out_channels)
    return rec, aux, updates

  def diffusion_loss(params, batch, rng, extra):
    x = batch["x"]
    k_t, k_noise, k_restart = jax.random.split(rng, 3)
    t = jax.random.randint(k_t, (x.shape[0],), 1, config.diffusion.steps + 1)
    noise = jax.random.normal(k_noise, x.shape if x.ndim == 4 else x.shape + (1,), jnp.float32)
    (pred, x0, aux), updates = model.apply({"params": params, **extra}, x, t, noise, train=True,
                                           mutable=["vq"], rngs={"restart": k_restart})
    return vqvae.reconstruction_loss(diffusion_rec, pred, x0), aux, updates

  def vector_loss(params, batch, rng):
    pred, aux = model.apply({"params": params}, batch["x"], train=True, rngs={"gumbel": rng})
    rec = mlp_vae.vector_loss(VECTOR_TARGETS[config.modality], pred, batch["x"])
    return rec, {"reconstruction": rec, "codebook_usage": aux["usage"],
                 "perplexity": aux["perplexity"]}

  def image_loss(params, x, rng, extra):
    rec, aux, updates = (diffusion_loss if kind == "diffusion" else vqvae_loss)(
        params, {"x": x}, rng, extra)
    metrics = {"reconstruction": rec, "commit": aux["commit_loss"],
               "codebook_usage": aux["usage"], "perplexity": aux["perplexity"]}
    return rec + aux["commit_loss"], (metrics, {"vq": updates["vq"]})

  def at_resolution(r):
    def branch(params, x, rng, extra):
      loss, (metrics, new_extra) = image_loss(params, resize_batch(config.modality, x, r),
                                              rng, extra)
      return loss, ({**metrics, "resolution": jnp.float32(r)}, new_extra)
    return branch

  def loss_fn(params, batch, rng, extra):
    """The batch's loss at its step's resolution (batch[RESOLUTION_KEY], multi-resolution
    training: one lax.switch branch per resolution), else as loaded (evaluation)."""
    if not choices or RESOLUTION_KEY not in batch:
      return image_loss(params, batch["x"], rng, extra)
    return jax.lax.switch(batch[RESOLUTION_KEY][0], [at_resolution(r) for r in choices],
                          params, batch["x"], rng, extra)

  def checked(ds, split):
    if config.modality != "semantic":
      return ds
    return ds.map(_CheckClasses(spec.out_channels, f"data.{split}"))

  def train_data(rows):
    ds = checked(_dataset(config.data, config.data.train, config.modality, "train"), "train")
    ds = ds.shuffle(seed=config.seed).repeat(None)
    ds = pipeline.ProcessRows(ds, config.batch_size, rows).batch(len(rows), drop_remainder=True)
    if choices:
      ds = ds.map_with_index(_StepResolution(config.seed, choices))
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=config.data.threads,
                                                prefetch_buffer_size=2))

  def eval_data(rows):
    ds = checked(_dataset(config.data, config.data.eval, config.modality, "eval",
                          config.batch_size), "eval")
    return pipeline.ProcessRows(ds, config.batch_size, rows).batch(len(rows), drop_remainder=True)

  if kind == "diffusion":
    recon_fn = jax.jit(lambda p, e, x: diffusion.reconstruct(
        model, {"params": p, **e}, x, num_steps=config.diffusion.sample_steps))
  else:
    recon_fn = jax.jit(lambda p, e, x: model.apply({"params": p, **e}, x)[0])

  def on_eval(params, extra, step, workdir):
    """Writes workdir/reconstructions/step_XXXXXX.png (8 validation samples)."""
    from jax.experimental import multihost_utils
    from PIL import Image
    ds = _dataset(config.data, config.data.eval, config.modality, "eval")
    n = min(8, len(ds))
    x = np.stack([ds[i]["x"] for i in range(n)])
    recon = multihost_utils.process_allgather(recon_fn(params, extra, jnp.asarray(x)),
                                              tiled=True)
    if jax.process_index() == 0:   # through epath: the workdir may be gs://...
      import io
      from etils import epath
      out = epath.Path(workdir) / "reconstructions"
      out.mkdir(parents=True, exist_ok=True)
      png = io.BytesIO()
      Image.fromarray(reconstruction_grid(config.modality, x, np.asarray(recon))).save(
          png, format="png")
      (out / f"step_{step:06d}.png").write_bytes(png.getvalue())

  vector = kind == "mlp_vae"
  return loop.Task(init_params=init_params, loss_fn=vector_loss if vector else loss_fn,
                   train_data=train_data,
                   eval_data=eval_data if config.data.get("eval") else None,
                   init_extra=None if vector else init_extra,
                   on_eval=None if vector else on_eval)


def check_data(config) -> None:
  """data.train is set (full-size variants have no default data), before anything is built."""
  if not config.data.train.strip():
    raise ValueError(
        f"config key 'data.train' is empty: the {config.get('variant', '?')} variant has no "
        "default data; set --config.data.train=arrayrecord:GLOB (pseudo-labelled shards of "
        "fourm_jax.pseudo_label), or scenes:N / synthetic_poses:N for a toy run")


def main(config, workdir):
  check_data(config)
  loop.train(config, workdir, build_task(config))


if __name__ == "__main__":
  from pretrain_jax import cli
  cli.run(main, validate=loop.validate_config)
