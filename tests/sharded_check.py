"""Run with 8 fake CPU devices (tests/test_sharding.py does): compares one AIM
training step, and a short run through the loop, on a 1-device mesh and on a
data=2, fsdp=2, tensor=2 mesh, and prints the results as JSON."""
import json
import sys
import tempfile

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from aimjax import model as model_lib
from aimjax import train as aim_train
from conftest import load_config
from pretrain_jax import loop, mesh as mesh_lib, metrics as metrics_lib, optim, partitioning
from pretrain_jax import train_state as ts


def three_steps(cfg, devices, mesh_cfg, batch):
  """Three updates on one batch (the first has lr 0 under warmup; Adam's second is
  sign-like), so params after the third show any numerical difference."""
  model = model_lib.from_config(cfg.model, cfg.objective)
  task = aim_train.build_task(cfg)
  boxed = ts.abstract_params(task.init_params, jax.random.key(0))
  tx, schedule = optim.create_optimizer(cfg.optimizer, cfg.total_steps, nn.unbox(boxed),
                                        cfg.model.depth)
  mesh = mesh_lib.create_mesh(mesh_cfg, devices)
  state, sh = ts.create_train_state(task.init_params, tx, jax.random.key(cfg.seed), mesh)
  step = jax.jit(loop.make_train_step(task, tx, schedule),
                 in_shardings=(sh, partitioning.batch_sharding(mesh)), out_shardings=(sh, None))
  init = jax.tree.map(np.asarray, state.params)
  with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.RULES):
    for _ in range(3):
      state, metrics = step(state, partitioning.shard_batch(batch, mesh))
  del model
  change = max(float(np.abs(np.asarray(a) - b).max())
               for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(init)))
  return state, metrics, change


def main():
  assert jax.device_count() == 8, jax.devices()
  cfg = load_config("configs/aim/pretrain.py", "variant=tiny")
  cfg.model.dtype = "float32"
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (32, 56, 56, 3), np.uint8),
           "label": np.zeros(32, np.int32), "valid": np.ones(32, np.float32)}
  cfg.optimizer.warmup_steps = 2
  single, m1, change = three_steps(cfg, jax.devices()[:1], dict(data=1, fsdp=1, tensor=1), batch)
  multi, m8, _ = three_steps(cfg, jax.devices(), dict(data=2, fsdp=2, tensor=2), batch)
  diffs = [float(np.abs(np.asarray(a) - np.asarray(b)).max())
           for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(multi.params))]
  fc1 = multi.params["blocks_0"]["mlp"]["fc1"]["kernel"]
  qkv = multi.params["blocks_0"]["attn"]["qkv"]
  mu_fc1 = optax.tree_utils.tree_get(multi.opt_state, "mu")["blocks_0"]["mlp"]["fc1"]["kernel"]
  result = {
      "loss_1": float(m1["loss"]), "loss_8": float(m8["loss"]),
      "max_param_diff": max(diffs), "param_change": change,
      "fc1_spec": str(fc1.sharding.spec), "fc1_shard": list(fc1.addressable_shards[0].data.shape),
      "fc1_shape": list(fc1.shape),
      "qkv_spec": str(qkv.sharding.spec), "qkv_shard": list(qkv.addressable_shards[0].data.shape),
      "mu_fc1_spec": str(mu_fc1.sharding.spec),
      "expected_fc1_spec": str(P("fsdp", "tensor")),
      "expected_qkv_spec": str(P("fsdp", None, "tensor", None)),
  }
  # One SGD step at learning rate 1: the params' change is the gradient itself (the AdamW
  # steps above are nearly sign-like and hide wrong gradient magnitudes).
  from grad_accum_check import batch as sgd_batch, max_diff, updates
  data = sgd_batch()
  one = updates((1,), jax.devices()[:1], (1, 1, 1), data)[1][0]
  eight = updates((1,), jax.devices(), (2, 2, 2), data)[1][0]
  result["max_sgd_param_diff"] = max_diff(one, eight)
  # The whole loop: same seed, same data, 1 device vs the 2x2x2 mesh.
  curves = {}
  for name, devices, mesh_cfg in (("1", jax.devices()[:1], (1, 1, 1)),
                                  ("8", jax.devices(), (2, 2, 2))):
    run_cfg = load_config("configs/aim/pretrain.py", "variant=tiny")
    run_cfg.total_steps, run_cfg.log_every, run_cfg.eval_every = 4, 1, 0
    run_cfg.optimizer.warmup_steps = 2
    run_cfg.mesh.data, run_cfg.mesh.fsdp, run_cfg.mesh.tensor = mesh_cfg
    with tempfile.TemporaryDirectory() as workdir:
      loop.train(run_cfg, workdir, aim_train.build_task(run_cfg), devices=devices)
      rows = metrics_lib.read_jsonl(f"{workdir}/metrics.jsonl")
      curves[name] = [rows[s]["loss"] for s in range(1, 5)]
  result["loop_losses_1"], result["loop_losses_8"] = curves["1"], curves["8"]
  json.dump(result, sys.stdout)
  print()


if __name__ == "__main__":
  main()
