"""Logical axis names -> mesh axes: the one rules table, and sharding helpers.

Parameters and activations use different logical names (MaxText's
convention), so no array maps two of its dimensions onto one mesh axis.
Axes of size 1 are no-ops, so the same table serves pure data parallelism,
FSDP, tensor parallelism and any mix of them.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")

RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("qkv", None),
    ("vocab", "tensor"),
    ("patch", None),
    ("norm", None),
    ("layers", None),
)


def logical_to_mesh(tree_of_specs, mesh: jax.sharding.Mesh, rules=RULES):
  """Maps a tree of logical PartitionSpecs to NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(tree_of_specs, mesh, rules)


def param_shardings(abstract_boxed_params, mesh, rules=RULES):
  """Shardings for params given the (boxed) output of `jax.eval_shape(init)`."""
  specs = nn.get_partition_spec(abstract_boxed_params)
  return logical_to_mesh(specs, mesh, rules)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) dimension over ('data', 'fsdp'), the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_rows(devices: np.ndarray, global_batch: int, process_index: int) -> tuple[int, ...]:
  """The rows of a global batch that `process_index`'s devices hold, in increasing order.

  devices: the mesh's device array [data, fsdp, tensor] (real devices or mocks with a
  `process_index`). The batch is split over ('data', 'fsdp') in row-major order, as
  `batch_sharding` does: device (i, j, k) holds rows [b * (i * fsdp + j), b * (... + 1))
  with b = global_batch // (data * fsdp). The rows need not be contiguous: on TPU
  slices a host's chips are a 2x2 block of the torus, so with jax's mesh order host 0
  of a v5p-256 holds rows [0, 8, 32, 40] of a 128-way split. Devices that differ only
  along 'tensor' hold the same rows, so processes spanning it load the same examples.
  """
  data, fsdp = devices.shape[0], devices.shape[1]
  shards = data * fsdp
  if global_batch % shards:
    raise ValueError(f"global batch {global_batch} does not split over data*fsdp = {shards}")
  per = global_batch // shards
  blocks = sorted({i * fsdp + j for (i, j, _), d in np.ndenumerate(devices)
                   if d.process_index == process_index})
  if not blocks:
    raise ValueError(f"process {process_index} holds no device of the mesh")
  return tuple(r for b in blocks for r in range(b * per, (b + 1) * per))


def process_rows(mesh: jax.sharding.Mesh, global_batch: int,
                 process_index: int | None = None) -> tuple[int, ...]:
  """This process's rows of every global batch (sorted global row indices).

  Its data pipeline loads exactly these rows, in this order, and `shard_batch` places
  them (`jax.make_array_from_process_local_data` maps sorted, possibly scattered row
  blocks onto the process's devices).
  """
  process_index = jax.process_index() if process_index is None else process_index
  return batch_rows(np.asarray(mesh.devices), global_batch, process_index)


def describe_rows(rows) -> str:
  """'[0, 8) [32, 40)': rows as half-open spans, for logs and errors."""
  spans = []
  for r in rows:
    if spans and spans[-1][1] == r:
      spans[-1][1] = r + 1
    else:
      spans.append([r, r + 1])
  return " ".join(f"[{a}, {b})" for a, b in spans)


def shard_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh,
                global_batch: int | None = None) -> dict[str, jax.Array]:
  """Turns this process's rows of the global batch into global jax.Arrays.

  batch: every leaf [len(rows), ...], the rows `process_rows(mesh, global_batch)` of the
  global batch in increasing order (all of it for one process).
  """
  sharding = batch_sharding(mesh)

  def put(x):
    x = np.asarray(x)
    shape = None if global_batch is None else (global_batch, *x.shape[1:])
    return jax.make_array_from_process_local_data(sharding, x, shape)
  return jax.tree.map(put, batch)


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def unsharded_fraction(shardings, abstract) -> float:
  """Fraction of bytes in `abstract` whose sharding replicates them fully.

  Used as a check at start-up (MaxText fails a run above a threshold): a
  large replicated share means a rule is missing for some parameter.
  """
  total = rep = 0
  for s, a in zip(jax.tree.leaves(shardings), jax.tree.leaves(abstract)):
    nbytes = math.prod(a.shape) * np.dtype(a.dtype).itemsize
    total += nbytes
    if s.is_fully_replicated:
      rep += nbytes
  return rep / max(total, 1)
