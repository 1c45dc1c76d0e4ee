"""Loading a trained workdir prints no warning and takes a path relative to the working dir.

Orbax warned "Metadata file does not exist: .../state/_CHECKPOINT_METADATA" on every load of
a checkpoint the loop's CheckpointManager wrote (its item directory has no such file).
"""
import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import aimjax
from aimjax import convert, train as aim_train
from conftest import load_config
from fourm_jax import backbone, load as fourm_load, train as fourm_train
from pretrain_jax import checkpoint
from tokenizers_jax import tokenize, train as tok_train


def _write_workdir(workdir, config, task):
  """What loop.train leaves in a workdir (config.json, a managed checkpoint of the state), with
  zero params: the shapes are all a load needs, and nothing is compiled."""
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  zeros = lambda init: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                    nn.unbox(jax.eval_shape(init, jax.random.key(0))))
  state = {"step": jnp.zeros((), jnp.int32), "params": zeros(task.init_params)}
  if task.init_extra is not None:
    state["extra"] = zeros(task.init_extra)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  ckpt.save(1, state, force=True)
  ckpt.close()


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  """A directory holding workdirs aim/, fourm/, tok/ (as training writes them) and converted/
  (as aimjax.convert writes one)."""
  root = tmp_path_factory.mktemp("workdirs")
  cfg = load_config("configs/aim/pretrain.py", "variant=tiny")
  _write_workdir(root / "aim", cfg, aim_train.build_task(cfg))
  cfg = load_config("configs/fourm/pretrain.py", "variant=tiny")
  _write_workdir(root / "fourm", cfg, fourm_train.build_task(cfg))
  cfg = load_config("configs/tokenizers/vqvae.py", "modality=depth,variant=tiny")
  _write_workdir(root / "tok", cfg, tok_train.build_task(cfg))
  return root


def _warnings(capfd, caplog):
  out, err = capfd.readouterr()
  lines = [line for line in (out + err).splitlines()
           if "WARNING" in line or "Metadata file does not exist" in line]
  return lines + [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_every_load_of_a_relative_workdir_is_quiet(workdirs, monkeypatch, capfd, caplog):
  monkeypatch.chdir(workdirs)
  caplog.set_level(logging.INFO)
  capfd.readouterr()
  model, params, _ = aimjax.load("aim")
  assert model.width == 64
  assert _warnings(capfd, caplog) == []
  fourm_load.load("fourm")
  backbone.load("fourm")
  assert _warnings(capfd, caplog) == []
  tok = tokenize.Tokenizer("tok")
  assert tok.modality == "depth"
  assert _warnings(capfd, caplog) == []
  _, report = checkpoint.warm_start(params, "aim")
  assert report["new"] == [] and report["mismatched"] == []
  assert _warnings(capfd, caplog) == []


def test_a_converted_checkpoint_is_written_and_loaded_quietly_through_relative_paths(
    workdirs, monkeypatch, capfd, caplog):
  monkeypatch.chdir(workdirs)
  _, params, _ = aimjax.load("aim")
  sd = convert.params_to_official(params)
  caplog.set_level(logging.INFO)
  capfd.readouterr()
  convert.write_converted(sd, "converted", width=64, depth=2, num_heads=2, image_size=56)
  model, loaded, _ = aimjax.load("converted")
  assert model.width == 64
  flat = lambda tree: {jax.tree_util.keystr(k): v
                       for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  trained, trunk = flat(params), flat(loaded)     # the converted checkpoint has no pixel head
  assert set(trunk) <= set(trained)
  for key, value in trunk.items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(trained[key]))
  checkpoint.warm_start(params, "converted")
  assert _warnings(capfd, caplog) == []


def test_aim_features_labeller_reads_a_relative_workdir_at_its_size_or_another(
    workdirs, monkeypatch):
  """The README's pseudo-labelling passes the quickstart's workdir/aim_tiny (trained at 56 px)
  as the feature labeller: by default the features come at the checkpoint's size; an
  image_size re-grids the model (fixed sin-cos positions) and preprocesses to that size."""
  from fourm_jax import labellers
  monkeypatch.chdir(workdirs)
  images = {"image": [np.zeros((32, 32, 3), np.uint8)] * 2}
  lab = labellers.create("aim_features", 32, init_from="aim")
  assert lab.outputs["aim_features"].shape == (16, 64)          # 56 px: a 4 x 4 grid
  assert lab(images)["aim_features"][0].shape == (16, 64)
  lab = labellers.create("aim_features", 32, init_from="aim", image_size=112)
  assert lab.outputs["aim_features"].shape == (64, 64)          # 112 px: 8 x 8
  assert lab(images)["aim_features"][0].shape == (64, 64)
