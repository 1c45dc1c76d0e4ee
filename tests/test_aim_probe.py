"""Probing and LoRA: adapters train alone, merge exactly, and the probe CLI writes its table."""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aimjax import backbone as aim_backbone
from aimjax import model as model_lib
from aimjax import probe as probe_lib
from conftest import ROOT, load_config, subprocess_env
from pretrain_jax import heads, optim
from pretrain_jax import probe as core_probe


def _lora_model(rank=4):
  base = model_lib.AIM(image_size=56, width=64, depth=2, num_heads=2, head="none")
  adapted = base.clone(lora=model_lib.LoRA(rank=rank, alpha=8.0))
  x = jax.random.normal(jax.random.key(1), (2, 56, 56, 3))
  v = jax.jit(adapted.init)(jax.random.key(0), x, jnp.ones((2,), jnp.int32))
  return base, adapted, nn.unbox(v["params"]), nn.unbox(v["lora"]), x


def test_lora_starts_as_the_base_model_and_merges_exactly():
  base, adapted, params, lora, x = _lora_model()
  f_base = base.apply({"params": params}, x, method=base.features)[-1]
  f_start = adapted.apply({"params": params, "lora": lora}, x, method=adapted.features)[-1]
  np.testing.assert_array_equal(f_base, f_start)   # B = 0 at init
  lora = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(3), a.shape), lora)
  f_lora = adapted.apply({"params": params, "lora": lora}, x, method=adapted.features)[-1]
  merged = model_lib.merge_lora(params, lora, adapted.lora)
  f_merged = base.apply({"params": merged}, x, method=base.features)[-1]
  assert np.abs(np.asarray(f_lora - f_base)).max() > 0.1
  np.testing.assert_allclose(f_merged, f_lora, atol=2e-5, rtol=1e-5)


def test_lora_rank_r_shapes_and_targets():
  _, _, _, lora, _ = _lora_model(rank=3)
  blk = lora["blocks_0"]
  assert blk["attn"]["qkv_a"].shape == (64, 3) and blk["attn"]["qkv_b"].shape == (3, 3, 2, 32)
  assert blk["mlp"]["fc1_a"].shape == (64, 3) and blk["mlp"]["fc2_b"].shape == (3, 64)
  only_qkv = model_lib.AIM(image_size=56, width=64, depth=2, num_heads=2, head="none",
                           lora=model_lib.LoRA(rank=3, targets=("qkv",)))
  v = jax.jit(only_qkv.init)(jax.random.key(0), jnp.zeros((1, 56, 56, 3)), jnp.ones((1,), jnp.int32))
  assert set(nn.unbox(v["lora"])["blocks_0"]) == {"attn"}
  assert set(nn.unbox(v["lora"])["blocks_0"]["attn"]) == {"qkv_a", "qkv_b"}


def test_only_lora_and_probe_parameters_get_gradients_and_optimizer_state():
  cfg = load_config("configs/aim/probe.py", "variant=tiny")
  cfg.lora.rank = 2
  base = model_lib.AIM(image_size=56, width=64, depth=2, num_heads=2, head="none")
  probe, trunk, groups = core_probe.build(cfg, aim_backbone.Backbone(base))
  x = jax.random.normal(jax.random.key(1), (4, 56, 56, 3))
  params = nn.unbox(jax.jit(base.init)(jax.random.key(0), x, jnp.ones((4,), jnp.int32))["params"])
  lora = trunk.init_adapters(jax.random.key(0))
  feats = core_probe.group_features(trunk, params, x, groups, lora)
  pv = nn.unbox(probe.init(jax.random.key(2), feats))
  trainable = {"probe": pv["params"], "lora": lora}
  tx, _ = optim.create_optimizer(cfg.optimizer, 100, trainable)
  opt_state = tx.init(trainable)
  size = lambda t: sum(int(a.size) for a in jax.tree.leaves(t))
  # Adam keeps two moments of the trainable params only, never of the frozen trunk.
  assert size(opt_state) <= 2 * size(trainable) + 8
  assert size(trainable) < size(params) / 4

  def loss(tr):
    f = core_probe.group_features(trunk, params, x, groups, tr["lora"])
    logits, _ = probe.apply({"params": tr["probe"], "batch_stats": pv["batch_stats"]},
                            f, train=True, mutable=["batch_stats"])
    return jnp.mean(logits ** 2)
  grads = jax.grad(loss)(trainable)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["probe"]))
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["lora"]))


