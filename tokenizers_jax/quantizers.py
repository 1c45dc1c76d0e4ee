"""Vector quantizers: l2-normalised EMA VQ with dead-code restart, and Memcodes.

VectorQuantizer (4M App. B.3): inputs are projected to a low-dimensional
latent (32) elsewhere and l2-normalised here; the token is the code of
largest cosine similarity, and the quantized vector is that code's stored
row (as the official Lucid cosine codebook in eval mode). The
codebook is not a parameter: it lives in the 'vq' collection and is updated
by exponential moving averages (decay 0.99) of the assigned latents, and
codes whose EMA count falls below B * N_tokens / (c_replace * V) are
restarted from random latents of the batch. As the official quantizer (Lucid
VectorQuantize with norm_latents=False, the 4M default), the straight-through
estimator and the commitment loss act on the RAW latent x, not its
l2-normalised copy: the decoder sees the code row q, gradients pass to x as
the identity, and the commitment loss is beta * mean over all elements of
(x - sg(q))^2 with beta = 1 (4M Table 3). `norm_latents=True` takes both on
the l2-normalised latent instead (the official option of that name).

Memcodes (Mama et al., used by 4M-21's MLP dVAEs): quantization as one
attention step over a learned codebook. Training (train=True, a 'gumbel'
rng) draws the code by the hard Gumbel-softmax as the official one
(temperature 1: forward the one-hot of argmax(logits + Gumbel noise),
backward the softmax of the perturbed logits); evaluation takes the plain
argmax, deterministic.

HeadMemcodes is Memcodes as the official 4M-21 tokenizers lay it out (one
codebook per head, the latent split across heads), which official
checkpoints convert to.

All return (quantized [..., D], aux) with aux = {"indices" int32 [...],
"commit_loss", "codebook_loss", "usage", "perplexity"} (scalars float32).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

_EPS = 1e-5


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), 1e-12))


def hard_gumbel_softmax(logits: jax.Array, rng: jax.Array, temperature: float = 1.0):
  """Straight-through hard Gumbel-softmax over the last axis (PyTorch's
  F.gumbel_softmax(hard=True)): returns (one-hot forward / softmax backward [..., V],
  indices int [...]) of argmax((logits + g) / temperature), g ~ Gumbel(0, 1)."""
  y = (logits + jax.random.gumbel(rng, logits.shape, logits.dtype)) / temperature
  soft = jax.nn.softmax(y, axis=-1)
  indices = jnp.argmax(y, axis=-1)
  hard = jax.nn.one_hot(indices, logits.shape[-1], dtype=soft.dtype)
  return hard + soft - jax.lax.stop_gradient(soft), indices


def _memcodes_aux(hard, indices, weights, heads: int, num_codes: int) -> dict:
  """The aux outputs of a Memcodes quantizer: codes, code usage and perplexity (weighted per
  vector by `weights`), and zero VQ losses (Memcodes has none)."""
  w = None if weights is None else jnp.repeat(weights.reshape(-1), heads)
  usage, perplexity = usage_and_perplexity(hard.reshape(-1, num_codes), w)
  zero = jnp.zeros((), jnp.float32)
  return {"indices": indices.astype(jnp.int32), "commit_loss": zero, "codebook_loss": zero,
          "usage": usage, "perplexity": perplexity}


def _pick(logits: jax.Array, train: bool, module: nn.Module, temperature: float):
  """(straight-through one-hot [..., V], hard one-hot [..., V], indices [...]): Gumbel when
  training (rng 'gumbel'), the argmax otherwise."""
  if train and not module.is_initializing():
    st, indices = hard_gumbel_softmax(logits, module.make_rng("gumbel"), temperature)
  else:
    indices = jnp.argmax(logits, axis=-1)
    st = jax.nn.one_hot(indices, logits.shape[-1], dtype=logits.dtype)
  return st, jax.nn.one_hot(indices, logits.shape[-1], dtype=logits.dtype), indices


def usage_and_perplexity(one_hot: jax.Array, weights: jax.Array | None = None):
  """one_hot [N, V] -> (share of codes used in the batch, exp(entropy of mean assignment))."""
  w = jnp.ones(one_hot.shape[:1]) if weights is None else weights
  probs = jnp.sum(one_hot * w[:, None], 0) / jnp.maximum(jnp.sum(w), 1.0)
  entropy = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-10)))
  return jnp.mean((probs > 0).astype(jnp.float32)), jnp.exp(entropy)


class VectorQuantizer(nn.Module):
  """EMA vector quantizer on l2-normalised latents.

  num_codes V, code_dim D; decay: EMA decay; restart_factor: c_replace
  (a code is dead when its EMA count < N / (c_replace * V), N = latents per
  batch); commitment: weight beta of the commitment loss (official 1.0);
  norm_latents: straight-through and commitment on the l2-normalised latent
  (official option, off by default) instead of the raw one.
  """
  num_codes: int
  code_dim: int = 32
  decay: float = 0.99
  restart_factor: float = 32.0
  commitment: float = 1.0
  norm_latents: bool = False

  def setup(self):
    def init_codes(key):
      return l2_normalize(jax.random.normal(key, (self.num_codes, self.code_dim)))
    # The codebook lives in a non-trainable collection; 'vq' must be mutable to update it.
    self.codebook = self.variable("vq", "codebook",
                                  lambda: init_codes(self.make_rng("params")))
    # Counts start at zero: every code is dead at the first training step and restarts
    # from the batch (a data-dependent init); codes the data never picks keep restarting.
    self.ema_count = self.variable("vq", "ema_count", lambda: jnp.zeros((self.num_codes,)))
    self.ema_sum = self.variable("vq", "ema_sum", lambda: jnp.zeros((self.num_codes,
                                                                    self.code_dim)))

  def lookup(self, indices: jax.Array) -> jax.Array:
    """int [...] -> float [..., D] codes."""
    return jnp.take(self.codebook.value, indices, axis=0)

  def __call__(self, z: jax.Array, train: bool = False, weights: jax.Array | None = None):
    """z float [..., D] -> (straight-through quantized [..., D], aux).

    train: update the codebook (EMA and restarts; needs mutable=['vq'] and a
    'restart' rng). weights: optional [...] 0/1 mask of latents to count.
    """
    shape = z.shape
    raw = z.reshape(-1, self.code_dim).astype(jnp.float32)
    flat = l2_normalize(raw)
    x = flat if self.norm_latents else raw
    w = jnp.ones(flat.shape[:1]) if weights is None else weights.reshape(-1).astype(jnp.float32)
    codebook = self.codebook.value
    # cosine similarity picks the code; the raw row is the quantized vector (official 4M
    # checkpoints' EMA rows are not exactly unit-norm, and they decode from the raw rows)
    indices = jnp.argmax(flat @ l2_normalize(codebook).T, axis=-1)
    one_hot = jax.nn.one_hot(indices, self.num_codes, dtype=jnp.float32)
    quantized = jnp.take(codebook, indices, axis=0)
    err = jnp.sum((flat - quantized) ** 2, -1)
    norm = jnp.maximum(jnp.sum(w), 1.0)
    # F.mse_loss(sg(q), x): the mean over latents AND their code_dim elements
    commit = jnp.sum(jnp.sum((x - jax.lax.stop_gradient(quantized)) ** 2, -1) * w) / (
        norm * self.code_dim)
    codebook_loss = jnp.sum(err * w) / norm
    usage, perplexity = usage_and_perplexity(one_hot, w)

    if train and not self.is_initializing():
      counts = jnp.sum(one_hot * w[:, None], 0)
      sums = (one_hot * w[:, None]).T @ flat
      ema_count = self.decay * self.ema_count.value + (1 - self.decay) * counts
      ema_sum = self.decay * self.ema_sum.value + (1 - self.decay) * sums
      # dead codes restart from random latents of this batch
      threshold = jnp.sum(w) / (self.restart_factor * self.num_codes)
      dead = ema_count < threshold
      pick = jax.random.choice(self.make_rng("restart"), flat.shape[0], (self.num_codes,),
                               p=w / jnp.sum(w))
      samples = flat[pick]
      ema_count = jnp.where(dead, threshold, ema_count)
      ema_sum = jnp.where(dead[:, None], samples * threshold, ema_sum)
      self.ema_count.value, self.ema_sum.value = ema_count, ema_sum
      self.codebook.value = l2_normalize(ema_sum / jnp.maximum(ema_count, _EPS)[:, None])

    st = x + jax.lax.stop_gradient(quantized - x)
    aux = {"indices": indices.reshape(shape[:-1]).astype(jnp.int32),
           "commit_loss": self.commitment * commit, "codebook_loss": codebook_loss,
           "usage": usage, "perplexity": perplexity}
    return st.reshape(shape).astype(z.dtype), aux


class Memcodes(nn.Module):
  """Attention-based quantization of [..., width] vectors over `num_codes` learned codes.

  Each of `heads` heads picks one code of size `dim` per input vector: logits
  are scaled dot products of a query projection with the codes; training
  picks by hard Gumbel-softmax (rng 'gumbel'), evaluation by argmax. Output:
  the chosen codes' value
  projections, concatenated over heads and projected back to `width`.
  Indices are int32 [..., heads].
  """
  num_codes: int
  width: int
  dim: int = 64
  heads: int = 1
  temperature: float = 1.0      # of the training Gumbel-softmax

  def setup(self):
    self.codes = self.param("codes", nn.initializers.normal(1.0),
                            (self.heads, self.num_codes, self.dim))
    self.to_q = nn.DenseGeneral((self.heads, self.dim), use_bias=False)
    self.to_v = nn.DenseGeneral(self.dim, use_bias=False)
    self.to_out = nn.DenseGeneral(self.width, axis=(-2, -1), use_bias=False)

  def _decode(self, onehot: jax.Array) -> jax.Array:
    """[..., heads, V] (hard or straight-through) -> [..., width]."""
    picked = jnp.einsum("...hv,hvd->...hd", onehot, self.to_v(self.codes))
    return self.to_out(picked)

  def __call__(self, x: jax.Array, train: bool = False, weights: jax.Array | None = None):
    q = self.to_q(x)                                                   # [..., h, d]
    logits = jnp.einsum("...hd,hvd->...hv", q, self.codes) * self.dim ** -0.5
    st, hard, indices = _pick(logits, train, self, self.temperature)
    return self._decode(st), _memcodes_aux(hard, indices, weights, self.heads, self.num_codes)

  def lookup(self, indices: jax.Array) -> jax.Array:
    """int [..., heads] -> float [..., width]: what __call__ returns for these codes."""
    return self._decode(jax.nn.one_hot(indices, self.num_codes))


class HeadMemcodes(nn.Module):
  """Memcodes as in the official 4M-21 MLP tokenizers: one codebook per head, no projections
  of the input.

  A latent [..., dim] splits into `heads` chunks of d = dim / heads channels
  (head h takes channels [h d, (h + 1) d)); chunk h is a query scaled by
  d^-0.5 against keys codes[h] @ to_k[h] of its own codebook of `num_codes`
  codes; the chunk's token is the argmax, its quantized value the chosen
  code's codes[h] @ to_v[h], and the heads' values concatenate back to
  [..., dim]. Weights are laid out (heads, d_in, d_out) as the official EinMix
  ones. Training (train=True, rng 'gumbel') picks by hard Gumbel-softmax at
  `temperature` (official: 1), evaluation by the argmax. Indices are int32
  [..., heads].
  """
  num_codes: int
  dim: int
  heads: int = 1
  temperature: float = 1.0

  def setup(self):
    d = self.dim // self.heads
    if d * self.heads != self.dim:
      raise ValueError(f"Memcodes latent width {self.dim} is not divisible by {self.heads} heads")
    self.codes = self.param("codes", nn.initializers.normal(1.0), (self.heads, self.num_codes, d))
    init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform", in_axis=1, out_axis=2)
    self.to_k = self.param("to_k", init, (self.heads, d, d))
    self.to_v = self.param("to_v", init, (self.heads, d, d))

  def _values(self):
    return jnp.einsum("hnd,hdc->hnc", self.codes, self.to_v)

  def _decode(self, onehot: jax.Array) -> jax.Array:
    """[..., heads, V] -> [..., dim]."""
    out = jnp.einsum("...hn,hnc->...hc", onehot, self._values())
    return out.reshape(out.shape[:-2] + (self.dim,))

  def __call__(self, x: jax.Array, train: bool = False, weights: jax.Array | None = None):
    d = self.dim // self.heads
    q = x.reshape(x.shape[:-1] + (self.heads, d)) * d ** -0.5
    keys = jnp.einsum("hnd,hdc->hnc", self.codes, self.to_k)
    logits = jnp.einsum("...hc,hnc->...hn", q, keys)
    st, hard, indices = _pick(logits, train, self, self.temperature)
    return self._decode(st), _memcodes_aux(hard, indices, weights, self.heads, self.num_codes)

  def lookup(self, indices: jax.Array) -> jax.Array:
    """int [..., heads] -> float [..., dim]: what __call__ returns for these codes."""
    return self._decode(jax.nn.one_hot(indices, self.num_codes))
