"""Gradient accumulation (`optimizer.grad_accum_steps`): k micro-batches inside the jitted
step give the one-shot big-batch update."""
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import grad_accum_check as check
from conftest import ROOT, load_config, subprocess_env
from pretrain_jax import loop


@pytest.fixture(scope="module")
def single_device():
  """{k: (params, metrics)} after one update on one device, k = 1 (one shot) and 4."""
  return check.updates((1, 4), jax.devices()[:1], (1, 1, 1), check.batch())


def test_four_micro_batches_give_the_big_batch_update(single_device):
  """AIM tiny, float32, one SGD update (params change by the gradient itself). The rows
  with valid = 0 sit unevenly in the micro-batches (rows i::4: 3, 1, 1 and 0 of them), so
  their loss denominators differ and the loss_weight each reports is what makes the
  accumulated loss and gradient the big batch's ratio of sums."""
  (p1, m1), (p4, m4) = single_device[1], single_device[4]
  assert check.max_diff(p1, p4) < 1e-6
  assert abs(m1["loss"] - m4["loss"]) < 1e-6
  assert abs(m1["grad_norm"] - m4["grad_norm"]) < 1e-6 and m1["grad_norm"] > 0.1
  assert m1["data/invalid"] == m4["data/invalid"] == 5.0    # a count: summed, not averaged
  assert loop.LOSS_WEIGHT not in m4


@pytest.fixture(scope="module")
def sharded_result(tmp_path_factory):
  out = tmp_path_factory.mktemp("grad_accum") / "params.npz"
  env = subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=8",
                       PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}")
  proc = subprocess.run([sys.executable, str(ROOT / "tests" / "grad_accum_check.py"), str(out)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  with np.load(out) as f:
    result["params"] = [f[f"arr_{i}"] for i in range(len(f.files))]
  return result


@pytest.mark.slow
def test_accumulation_on_a_sharded_mesh_gives_the_big_batch_update(single_device,
                                                                   sharded_result):
  """k = 2 on data=2, fsdp=4 (8 fake CPU devices; 2 rows per data-parallel device, one per
  micro-batch: rows 0, 4, 8, 14 invalid in one, row 1 in the other) vs the one-shot update
  on one device."""
  r = sharded_result
  p1, m1 = single_device[1]
  assert check.max_diff(jax.tree.leaves(p1), r["params"]) < 1e-6
  assert abs(m1["loss"] - r["loss"]) < 1e-6, r["loss"]
  assert abs(m1["grad_norm"] - r["grad_norm"]) < 1e-6, r["grad_norm"]
  assert r["invalid"] == 5.0


@pytest.mark.slow
def test_micro_batches_must_split_over_the_data_parallel_devices(sharded_result):
  assert "optimizer.grad_accum_steps" in sharded_result["dp_error"], sharded_result


@pytest.mark.parametrize("k", [0, -2, 1.5, True, "4"])
def test_a_bad_count_names_the_key(k):
  with pytest.raises(ValueError, match=r"optimizer\.grad_accum_steps"):
    loop.make_train_step(None, optax.sgd(1.0), optax.constant_schedule(1.0),
                         grad_accum_steps=k)


def test_a_count_that_does_not_divide_the_batch_names_the_key():
  def loss_fn(params, batch, rng):
    return jnp.mean(params["w"] * batch["x"]), {}
  task = loop.Task(init_params=None, loss_fn=loss_fn, train_data=None)
  tx = optax.sgd(1.0)
  step = loop.make_train_step(task, tx, optax.constant_schedule(1.0), grad_accum_steps=3)
  params = {"w": np.ones((2,), np.float32)}
  state = _state(params, tx)
  with pytest.raises(ValueError, match=r"optimizer\.grad_accum_steps.*\(3\).*\(8\)"):
    jax.eval_shape(step, state, {"x": np.ones((8, 2), np.float32)})


def test_every_training_config_defaults_to_one_micro_batch():
  for path, arg in (("configs/aim/pretrain.py", "variant=tiny"),
                    ("configs/fourm/pretrain.py", "variant=tiny"),
                    ("configs/tokenizers/vqvae.py", "modality=depth,variant=tiny"),
                    ("configs/tokenizers/diffusion.py", "modality=rgb,variant=tiny"),
                    ("configs/tokenizers/mlp_vae.py", "target=pose,variant=tiny")):
    assert load_config(path, arg).optimizer.grad_accum_steps == 1, path


def test_extra_state_threads_through_the_micro_batches():
  """A loss_fn with `extra` (as the VQ tokenizers' codebook EMAs): it sees the extra the
  previous micro-batch returned, and the step returns the last one; no loss_weight, so the
  micro-batches weigh 1/k each."""
  def loss_fn(params, batch, rng, extra):
    del rng
    loss = jnp.mean((params["w"] * batch["x"]) ** 2)
    return loss, ({"seen": extra["count"]}, {"count": extra["count"] + 1.0})
  task = loop.Task(init_params=None, loss_fn=loss_fn, train_data=None,
                   init_extra=lambda rng: {"count": np.float32(0.0)})
  tx = optax.sgd(1.0)
  params = {"w": np.arange(1.0, 4.0, dtype=np.float32)}
  x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
  out = {}
  for k in (1, 4):
    step = jax.jit(loop.make_train_step(task, tx, optax.constant_schedule(1.0),
                                        grad_accum_steps=k))
    state, metrics = step(_state(params, tx, {"count": np.float32(0.0)}), {"x": x})
    out[k] = (state, metrics)
  assert float(out[1][0].extra["count"]) == 1.0 and float(out[4][0].extra["count"]) == 4.0
  assert float(out[4][1]["seen"]) == 1.5       # 0, 1, 2, 3 averaged
  np.testing.assert_allclose(out[4][0].params["w"], out[1][0].params["w"], atol=1e-6)
  assert abs(float(out[4][1]["loss"]) - float(out[1][1]["loss"])) < 1e-6


def _state(params, tx, extra=None):
  """A TrainState on the default device, without a mesh."""
  from pretrain_jax import train_state as ts
  return ts.TrainState(step=np.int32(0), params=params, opt_state=tx.init(params),
                       rng=jax.random.key(0), extra={} if extra is None else extra)
