"""Cross-entropy of decoder tokens, each over its own modality's vocabulary only.

A 4M decoder position belongs to one target modality, and its logits are over
that modality's vocabulary. Computing every modality's logits at every position
(fixed shapes, simple) costs sum_k V_k outputs per position where the official
model computes V_{own}: with three vocabularies of 16k, 8k and 30k, 3x the
work of the largest matmul of the step. Here the tokens are grouped instead,
in fixed shapes:

1. the T = B x M decoder tokens (per device, see below) are sorted by modality
   (not-valid tokens last);
2. for each modality k, a loop runs over its ceil(n_k / c) chunks of `c`
   tokens (a dynamic trip count: only the chunks that exist run, the last one
   padded), each a [c, D] x [D, V_k] matmul, so the work is each token's own
   vocabulary plus at most one partial chunk per modality;
3. the result is each modality's sum of token losses, [K].

The gradient is computed in the same loop, while each chunk's softmax is at
hand (a custom VJP): d logits = softmax - onehot, then d y = d logits W and
d W += d logits^T y, two matmuls as in any backward pass; no [c, V_k] array
outlives its chunk, and the backward pass only scales the saved d y and d W by
each modality's incoming cotangent (the sums are linear in the token losses).
Memory for logits drops from B x M x sum_k V_k to c x V_k.

Under a mesh, the grouping runs per device (`shard_map` over the batch axes):
a global sort would gather the whole batch on every device. The logit tables
enter each device whole (the dense path all-gathers them too).
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from pretrain_jax import partitioning


def chunk_size(tokens: int, modalities: int) -> int:
  """Tokens per chunk: the power of two nearest sqrt(24 n), n = tokens / modalities, in
  [8, 256].

  Two costs pull apart. Padding: a modality's last chunk is on average half empty, c / 2
  tokens of 6 V D flops each (the logits and their two gradients). Per chunk: the [V, D]
  gradient is read and written once per chunk: 12 V D bytes, which take as long as about 12
  tokens' matmuls where one byte moved costs the time of ~6 flops (this project's CPU: ~120
  GFLOP/s of matmul against ~20 GB/s; accelerators have more flops per byte still). So n / c
  chunks cost ~72 V D n / c. The sum, 3 V D c + 72 V D n / c, is least at c = sqrt(24 n).
  4M's CPU benchmark step (512 tokens, 3 modalities: c = 64) took 1.50 s at 64 against
  1.62 s at 32 and 1.52 s at 128 (alternating, one process).
  """
  n = max(tokens / max(modalities, 1), 1.0)
  return int(min(256, max(8, 2 ** round(math.log2(math.sqrt(24 * n))))))


def _sorted_runs(mods, valid, num_modalities: int):
  """Tokens grouped by modality. mods, valid [T] -> (order int [T]: token indices, modality 0's
  valid tokens first, then 1's, ..., not-valid last; first int [K]: where each modality's run
  starts in `order`; counts int [K])."""
  key = jnp.where(valid, mods, num_modalities)
  order = jnp.argsort(key, stable=True)
  counts = jnp.sum(key[:, None] == jnp.arange(num_modalities)[None, :], axis=0)
  return order, jnp.cumsum(counts) - counts, counts


def _runs(tables, y, ids, mods, valid, chunk: int, axes: tuple, grads: bool, layout: str):
  """Per modality k, a loop over ceil(n_k / c) chunks of its tokens (a dynamic trip count: only
  the chunks that exist run), each [c, D] x [D, V_k].

  y [T, D], ids, mods, valid [T]; tables [V_k, D] (layout 'vd') or [D, V_k] ('dv').
  Returns (sums [K] of the modality's token losses, and with
  `grads` dy [T, D], the gradient of sum_k sums[k] w.r.t. y, and dtables, each like its
  table): computing the gradients while the chunk's softmax is at hand costs two matmuls,
  as a backward pass would, and keeps no [c, V] array past its chunk."""
  t, d = y.shape
  # under shard_map (axes: the batch axes) loop carries must vary over the axes as y does
  vary = (lambda x: jax.lax.pcast(x, axes, to="varying")) if axes else (lambda x: x)
  order, first, counts = _sorted_runs(mods, valid, len(tables))
  lane = jnp.arange(chunk)
  sums, dtables = [], []
  dy = vary(jnp.zeros((t, d), jnp.float32))
  for k, table in enumerate(tables):
    w = table.astype(jnp.float32)
    v = w.shape[0 if layout == "vd" else 1]

    def chunk_terms(j, k=k, w=w, v=v):
      """Chunk j of modality k: (sum of its token losses, and with `grads` the rows it
      fills, their dy [c, D] and its share of d table)."""
      pos = j * chunk + lane
      ok = pos < counts[k]
      index = order[jnp.clip(first[k] + pos, 0, t - 1)]
      y_c = y[index].astype(jnp.float32)                       # [c, D]
      own = jnp.clip(ids[index], 0, v - 1)
      logits = y_c @ w.T if layout == "vd" else y_c @ w           # [c, V_k]
      lse = jax.nn.logsumexp(logits, axis=-1)
      nll = lse - jnp.take_along_axis(logits, own[:, None], -1)[:, 0]
      loss = jnp.sum(jnp.where(ok, nll, 0.0))
      if not grads:
        return loss, None, None, None
      dlogits = jnp.exp(logits - lse[:, None]).at[lane, own].add(-1.0)
      dlogits = jnp.where(ok[:, None], dlogits, 0.0)
      dy_c = dlogits @ w if layout == "vd" else dlogits @ w.T
      # in the table's own layout: a [V, D] gradient of a [D, V] kernel would be transposed
      # (a copy of the table) before the optimizer reads it
      dw_c = dlogits.T @ y_c if layout == "vd" else y_c.T @ dlogits
      return loss, jnp.where(ok, index, t), dy_c, dw_c

    def body(j, carry, chunk_terms=chunk_terms):
      total, dy, dw = carry
      loss, rows, dy_c, dw_c = chunk_terms(j)
      return total + loss, dy.at[rows].set(dy_c, mode="drop"), dw + dw_c

    trips = (counts[k] + chunk - 1) // chunk
    if grads:
      # Chunk 0 outside the loop: its d table starts the sum, so no [V, D] array of zeros
      # is written and then added to (a modality without tokens runs it with every lane
      # masked: zero loss, zero gradient).
      loss, rows, dy_c, dw = chunk_terms(0)
      init = (loss, dy.at[rows].set(dy_c, mode="drop"), dw)
      total, dy, dw = jax.lax.fori_loop(1, trips, body, init)
    else:
      total = jax.lax.fori_loop(0, trips, lambda j, tot, f=chunk_terms: tot + f(j)[0],
                                vary(jnp.zeros((), jnp.float32)))
      dw = None
    sums.append(total)
    dtables.append(dw)
  sums = jnp.stack(sums)
  return (sums, dy, dtables) if grads else sums


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _sums_local(tables, y, ids, mods, valid, chunk, axes, layout):
  return _runs(tables, y, ids, mods, valid, chunk, axes, False, layout)


def _sums_fwd(tables, y, ids, mods, valid, chunk, axes, layout):
  sums, dy, dtables = _runs(tables, y, ids, mods, valid, chunk, axes, True, layout)
  return sums, (dy, dtables, ids, mods, valid)


def _sums_bwd(chunk, axes, layout, res, ct):
  del layout
  dy, dtables, ids, mods, valid = res
  per_token = jnp.where(valid, ct[jnp.clip(mods, 0, ct.shape[0] - 1)], 0.0)       # [T]
  d_tables = [ct[k] * dw for k, dw in enumerate(dtables)]
  return (d_tables, dy * per_token[:, None], _int_zero(ids), _int_zero(mods), _int_zero(valid))


def _int_zero(x):
  return np.zeros(x.shape, jax.dtypes.float0)


_sums_local.defvjp(_sums_fwd, _sums_bwd)


def _local(tables, y, ids, mods, valid, chunk: int | None, layout: str, axes: tuple = ()):
  b, m, d = y.shape
  t = b * m
  c = chunk or chunk_size(t, len(tables))
  # float32 in and out of the custom gradient (the casts carry it back to bf16 inputs)
  return _sums_local([w.astype(jnp.float32) for w in tables],
                     y.reshape(t, d).astype(jnp.float32), ids.reshape(t), mods.reshape(t),
                     valid.reshape(t), c, axes, layout)


def _batch_shards(mesh) -> tuple[tuple[str, ...], int]:
  axes = tuple(a for a in partitioning.BATCH_AXES if a in mesh.axis_names)
  return axes, int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


def own_vocab_losses(tables: Sequence[jax.Array], y, ids, mods, valid,
                     chunk: int | None = None, layout: str = "vd") -> jax.Array:
  """Sum of -log p(token) over each modality's valid decoder tokens, each token under its own
  modality's logits.

  tables: per target modality k, the output layer as [V_k, D] (layout 'vd': logits =
  y @ table.T, a tied embedding) or [D, V_k] ('dv': logits = y @ kernel, a Dense kernel), in
  float32; each gradient comes in its table's layout. y [B, M, D] decoder outputs; ids, mods
  int [B, M] (target id, modality index into `tables`); valid bool [B, M]. Returns float32
  [K]. Differentiable in tables and y.
  chunk: tokens per chunk (default chunk_size(tokens per device, K)).
  """
  if layout not in ("vd", "dv"):
    raise ValueError(f"layout must be 'vd' ([V, D] tables) or 'dv' ([D, V] kernels), got "
                     f"{layout!r}")
  if y.ndim != 3 or ids.shape != y.shape[:2] or mods.shape != ids.shape or \
      valid.shape != ids.shape:
    raise ValueError(f"expected y [B, M, D] and ids, mods, valid [B, M]; got "
                     f"{y.shape}, {ids.shape}, {mods.shape}, {valid.shape}")
  mesh = jax.sharding.get_abstract_mesh()
  axes, shards = _batch_shards(mesh) if not mesh.empty else ((), 1)
  if shards == 1 or y.shape[0] % shards:
    return _local(tables, y, ids, mods, valid, chunk, layout)
  rows = P(axes)

  def per_device(tables, *rest):
    # The replicated tables become per-device values here, at the top level, so that their
    # gradient is summed over the batch shards once, after the backward pass.
    tables = [jax.lax.pcast(w, axes, to="varying") for w in tables]
    return jax.lax.psum(_local(tables, *rest, chunk, layout, axes), axes)

  fn = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), rows, rows, rows, rows),
                     out_specs=P())
  return fn(list(tables), y, ids, mods, valid)
