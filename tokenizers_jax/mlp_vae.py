"""MLP discrete VAE for vectors: global embeddings and human pose/shape (4M-21 App. D.2, D.4).

  v [B, in_dim] -> BottleneckMLP -> [B, num_tokens, token_dim] -> Memcodes (tokens int32
  [B, num_tokens], vocab V) -> BottleneckMLP -> [B, in_dim]

4M-21: 6 blocks of width 1024; global embeddings (DINOv2/ImageBind) as 16
tokens of vocab 8192 with a cosine loss, poses as 8 tokens of vocab 1024
with smooth L1. `vector_loss` gives both. Official 4M-21 checkpoints
(fourm.vq VQVAE with BottleneckMLP and Memcodes) load as `official=True`
through tokenizers_jax.convert.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from pretrain_jax import activations
from tokenizers_jax.quantizers import HeadMemcodes, Memcodes
from tokenizers_jax.vqvae import smooth_l1


class BottleneckMLP(nn.Module):
  """in -> width -> `blocks` pre-norm residual MLP blocks (hidden expansion * width) -> out.

  final_norm: a LayerNorm before the output projection (ours; the official
  fourm.vq BottleneckMLP has none). eps: the LayerNorms' epsilon (PyTorch's
  1e-5 in the official model). exact_gelu: erf GELU (official) or tanh.
  """
  width: int
  blocks: int
  out: int
  expansion: int = 4
  final_norm: bool = True
  eps: float = 1e-6
  exact_gelu: bool = False

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.width, name="proj_in")(x)
    for i in range(self.blocks):
      y = nn.LayerNorm(epsilon=self.eps, use_fast_variance=False, name=f"norm_{i}")(x)
      y = nn.Dense(self.expansion * self.width, name=f"fc1_{i}")(y)
      x = x + nn.Dense(self.width, name=f"fc2_{i}")(activations.gelu_exact(y) if self.exact_gelu else nn.gelu(y))
    if self.final_norm:
      x = nn.LayerNorm(name="norm_out")(x)
    return nn.Dense(self.out, name="proj_out")(x)


class MLPVAE(nn.Module):
  """v [B, in_dim] -> tokens int32 [B, num_tokens] -> [B, in_dim].

  official=False (ours): the encoder emits num_tokens vectors of token_dim
  that one shared Memcodes codebook quantizes. official=True: the fourm.vq
  VQVAE with BottleneckMLP encoder/decoder (`BottleneckMLP/B_<blocks>-Wi_<width>
  [-E_<expansion>]`): encoder -> quant_proj (width -> num_tokens * token_dim)
  -> HeadMemcodes with one head (and codebook) per token -> post_quant_proj
  -> decoder, LayerNorm eps 1e-5, exact GELU, no final norm.
  """
  in_dim: int
  num_tokens: int = 16
  vocab: int = 8192
  width: int = 1024
  blocks: int = 6
  token_dim: int = 32
  expansion: int = 4
  official: bool = False

  def setup(self):
    latent = self.num_tokens * self.token_dim
    if self.official:
      mlp = dict(expansion=self.expansion, final_norm=False, eps=1e-5, exact_gelu=True)
      self.encoder = BottleneckMLP(self.width, self.blocks, self.width, **mlp)
      self.quant_proj = nn.Dense(latent)
      self.quantizer = HeadMemcodes(self.vocab, latent, heads=self.num_tokens)
      self.post_quant_proj = nn.Dense(self.width)
      self.decoder = BottleneckMLP(self.width, self.blocks, self.in_dim, **mlp)
    else:
      self.encoder = BottleneckMLP(self.width, self.blocks, latent, self.expansion)
      self.quantizer = Memcodes(self.vocab, width=self.token_dim, dim=self.token_dim, heads=1)
      self.decoder = BottleneckMLP(self.width, self.blocks, self.in_dim, self.expansion)

  def latent(self, v):
    """[B, in_dim] -> the continuous latent before quantization."""
    z = self.encoder(v)
    if self.official:
      return self.quant_proj(z)
    return z.reshape(v.shape[0], self.num_tokens, self.token_dim)

  def _quantize(self, v, train: bool = False):
    z, aux = self.quantizer(self.latent(v), train=train)
    if not self.official:
      aux = dict(aux, indices=aux["indices"][..., 0])
    return z, aux

  def _decode(self, z):
    z = z.reshape(z.shape[0], -1)
    return self.decoder(self.post_quant_proj(z) if self.official else z)

  def tokenize(self, v):
    """[B, in_dim] -> int32 [B, num_tokens]."""
    return self._quantize(v)[1]["indices"]

  def lookup(self, tokens):
    """int [B, num_tokens] -> the quantized latent."""
    return self.quantizer.lookup(tokens if self.official else tokens[..., None])

  def decode_tokens(self, tokens):
    """int [B, num_tokens] -> [B, in_dim]."""
    return self._decode(self.lookup(tokens))

  def __call__(self, v, train: bool = False):
    """train: codes by hard Gumbel-softmax (needs a 'gumbel' rng), as the official Memcodes."""
    z, aux = self._quantize(v, train)
    return self._decode(z), aux


def vector_loss(kind: str, pred, target):
  """'cosine': mean 1 - cos(pred, target); 'smooth_l1': mean smooth L1."""
  if kind == "cosine":
    num = jnp.sum(pred * target, -1)
    den = jnp.linalg.norm(pred, axis=-1) * jnp.linalg.norm(target, axis=-1)
    return jnp.mean(1 - num / jnp.maximum(den, 1e-8))
  if kind == "smooth_l1":
    return smooth_l1(pred, target)
  raise ValueError(f"unknown vector loss {kind!r}; use cosine or smooth_l1")
