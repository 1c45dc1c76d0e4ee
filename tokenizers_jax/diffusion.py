"""Diffusion decoder for image-like tokenizers (4M App. B.3): a patched UNet, DDPM and DDIM.

The decoder denoises x_t [B, H, W, C] working on 4 x 4 pixel patches
([B, H/4, W/4, 16 C]); the tokenizer's codebook vectors [B, h, w, D] are
upsampled (nearest) to the patch grid and concatenated to its input. The
UNet has `len(channel_mult)` levels (4 by default) of `num_res_blocks` (3)
residual blocks, self-attention at the two smallest levels, and a sinusoidal
timestep embedding. It predicts x0. Training draws t uniformly from 1000
steps of a linear beta schedule (1e-4 .. 0.02); sampling runs DDPM
(ancestral) or DDIM (25 steps by default, eta = 0 deterministic) as one
jitted loop.
"""
from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

PATCH = 4


class Schedule:
  """Linear beta schedule over `steps` timesteps t = 1..steps (index t - 1)."""

  def __init__(self, steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
    self.steps = steps
    self.betas = np.linspace(beta_start, beta_end, steps, dtype=np.float64)
    self.alpha_bar = np.cumprod(1.0 - self.betas)

  def abar(self, t):
    """alpha_bar at integer timesteps t (0 -> 1.0, i.e. clean data)."""
    table = jnp.asarray(np.concatenate([[1.0], self.alpha_bar]), jnp.float32)
    return table[t]

  def q_sample(self, x0, t, noise):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; t int [B] in 1..steps."""
    a = self.abar(t).reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise


def timestep_embedding(t, dim: int):
  """[B] -> [B, dim] sinusoidal embedding."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class _ResBlock(nn.Module):
  channels: int

  @nn.compact
  def __call__(self, x, temb):
    groups = min(32, self.channels // 4) or 1
    h = nn.Conv(self.channels, (3, 3), name="conv1")(nn.silu(nn.GroupNorm(groups, name="norm1")(x)))
    h = h + nn.Dense(self.channels, name="temb")(nn.silu(temb))[:, None, None]
    h = nn.Conv(self.channels, (3, 3), name="conv2")(nn.silu(nn.GroupNorm(groups, name="norm2")(h)))
    if x.shape[-1] != self.channels:
      x = nn.Conv(self.channels, (1, 1), name="skip")(x)
    return x + h


class _Attention(nn.Module):
  heads: int = 4

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    y = nn.GroupNorm(min(32, c // 4) or 1, name="norm")(x).reshape(b, h * w, c)
    qkv = nn.DenseGeneral((3, self.heads, c // self.heads), name="qkv")(y)
    y = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    y = nn.DenseGeneral(c, axis=(-2, -1), name="proj")(y)
    return x + y.reshape(b, h, w, c)


class PatchedUNet(nn.Module):
  """x_t [B, H, W, C], t [B], cond [B, h, w, D] -> predicted x0 [B, H, W, C]."""
  out_channels: int
  base_channels: int = 128
  channel_mult: tuple[int, ...] = (1, 2, 3, 4)
  num_res_blocks: int = 3
  attn_levels: int = 2          # self-attention at this many of the smallest levels

  @nn.compact
  def __call__(self, x_t, t, cond):
    b, hh, ww, c = x_t.shape
    if hh % PATCH or ww % PATCH:
      raise ValueError(f"image {hh}x{ww} is not a multiple of the {PATCH}-pixel patches")
    gh, gw = hh // PATCH, ww // PATCH
    down = 2 ** (len(self.channel_mult) - 1)
    if gh % down or gw % down:
      raise ValueError(f"patch grid {gh}x{gw} must be divisible by {down} for "
                       f"{len(self.channel_mult)} levels")
    x = x_t.reshape(b, gh, PATCH, gw, PATCH, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh, gw, -1)
    cond = jax.image.resize(cond, (b, gh, gw, cond.shape[-1]), "nearest")
    x = jnp.concatenate([x, cond.astype(x.dtype)], axis=-1)
    temb = nn.Dense(4 * self.base_channels, name="temb_1")(
        timestep_embedding(t, self.base_channels))
    temb = nn.Dense(4 * self.base_channels, name="temb_2")(nn.silu(temb))

    h = nn.Conv(self.base_channels, (3, 3), name="conv_in")(x)
    skips = [h]
    levels = len(self.channel_mult)
    for i, mult in enumerate(self.channel_mult):
      for j in range(self.num_res_blocks):
        h = _ResBlock(self.base_channels * mult, name=f"down_{i}_{j}")(h, temb)
        if i >= levels - self.attn_levels:
          h = _Attention(name=f"down_attn_{i}_{j}")(h)
        skips.append(h)
      if i < levels - 1:
        h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2), name=f"downsample_{i}")(h)
        skips.append(h)
    h = _ResBlock(h.shape[-1], name="mid_1")(h, temb)
    h = _Attention(name="mid_attn")(h)
    h = _ResBlock(h.shape[-1], name="mid_2")(h, temb)
    for i, mult in reversed(list(enumerate(self.channel_mult))):
      for j in range(self.num_res_blocks + 1):
        h = _ResBlock(self.base_channels * mult, name=f"up_{i}_{j}")(
            jnp.concatenate([h, skips.pop()], axis=-1), temb)
        if i >= levels - self.attn_levels:
          h = _Attention(name=f"up_attn_{i}_{j}")(h)
      if i > 0:
        hb, hh2, ww2, hc = h.shape
        h = jax.image.resize(h, (hb, hh2 * 2, ww2 * 2, hc), "nearest")
        h = nn.Conv(hc, (3, 3), name=f"upsample_{i}")(h)
    h = nn.silu(nn.GroupNorm(min(32, h.shape[-1] // 4) or 1, name="norm_out")(h))
    h = nn.Conv(PATCH * PATCH * self.out_channels, (3, 3), name="conv_out",
                kernel_init=nn.initializers.zeros)(h)
    h = h.reshape(b, gh, gw, PATCH, PATCH, self.out_channels).transpose(0, 1, 3, 2, 4, 5)
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
  """ViT encoder + EMA VQ (a VQVAE without its ViT decoder) and a PatchedUNet decoder.

  Training (__call__) noises the target x0 [B, H, W, C] at timesteps t [B] and
  returns the UNet's x0 prediction conditioned on the quantized codes, with
  the quantizer's aux; sampling is `reconstruct` (DDIM from noise).
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
  commitment: float = 0.25
  base_channels: int = 128
  channel_mult: tuple[int, ...] = (1, 2, 3, 4)
  num_res_blocks: int = 3
  attn_levels: int = 2
  steps: int = 1000

  def setup(self):
    from tokenizers_jax.vqvae import VQVAE
    self.tokenizer = VQVAE(self.in_channels, self.out_channels, self.patch_size, self.width,
                           self.enc_depth, 0, self.heads, self.num_codes, self.code_dim,
                           ema_decay=self.ema_decay, restart_factor=self.restart_factor,
                           commitment=self.commitment)
    self.unet = PatchedUNet(self.out_channels, self.base_channels, tuple(self.channel_mult),
                            self.num_res_blocks, self.attn_levels)

  def encode(self, x, train: bool = False):
    """x [B, H, W(, C)] -> (codes [B, h, w, D], aux with 'indices')."""
    return self.tokenizer.encode(x, train)

  def tokenize(self, x):
    return self.tokenizer.tokenize(x)

  def lookup(self, tokens):
    """int [B, h, w] -> codes [B, h, w, D]."""
    return self.tokenizer.quantizer.lookup(tokens)

  def predict_x0(self, x_t, t, codes):
    return self.unet(x_t, t, codes)

  def __call__(self, x, t, noise, train: bool = False):
    """x [B, H, W(, C)], t int [B] in 1..steps, noise like x0 -> (predicted x0, x0, aux)."""
    codes, aux = self.encode(x, train)
    x0 = x if x.ndim == 4 else x[..., None]
    x_t = Schedule(self.steps).q_sample(x0, t, noise.reshape(x0.shape))
    return self.unet(x_t, t, codes), x0, aux


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
  return ddim_sample(predict, Schedule(model.steps), x_T, k2, num_steps)
