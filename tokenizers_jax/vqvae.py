"""VQ-VAE with ViT encoder and decoder for image-like modalities (4M App. B.3).

  x [B, H, W, C_in] -> patches of p x p -> ViT encoder -> latent [B, h, w, 32]
    -> cosine VQ (tokens int32 [B, h, w]) -> ViT decoder -> [B, H, W, C_out]

The architecture is the official 4M tokenizers' (fourm.vq VQVAE with
ViTEncoder/ViTDecoder): qkv and projection biases, exact GELU, a residual
tanh MLP in place of a final LayerNorm (`post_mlp`), and 2D sine-cosine
positions with the row first: computed for the grid at call time (`pos_grid`
0), or, as the official ViTs, a fixed table at the `pos_grid` x `pos_grid`
grid (the largest training resolution / patch) bicubic-resized to the call's
grid (`position_table`, `resize_weights`); either way one tokenizer runs at
224 (14 x 14 tokens) and 448 (28 x 28). Official
checkpoints load through tokenizers_jax.convert. Per-modality
reconstruction losses (`reconstruction_loss`): MSE (RGB), smooth L1 (depth,
normals, feature maps), cross-entropy over classes (segmentation; C_out =
number of classes, inputs given as class ids are one-hot encoded, or
embedded with `class_embed_dim` as the official tokenizers do).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pretrain_jax import activations
from pretrain_jax import attention
from pretrain_jax import positions
from tokenizers_jax.quantizers import VectorQuantizer

LOSSES = ("mse", "l1", "smooth_l1", "cross_entropy")


RESIZE_MODES = ("bicubic", "bilinear", "nearest")


def resize_weights(in_size: int, out_size: int, mode: str = "bicubic") -> np.ndarray:
  """float64 [out_size, in_size]: row i holds the weights of the input samples that output
  sample i mixes, as PyTorch's F.interpolate(mode=mode, align_corners=False,
  antialias=False) computes them along one axis (2D resizing is separable: rows, then
  columns). The source coordinate of output i is s = (i + 0.5) * in / out - 0.5 (in
  float32, as PyTorch for float32 inputs);
  'bilinear' clamps s at 0 and mixes floor(s) and floor(s) + 1 (clamped to the last
  sample), 'bicubic' mixes floor(s) - 1 .. floor(s) + 2 with Keys' cubic convolution
  weights (a = -0.75), indices clamped to the border (the edge sample repeats); 'nearest'
  picks floor(i * in / out) (float32 scale, as PyTorch). Equal sizes give the identity."""
  if mode not in RESIZE_MODES:
    raise ValueError(f"unknown resize mode {mode!r}; known: {RESIZE_MODES}")
  if in_size <= 0 or out_size <= 0:
    raise ValueError(f"cannot resize {in_size} samples to {out_size}")
  if in_size == out_size:
    return np.eye(in_size)
  w = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  if mode == "nearest":
    w[rows, nearest_indices(in_size, out_size)] = 1.0
    return w
  # in float32 as PyTorch computes it for float32 images (the sizes' ratio rounded)
  scale = np.float32(in_size) / np.float32(out_size)
  src = (scale * (rows.astype(np.float32) + np.float32(0.5)) - np.float32(0.5)).astype(np.float64)
  if mode == "bilinear":
    src = np.maximum(src, 0.0)
    i0 = np.floor(src).astype(np.int64)
    lam = src - i0
    np.add.at(w, (rows, np.minimum(i0, in_size - 1)), 1.0 - lam)
    np.add.at(w, (rows, np.minimum(i0 + 1, in_size - 1)), lam)
    return w
  a = -0.75                               # PyTorch's (and Keys') cubic coefficient
  i0 = np.floor(src).astype(np.int64)
  t = src - i0
  near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1             # |x| <= 1
  far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a       # 1 < |x| < 2
  for k, coef in enumerate((far(t + 1), near(t), near(1 - t), far(2 - t))):
    np.add.at(w, (rows, np.clip(i0 - 1 + k, 0, in_size - 1)), coef)
  return w


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """int64 [out_size]: PyTorch's 'nearest' source indices, min(floor(i * scale), in - 1)
  with scale = in / out in float32 (exact for 2x)."""
  if in_size == out_size:
    return np.arange(out_size)
  scale = np.float32(in_size) / np.float32(out_size)
  idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(idx, in_size - 1)


def resize(x, size: tuple[int, int], mode: str = "bilinear"):
  """Batched images [B, H, W] or [B, H, W, C] (numpy or jax) -> [B, *size(, C)] as
  PyTorch's F.interpolate(mode, align_corners=False) (`resize_weights`). 'nearest' gathers
  (class ids keep their dtype); the others are two matrix products in float32 (HIGHEST
  precision under jit). The same size returns x unchanged."""
  hh, ww = x.shape[1], x.shape[2]
  oh, ow = int(size[0]), int(size[1])
  if (hh, ww) == (oh, ow):
    return x
  xp = np if isinstance(x, np.ndarray) else jnp
  if mode == "nearest":
    return xp.take(xp.take(x, nearest_indices(hh, oh), axis=1), nearest_indices(ww, ow), axis=2)
  wh = resize_weights(hh, oh, mode).astype(np.float32)
  ww_ = resize_weights(ww, ow, mode).astype(np.float32)
  spec = "oh,bhw,pw->bop" if x.ndim == 3 else "oh,bhwc,pw->bopc"
  if xp is np:
    return np.einsum(spec, wh, np.asarray(x, np.float32), ww_).astype(np.float32)
  return jnp.einsum(spec, wh, x.astype(jnp.float32), ww_, precision=jax.lax.Precision.HIGHEST)


def position_table(height: int, width: int, dim: int, grid: int = 0) -> np.ndarray:
  """float32 [height * width, dim]: the 4M tokenizers' 2D sin-cos positions (row first) for a
  height x width grid. grid 0: computed at that grid. grid > 0: the official fourm.vq
  ViTEncoder/ViTDecoder `pos_emb`, a fixed table built at grid x grid (the tokenizer's
  image_size / patch) and bicubic-resized to the call's grid as F.interpolate(mode='bicubic',
  align_corners=False) does (`resize_weights`); at grid x grid it is the table itself."""
  if not grid or (height, width) == (grid, grid):
    return positions.sincos_2d(height, width, dim, rows_first=True)
  table = positions.sincos_2d(grid, grid, dim, rows_first=True).reshape(grid, grid, dim)
  out = np.einsum("oh,hwd,pw->opd", resize_weights(grid, height, "bicubic"),
                  table.astype(np.float64), resize_weights(grid, width, "bicubic"))
  return out.reshape(height * width, dim).astype(np.float32)


def _norm(name: str, eps: float = 1e-6):
  # two-pass variance, as PyTorch computes it (official checkpoints reproduce to ~1e-6)
  return nn.LayerNorm(epsilon=eps, use_fast_variance=False, name=name)


class _Block(nn.Module):
  """Pre-LN transformer block: attention (qkv and output biases) and an exact-GELU MLP."""
  width: int
  heads: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = True

  @nn.compact
  def __call__(self, x):
    y = _norm("norm1")(x)
    hd = self.width // self.heads
    init = nn.initializers.variance_scaling
    w_qkv = self.param("qkv", nn.with_logical_partitioning(
        init(1.0, "fan_avg", "uniform", in_axis=0, out_axis=(1, 2, 3)),
        ("embed", "qkv", "heads", "kv")), (self.width, 3, self.heads, hd))
    w_proj = self.param("proj", nn.with_logical_partitioning(
        init(1.0, "fan_avg", "uniform", in_axis=(0, 1), out_axis=2),
        ("heads", "kv", "embed")), (self.heads, hd, self.width))
    qkv = jnp.einsum("btd,dshk->btshk", y, w_qkv)
    if self.qkv_bias:
      qkv = qkv + self.param("qkv_bias", nn.with_logical_partitioning(
          nn.initializers.zeros, ("qkv", "heads", "kv")), (3, self.heads, hd))
    y = attention.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    y = jnp.einsum("bthk,hkd->btd", y, w_proj)
    if self.qkv_bias:
      y = y + self.param("proj_bias", nn.with_logical_partitioning(
          nn.initializers.zeros, ("embed",)), (self.width,))
    x = x + y
    y = _norm("norm2")(x)
    y = nn.Dense(int(self.width * self.mlp_ratio), name="fc1",
                 kernel_init=nn.with_logical_partitioning(
                     nn.initializers.xavier_uniform(), ("embed", "mlp")))(y)
    y = nn.Dense(self.width, name="fc2", kernel_init=nn.with_logical_partitioning(
        nn.initializers.xavier_uniform(), ("mlp", "embed")))(activations.gelu_exact(y))
    return x + y


class _ViT(nn.Module):
  """[B, h, w, C] -> [B, h, w, width] -> blocks -> [B, h, w, out].

  The 4M tokenizers' ViT (fourm.vq ViTEncoder/ViTDecoder): fixed 2D sin-cos
  positions with the row in the first half of the channels, pre-LN blocks,
  no final LayerNorm, and with `post_mlp` a residual tanh MLP on the last
  block's output (x + fc2(tanh(fc1(LN(x))))). proj_in and proj_out play the
  official patch projection / post_quant_proj and quant_proj / out_proj.
  pos_grid > 0: positions from the table at that grid, bicubic-resized (`position_table`).
  """
  width: int
  depth: int
  heads: int
  out: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  post_mlp: bool = True
  pos_grid: int = 0

  @nn.compact
  def __call__(self, x):
    b, h, w, _ = x.shape
    x = nn.Dense(self.width, name="proj_in")(x).reshape(b, h * w, self.width)
    x = x + jnp.asarray(position_table(h, w, self.width, self.pos_grid))[None]
    x = nn.with_logical_constraint(x, ("activation_batch", "activation_length",
                                       "activation_embed"))
    for i in range(self.depth):
      x = _Block(self.width, self.heads, self.mlp_ratio, self.qkv_bias, name=f"blocks_{i}")(x)
    if self.post_mlp:
      y = _norm("norm_mlp")(x.astype(jnp.float32))
      y = nn.Dense(int(self.width * self.mlp_ratio), name="post_mlp_fc1")(y)
      x = x.astype(jnp.float32) + nn.Dense(self.width, name="post_mlp_fc2")(jnp.tanh(y))
    return nn.Dense(self.out, name="proj_out")(x).reshape(b, h, w, self.out)


@dataclasses.dataclass(frozen=True)
class ModalitySpec:
  """in_channels (class count for class-id inputs), out_channels, loss, class_ids input."""
  in_channels: int
  out_channels: int
  loss: str
  class_ids: bool = False


MODALITIES = {
    "rgb": ModalitySpec(3, 3, "mse"),
    "depth": ModalitySpec(1, 1, "smooth_l1"),
    "normals": ModalitySpec(3, 3, "smooth_l1"),
    "semantic": ModalitySpec(7, 7, "cross_entropy", class_ids=True),
    "edges": ModalitySpec(1, 1, "mse"),
    # SAM instance masks (4M-21 App. D.3): one instance cropped to its box, resized to 64 x 64
    "sam_mask": ModalitySpec(2, 2, "cross_entropy", class_ids=True),
    # feature maps of a frozen network (CLIP, DINOv2, ImageBind; here AIM's) as a grid
    # [g, g, D]; D comes from the config (model.feature_dim)
    "features": ModalitySpec(0, 0, "smooth_l1"),
}


def modality_spec(modality: str, feature_dim: int = 0) -> ModalitySpec:
  """MODALITIES[modality], with the channel count of a feature-map modality filled in."""
  if modality not in MODALITIES:
    raise ValueError(f"unknown tokenizer modality {modality!r}; known: {sorted(MODALITIES)}")
  spec = MODALITIES[modality]
  if modality == "features":
    if feature_dim <= 0:
      raise ValueError("a feature-map tokenizer needs model.feature_dim (the features' width)")
    spec = dataclasses.replace(spec, in_channels=feature_dim, out_channels=feature_dim)
  return spec


class VQVAE(nn.Module):
  """ViT VQ-VAE. Sizes: patch p, encoder/decoder width, depth, heads; codebook V x code_dim."""
  in_channels: int
  out_channels: int
  patch_size: int = 16
  width: int = 768
  enc_depth: int = 12
  dec_depth: int = 12
  heads: int = 12
  num_codes: int = 8192
  code_dim: int = 32
  class_ids: bool = False      # inputs are int class ids [B, H, W] (one-hot encoded here)
  ema_decay: float = 0.99
  restart_factor: float = 32.0
  commitment: float = 1.0      # official commitment_weight (4M Table 3)
  mlp_ratio: float = 4.0
  qkv_bias: bool = True        # biases on the attention's qkv and output projections
  post_mlp: bool = True        # the residual tanh MLP closing each ViT (fourm.vq post_mlp)
  # class ids through a learned embedding of this width (official cls_emb) instead of one-hot
  class_embed_dim: int = 0
  norm_latents: bool = False   # commitment / straight-through on l2-normalised latents
  # positions: 0 = sin-cos at each call's grid; G > 0 = the official fixed table at G x G (the
  # largest training image / patch) bicubic-resized to the call's grid (`position_table`)
  pos_grid: int = 0

  def setup(self):
    vit = dict(mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias, post_mlp=self.post_mlp,
               pos_grid=self.pos_grid)
    self.encoder = _ViT(self.width, self.enc_depth, self.heads, self.code_dim, **vit)
    self.quantizer = VectorQuantizer(self.num_codes, self.code_dim, self.ema_decay,
                                     self.restart_factor, self.commitment, self.norm_latents)
    if self.class_ids and self.class_embed_dim:
      self.class_embed = nn.Embed(self.in_channels, self.class_embed_dim)
    if self.dec_depth:        # dec_depth=0: encoder and quantizer only (diffusion decoder)
      self.decoder = _ViT(self.width, self.dec_depth, self.heads,
                          self.patch_size ** 2 * self.out_channels, **vit)

  def _patchify(self, x):
    if self.class_ids and self.class_embed_dim:
      x = self.class_embed(x.astype(jnp.int32))
    elif self.class_ids:
      x = jax.nn.one_hot(x, self.in_channels)
    elif x.ndim == 3:
      x = x[..., None]
    b, hh, ww, c = x.shape
    p = self.patch_size
    if hh % p or ww % p:
      raise ValueError(f"image {hh}x{ww} is not a multiple of the patch size {p}")
    x = x.reshape(b, hh // p, p, ww // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, hh // p, ww // p, p * p * c)

  def _unpatchify(self, y):
    b, h, w, _ = y.shape
    p, c = self.patch_size, self.out_channels
    y = y.reshape(b, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return y.reshape(b, h * p, w * p, c)

  def encode(self, x, train: bool = False):
    """x [B, H, W(, C)] -> (straight-through codes [B, h, w, D], aux with 'indices' [B, h, w])."""
    return self.quantizer(self.encoder(self._patchify(x)), train=train)

  def decode_codes(self, codes):
    """[B, h, w, D] -> [B, H, W, C_out] (class logits for segmentation)."""
    return self._unpatchify(self.decoder(codes))

  def decode_tokens(self, tokens):
    """int [B, h, w] -> [B, H, W, C_out]."""
    return self.decode_codes(self.quantizer.lookup(tokens))

  def tokenize(self, x):
    """x -> int32 tokens [B, h, w]."""
    return self.encode(x)[1]["indices"]

  def __call__(self, x, train: bool = False):
    codes, aux = self.encode(x, train)
    return self.decode_codes(codes), aux


def smooth_l1(pred, target):
  """Mean Huber loss with delta 1 (PyTorch's smooth L1)."""
  d = jnp.abs(pred - target)
  return jnp.mean(jnp.where(d < 1.0, 0.5 * d * d, d - 0.5))


def reconstruction_loss(kind: str, pred, target, num_classes: int = 0):
  """Mean per-element loss. pred [B, H, W, C]; target [B, H, W(, C)] (class ids for CE)."""
  if kind == "mse":
    return jnp.mean((pred - target.reshape(pred.shape)) ** 2)
  if kind == "l1":
    return jnp.mean(jnp.abs(pred - target.reshape(pred.shape)))
  if kind == "smooth_l1":
    return smooth_l1(pred, target.reshape(pred.shape))
  if kind == "cross_entropy":
    logp = jax.nn.log_softmax(pred, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, target[..., None].astype(jnp.int32), -1))
  raise ValueError(f"unknown reconstruction loss {kind!r}; known: {LOSSES}")
