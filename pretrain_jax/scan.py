"""Scan over layers (config key `model.scan_layers`): N identical blocks as one `lax.scan`.

XLA then compiles one block instead of N, so compile time stops growing with the depth
(MaxText's `scan_layers`). The blocks' parameters are stacked along a leading axis named
'layers' (replicated by the rules table), under `NAME/layers/layer/...`. The unrolled form
names them `NAME_0 ... NAME_{N-1}`; `unstack` and `stack` convert between the two, so a
run trained with scan loads into models built without it (per-block features, cached
decoding, converters, layer-wise lr decay all use the unrolled names).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pretrain_jax import remat as remat_lib


class _Layer(nn.Module):
  """The scanned body: one block (rematerialised per `remat`); returns (carry, None)."""
  block_cls: Any
  kwargs: Any
  remat: str = "none"

  @nn.compact
  def __call__(self, x, args):
    block = remat_lib.wrap(self.block_cls, self.remat)(**self.kwargs, name="layer")
    return block(x, *args), None


class Stack(nn.Module):
  """`length` blocks `block_cls(**kwargs)` applied in turn as one scan.

  __call__(x, *args): x [B, T, D] is the carry; args (masks, context) are the same for
  every block. Returns the last block's output.
  """
  block_cls: Any
  length: int
  kwargs: Any
  remat: str = "none"

  @nn.compact
  def __call__(self, x, *args):
    scan = nn.scan(_Layer, variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=nn.broadcast, length=self.length,
                   metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = scan(self.block_cls, self.kwargs, self.remat, name="layers")(x, args)
    return x


def apply(blocks, x, *args):
  """Runs a list of blocks, or a Stack, over x."""
  if isinstance(blocks, Stack):
    return blocks(x, *args)
  for block in blocks:
    x = block(x, *args)
  return x


def unrolled(blocks, what: str):
  """The list of blocks; a clear error for a Stack (per-block access needs unrolled params)."""
  if isinstance(blocks, Stack):
    raise ValueError(f"{what} needs the blocks one by one, but the model was built with "
                     "model.scan_layers=True: build it without, and convert the params with "
                     "pretrain_jax.scan.unstack")
  return blocks


def _is_stacked(tree) -> bool:
  return isinstance(tree, Mapping) and set(tree) == {"layers"} and \
      isinstance(tree["layers"], Mapping) and set(tree["layers"]) == {"layer"}


def unstack(params: dict) -> dict:
  """Scanned params (`NAME/layers/layer/...`, leading layer axis) -> `NAME_i/...`, at any depth
  of the tree. Other entries are kept as they are."""
  out = {}
  for key, value in params.items():
    if _is_stacked(value):
      stacked = value["layers"]["layer"]
      n = jax.tree.leaves(stacked)[0].shape[0]
      for i in range(n):
        out[f"{key}_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
    elif isinstance(value, Mapping):
      out[key] = unstack(value)
    else:
      out[key] = value
  return out


def stacked_names(params: dict) -> list[str]:
  """Top-level names of scanned block stacks in `params`."""
  return [k for k, v in params.items() if _is_stacked(v)]


def like(source: dict, target: dict) -> dict:
  """`source` params in `target`'s layout (scanned or unrolled block lists), so that a run
  with one layout can start from or compare with a checkpoint of the other."""
  source = unstack(source)
  names = [n for n in stacked_names(target) if f"{n}_0" in source]
  return stack(source, names) if names else source


def stack(params: dict, names) -> dict:
  """The inverse of `unstack` for the block lists `names` (e.g. ('blocks', 'head_blocks'))."""
  out = dict(params)
  for name in names:
    pattern = re.compile(rf"^{re.escape(name)}_(\d+)$")
    ids = sorted((int(m.group(1)), k) for k in params if (m := pattern.match(k)))
    if not ids:
      raise KeyError(f"no {name}_0... entries to stack in {sorted(params)[:8]}")
    if [i for i, _ in ids] != list(range(len(ids))):
      raise ValueError(f"{name}_i entries are not 0..{len(ids) - 1}: {[k for _, k in ids]}")
    layers = [params[k] for _, k in ids]
    for _, k in ids:
      del out[k]
    out[name] = {"layers": {"layer": jax.tree.map(lambda *a: jnp.stack(a), *layers)}}
  return out
