"""Tiny ViT VQ-VAE tokenizers trained on the shared core (tokenizers_jax.train)."""
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import load_config
from pretrain_jax import export, loop, metrics as metrics_lib
from tokenizers_jax import train as tok_train


def _train(modality, workdir, steps=300):
  """Trains the tiny tokenizer of `modality`; returns (config, metrics row of the last step)."""
  cfg = load_config("configs/tokenizers/vqvae.py", f"modality={modality},variant=tiny")
  cfg.total_steps, cfg.eval_every, cfg.checkpoint_every = steps, steps, steps
  cfg.data.eval, cfg.data.eval_batches = "scenes:64", 2
  loop.train(cfg, workdir, tok_train.build_task(cfg))
  return cfg, metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))[steps]


def _eval_targets(cfg, modality):
  ds = tok_train._dataset(cfg.data, cfg.data.eval, modality, "eval")
  return np.stack([ds[i]["x"] for i in range(64)])


def test_depth_tokenizer_beats_the_mean_prediction(tmp_path):
  """Depth is standardised per image, so the per-image mean predicts 0: the
  baseline is the smooth-L1 of the standardised depth itself."""
  cfg, row = _train("depth", str(tmp_path))
  x = _eval_targets(cfg, "depth")
  baseline = float(np.mean(np.where(np.abs(x) < 1, 0.5 * x * x, np.abs(x) - 0.5)))
  rec = row["eval/reconstruction"]
  assert rec < 0.25 * baseline, (rec, baseline)      # measured: about 0.015 vs 0.40
  assert row["eval/perplexity"] > 16                  # the codebook is used, not collapsed
  from PIL import Image
  grid = np.asarray(Image.open(tmp_path / "reconstructions" / "step_000300.png"))
  assert grid.shape == (2 * 34, 8 * 34, 3) and grid.std() > 10   # targets over reconstructions

  # the EMA codebook is part of the checkpointed state and moved away from its init
  restored = ocp.StandardCheckpointer().restore(
      os.path.join(tmp_path, "checkpoints", "300", "state"))
  vq = restored["extra"]["vq"]["quantizer"]
  assert vq["codebook"].shape == (256, 32) and float(np.sum(vq["ema_count"])) > 0
  # params and codebook export to safetensors and back exactly
  path = str(tmp_path / "tok.safetensors")
  export.save_safetensors({"params": restored["params"], **restored["extra"]}, path,
                          {"modality": "depth"})
  back, meta = export.load_safetensors(path)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves({"params": restored["params"],
                                                          **restored["extra"]})):
    np.testing.assert_array_equal(a, b)
  assert meta == {"modality": "depth"}


def test_segmentation_tokenizer_beats_the_class_frequency_prediction(tmp_path):
  cfg, row = _train("semantic", str(tmp_path))
  x = _eval_targets(cfg, "semantic")
  p = np.bincount(x.ravel(), minlength=7) / x.size
  baseline = float(-np.sum(p[p > 0] * np.log(p[p > 0])))   # CE of predicting the frequencies
  rec = row["eval/reconstruction"]
  assert rec < 0.5 * baseline, (rec, baseline)


def test_sam_instance_mask_tokenizer_gives_16_tokens_and_beats_the_pixel_prior(tmp_path):
  """4M-21 App. D.3: one instance, cropped to its box and resized to 64 x 64, -> 16 tokens."""
  from tokenizers_jax import tokenize as tok_lib
  from pretrain_jax.data.scenes import render_scene
  truth = render_scene(0, 3, 64)
  crop = tok_train.instance_mask_crop(truth["instance"], truth["boxes"], 0, 64)
  assert crop.shape == (64, 64) and crop[32, 32] == 1 and 0.3 < crop.mean() <= 1
  cfg, row = _train("sam_mask", str(tmp_path), steps=150)
  x = _eval_targets(cfg, "sam_mask")
  p = x.mean()
  baseline = float(-(p * np.log(p) + (1 - p) * np.log(1 - p)))
  assert row["eval/reconstruction"] < 0.5 * baseline, (row["eval/reconstruction"], baseline)
  tok = tok_lib.ImageTokenizer(str(tmp_path))
  assert tok([crop])[0].shape == (4, 4)
