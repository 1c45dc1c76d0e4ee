"""Run with 8 fake CPU devices (tests/test_fourm_sharding.py does): three tiny-4M training
steps on one batch, on a 1-device mesh and on a data=2, fsdp=2, tensor=2 mesh; prints JSON."""
import json
import sys

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from conftest import load_config
from fourm_jax import train as fourm_train
from pretrain_jax import loop, mesh as mesh_lib, optim, partitioning
from pretrain_jax import train_state as ts


def masked_batch(cfg, task_model, n=16):
  masker = fourm_train.build_masker(cfg, task_model)
  rng = np.random.default_rng(0)
  rows = []
  for _ in range(n):
    cap = np.concatenate([rng.integers(4204, 4500, rng.integers(3, 20)), [3]])
    sample = {"rgb@32": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
              "tok_rgb@32": rng.integers(0, 256, (4, 4)), "tok_depth@32": rng.integers(0, 256, (4, 4)),
              "tok_aim_global": rng.integers(0, 256, (16,)), "caption": cap}
    rows.append(masker(sample, rng))
  batch = jax.tree.map(lambda *x: np.stack(x), *rows)
  batch["valid"] = np.ones(n, np.float32)
  return batch


def three_steps(cfg, devices, mesh_cfg, batch):
  task = fourm_train.build_task(cfg)
  boxed = ts.abstract_params(task.init_params, jax.random.key(0))
  tx, schedule = optim.create_optimizer(cfg.optimizer, cfg.total_steps, nn.unbox(boxed))
  mesh = mesh_lib.create_mesh(mesh_cfg, devices)
  state, sh = ts.create_train_state(task.init_params, tx, jax.random.key(cfg.seed), mesh)
  step = jax.jit(loop.make_train_step(task, tx, schedule),
                 in_shardings=(sh, partitioning.batch_sharding(mesh)), out_shardings=(sh, None))
  init = jax.tree.map(np.asarray, state.params)
  with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.RULES):
    for _ in range(3):
      state, metrics = step(state, partitioning.shard_batch(batch, mesh))
  change = max(float(np.abs(np.asarray(a) - b).max())
               for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(init)))
  return state, metrics, change


def main():
  assert jax.device_count() == 8, jax.devices()
  cfg = load_config("configs/fourm/pretrain.py", "variant=tiny")
  cfg.optimizer.warmup_steps = 2
  cfg.batch_size = 16
  batch = masked_batch(cfg, fourm_train.build_model(cfg))
  single, m1, change = three_steps(cfg, jax.devices()[:1], dict(data=1, fsdp=1, tensor=1), batch)
  multi, m8, _ = three_steps(cfg, jax.devices(), dict(data=2, fsdp=2, tensor=2), batch)
  diffs = [float(np.abs(np.asarray(a) - np.asarray(b)).max())
           for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(multi.params))]
  fc1 = multi.params["encoder_0"]["mlp"]["fc1"]["kernel"]
  emb = multi.params["dec_tok_caption"]["embedding"]
  json.dump({"loss_1": float(m1["loss"]), "loss_8": float(m8["loss"]),
             "max_param_diff": max(diffs), "param_change": change,
             "fc1_spec": str(fc1.sharding.spec), "emb_spec": str(emb.sharding.spec),
             "expected_fc1_spec": str(P("fsdp", "tensor")),
             "expected_emb_spec": str(P("tensor", "fsdp"))}, sys.stdout)
  print()


if __name__ == "__main__":
  main()
