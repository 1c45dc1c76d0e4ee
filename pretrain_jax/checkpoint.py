"""Orbax checkpoints of the train state plus the Grain iterator position.

Saves are asynchronous (only the device-to-host copy blocks the loop) and
atomic: Orbax writes into a temporary directory and renames it when the save
is complete, so a process killed mid-save leaves the previous checkpoint as
the latest loadable one. The data iterator's state is saved alongside, so a
resumed run reads exactly the batches an uninterrupted run would have read.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from pretrain_jax import paths


class Checkpointer:
  """Keeps the last `keep` checkpoints of (state, data iterator) under `directory`."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    # Local paths are made absolute (Orbax needs that); URLs (gs://...) stay as they are.
    self.directory = paths.resolve(directory)
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, state: Any, data_iter=None, force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    saved = self._mngr.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
      logging.info("Saving checkpoint for step %d to %s (async)", step, self.directory)
    return saved

  def restore(self, abstract_state: Any, data_iter=None, step: int | None = None):
    """Restores `step` (default: latest) into `abstract_state`'s shapes/shardings.

    data_iter: a fresh Grain iterator whose position is set in place.
    Returns the restored state. Raises FileNotFoundError naming the directory
    when there is no checkpoint.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint found in {self.directory}")
    if step not in self.all_steps():
      raise FileNotFoundError(
          f"no checkpoint for step {step} in {self.directory}; available: {self.all_steps()}")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
    except FileNotFoundError as e:
      if data_iter is not None and "process_" in str(e):
        raise FileNotFoundError(
            f"checkpoint {step} in {self.directory} holds data-iterator states for a different "
            f"number of processes than this run's {jax.process_count()} ({e}); resume with the "
            "same number of hosts") from e
      raise
    logging.info("Restored checkpoint of step %d from %s", step, self.directory)
    return restored["state"]

  def reached_preemption(self, step: int) -> bool:
    return self._mngr.reached_preemption(step)

  def wait_until_finished(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.close()


def state_dir(workdir: str, step: int | None = None) -> str:
  """checkpoints/<step>/state of a training workdir (local or gs://...): `step`, or the
  latest committed one. A local path comes back absolute (Orbax needs that)."""
  ckpt_dir = epath.Path(paths.resolve(workdir)) / "checkpoints"
  steps = sorted(int(d.name) for d in ckpt_dir.iterdir() if d.name.isdigit()) if (
      ckpt_dir.is_dir()) else []
  if not steps:
    raise FileNotFoundError(f"no committed checkpoint under {ckpt_dir}")
  if step is not None and step not in steps:
    raise FileNotFoundError(f"no checkpoint of step {step} under {ckpt_dir}; available: {steps}")
  return os.fspath(ckpt_dir / str(steps[-1] if step is None else step) / "state")


def restore_parts(workdir: str, parts=("params",), step: int | None = None) -> dict:
  """Parts of a workdir's train state (default: the params) as host numpy arrays, read alone:
  nothing else is loaded (no optimizer moments), and the saved device layout is not needed,
  so a run trained on a pod loads on one host."""
  path = state_dir(workdir, step)
  # The handler's metadata (not the Checkpointer's): the item directory of a managed
  # checkpoint has no _CHECKPOINT_METADATA of its own, which the Checkpointer warns about.
  tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(path))
  tree = getattr(tree, "tree", tree)
  missing = [p for p in parts if p not in tree]
  if missing:
    raise ValueError(f"checkpoint {path} has no {missing} (it has {sorted(tree)})")
  sub = {p: tree[p] for p in parts}
  item = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), sub)
  restore_args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), sub)
  return ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
      item=item, restore_args=restore_args, partial_restore=True))


def _place(value: np.ndarray, sharding) -> jax.Array:
  """A host array as a (sharded) jax.Array. Each device's shard is cut from the host copy
  (`make_array_from_callback`), so on several hosts nothing is gathered or compared across
  processes (device_put of a host array would check that every process holds the same)."""
  if sharding is None:
    return jax.numpy.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def warm_start(params: Any, workdir: str, shardings: Any = None) -> tuple[Any, dict]:
  """`params` with every leaf that a checkpoint of `workdir` holds under the same path and
  shape replaced by the checkpoint's (placed with `shardings`, a matching tree).

  Returns (params, report): report lists the `copied`, `new` (not in the checkpoint) and
  `mismatched` (other shape) paths. Raises ValueError when nothing matches (the wrong
  model). This is how a run starts from another (4M-21 from 4M-7, super-resolution from
  4M-L): new modalities' embeddings keep their fresh initialisation.
  """
  from pretrain_jax import scan   # a scanned run may start from an unrolled one, and back
  source = scan.like(restore_parts(workdir)["params"], dict(params))
  flat_src = {jax.tree_util.keystr(k): v for k, v in
              jax.tree_util.tree_flatten_with_path(source)[0]}
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  shard_leaves = (jax.tree_util.tree_leaves(shardings) if shardings is not None
                  else [None] * len(leaves))
  report = {"copied": [], "new": [], "mismatched": []}
  out = []
  for (path, leaf), sharding in zip(leaves, shard_leaves):
    key = jax.tree_util.keystr(path)
    src = flat_src.get(key)
    if src is None:
      report["new"].append(key)
      out.append(leaf)
    elif tuple(src.shape) != tuple(leaf.shape):
      report["mismatched"].append(f"{key}: {tuple(src.shape)} vs {tuple(leaf.shape)}")
      out.append(leaf)
    else:
      out.append(_place(np.asarray(src, leaf.dtype), sharding))
      report["copied"].append(key)
  if not report["copied"]:
    raise ValueError(f"init_from {workdir}: no parameter of its checkpoint matches this model "
                     f"by name and shape (first of ours: {report['new'][:3]})")
  return jax.tree_util.tree_unflatten(treedef, out), report
