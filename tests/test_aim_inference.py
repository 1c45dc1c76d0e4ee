"""aimjax.load / extract_features, safetensors export, and the converter CLI."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import aimjax
from aimjax import convert
from conftest import ROOT, SHARED, subprocess_env
from pretrain_jax import export, loop

FIXTURE = SHARED / "fixtures" / "aim_v1_small.safetensors"


def test_features_do_not_depend_on_the_batch_they_come_in():
  model, params, _ = aimjax.load("tiny", image_size=56)
  images = np.random.default_rng(0).normal(size=(7, 56, 56, 3)).astype(np.float32)
  all7 = aimjax.extract_features(model, params, images, layers=(0, -1), chunk=4)
  first3 = aimjax.extract_features(model, params, images[:3], layers=(0, -1), chunk=4)
  single = aimjax.extract_features(model, params, images[5:6], layers=(-1,), chunk=4)
  assert all7[1].shape == (7, 16, 64)
  np.testing.assert_array_equal(all7[0][:3], first3[0])
  np.testing.assert_array_equal(all7[1][:3], first3[1])
  np.testing.assert_array_equal(all7[1][5:6], single[0])


def test_export_round_trip_is_exact_for_every_dtype(tmp_path):
  params = {"a": {"kernel": np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)},
            "b": np.arange(6, dtype=np.float32).astype(ml_dtypes.bfloat16).reshape(2, 3),
            "c": jnp.arange(5, dtype=jnp.int32)}
  path = str(tmp_path / "p.safetensors")
  export.save_safetensors(params, path, {"model": {"width": 4}})
  back, cfg = export.load_safetensors(path)
  assert cfg == {"model": {"width": 4}}
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
    assert np.asarray(a).dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), b)


def test_load_a_training_workdir_and_its_safetensors_export(tiny_aim_config, tmp_path):
  cfg = tiny_aim_config
  cfg.total_steps, cfg.eval_every, cfg.checkpoint_every, cfg.log_every = 3, 0, 3, 1
  cfg.optimizer.warmup_steps = 1
  from aimjax import train as aim_train
  workdir = str(tmp_path / "run")
  loop.train(cfg, workdir, aim_train.build_task(cfg))
  model, params, preprocess = aimjax.load(workdir)
  assert model.width == 64 and model.image_size == 56
  images = preprocess(np.random.default_rng(1).integers(0, 255, (2, 70, 90, 3), np.uint8))
  assert images.shape == (2, 56, 56, 3)
  feats = aimjax.extract_features(model, params, images)[0]
  path = str(tmp_path / "aim.safetensors")
  export.save_safetensors(params, path, {"model": dict(cfg.model)})
  model2, params2, _ = aimjax.load(path)
  np.testing.assert_array_equal(aimjax.extract_features(model2, params2, images)[0], feats)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no AIM checkpoint or variant named"):
    aimjax.load(str(tmp_path / "nope.safetensors"))


@pytest.mark.skipif(not FIXTURE.exists(), reason=f"{FIXTURE} absent: ../shared/ not beside the checkout")
def test_convert_cli_writes_a_workdir_that_reproduces_official_features(tmp_path):
  from safetensors.numpy import load_file, save_file
  fx = load_file(str(FIXTURE))
  official = str(tmp_path / "aim_small.safetensors")   # the state dict alone, as released
  save_file({k: v for k, v in fx.items() if not k.startswith("__")}, official)
  out = str(tmp_path / "converted")
  proc = subprocess.run([sys.executable, "-m", "aimjax.convert", f"--input={official}",
                         f"--out={out}", "--image_size=56", "--num_heads=4"], cwd=ROOT, env=subprocess_env(),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert {"config.json", "params.safetensors", "probe.safetensors"} <= set(os.listdir(out))
  images = fx["__input__"].transpose(0, 2, 3, 1)
  for source in (out, os.path.join(out, "params.safetensors"), official):
    model, params, _ = aimjax.load(source, image_size=56, num_heads=4)
    feats = aimjax.extract_features(model, params, images, layers=(1, 3))
    np.testing.assert_allclose(feats[1], fx["__block_3__"], atol=1e-4)
    np.testing.assert_allclose(feats[0], fx["__block_1__"], atol=1e-4)


def test_convert_cli_refuses_a_mismatched_state_dict(tmp_path):
  from safetensors.numpy import save_file
  bad = str(tmp_path / "bad.safetensors")
  save_file({"preprocessor.patchifier.proj.weight": np.zeros((64, 3, 14, 14), np.float32)}, bad)
  proc = subprocess.run([sys.executable, "-m", "aimjax.convert", f"--input={bad}",
                         f"--out={tmp_path / 'o'}", "--num_heads=4"], cwd=ROOT, env=subprocess_env(),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "missing keys" in proc.stderr and "trunk.post_trunk_norm.weight" in proc.stderr
