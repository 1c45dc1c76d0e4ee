"""Classifier heads on frozen backbone features: the attentive probe and a linear probe.

The attentive probe follows AIM's Eq. 4 and the official
`AttentionPoolingClassifier` (`../shared/reference/aim.md`): BatchNorm without
affine parameters over the feature dimension, one learned query per head
(H = d / d_head heads, stored as one [1, Q, d] token), bias-free key and value
projections of the patch features, attention pooling, the mean over queries,
then a linear classifier, bias-free as in the released heads (`linear_bias`: the
biased classifier of heads trained with apple/ml-l3m's probe). Extra parameters:
2 d^2 + d, plus the classifier's d * classes.

The probes read the mean of a group of block outputs (the official
`AverageLayers`; a group of one block is that block's output): `average_layers`.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from pretrain_jax import attention


def average_layers(features: Mapping[int, jax.Array], group: Sequence[int]) -> jax.Array:
  """The mean of the block outputs `features[l]` ([B, K, D] each) over the blocks in `group`."""
  if len(group) == 1:
    return features[group[0]]
  return jnp.mean(jnp.stack([features[l] for l in group]), axis=0)


def _dense(features, names, name, dtype, use_bias=False):
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, name=name,
                  kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), names),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[-1:]))


class AttentiveProbe(nn.Module):
  """features [B, K, D] -> logits [B, classes]."""
  num_heads: int
  num_classes: int
  num_queries: int = 1
  linear_bias: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    b, _, d = x.shape
    x = nn.BatchNorm(use_running_average=not train, use_bias=False, use_scale=False,
                     epsilon=1e-6, momentum=0.9, name="bn", dtype=self.dtype)(x)
    cls = self.param("cls_token", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, None, "embed")), (1, self.num_queries, d))
    head_dim = d // self.num_heads
    q = jnp.broadcast_to(cls, (b, self.num_queries, d)).reshape(b, self.num_queries,
                                                               self.num_heads, head_dim)
    k = _dense(d, ("embed", "mlp"), "k", self.dtype)(x).reshape(b, -1, self.num_heads, head_dim)
    v = _dense(d, ("embed", "mlp"), "v", self.dtype)(x).reshape(b, -1, self.num_heads, head_dim)
    pooled = attention.dot_product_attention(q.astype(k.dtype), k, v)
    pooled = pooled.reshape(b, self.num_queries, d)
    return _dense(self.num_classes, ("embed", "vocab"), "linear", self.dtype,
                  self.linear_bias)(pooled.mean(axis=1))


class LinearProbe(nn.Module):
  """Average-pooled features [B, K, D] -> BatchNorm -> linear logits [B, classes]."""
  num_classes: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.mean(axis=1)
    x = nn.BatchNorm(use_running_average=not train, use_bias=False, use_scale=False,
                     epsilon=1e-6, momentum=0.9, name="bn", dtype=self.dtype)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name="linear",
                    kernel_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                             ("embed", "vocab")),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)))(x)
