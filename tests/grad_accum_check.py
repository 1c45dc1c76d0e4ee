"""Gradient accumulation vs the one-shot big-batch update for AIM tiny (float32).

tests/test_grad_accum.py imports `updates` (one device, k = 1 and 4) and runs this file
with 8 fake CPU devices (data=2, fsdp=4; k = 2), which saves the params and prints the
metrics as JSON.
"""
import json
import sys

import flax.linen as nn
import jax
import numpy as np
import optax

from aimjax import train as aim_train
from conftest import load_config
from pretrain_jax import loop, mesh as mesh_lib, partitioning
from pretrain_jax import train_state as ts


def config():
  cfg = load_config("configs/aim/pretrain.py", "variant=tiny")
  cfg.model.dtype = "float32"
  cfg.model.depth, cfg.model.head_depth = 1, 1   # small: the compiles stay quick
  cfg.data.image_size = 28                      # 2x2 patches
  cfg.objective.prefix = False    # no random prefix lengths: the loss is deterministic
  cfg.optimizer.warmup_steps = 0  # a nonzero learning rate at the first step
  return cfg


def batch(size: int = 16):
  """Rows with valid = 0 (skipped records) unevenly spread over the micro-batches, so the
  micro-batches' loss denominators differ: a plain mean of their means would be off."""
  rng = np.random.default_rng(0)
  valid = np.ones(size, np.float32)
  valid[[0, 4, 8, 1, 14]] = 0.0
  return {"image": rng.integers(0, 256, (size, 28, 28, 3), np.uint8),
          "label": np.zeros(size, np.int32), "valid": valid}


def updates(ks, devices, mesh_shape, data):
  """{k: (params after one update, metrics)} from the same initial state and batch, with
  SGD at learning rate 1: the params' change is the gradient itself (AdamW's first update
  is sign-like and would hide gradient differences)."""
  cfg = config()
  task = aim_train.build_task(cfg)
  mesh = mesh_lib.create_mesh(dict(zip(("data", "fsdp", "tensor"), mesh_shape)), devices)
  tx, schedule = optax.sgd(1.0), optax.constant_schedule(1.0)
  state, sh = ts.create_train_state(task.init_params, tx, jax.random.key(cfg.seed), mesh)
  out = {}
  with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.RULES):
    sharded = partitioning.shard_batch(data, mesh)
    for k in ks:   # the state is not donated: every k starts from it
      step = jax.jit(loop.make_train_step(task, tx, schedule, grad_accum_steps=k),
                     in_shardings=(sh, partitioning.batch_sharding(mesh)),
                     out_shardings=(sh, None))
      new, metrics = step(state, sharded)
      out[k] = (jax.tree.map(np.asarray, new.params),
                {n: float(v) for n, v in jax.device_get(metrics).items()})
  return out


def max_diff(a, b) -> float:
  return max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main():
  """argv[1]: an .npz to write the params after one k = 2 update on the data=2, fsdp=4 mesh
  to (the test compares them with the one-device k = 1 params it computes itself)."""
  assert jax.device_count() == 8, jax.devices()
  data = batch()
  params, metrics = updates((2,), jax.devices(), (2, 4, 1), data)[2]
  np.savez(sys.argv[1], *jax.tree.leaves(params))
  result = {"loss": metrics["loss"], "grad_norm": metrics["grad_norm"],
            "invalid": metrics["data/invalid"]}
  # rows per data-parallel device: 16 / 8 = 2, which k = 4 does not divide
  cfg = config()
  task = aim_train.build_task(cfg)
  mesh = mesh_lib.create_mesh(dict(data=2, fsdp=4, tensor=1), jax.devices())
  tx = optax.sgd(1.0)
  state, sh = ts.abstract_train_state(task.init_params, tx, jax.random.key(0), mesh)
  spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), data)
  step = jax.jit(loop.make_train_step(task, tx, optax.constant_schedule(1.0),
                                      grad_accum_steps=4),
                 in_shardings=(sh, partitioning.batch_sharding(mesh)), out_shardings=(sh, None))
  try:
    with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.RULES):
      step.trace(state, spec)
    result["dp_error"] = ""
  except ValueError as e:
    result["dp_error"] = str(e)
  json.dump(result, sys.stdout)
  print()


if __name__ == "__main__":
  main()
