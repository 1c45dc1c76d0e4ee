"""4M encoder-decoder (fourm_jax.model): sizes, official parity, masks, conversion."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import SHARED
from fourm_jax import convert, modalities, model as model_lib

FIXTURE = os.path.join(SHARED, "fixtures", "fourm_small.safetensors")
# 4M Table 4: parameters without embeddings, truncated to whole millions
TABLE4 = {"Ti": 24, "S": 59, "B": 198, "L": 705, "XL": 2818}


def _abstract_batch(mods, b=1):
  batch = {}
  for m in mods:
    n = m.num_tokens
    if m.kind == "pixels":
      t = jax.ShapeDtypeStruct((b, m.grid[0] * m.patch_size, m.grid[1] * m.patch_size, 3),
                               jnp.float32)
    elif m.kind == "seq_emb":
      t = jax.ShapeDtypeStruct((b, n, m.emb_dim), jnp.float32)
    else:
      t = jax.ShapeDtypeStruct((b, n), jnp.int32)
    batch[m.name] = {"tensor": t, "input_mask": jax.ShapeDtypeStruct((b, n), jnp.bool_),
                     "target_mask": jax.ShapeDtypeStruct((b, n), jnp.bool_),
                     "decoder_attention_mask": jax.ShapeDtypeStruct((b, n), jnp.int32)}
  return batch


@pytest.mark.parametrize("size", list(TABLE4))
def test_parameter_counts_match_table_4(size):
  names = list(modalities.FOURM7)
  cfg = ml_collections.ConfigDict({"size": size, "inputs": names,
                                   "targets": [n for n in names if n != "rgb@224"]})
  model = model_lib.from_config(cfg)
  batch = _abstract_batch(modalities.get(names))
  params = jax.eval_shape(lambda b: model.init(jax.random.key(0), b, 128, 128), batch)["params"]
  n = model_lib.count_params(nn.unbox(params)) / 1e6
  assert abs(n - (TABLE4[size] + 0.5)) / TABLE4[size] < 0.03, n   # middle of the truncated value


def _fixture():
  from safetensors.numpy import load_file
  from safetensors import safe_open
  with safe_open(FIXTURE, "np") as f:
    meta = f.metadata()
  return load_file(FIXTURE), meta


@pytest.mark.skipif(not os.path.exists(FIXTURE), reason="../shared/fixtures/fourm_small.safetensors "
                    "(official 4M outputs) is not present")
def test_official_small_model_loss_and_logits_are_reproduced():
  sd, meta = _fixture()
  cfg = json.loads(meta["config"])
  n_enc, n_dec = int(meta["num_encoder_tokens"]), int(meta["num_decoder_tokens"])
  caption = modalities.Modality("caption", "seq", vocab_size=30000, length=512)
  reg = {**modalities.REGISTRY, "caption": caption}      # the fixture's caption embeddings: 512
  model = model_lib.FourM(modalities.get(cfg["domains_in"], reg),
                          modalities.get(sorted(cfg["domains_out"]), reg),
                          dim=cfg["dim"], encoder_depth=cfg["encoder_depth"],
                          decoder_depth=cfg["decoder_depth"], num_heads=cfg["num_heads"],
                          tie_embeddings=False)
  params = convert.from_official(sd, model)
  batch = {}
  for name in cfg["domains_in"]:
    d = {k: sd[f"__in__.{name}.{k}"] for k in ("tensor", "input_mask", "target_mask",
                                               "decoder_attention_mask")}
    t = d["tensor"]
    d["tensor"] = t.transpose(0, 2, 3, 1) if t.ndim == 4 else t.astype(np.int32)
    batch[name] = {k: jnp.asarray(v) for k, v in d.items()}
  variables = {"params": jax.tree.map(jnp.asarray, params)}
  for fn in (model_lib.loss, jax.jit(model_lib.loss, static_argnums=(0, 3, 4))):
    total, per_mod = fn(model, variables, batch, n_enc, n_dec)
    np.testing.assert_allclose(float(total), float(sd["__loss__"][0]), atol=1e-4)
    for name, value in per_mod.items():
      np.testing.assert_allclose(float(value), float(sd[f"__modloss__.{name}"][0]), atol=1e-4)
  y, _, _, _ = model.apply(variables, batch, n_enc, n_dec)
  for m in model.targets:
    got = np.asarray(model.apply(variables, y, m.name, method=model.logits))
    want = sd[f"__logits__.{m.name}"].astype(np.float32)
    np.testing.assert_allclose(got, want, atol=2e-3)    # float16 storage of values about 1.4


def _tiny_model_and_batch(seed=0, b=2):
  rng = np.random.default_rng(seed)
  mods = modalities.get(["tok_rgb@224", "tok_depth@224", "caption"])
  model = model_lib.FourM(mods, mods, dim=32, encoder_depth=1, decoder_depth=2, num_heads=4)
  batch = {}
  for m in mods[:2]:
    perm = rng.permutation(196)
    inp, tgt = np.ones((b, 196), bool), np.ones((b, 196), bool)
    inp[:, perm[:20]] = False
    tgt[:, perm[20:40]] = False
    att = np.zeros((b, 196), np.int32)
    att[:, np.sort(perm[20:40])[0]] = 20            # the 20 targets see each other
    batch[m.name] = {"tensor": rng.integers(0, m.vocab_size, (b, 196)), "input_mask": inp,
                     "target_mask": tgt, "decoder_attention_mask": att}
  cap = np.zeros((b, 256), np.int64)
  cap[:, :12] = rng.integers(5000, 20000, (b, 12))
  tgt = np.ones((b, 256), bool)
  tgt[:, :12] = False
  batch["caption"] = {"tensor": cap, "input_mask": np.ones((b, 256), bool), "target_mask": tgt,
                      "decoder_attention_mask": np.ones((b, 256), np.int32)}   # causal
  batch = jax.tree.map(jnp.asarray, batch)
  variables = jax.jit(lambda r, b: model.init(r, b, 40, 64))(jax.random.key(seed), batch)
  return model, variables, batch


def _all_logits(model, variables, batch):
  @jax.jit
  def forward(variables, batch):
    y, ids, mods, valid = model.apply(variables, batch, 40, 64)
    return {m.name: model.apply(variables, y, m.name, method=model.logits)
            for m in model.targets}, mods, valid
  return jax.tree.map(np.asarray, forward(variables, batch))


def test_decoder_keeps_modalities_apart():
  """Changing the caption's target tokens leaves the image targets' outputs unchanged."""
  model, variables, batch = _tiny_model_and_batch()
  before, mods, valid = _all_logits(model, variables, batch)
  changed = jax.tree.map(lambda x: x, batch)
  changed["caption"]["tensor"] = batch["caption"]["tensor"].at[:, 1:11].set(7777)
  after, _, _ = _all_logits(model, variables, changed)
  for i, name in enumerate(["tok_rgb@224", "tok_depth@224"]):
    rows = (mods == i) & valid
    assert rows.sum() == 2 * 20
    np.testing.assert_array_equal(after[name][rows], before[name][rows])
  cap = (mods == 2) & valid
  assert not np.allclose(after["caption"][cap], before["caption"][cap])


def test_sequence_targets_are_causal():
  """Changing caption token j changes the predictions at positions >= j only."""
  model, variables, batch = _tiny_model_and_batch(seed=1)
  before, mods, valid = _all_logits(model, variables, batch)
  j = 6
  changed = jax.tree.map(lambda x: x, batch)
  changed["caption"]["tensor"] = batch["caption"]["tensor"].at[:, j].set(4321)
  after, _, _ = _all_logits(model, variables, changed)
  pos = np.cumsum((mods == 2) & valid, axis=1) - 1     # decoder position k predicts token k + 1
  for b in range(2):
    cap = np.flatnonzero((mods[b] == 2) & valid[b])
    early, late = cap[pos[b, cap] < j], cap[pos[b, cap] >= j]
    np.testing.assert_array_equal(after["caption"][b, early], before["caption"][b, early])
    assert not np.allclose(after["caption"][b, late], before["caption"][b, late])


def test_gelu_reference_model_with_biases_has_the_b_parameter_count():
  """4M Table 14's reference model (GELU feed-forward, biases) is a B: within 3% of 198M."""
  names = list(modalities.FOURM7)
  cfg = ml_collections.ConfigDict({"size": "B", "inputs": names, "ffn": "gelu", "use_bias": True,
                                   "targets": [n for n in names if n != "rgb@224"]})
  model = model_lib.from_config(cfg)
  params = jax.eval_shape(lambda b: model.init(jax.random.key(0), b, 128, 128),
                          _abstract_batch(modalities.get(names)))["params"]
  params = nn.unbox(params)
  assert "bias" in params["encoder_0"]["mlp"]["fc1"] and "qkv_bias" in params["encoder_0"]["attn"]
  n = model_lib.count_params(params) / 1e6
  assert abs(n - 198.5) / 198 < 0.03, n