def test_probe_cli_trains_every_block_and_group_and_writes_the_table_and_head(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "aimjax.probe", "--config=configs/aim/probe.py:variant=tiny",
       "--config.init_from=tiny", f"--workdir={tmp_path}", "--config.epochs=1",
       "--config.data.train=scenes:256", "--config.data.eval=scenes:128",
       "--config.lora.rank=2", "--config.layers=(0, 1, (0, 1))",
       "--config.optimizer.warmup_steps=1"],
      cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.load(open(tmp_path / "probe_results.json"))
  assert set(result["top1"]) == {"0", "1", "0-1"}    # "0-1": the mean of blocks 0 and 1
  assert result["groups"]["0-1"] == [0, 1]
  assert result["eval_examples"] == 128
  assert all(0.0 <= a <= 1.0 for a in result["top1"].values())
  assert os.path.getsize(tmp_path / "probe_layers.png") > 1000
  assert (tmp_path / "merged_params.safetensors").exists()
  # the best group's head, applied by aimjax.classify on the LoRA-merged trunk
  from aimjax import classify
  from pretrain_jax import export
  _, meta = export.load_safetensors(str(tmp_path / "probe.safetensors"))
  assert meta["probe"]["layers"] == result["groups"][result["best_block"]]
  out = classify.classify(str(tmp_path), np.zeros((3, 64, 80, 3), np.uint8))
  assert out["classes"].shape == (3, 5) and out["logits"].shape == (3, 8)
  assert out["synsets"] is None                      # 8 classes: ids only


def test_layer_groups_are_single_blocks_or_means_of_several():
  assert core_probe.layer_groups((1, -1, (3, 2, -2), (0,)), 4) == ((0,), (1,), (3,), (2, 3))
  assert [core_probe.group_name(g) for g in ((5,), (14, 15, 16), (0, 2))] == ["5", "14-16",
                                                                               "0+2"]
  with pytest.raises(ValueError, match="'layers': 4 is not a block index"):
    core_probe.layer_groups((0, (1, 4)), 4)
  feats = {0: jnp.ones((1, 2, 3)), 2: 3 * jnp.ones((1, 2, 3))}
  np.testing.assert_array_equal(heads.average_layers(feats, (0, 2)), 2 * np.ones((1, 2, 3)))


def test_released_variants_probe_the_official_best_and_last_groups():
  """ml-aim's LAYERS_BEST (0-indexed): 14-19 for 600M and 7B, 12-17 for 1B and 3B; 'last'
  is the mean of the last 6 blocks (the official probe_layers=6)."""
  want = {"0.6B": ((14, 15, 16, 17, 18, 19), (18, 19, 20, 21, 22, 23)),
          "1B": ((12, 13, 14, 15, 16, 17), (18, 19, 20, 21, 22, 23)),
          "3B": ((12, 13, 14, 15, 16, 17), (18, 19, 20, 21, 22, 23)),
          "7B": ((14, 15, 16, 17, 18, 19), (26, 27, 28, 29, 30, 31))}
  for variant, groups in want.items():
    assert load_config("configs/aim/probe.py", f"variant={variant}").layers == groups


@pytest.mark.slow
def test_probe_on_pretrained_trunk_beats_the_same_probe_on_a_random_trunk(tmp_path):
  """The signal AIM's whole evaluation rests on, at tiny scale: 1200 steps of
  prefix-causal pretraining on 2048 scenes make the attentive probe on frozen
  features clearly better than on a randomly initialised trunk (benchmarks/
  aim_fidelity.py measures the curve; 8 colour classes, chance about 0.15)."""
  from aimjax import train as aim_train
  from pretrain_jax import loop
  from pretrain_jax.data import make_scenes
  train_dir, val_dir = str(tmp_path / "train"), str(tmp_path / "val")
  make_scenes.write_scenes(train_dir, 2048, seed=0, resolution=64, shards=2)
  make_scenes.write_scenes(val_dir, 512, seed=1, resolution=64, shards=1)
  data = {"train": f"arrayrecord:{train_dir}/*.array_record",
          "eval": f"arrayrecord:{val_dir}/*.array_record"}

  pre = load_config("configs/aim/pretrain.py", "variant=tiny")
  pre.total_steps, pre.checkpoint_every, pre.eval_every = 1200, 1200, 0
  pre.data.train, pre.data.eval = data["train"], data["eval"]
  loop.train(pre, str(tmp_path / "pretrain"), aim_train.build_task(pre))

  top1 = {}
  for name, init_from in [("random", "tiny"), ("pretrained", str(tmp_path / "pretrain"))]:
    cfg = load_config("configs/aim/probe.py", "variant=tiny")
    cfg.init_from, cfg.epochs = init_from, 12
    cfg.data.train, cfg.data.eval = data["train"], data["eval"]
    top1[name] = probe_lib.train_probes(cfg, str(tmp_path / f"probe_{name}"))["best_top1"]
  assert top1["random"] > 1 / 8                     # the probe learns something on any trunk
  assert top1["pretrained"] > top1["random"] + 0.1, top1
