"""Backbones and training tasks found by name (pretrain_jax.registry): AIM and 4M register
through entry points, the probe and the feature labellers use only the registry."""
import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from pretrain_jax import backbones, plan, probe, registry
from pretrain_jax.data.scenes import render_scene


def test_the_registries_list_aim_and_fourm_backbones_and_tasks():
  assert {"aim", "fourm"} <= set(backbones.names())
  assert {"aim", "fourm"} <= set(registry.names(registry.TASKS))
  assert plan.task_module("configs/aim/pretrain.py").__name__ == "aimjax.train"
  assert plan.task_module("x.py", task="fourm").build_task.__module__ == "fourm_jax.train"


def test_an_unknown_name_says_which_ones_are_registered():
  with pytest.raises(ValueError, match=r"'vit' is not a registered backbone; registered: "
                                       r"\[.*'aim'.*'fourm'"):
    backbones.load("vit", "workdir/vit")
  with pytest.raises(ValueError, match=r"--task 'mae' is not a registered task; registered: "
                                       r"\[.*'aim'.*'fourm'"):
    plan.task_module("configs/aim/pretrain.py", task="mae")
  with pytest.raises(ValueError, match="takes no option"):
    backbones.load("aim", "tiny", colour="blue")


def _fourm_workdir(workdir):
  """A fourm_jax.train workdir (config.json and a checkpoint) of a randomly initialised tiny
  4M: all a backbone load needs, without training."""
  from fourm_jax import train as fourm_train
  from pretrain_jax import checkpoint
  cfg = load_config("configs/fourm/pretrain.py", "variant=tiny")
  task = fourm_train.build_task(cfg)
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(cfg.to_json_best_effort(indent=2, sort_keys=True))
  state = {"step": jnp.zeros((), jnp.int32),
           "params": nn.unbox(jax.jit(task.init_params)(jax.random.key(0)))}
  if task.init_extra is not None:
    state["extra"] = nn.unbox(jax.eval_shape(task.init_extra, jax.random.key(0)))
    state["extra"] = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state["extra"])
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  ckpt.save(1, state, force=True)
  ckpt.close()
  return str(workdir)


def test_a_4m_encoder_is_probed_through_the_registry(tmp_path):
  from fourm_jax import backbone as fourm_backbone
  workdir = _fourm_workdir(tmp_path / "fourm")
  bb, params = backbones.load("fourm", workdir, image_size=32)
  assert isinstance(bb, fourm_backbone.Backbone) and (bb.image_size, bb.num_patches) == (32, 16)
  images = backbones.preprocessing(32)(np.stack([render_scene(7, i, 32)["rgb"] for i in range(3)]))
  first, last = backbones.extract_features(bb, params, images, layers=(0, -1), chunk=2)
  assert first.shape == last.shape == (3, 16, bb.width) and np.abs(first - last).max() > 0
  with pytest.raises(ValueError, match="resolution"):
    backbones.load("fourm", workdir, image_size=56)
  cfg = load_config("configs/aim/probe.py", "variant=tiny")
  cfg.backbone, cfg.init_from = "fourm", workdir
  cfg.data.image_size, cfg.data.scenes_resolution = 32, 32
  cfg.data.train, cfg.data.eval, cfg.epochs, cfg.batch_size = "scenes:64", "scenes:32", 1, 32
  result = probe.train_probes(cfg, str(tmp_path / "probe"))
  assert result["backbone"] == "fourm" and set(result["top1"]) == {"0", "1"}
  assert result["eval_examples"] == 32


def test_the_aim_features_labeller_loads_aim_through_the_registry(monkeypatch):
  from aimjax import backbone as aim_backbone
  from fourm_jax import labellers
  calls = []
  def spy(init_from, **kw):
    calls.append((init_from, kw))
    return aim_backbone.load(init_from, **kw)
  monkeypatch.setitem(registry._LOCAL, registry.BACKBONES, {"aim": spy})
  images = {"image": [render_scene(3, i, 64)["rgb"] for i in range(2)]}
  out = labellers.create("aim_features", 64, init_from="random:tiny", image_size=56)(images)
  assert calls == [("tiny", {"image_size": 56, "step": None})]
  same = labellers.create("backbone_features", 64, backbone="aim", init_from="random:tiny",
                          image_size=56)(images)
  assert set(out) == {"aim_features", "aim_global"} == set(same)
  np.testing.assert_array_equal(out["aim_features"][1], same["aim_features"][1])
  assert out["aim_features"][0].shape == (16, 64)      # 56 px: a 4 x 4 grid of 64 wide


@dataclasses.dataclass(frozen=True)
class _PixelMeans:
  """A stand-in model family: block l's feature of a 4 x 4 patch is its mean colour times l + 1."""
  image_size: int = 16
  num_patches: int = 16
  width: int = 3
  depth: int = 2
  num_heads: int = 1

  def features(self, params, images, layers):
    b = images.shape[0]
    patches = images.reshape(b, 4, 4, 4, 4, 3).mean(axis=(2, 4)).reshape(b, 16, 3)
    return [patches * params["scale"] * (l + 1) for l in layers]


def test_a_new_family_registered_in_process_labels_without_touching_the_core(monkeypatch):
  from fourm_jax import labellers
  monkeypatch.setitem(registry._LOCAL, registry.BACKBONES, {
      "means": lambda init_from, image_size=0, step=None: (_PixelMeans(), {"scale": 2.0})})
  assert "means" in backbones.names()
  lab = labellers.create("backbone_features", 16, backbone="means", init_from="random:-", layer=0)
  assert lab.outputs["means_features"].shape == (16, 3)
  image = np.full((16, 16, 3), 255, np.uint8)
  out = lab({"image": [image]})
  white = (1.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(out["means_global"][0], 2 * white, rtol=1e-3)
  with pytest.raises(ValueError, match="needs the option 'backbone'"):
    labellers.create("backbone_features", 16, init_from="x")
