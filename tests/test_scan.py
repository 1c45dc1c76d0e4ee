"""Scan over layers: the same function as the unrolled blocks, params convertible both ways."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from pretrain_jax import optim, scan


def _aim(scan_layers: bool):
  from aimjax import model as model_lib
  cfg = load_config("configs/aim/pretrain.py", "variant=tiny")
  with cfg.unlocked():
    cfg.model.scan_layers = scan_layers
    cfg.model.remat = "block"
  return model_lib.from_config(cfg.model, cfg.objective), cfg


def test_scanned_aim_computes_what_the_unrolled_blocks_compute():
  scanned, _ = _aim(True)
  unrolled, _ = _aim(False)
  images = jax.random.normal(jax.random.key(1), (2, 56, 56, 3))
  prefix = jnp.array([3, 7])
  params = nn.unbox(scanned.init(jax.random.key(0), images, prefix)["params"])
  assert params["blocks"]["layers"]["layer"]["attn"]["qkv"].shape[0] == 2
  flat = scan.unstack(params)
  assert "blocks_1" in flat and "head_blocks_1" in flat and "blocks" not in flat
  reference = nn.unbox(unrolled.init(jax.random.key(0), images, prefix)["params"])
  assert jax.tree.structure(flat) == jax.tree.structure(reference)
  out_scan = scanned.apply({"params": params}, images, prefix)
  out_flat = unrolled.apply({"params": flat}, images, prefix)
  np.testing.assert_allclose(out_scan, out_flat, rtol=1e-5, atol=1e-5)
  back = scan.stack(flat, ("blocks", "head_blocks"))
  jax.tree.map(np.testing.assert_array_equal, back, params)


@pytest.mark.slow
def test_scanned_fourm_loss_equals_the_unrolled_loss():
  from fourm_jax import model as model_lib
  from fourm_jax import train as train_lib
  cfg = load_config("configs/fourm/pretrain.py", "variant=tiny")
  models = {}
  for flag in (True, False):
    c = cfg.copy_and_resolve_references()
    with c.unlocked():
      c.model.scan_layers = flag
    models[flag] = train_lib.build_model(c)
  batch = jax.tree.map(jnp.asarray, train_lib.dummy_batch(models[True], 2))
  rng = np.random.default_rng(0)
  for name in ("tok_rgb@32", "tok_depth@32"):   # random tokens, every other one given
    t = batch[name]
    n = t["tensor"].shape[1]
    batch[name] = {**t, "tensor": jnp.asarray(rng.integers(0, 64, (2, n)), jnp.int32),
                   "input_mask": jnp.asarray(np.arange(n)[None].repeat(2, 0) % 2 == 0),
                   "target_mask": jnp.asarray(np.arange(n)[None].repeat(2, 0) % 2 == 1)}
  n_enc, n_dec = cfg.model.num_encoder_tokens, cfg.model.num_decoder_tokens
  params = nn.unbox(models[True].init(jax.random.key(0), batch, n_enc, n_dec)["params"])
  assert "encoder" in params and "decoder" in params and "encoder_0" not in params
  losses = {}
  for flag, p in ((True, params), (False, scan.unstack(params))):
    losses[flag] = model_lib.loss(models[flag], {"params": p}, batch, n_enc, n_dec,
                                  cfg.loss_type)[0]
  np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)
  assert np.isfinite(losses[True]) and losses[True] > 0
  with pytest.raises(ValueError, match="scan_layers"):
    models[True].apply({"params": params}, jnp.zeros((1, 32, 32, 3)), "rgb@32",
                       method=models[True].encoder_features)


def test_the_optimizer_treats_stacked_blocks_like_unrolled_ones():
  scanned, cfg = _aim(True)
  images = jnp.zeros((1, 56, 56, 3))
  params = nn.unbox(jax.eval_shape(scanned.init, jax.random.key(0), images,
                                   jnp.ones((1,), jnp.int32))["params"])
  mask = optim.weight_decay_mask(params, ("pos_embed",))
  layer = mask["blocks"]["layers"]["layer"]
  assert layer["attn"]["qkv"] and layer["mlp"]["fc1"]["kernel"] and not layer["norm_1"]["scale"]
  with cfg.unlocked():
    cfg.optimizer.layer_decay = 0.75
  with pytest.raises(ValueError, match="layer_decay"):
    optim.create_optimizer(cfg.optimizer, 100, params, 2)
  with pytest.raises(ValueError, match="scan_layers"):
    scanned.apply({"params": params}, images, method=scanned.features)


def test_like_brings_a_checkpoint_into_the_other_layout():
  """What a warm start (init_from) does between a scanned and an unrolled run."""
  unrolled = {"embed": {"kernel": np.ones((2, 3))},
              "blocks_0": {"w": np.zeros((3, 3))}, "blocks_1": {"w": np.ones((3, 3))}}
  scanned = scan.stack(unrolled, ("blocks",))
  assert scan.stacked_names(scanned) == ["blocks"]
  to_scanned = scan.like(unrolled, scanned)
  np.testing.assert_array_equal(to_scanned["blocks"]["layers"]["layer"]["w"][1], np.ones((3, 3)))
  to_unrolled = scan.like(scanned, unrolled)
  assert sorted(to_unrolled) == ["blocks_0", "blocks_1", "embed"]
  with pytest.raises(ValueError, match="0..1"):
    scan.stack({"blocks_0": {}, "blocks_2": {}}, ("blocks",))
