"""Activation rematerialisation policies, one name each (config key `model.remat`).

  none   keep every activation for the backward pass (fastest, most memory)
  block  keep only each block's input; recompute the block in the backward pass
  dots   keep the outputs of matmuls without batch dimensions (the projections),
         recompute the cheap element-wise work and attention around them
"""
from __future__ import annotations

import flax.linen as nn
import jax

POLICIES = ("none", "block", "dots")


def policy_name(value) -> str:
  """A config value -> a policy name (True/False as 'block'/'none', for older configs)."""
  if isinstance(value, bool):
    return "block" if value else "none"
  if value not in POLICIES:
    raise ValueError(f"config key 'model.remat' must be one of {POLICIES}, got {value!r}")
  return value


def wrap(cls, remat) -> type:
  """The module class `cls`, rematerialised per call under the policy `remat`."""
  name = policy_name(remat)
  if name == "none":
    return cls
  policy = (jax.checkpoint_policies.nothing_saveable if name == "block"
            else jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  return nn.remat(cls, policy=policy)
