"""Diffusion decoder for image-like tokenizers (4M App. B.3): a patched UNet, DDPM and DDIM.

The decoder denoises x_t [B, H, W, C] working on 4 x 4 pixel patches
([B, H/4, W/4, 16 C]); the tokenizer's codebook vectors [B, h, w, D] are
upsampled (nearest) to the patch grid and concatenated to its input. The
UNet has `len(channel_mult)` levels (4 by default) of `num_res_blocks` (3)
residual blocks, self-attention at the two smallest levels, and a sinusoidal
timestep embedding; it is the official fourm.vq PatchedUNetCondCat, so
official DiVAE checkpoints load through tokenizers_jax.convert. It predicts
x0 by default (4M), or the noise or v (`prediction_type`, as the official
DiVAE options). Training draws t uniformly from 1000 steps of a linear (or
squaredcos_cap_v2) beta schedule, rescaled to zero terminal SNR as the
official DiVAE does by default;
sampling runs DDPM (ancestral) or DDIM (25 steps by default, eta = 0
deterministic) on the x0 estimates as one jitted loop.
"""
from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pretrain_jax import attention

PATCH = 4
BETA_SCHEDULES = ("linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("sample", "epsilon", "v_prediction")


def official_betas(steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                   beta_schedule: str = "linear", zero_terminal_snr: bool = False) -> np.ndarray:
  """float32 [steps] betas as fourm.vq's DDPM/DDIM schedulers compute them (float32 linspace;
  the cosine schedule capped at 0.999; optionally rescaled to zero terminal SNR, Lin et al.)."""
  if beta_schedule == "linear":
    betas = np.linspace(beta_start, beta_end, steps, dtype=np.float32)
  elif beta_schedule == "squaredcos_cap_v2":
    abar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = np.array([min(1 - abar((i + 1) / steps) / abar(i / steps), 0.999)
                      for i in range(steps)], np.float32)
  else:
    raise ValueError(f"unknown beta_schedule {beta_schedule!r}; known: {BETA_SCHEDULES}")
  if zero_terminal_snr:
    s = np.sqrt(np.cumprod(np.float32(1) - betas, dtype=np.float32))
    s0, s_end = s[0].copy(), s[-1].copy()
    s = (s - s_end) * (s0 / (s0 - s_end))
    abar_t = s ** 2
    alphas = np.concatenate([abar_t[:1], abar_t[1:] / abar_t[:-1]])
    betas = (np.float32(1) - alphas).astype(np.float32)
  return betas


class Schedule:
  """A beta schedule over `steps` timesteps t = 1..steps (index t - 1; the UNet sees t - 1,
  fourm.vq's 0-based timestep). Defaults: linear 1e-4 .. 0.02, as 4M."""

  def __init__(self, steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
               beta_schedule: str = "linear", zero_terminal_snr: bool = False):
    self.steps = steps
    self.betas = official_betas(steps, beta_start, beta_end, beta_schedule, zero_terminal_snr)
    # the product in float64: the samplers take ratios of neighbouring entries
    self.alpha_bar = np.cumprod(1.0 - self.betas.astype(np.float64))

  def abar(self, t):
    """alpha_bar at integer timesteps t (0 -> 1.0, i.e. clean data)."""
    table = jnp.asarray(np.concatenate([[1.0], self.alpha_bar]), jnp.float32)
    return table[t]

  def q_sample(self, x0, t, noise):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; t int [B] in 1..steps."""
    a = self.abar(t).reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise

  def target(self, prediction_type: str, x0, t, noise):
    """What the decoder learns to output: x0 ('sample'), the noise ('epsilon') or
    v = sqrt(abar) noise - sqrt(1 - abar) x0 ('v_prediction')."""
    a = self.abar(t).reshape((-1,) + (1,) * (x0.ndim - 1))
    if prediction_type == "sample":
      return x0
    if prediction_type == "epsilon":
      return noise
    if prediction_type == "v_prediction":
      return jnp.sqrt(a) * noise - jnp.sqrt(1 - a) * x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}; known: {PREDICTION_TYPES}")

  def to_x0(self, prediction_type: str, out, x_t, t):
    """The decoder's output at x_t (t in 1..steps) -> its x0 estimate."""
    a = self.abar(t).reshape((-1,) + (1,) * (x_t.ndim - 1))
    if prediction_type == "sample":
      return out
    if prediction_type == "epsilon":   # undefined where abar = 0 (zero terminal SNR): guarded
      return (x_t - jnp.sqrt(1 - a) * out) / jnp.sqrt(jnp.maximum(a, 1e-8))
    if prediction_type == "v_prediction":
      return jnp.sqrt(a) * x_t - jnp.sqrt(1 - a) * out
    raise ValueError(f"unknown prediction_type {prediction_type!r}; known: {PREDICTION_TYPES}")


def timestep_embedding(t, dim: int):
  """[B] -> [B, dim]: [cos(t f), sin(t f)] (cosine first, as guided-diffusion's UNet),
  f_i = exp(-ln(10^4) i / (dim / 2))."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def _group_norm(name: str, channels: int):
  # GroupNorm(32, C) eps 1e-5 in float32 (fewer groups when C is not a multiple of 32)
  return nn.GroupNorm(math.gcd(32, channels), epsilon=1e-5, use_fast_variance=False, name=name)


class _ResBlock(nn.Module):
  channels: int

  @nn.compact
  def __call__(self, x, temb):
    c_in = x.shape[-1]
    h = nn.silu(_group_norm("norm1", c_in)(x.astype(jnp.float32)))
    h = nn.Conv(self.channels, (3, 3), padding=1, name="conv1")(h)
    h = h + nn.Dense(self.channels, name="temb")(nn.silu(temb))[:, None, None]
    h = nn.silu(_group_norm("norm2", self.channels)(h))
    h = nn.Conv(self.channels, (3, 3), padding=1, name="conv2")(h)
    if c_in != self.channels:
      x = nn.Conv(self.channels, (1, 1), name="skip")(x)
    return x + h


class _Attention(nn.Module):
  """Self-attention over the grid. qkv is laid out per head (q, k, v of one head adjacent:
  guided-diffusion's legacy QKV order), so official weights load as they are."""
  heads: int = 1

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    y = _group_norm("norm", c)(x.astype(jnp.float32)).reshape(b, h * w, c)
    qkv = nn.DenseGeneral((self.heads, 3, c // self.heads), name="qkv")(y)
    y = attention.dot_product_attention(qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2])
    y = nn.DenseGeneral(c, axis=(-2, -1), name="proj")(y)
    return x + y.reshape(b, h, w, c)


def _nearest(x, size):
  """[B, h, w, C] -> [B, H, W, C], PyTorch's 'nearest' (source index floor(i * h / H))."""
  rows = (np.arange(size[0]) * x.shape[1] // size[0]).astype(np.int32)
  cols = (np.arange(size[1]) * x.shape[2] // size[1]).astype(np.int32)
  return x[:, rows][:, :, cols]


class PatchedUNet(nn.Module):
  """x_t [B, H, W, C], t [B], cond [B, h, w, D] -> the decoder output [B, H, W, C].

  The 4M diffusion decoder (fourm.vq PatchedUNetCondCat, a guided-diffusion
  UNet): pixels are patchified channel-major (c, ph, pw), the conditioning is
  upsampled (nearest) to the patch grid and concatenated after them; per level
  `num_res_blocks` ResBlocks (+ attention where the downsampling rate is in
  `attention_resolutions`, or at the `attn_levels` smallest levels when it is
  empty), a stride-2 conv between levels, a middle ResBlock-attention-ResBlock,
  and the mirrored decoder with skip connections and nearest upsampling.
  """
  out_channels: int
  base_channels: int = 128
  channel_mult: tuple[int, ...] = (1, 2, 3, 4)
  num_res_blocks: int = 3
  attn_levels: int = 2          # self-attention at this many of the smallest levels
  attention_resolutions: tuple[int, ...] = ()   # downsampling rates with attention (official)
  num_heads: int = 1
  patch_size: int = PATCH

  def _attends(self, level: int) -> bool:
    if self.attention_resolutions:
      return 2 ** level in self.attention_resolutions
    return level >= len(self.channel_mult) - self.attn_levels

  @nn.compact
  def __call__(self, x_t, t, cond):
    b, hh, ww, c = x_t.shape
    p = self.patch_size
    if hh % p or ww % p:
      raise ValueError(f"image {hh}x{ww} is not a multiple of the {p}-pixel patches")
    gh, gw = hh // p, ww // p
    down = 2 ** (len(self.channel_mult) - 1)
    if gh % down or gw % down:
      raise ValueError(f"patch grid {gh}x{gw} must be divisible by {down} for "
                       f"{len(self.channel_mult)} levels")
    x = x_t.reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 5, 2, 4).reshape(b, gh, gw, -1)
    x = jnp.concatenate([x, _nearest(cond, (gh, gw)).astype(x.dtype)], axis=-1)
    temb = nn.Dense(4 * self.base_channels, name="temb_1")(
        timestep_embedding(t, self.base_channels))
    temb = nn.Dense(4 * self.base_channels, name="temb_2")(nn.silu(temb))

    h = nn.Conv(self.base_channels * self.channel_mult[0], (3, 3), padding=1, name="conv_in")(x)
    skips = [h]
    levels = len(self.channel_mult)
    for i, mult in enumerate(self.channel_mult):
      for j in range(self.num_res_blocks):
        h = _ResBlock(self.base_channels * mult, name=f"down_{i}_{j}")(h, temb)
        if self._attends(i):
          h = _Attention(self.num_heads, name=f"down_attn_{i}_{j}")(h)
        skips.append(h)
      if i < levels - 1:
        h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                    name=f"downsample_{i}")(h)
        skips.append(h)
    h = _ResBlock(h.shape[-1], name="mid_1")(h, temb)
    h = _Attention(self.num_heads, name="mid_attn")(h)
    h = _ResBlock(h.shape[-1], name="mid_2")(h, temb)
    for i, mult in reversed(list(enumerate(self.channel_mult))):
      for j in range(self.num_res_blocks + 1):
        h = _ResBlock(self.base_channels * mult, name=f"up_{i}_{j}")(
            jnp.concatenate([h, skips.pop()], axis=-1), temb)
        if self._attends(i):
          h = _Attention(self.num_heads, name=f"up_attn_{i}_{j}")(h)
      if i > 0:
        hb, hh2, ww2, hc = h.shape
        h = _nearest(h, (hh2 * 2, ww2 * 2))
        h = nn.Conv(hc, (3, 3), padding=1, name=f"upsample_{i}")(h)
    h = nn.silu(_group_norm("norm_out", h.shape[-1])(h))
    h = nn.Conv(p * p * self.out_channels, (3, 3), padding=1, name="conv_out",
                kernel_init=nn.initializers.zeros)(h)
    h = h.reshape(b, gh, gw, self.out_channels, p, p).transpose(0, 1, 4, 2, 5, 3)
    return h.reshape(b, hh, ww, self.out_channels)


def diffusion_loss(predict_x0: Callable, schedule: Schedule, x0, rng):
  """MSE of the x0 prediction at uniformly drawn t in 1..steps."""
  k1, k2 = jax.random.split(rng)
  t = jax.random.randint(k1, (x0.shape[0],), 1, schedule.steps + 1)
  noise = jax.random.normal(k2, x0.shape, x0.dtype)
  return jnp.mean((predict_x0(schedule.q_sample(x0, t, noise), t) - x0) ** 2)


def ddpm_sample(predict_x0: Callable, schedule: Schedule, x_T, rng):
  """Ancestral sampling through all steps: x_{t-1} ~ q(x_{t-1} | x_t, x0 = predict_x0(x_t, t))."""
  betas = jnp.asarray(schedule.betas, jnp.float32)
  b = x_T.shape[0]

  def body(i, carry):
    x, key = carry
    t = schedule.steps - i
    key, sub = jax.random.split(key)
    x0 = predict_x0(x, jnp.full((b,), t, jnp.int32))
    a_t, a_prev, beta = schedule.abar(t), schedule.abar(t - 1), betas[t - 1]
    mean = (jnp.sqrt(a_prev) * beta / (1 - a_t)) * x0 + \
        (jnp.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t)) * x
    var = beta * (1 - a_prev) / (1 - a_t)
    x = mean + jnp.where(t > 1, jnp.sqrt(var), 0.0) * jax.random.normal(sub, x.shape, x.dtype)
    return x, key

  return jax.lax.fori_loop(0, schedule.steps, body, (x_T, rng))[0]


def ddim_sample(predict_x0: Callable, schedule: Schedule, x_T, rng=None, num_steps: int = 25,
                eta: float = 0.0):
  """DDIM over `num_steps` evenly spaced timesteps; eta = 0 is deterministic, eta = 1 with all
  steps is DDPM's ancestral sampler."""
  ts = np.linspace(schedule.steps, 0, num_steps + 1).round().astype(np.int32)
  ts_arr = jnp.asarray(ts)
  b = x_T.shape[0]
  rng = jax.random.key(0) if rng is None else rng

  def body(i, carry):
    x, key = carry
    t, t_prev = ts_arr[i], ts_arr[i + 1]
    key, sub = jax.random.split(key)
    x0 = predict_x0(x, jnp.full((b,), t, jnp.int32))
    a_t, a_prev = schedule.abar(t), schedule.abar(t_prev)
    eps = (x - jnp.sqrt(a_t) * x0) / jnp.sqrt(1 - a_t)
    sigma = eta * jnp.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    x = jnp.sqrt(a_prev) * x0 + jnp.sqrt(jnp.maximum(1 - a_prev - sigma ** 2, 0.0)) * eps
    x = x + sigma * jax.random.normal(sub, x.shape, x.dtype)
    return x, key

  return jax.lax.fori_loop(0, num_steps, body, (x_T, rng))[0]


class DiffusionTokenizer(nn.Module):
  """ViT encoder + VQ (a VQVAE without its ViT decoder) and a PatchedUNet decoder (fourm.vq
  DiVAE).

  Training (__call__) noises the target x0 [B, H, W, C] at timesteps t [B] and
  returns the UNet's output conditioned on the quantized codes, the target it
  learns (x0, the noise or v, by `prediction_type`) and the quantizer's aux;
  sampling is `reconstruct` (DDIM from noise on the x0 estimates).
  """
  in_channels: int
  out_channels: int
  patch_size: int = 16
  width: int = 768
  enc_depth: int = 12
  heads: int = 12
  num_codes: int = 8192
  code_dim: int = 32
  ema_decay: float = 0.99
  restart_factor: float = 32.0
  commitment: float = 1.0
  base_channels: int = 128
  channel_mult: tuple[int, ...] = (1, 2, 3, 4)
  num_res_blocks: int = 3
  attn_levels: int = 2
  steps: int = 1000
  attention_resolutions: tuple[int, ...] = ()
  unet_heads: int = 1
  unet_patch: int = PATCH
  beta_schedule: str = "linear"
  zero_terminal_snr: bool = True       # the official DiVAE default
  prediction_type: str = "sample"
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  post_mlp: bool = True
  norm_latents: bool = False
  pos_grid: int = 0             # the encoder's position table grid (vqvae.VQVAE.pos_grid)

  def setup(self):
    from tokenizers_jax.vqvae import VQVAE
    self.tokenizer = VQVAE(self.in_channels, self.out_channels, self.patch_size, self.width,
                           self.enc_depth, 0, self.heads, self.num_codes, self.code_dim,
                           ema_decay=self.ema_decay, restart_factor=self.restart_factor,
                           commitment=self.commitment, norm_latents=self.norm_latents,
                           mlp_ratio=self.mlp_ratio,
                           qkv_bias=self.qkv_bias, post_mlp=self.post_mlp,
                           pos_grid=self.pos_grid)
    self.unet = PatchedUNet(self.out_channels, self.base_channels, tuple(self.channel_mult),
                            self.num_res_blocks, self.attn_levels,
                            tuple(self.attention_resolutions), self.unet_heads, self.unet_patch)

  def schedule(self) -> Schedule:
    return Schedule(self.steps, beta_schedule=self.beta_schedule,
                    zero_terminal_snr=self.zero_terminal_snr)

  def encode(self, x, train: bool = False):
    """x [B, H, W(, C)] -> (codes [B, h, w, D], aux with 'indices')."""
    return self.tokenizer.encode(x, train)

  def tokenize(self, x):
    return self.tokenizer.tokenize(x)

  def lookup(self, tokens):
    """int [B, h, w] -> codes [B, h, w, D]."""
    return self.tokenizer.quantizer.lookup(tokens)

  def decoder(self, x_t, t, codes):
    """One UNet forward: x_t [B, H, W, C], t int [B] in 1..steps (the UNet sees the 0-based
    t - 1, the official timestep), codes [B, h, w, D] -> the raw output."""
    return self.unet(x_t, t - 1, codes)

  def predict_x0(self, x_t, t, codes):
    """The x0 estimate at x_t (t in 1..steps), whatever the decoder predicts."""
    return self.schedule().to_x0(self.prediction_type, self.decoder(x_t, t, codes), x_t, t)

  def __call__(self, x, t, noise, train: bool = False):
    """x [B, H, W(, C)], t int [B] in 1..steps, noise like x0 -> (output, target, aux)."""
    codes, aux = self.encode(x, train)
    x0 = x if x.ndim == 4 else x[..., None]
    noise = noise.reshape(x0.shape)
    sch = self.schedule()
    x_t = sch.q_sample(x0, t, noise)
    return self.decoder(x_t, t, codes), sch.target(self.prediction_type, x0, t, noise), aux


def reconstruct(model: DiffusionTokenizer, variables, x=None, rng=None, num_steps: int = 25,
                tokens=None):
  """Encodes x (or takes `tokens` [B, h, w]) and decodes with DDIM (eta 0) from noise.
  Returns [B, H, W, C]. Jit the caller; the sampling loop is a fori_loop."""
  if tokens is None:
    codes = model.apply(variables, x, method=model.encode)[0]
  else:
    codes = model.apply(variables, tokens, method=model.lookup)
  b, h, w, _ = codes.shape
  p = model.patch_size
  rng = jax.random.key(0) if rng is None else rng
  k1, k2 = jax.random.split(rng)
  x_T = jax.random.normal(k1, (b, h * p, w * p, model.out_channels), jnp.float32)
  predict = lambda x_t, t: model.apply(variables, x_t, t, codes, method=model.predict_x0)
  return ddim_sample(predict, Schedule(model.steps, beta_schedule=model.beta_schedule,
                                       zero_terminal_snr=model.zero_terminal_snr),
                     x_T, k2, num_steps)
