"""The core's pieces on their own: mesh shapes, optimizer, checkpoints, metrics, flops."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from pretrain_jax import checkpoint as checkpoint_lib
from pretrain_jax import flops as flops_lib
from pretrain_jax import mesh as mesh_lib
from pretrain_jax import metrics as metrics_lib
from pretrain_jax import optim


def _mesh_cfg(**kw):
  base = dict(data=1, fsdp=-1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1)
  base.update(kw)
  return base


def test_mesh_minus_one_fills_the_remaining_devices():
  assert mesh_lib.mesh_shapes(_mesh_cfg(data=2, tensor=4), 64)[0] == (2, 8, 4)
  assert mesh_lib.mesh_shapes(_mesh_cfg(data=-1, fsdp=4), 16)[0] == (4, 4, 1)


def test_mesh_dcn_degrees_split_across_slices():
  ici, dcn = mesh_lib.mesh_shapes(_mesh_cfg(dcn_data=-1), 256, num_slices=4)
  assert ici == (1, 64, 1) and dcn == (4, 1, 1)


@pytest.mark.parametrize("kw, message", [
    (dict(data=3), "not divisible by 3"),
    (dict(data=-1, fsdp=-1), "at most one"),
    (dict(data=2, fsdp=2, tensor=1), "multiply to 4"),
    (dict(tensor=0), "mesh.tensor"),
])
def test_bad_mesh_degrees_are_clear_errors(kw, message):
  with pytest.raises(ValueError, match=message):
    mesh_lib.mesh_shapes(_mesh_cfg(**kw), 8)


def test_single_device_mesh_has_auto_axes():
  mesh = mesh_lib.create_mesh(_mesh_cfg(), jax.devices()[:1])
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def _opt_cfg(**kw):
  c = ml_collections.ConfigDict(dict(
      lr=1e-2, warmup_steps=10, end_lr=1e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
      clip_norm=1.0, layer_decay=1.0, no_decay=("pos_embed", "modality_embed")))
  c.update(kw)
  return c


PARAMS = {
    "patch_embed": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones((3,))},
    "pos_embed": jnp.ones((5, 3)),
    "blocks_0": {"mlp": {"kernel": jnp.ones((3, 3))}, "norm": {"scale": jnp.ones((3,))}},
    "blocks_1": {"mlp": {"kernel": jnp.ones((3, 3))}},
    "head_out": {"kernel": jnp.ones((3, 2))},
}


def test_weight_decay_skips_norms_biases_and_position_embeddings():
  mask = optim.weight_decay_mask(PARAMS, ("pos_embed",))
  assert mask["patch_embed"]["kernel"] and not mask["patch_embed"]["bias"]
  assert not mask["pos_embed"]
  assert mask["blocks_0"]["mlp"]["kernel"] and not mask["blocks_0"]["norm"]["scale"]


def test_schedule_warms_up_linearly_then_decays_by_cosine():
  sched = optim.learning_rate_schedule(_opt_cfg(), 110)
  assert float(sched(0)) == 0.0
  assert float(sched(5)) == pytest.approx(5e-3)
  assert float(sched(10)) == pytest.approx(1e-2)
  assert float(sched(60)) == pytest.approx(1e-4 + (1e-2 - 1e-4) / 2, rel=1e-3)
  assert float(sched(110)) == pytest.approx(1e-4)
  # a run shorter than its warmup (a shortened debugging run) stays in the linear warmup
  short = optim.learning_rate_schedule(_opt_cfg(warmup_steps=200), 100)
  assert float(short(50)) == pytest.approx(2.5e-3) and float(short(100)) == pytest.approx(5e-3)
  with pytest.raises(ValueError, match="optimizer.warmup_steps"):
    optim.learning_rate_schedule(_opt_cfg(warmup_steps=-1), 100)


def _second_update(tx, grads):
  """The update at step 1 (step 0 has lr 0 under warmup)."""
  state = tx.init(PARAMS)
  _, state = tx.update(grads, state, PARAMS)
  updates, _ = tx.update(grads, state, PARAMS)
  return updates


def test_decay_shrinks_only_masked_params_without_gradient():
  tx, _ = optim.create_optimizer(_opt_cfg(warmup_steps=1, clip_norm=0.0), 100, PARAMS)
  updates = _second_update(tx, jax.tree.map(jnp.zeros_like, PARAMS))
  assert float(updates["blocks_0"]["mlp"]["kernel"][0, 0]) < 0        # decayed
  assert float(updates["blocks_0"]["norm"]["scale"][0]) == 0.0        # not decayed
  assert float(updates["pos_embed"][0, 0]) == 0.0


def test_clipping_bounds_the_gradient_before_adam():
  # With eps=1, Adam's step is g / (|g| + 1): clipping makes it tiny.
  grads = jax.tree.map(lambda p: 100 * jnp.ones_like(p), PARAMS)
  kw = dict(weight_decay=0.0, eps=1.0, warmup_steps=1)
  clipped = _second_update(optim.create_optimizer(_opt_cfg(clip_norm=1e-3, **kw), 100, PARAMS)[0],
                           grads)
  free = _second_update(optim.create_optimizer(_opt_cfg(clip_norm=0.0, **kw), 100, PARAMS)[0],
                        grads)
  c = abs(float(clipped["head_out"]["kernel"][0, 0]))
  f = abs(float(free["head_out"]["kernel"][0, 0]))
  assert c < 1e-3 * f


def test_global_norm_is_optax_value_without_a_squared_copy():
  tree = {"a": jnp.arange(12.0).reshape(3, 4) - 5.0, "b": [jnp.ones((7,)) * 0.5],
          "c": jnp.asarray([3.0, -4.0], jnp.bfloat16)}
  expected = np.sqrt(sum(float(np.sum(np.square(np.asarray(x, np.float64))))
                         for x in jax.tree.leaves(tree)))
  assert float(optim.global_norm(tree)) == pytest.approx(expected, rel=1e-6)
  f32 = {k: v for k, v in tree.items() if k != "c"}
  assert float(optim.global_norm(f32)) == pytest.approx(float(optax.global_norm(f32)), rel=1e-7)

  # The reason it exists: next to Adam's second moment of the same gradient, optax's norm
  # shares the square with it, which XLA then writes out whole as a temporary; ours does not.
  g = jnp.ones((256, 1024), jnp.float32)

  def temp_bytes(norm):
    def step(g, v):
      return norm(g), 0.95 * v + 0.05 * g ** 2
    return jax.jit(step, donate_argnums=1).lower(g, g).compile().memory_analysis() \
        .temp_size_in_bytes
  assert temp_bytes(optim.global_norm) < g.nbytes


def test_layerwise_decay_scales_earlier_layers_down():
  assert optim.default_layer_id("patch_embed/kernel", 2) == 0
  assert optim.default_layer_id("blocks_1/mlp/kernel", 2) == 2
  assert optim.default_layer_id("head_out/kernel", 2) == 3
  tx, _ = optim.create_optimizer(_opt_cfg(weight_decay=0.0, layer_decay=0.5, clip_norm=0.0,
                                          warmup_steps=1), 100, PARAMS, num_layers=2)
  updates = _second_update(tx, jax.tree.map(jnp.ones_like, PARAMS))
  head = float(updates["head_out"]["kernel"][0, 0])
  assert float(updates["blocks_1"]["mlp"]["kernel"][0, 0]) == pytest.approx(0.5 * head)
  assert float(updates["blocks_0"]["mlp"]["kernel"][0, 0]) == pytest.approx(0.25 * head)
  assert float(updates["patch_embed"]["kernel"][0, 0]) == pytest.approx(0.125 * head)


def test_checkpointer_keeps_the_last_k_and_names_missing_checkpoints(tmp_path):
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), keep=2, async_save=False)
  state = {"w": jnp.arange(3.0)}
  for step in (1, 2, 3):
    ckpt.save(step, {"w": state["w"] * step})
  ckpt.wait_until_finished()
  assert ckpt.all_steps() == [2, 3]
  restored = ckpt.restore(jax.eval_shape(lambda: state))
  np.testing.assert_array_equal(restored["w"], [0.0, 3.0, 6.0])
  with pytest.raises(FileNotFoundError, match="step 1"):
    ckpt.restore(jax.eval_shape(lambda: state), step=1)
  ckpt.close()
  empty = checkpoint_lib.Checkpointer(str(tmp_path / "none"))
  with pytest.raises(FileNotFoundError, match="no checkpoint found"):
    empty.restore(jax.eval_shape(lambda: state))
  empty.close()


def test_jsonl_writer_writes_one_object_per_step(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  w = metrics_lib.JsonlWriter(path)
  w.write_scalars(1, {"loss": np.float32(2.5)})
  w.write_scalars(2, {"loss": 2.0, "lr": 0.1})
  w.write_scalars(2, {"loss": 1.5})    # a step redone after a resume
  w.close()
  lines = [json.loads(x) for x in open(path)]
  assert lines[0] == {"step": 1, "loss": 2.5}
  assert metrics_lib.read_jsonl(path)[2] == {"step": 2, "loss": 1.5, "lr": 0.1}


def test_matmul_and_attention_flops():
  assert flops_lib.matmul(2, 3, 4) == 48
  assert flops_lib.attention(1, 10, 8) == 2 * 2 * 10 * 8 * 10
  peak, how = flops_lib.peak_flops_per_device(jax.devices()[0])
  assert "measured" in how and peak == flops_lib.measured_matmul_peak()
  assert flops_lib.mfu(3e9, 2.0) == pytest.approx(1.5e9 / peak)


def test_normalize_images_matches_on_host_and_device():
  images = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), np.uint8)
  from pretrain_jax.data import transforms
  np.testing.assert_allclose(transforms.normalize_images(jnp.asarray(images)),
                             transforms.normalize_images(images), atol=1e-6)
  np.testing.assert_allclose(transforms.normalize_images(images)[0],
                             transforms.normalize(images[0]), atol=1e-6)


def test_distributed_init_is_detected_from_the_environment(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda: calls.append(1))
  for key in ("SLURM_STEP_NUM_TASKS", "JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS",
              "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(key, raising=False)
  monkeypatch.setenv("SLURM_NTASKS", "8")   # an sbatch allocation, outside srun: one process
  mesh_lib.maybe_initialize_distributed("auto")
  assert calls == []
  monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")
  mesh_lib.maybe_initialize_distributed("auto")
  assert calls == [1]
  mesh_lib.maybe_initialize_distributed("off")
  assert calls == [1]
  monkeypatch.delenv("SLURM_STEP_NUM_TASKS")
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w0,w1,w2,w3")
  mesh_lib.maybe_initialize_distributed("auto")
  assert calls == [1, 1]
  with pytest.raises(ValueError, match="--distributed"):
    mesh_lib.maybe_initialize_distributed("maybe")
