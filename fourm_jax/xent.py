"""Cross-entropy of decoder tokens, each over its own modality's vocabulary only.

A 4M decoder position belongs to one target modality, and its logits are over
that modality's vocabulary. Computing every modality's logits at every position
(fixed shapes, simple) costs sum_k V_k outputs per position where the official
model computes V_{own}: with three vocabularies of 16k, 8k and 30k, 3x the
work of the largest matmul of the step. Here the tokens are grouped instead,
in fixed shapes:

1. the T = B x M decoder tokens (per device, see below) are sorted by modality
   (not-valid tokens last);
2. each modality's run is cut into chunks of `c` tokens, the last one padded;
   at most ceil(T / c) + K chunks exist for K modalities, a static bound;
3. a scan over the chunks runs `lax.switch` on the chunk's modality: only that
   branch's [c, D] x [D, V_k] matmul runs, unused chunks take an empty branch;
4. the per-token losses are scattered back to [B, M].

Each branch is rematerialised, so the backward pass keeps only the chunk's
inputs (not [c, V_k] of softmax): recomputing the chunk's logits costs one
more forward matmul, and logit memory drops from B x M x sum_k V_k to c x V_k.

Under a mesh, the grouping runs per device (`shard_map` over the batch axes):
a global sort would gather the whole batch on every device. The logit tables
enter each device whole (the dense path all-gathers them too).
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from pretrain_jax import partitioning


def chunk_size(tokens: int, modalities: int) -> int:
  """Tokens per chunk: a power of two near tokens / (4 x modalities), in [8, 256], so the
  padding (at most one partial chunk per modality) stays a small share of `tokens`."""
  target = max(tokens // (4 * max(modalities, 1)), 1)
  return int(min(256, max(8, 2 ** int(math.log2(target)))))


def _chunk_table(mods, valid, num_modalities: int, chunk: int):
  """Which tokens each chunk holds. mods, valid [T] -> (index int [G, c] into the T tokens,
  ok bool [G, c], modality int [G]: K for an unused chunk), G = ceil(T / c) + K."""
  t = mods.shape[0]
  k = num_modalities
  key = jnp.where(valid, mods, k)
  order = jnp.argsort(key, stable=True)
  counts = jnp.sum(key[:, None] == jnp.arange(k)[None, :], axis=0)          # [K]
  first_token = jnp.cumsum(counts) - counts                                   # [K]
  chunks = (counts + chunk - 1) // chunk                                      # [K]
  end_chunk = jnp.cumsum(chunks)                                              # [K]
  g = -(-t // chunk) + k
  ids = jnp.arange(g)
  modality = jnp.sum(end_chunk[None, :] <= ids[:, None], axis=1)             # [G], K: unused
  m = jnp.minimum(modality, k - 1)
  within = (ids - (end_chunk[m] - chunks[m]))[:, None] * chunk + jnp.arange(chunk)[None, :]
  ok = (modality[:, None] < k) & (within < counts[m][:, None])
  index = order[jnp.clip(first_token[m][:, None] + within, 0, t - 1)]
  return index, ok, modality


def _nll_local(tables: Sequence[jax.Array], y, ids, mods, valid, chunk: int | None):
  """The single-device computation of own_vocab_nll."""
  b, m, d = y.shape
  k = len(tables)
  t = b * m
  c = chunk or chunk_size(t, k)
  index, ok, modality = _chunk_table(mods.reshape(t), valid.reshape(t), k, c)
  y_chunks = y.reshape(t, d)[index]                  # [G, c, D]
  id_chunks = ids.reshape(t)[index]                  # [G, c]

  def branch(table):
    @jax.checkpoint
    def nll(y_c, id_c):
      logits = y_c.astype(jnp.float32) @ table.astype(jnp.float32).T       # [c, V_k]
      own = jnp.clip(id_c, 0, table.shape[0] - 1)
      picked = jnp.take_along_axis(logits, own[:, None], -1)[:, 0]
      return jax.nn.logsumexp(logits, -1) - picked
    return nll

  def unused(y_c, id_c):   # zeros typed like the other branches' outputs (varying under shard_map)
    return (id_c * 0).astype(jnp.float32)

  branches = [branch(w) for w in tables] + [unused]

  def body(_, xs):
    y_c, id_c, mod = xs
    return None, jax.lax.switch(mod, branches, y_c, id_c)

  _, nll = jax.lax.scan(body, None, (y_chunks, id_chunks, modality))
  nll = jnp.where(ok, nll, 0.0)
  out = jnp.zeros((t,), jnp.float32).at[jnp.where(ok, index, t)].add(nll, mode="drop")
  return out.reshape(b, m)


def _batch_shards(mesh) -> tuple[tuple[str, ...], int]:
  axes = tuple(a for a in partitioning.BATCH_AXES if a in mesh.axis_names)
  return axes, int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


def own_vocab_nll(tables: Sequence[jax.Array], y, ids, mods, valid,
                  chunk: int | None = None) -> jax.Array:
  """-log p(token) of every decoder token under its own modality's logits.

  tables: per target modality k, the output layer as [V_k, D] (logits = y @ table.T, in
  float32). y [B, M, D] decoder outputs; ids, mods int [B, M] (target id, modality index
  into `tables`); valid bool [B, M]. Returns nll float32 [B, M], 0 where not valid.
  chunk: tokens per chunk (default chunk_size(tokens per device, K)).
  """
  if y.ndim != 3 or ids.shape != y.shape[:2] or mods.shape != ids.shape or \
      valid.shape != ids.shape:
    raise ValueError(f"expected y [B, M, D] and ids, mods, valid [B, M]; got "
                     f"{y.shape}, {ids.shape}, {mods.shape}, {valid.shape}")
  mesh = jax.sharding.get_abstract_mesh()
  axes, shards = _batch_shards(mesh) if not mesh.empty else ((), 1)
  if shards == 1 or y.shape[0] % shards:
    return _nll_local(tables, y, ids, mods, valid, chunk)
  rows = P(axes)

  def per_device(tables, *rest):
    # Mark the (replicated) tables as varying here, at the top level: their gradient's sum over
    # the batch shards then happens once, outside the scan, not inside a switch branch that
    # other devices do not take (a collective there deadlocks).
    tables = [jax.lax.pcast(w, axes, to="varying") for w in tables]
    return _nll_local(tables, *rest, chunk)

  fn = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), rows, rows, rows, rows),
                     out_specs=rows)
  return fn(list(tables), y, ids, mods, valid)