def test_encoder_features_are_the_encoder_output_when_every_patch_is_given():
  mods = modalities.get(["rgb@224", "tok_depth@224"])
  model = model_lib.FourM(mods, mods[1:], dim=32, encoder_depth=2, decoder_depth=1, num_heads=4)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(2, 224, 224, 3)), jnp.float32)
  batch = {"rgb@224": {"tensor": images, "input_mask": jnp.zeros((2, 196), bool),
                       "target_mask": jnp.ones((2, 196), bool),
                       "decoder_attention_mask": jnp.zeros((2, 196), jnp.int32)},
           "tok_depth@224": {"tensor": jnp.zeros((2, 196), jnp.int32),
                             "input_mask": jnp.ones((2, 196), bool),
                             "target_mask": jnp.ones((2, 196), bool),
                             "decoder_attention_mask": jnp.zeros((2, 196), jnp.int32)}}
  variables = model.init(jax.random.key(0), batch, 196, 8)
  context, _, valid = model.apply(variables, batch, 196, method=model.encode)
  assert bool(valid.all())
  feats = model.apply(variables, images, "rgb@224", method=model.encoder_features)
  assert len(feats) == 2 and feats[0].shape == (2, 196, 32)
  np.testing.assert_allclose(np.asarray(feats[-1]), np.asarray(context), atol=1e-5)
  with pytest.raises(ValueError, match="not a pixel input"):
    model.apply(variables, images, "tok_depth@224", method=model.encoder_features)


def test_remat_policies_give_the_same_gradients():
  model, variables, batch = _tiny_model_and_batch(seed=2)
  grad = lambda m: jax.jit(jax.grad(lambda p: model_lib.loss(m, {"params": p}, batch, 40, 64)[0]))(
      variables["params"])
  plain = grad(model)
  for policy in ("block", "dots"):
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(grad(model.clone(remat=policy)))):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  with pytest.raises(ValueError, match="model.remat"):
    model_lib.from_config(ml_collections.ConfigDict({"size": "tiny", "inputs": ["caption"],
                                                     "targets": ["caption"], "remat": "all"}))
