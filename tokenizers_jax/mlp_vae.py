"""MLP discrete VAE for vectors: global embeddings and human pose/shape (4M-21 App. D.2, D.4).

  v [B, in_dim] -> BottleneckMLP -> [B, num_tokens, token_dim] -> Memcodes (tokens int32
  [B, num_tokens], vocab V) -> BottleneckMLP -> [B, in_dim]

4M-21: 6 blocks of width 1024; global embeddings (DINOv2/ImageBind) as 16
tokens of vocab 8192 with a cosine loss, poses as 8 tokens of vocab 1024
with smooth L1. `vector_loss` gives both.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from tokenizers_jax.quantizers import Memcodes
from tokenizers_jax.vqvae import smooth_l1


class BottleneckMLP(nn.Module):
  """in -> width -> `blocks` pre-norm residual MLP blocks (hidden 4 * width) -> out."""
  width: int
  blocks: int
  out: int

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.width, name="proj_in")(x)
    for i in range(self.blocks):
      y = nn.LayerNorm(name=f"norm_{i}")(x)
      y = nn.Dense(4 * self.width, name=f"fc1_{i}")(y)
      x = x + nn.Dense(self.width, name=f"fc2_{i}")(nn.gelu(y))
    return nn.Dense(self.out, name="proj_out")(nn.LayerNorm(name="norm_out")(x))


class MLPVAE(nn.Module):
  in_dim: int
  num_tokens: int = 16
  vocab: int = 8192
  width: int = 1024
  blocks: int = 6
  token_dim: int = 32

  def setup(self):
    self.encoder = BottleneckMLP(self.width, self.blocks, self.num_tokens * self.token_dim)
    self.quantizer = Memcodes(self.vocab, width=self.token_dim, dim=self.token_dim, heads=1)
    self.decoder = BottleneckMLP(self.width, self.blocks, self.in_dim)

  def _quantize(self, v):
    z = self.encoder(v).reshape(v.shape[0], self.num_tokens, self.token_dim)
    return self.quantizer(z)

  def tokenize(self, v):
    """[B, in_dim] -> int32 [B, num_tokens]."""
    return self._quantize(v)[1]["indices"][..., 0]

  def decode_tokens(self, tokens):
    """int [B, num_tokens] -> [B, in_dim]."""
    z = self.quantizer.lookup(tokens[..., None])
    return self.decoder(z.reshape(tokens.shape[0], -1))

  def __call__(self, v, train: bool = False):
    z, aux = self._quantize(v)
    aux = dict(aux, indices=aux["indices"][..., 0])
    return self.decoder(z.reshape(v.shape[0], -1)), aux


def vector_loss(kind: str, pred, target):
  """'cosine': mean 1 - cos(pred, target); 'smooth_l1': mean smooth L1."""
  if kind == "cosine":
    num = jnp.sum(pred * target, -1)
    den = jnp.linalg.norm(pred, axis=-1) * jnp.linalg.norm(target, axis=-1)
    return jnp.mean(1 - num / jnp.maximum(den, 1e-8))
  if kind == "smooth_l1":
    return smooth_l1(pred, target)
  raise ValueError(f"unknown vector loss {kind!r}; use cosine or smooth_l1")
