"""Parity with the official AIM v1 model (fixtures computed with apple/ml-aim's own code)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aimjax import convert
from aimjax import model as model_lib
from conftest import SHARED
from pretrain_jax import heads

FIXTURE = SHARED / "fixtures" / "aim_v1_small.safetensors"
pytestmark = pytest.mark.skipif(not FIXTURE.exists(),
                                reason=f"{FIXTURE} absent: ../shared/ is not beside the checkout")


@pytest.fixture(scope="module")
def fixture():
  from safetensors import safe_open
  with safe_open(str(FIXTURE), "np") as f:
    cfg = json.loads(f.metadata()["config"])
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  inputs = {k: v for k, v in tensors.items() if k.startswith("__")}
  sd = {k: v for k, v in tensors.items() if not k.startswith("__")}
  return cfg, sd, inputs


def _model(cfg):
  return model_lib.AIM(image_size=cfg["img_size"], patch_size=cfg["patch_size"],
                       width=cfg["embed_dim"], depth=cfg["num_blocks"], num_heads=cfg["num_heads"],
                       head="none")


def test_converted_weights_reproduce_official_block_features_and_logits(fixture):
  cfg, sd, inputs = fixture
  params, probe_vars = convert.official_to_params(sd, cfg["embed_dim"], cfg["num_blocks"],
                                                  cfg["num_heads"], cfg["patch_size"])
  model = _model(cfg)
  x = jnp.asarray(inputs["__input__"].transpose(0, 2, 3, 1))   # NCHW -> NHWC
  blocks = model.apply({"params": params}, x, method=model.features)
  for i, feats in enumerate(blocks):
    np.testing.assert_allclose(feats, inputs[f"__block_{i}__"], atol=1e-4, rtol=1e-4)
  probe = heads.AttentiveProbe(num_heads=cfg["num_heads"], num_classes=cfg["num_classes"])
  pooled_in = jnp.mean(jnp.stack(blocks[-cfg["probe_layers"]:]), axis=0)
  logits = probe.apply(probe_vars, pooled_in)
  np.testing.assert_allclose(logits, inputs["__logits__"], atol=1e-4, rtol=1e-4)


def test_round_trip_through_the_official_layout_is_exact(fixture):
  cfg, sd, _ = fixture
  params, probe_vars = convert.official_to_params(sd, cfg["embed_dim"], cfg["num_blocks"],
                                                  cfg["num_heads"], cfg["patch_size"])
  back = convert.params_to_official(params, probe_vars, cfg["patch_size"])
  assert set(back) == set(sd)
  for k in sd:
    if k != "head.bn.num_batches_tracked":
      np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
  again, _ = convert.official_to_params(back, cfg["embed_dim"], cfg["num_blocks"],
                                        cfg["num_heads"], cfg["patch_size"])
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)


def test_bad_state_dicts_list_missing_extra_and_misshaped_keys(fixture):
  cfg, sd, _ = fixture
  bad = dict(sd)
  del bad["trunk.blocks.1.mlp.fc1.weight"]
  bad["trunk.blocks.9.attn.qkv.weight"] = np.zeros((192, 64), np.float32)
  bad["trunk.blocks.0.attn.proj.weight"] = np.zeros((64, 65), np.float32)
  with pytest.raises(ValueError) as e:
    convert.official_to_params(bad, cfg["embed_dim"], cfg["num_blocks"], cfg["num_heads"])
  msg = str(e.value)
  assert "missing keys (1): trunk.blocks.1.mlp.fc1.weight" in msg
  assert "unexpected keys (1): trunk.blocks.9.attn.qkv.weight" in msg
  assert "trunk.blocks.0.attn.proj.weight: (64, 65) (expected (64, 64))" in msg
  with pytest.raises(ValueError, match="depth=6"):
    convert.official_to_params(sd, cfg["embed_dim"], 6, cfg["num_heads"])


def test_attentive_probe_has_2d2_plus_d_params_plus_the_classifier():
  d, classes = 64, 10
  probe = heads.AttentiveProbe(num_heads=4, num_classes=classes)
  variables = probe.init(jax.random.key(0), jnp.zeros((2, 16, d)))
  import flax.linen as nn
  n = sum(x.size for x in jax.tree.leaves(nn.unbox(variables["params"])))
  assert n == 2 * d * d + d + d * classes
