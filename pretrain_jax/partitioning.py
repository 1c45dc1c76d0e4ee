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


def process_rows(mesh: jax.sharding.Mesh, global_batch: int) -> tuple[int, int]:
  """(start, count): the rows of every global batch this process's devices hold.

  Processes whose devices hold the same rows (e.g. a tensor axis spanning
  hosts) get the same rows, so they load the same examples.
  """
  index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
  spans = sorted({sl[0].indices(global_batch)[:2] for sl in index_map.values()})
  start, stop = spans[0][0], max(e for _, e in spans)
  covered = sum(e - s for s, e in _merge(spans))
  if covered != stop - start:
    raise ValueError(
        f"process {jax.process_index()} holds non-contiguous batch rows {spans}; order the mesh "
        "so each process's devices are contiguous along ('data', 'fsdp')")
  return start, stop - start


def _merge(spans):
  merged = []
  for s, e in spans:
    if merged and s <= merged[-1][1]:
      merged[-1] = (merged[-1][0], max(merged[-1][1], e))
    else:
      merged.append((s, e))
  return merged


def shard_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh,
                global_batch: int | None = None) -> dict[str, jax.Array]:
  """Turns this process's rows of the global batch into global jax.Arrays.

  batch: every leaf [count, ...], the rows `process_rows(mesh, global_batch)`
  of the global batch (all of it for one process).
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
