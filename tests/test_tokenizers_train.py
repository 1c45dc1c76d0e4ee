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


@pytest.mark.slow     # about 50 s
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


@pytest.mark.slow
def test_segmentation_tokenizer_beats_the_class_frequency_prediction(tmp_path):
  cfg, row = _train("semantic", str(tmp_path))
  x = _eval_targets(cfg, "semantic")
  p = np.bincount(x.ravel(), minlength=7) / x.size
  baseline = float(-np.sum(p[p > 0] * np.log(p[p > 0])))   # CE of predicting the frequencies
  rec = row["eval/reconstruction"]
  assert rec < 0.5 * baseline, (rec, baseline)


@pytest.mark.slow
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
  tok = tok_lib.Tokenizer(str(tmp_path))
  assert tok([crop])[0].shape == (4, 4)


@pytest.mark.slow
def test_diffusion_decoder_depth_tokenizer_reconstructs_from_tokens(tmp_path):
  """ViT encoder + VQ + UNet diffusion decoder (configs/tokenizers/diffusion.py): decoding the
  tokens with 25 DDIM steps from noise beats the mean prediction of standardised depth."""
  from tokenizers_jax import tokenize as tok_lib
  cfg = load_config("configs/tokenizers/diffusion.py", "modality=depth,variant=tiny")
  cfg.total_steps, cfg.eval_every, cfg.checkpoint_every = 150, 150, 150
  cfg.diffusion.base_channels, cfg.diffusion.channel_mult = 16, (1, 2, 2)   # a faster UNet
  cfg.data.eval, cfg.data.eval_batches = "scenes:64", 1
  loop.train(cfg, str(tmp_path), tok_train.build_task(cfg))
  tok = tok_lib.Tokenizer(str(tmp_path))
  x = _eval_targets(cfg, "depth")[:16]
  tokens = tok(list(x))
  assert tokens.shape == (16, 4, 4)
  recon = tok.detokenize(tokens)[..., 0]
  err, baseline = float(np.abs(recon - x).mean()), float(np.abs(x).mean())
  assert err < 0.3 * baseline, (err, baseline)          # measured: about 0.09 vs 0.79
  # the sample is deterministic for a seed, and another seed draws another sample
  np.testing.assert_array_equal(tok.detokenize(tokens)[..., 0], recon)
  assert not np.array_equal(tok.detokenize(tokens, seed=1)[..., 0], recon)
  assert (tmp_path / "reconstructions" / "step_000150.png").exists()


def test_pose_mlp_dvae_gives_8_tokens_and_beats_the_mean_pose(tmp_path):
  """4M-21 App. D.2 (tiny): SMPL body pose [207] -> 8 tokens -> pose, on synthetic poses."""
  from tokenizers_jax import poses, tokenize as tok_lib
  rot = poses.rotation_matrices(np.array([[0.0, 0.0, np.pi / 2]]))[0]
  np.testing.assert_allclose(rot @ [1, 0, 0], [0, 1, 0], atol=1e-12)   # Rodrigues, z by 90 deg
  cfg = load_config("configs/tokenizers/mlp_vae.py", "target=pose,variant=tiny")
  loop.train(cfg, str(tmp_path), tok_train.build_task(cfg))
  tok = tok_lib.Tokenizer(str(tmp_path))
  train = np.stack([poses.synthetic_body_pose(0, i) for i in range(2000)])
  val = np.stack([poses.synthetic_body_pose(1_000_003, i) for i in range(512)])
  tokens = tok(list(val))
  assert tokens.shape == (512, 8) and tokens.max() < 256
  smooth_l1 = lambda d: float(np.mean(np.where(np.abs(d) < 1, 0.5 * d * d, np.abs(d) - 0.5)))
  err, baseline = smooth_l1(tok.detokenize(tokens) - val), smooth_l1(val - train.mean(0))
  assert err < 0.6 * baseline, (err, baseline)          # measured: about 0.013 vs 0.036
  assert len(np.unique(tokens)) > 16                     # the codebook is used


FULL_SIZE = [  # config, argument, parameters in millions
    # two ViT-B/16 stacks of 12 blocks (7.1M each), each closed by the official tanh post-MLP
    # (4.7M), and the patch projections
    ("configs/tokenizers/vqvae.py", "modality=rgb,variant=B16", (175, 190)),
    # one ViT-B/16 encoder (86M) and the UNet (base 128, mults 1-2-3-4, 3 blocks a level)
    ("configs/tokenizers/diffusion.py", "modality=rgb,variant=B16", (190, 215)),
    # two bottleneck MLPs of 6 blocks at width 1024 (8.4M each)
    ("configs/tokenizers/mlp_vae.py", "target=pose,variant=paper", (95, 110)),
]


@pytest.mark.parametrize("path,arg,millions", FULL_SIZE,
                         ids=["vqvae-B16", "diffusion-B16", "mlp_vae-paper"])
def test_full_size_tokenizers_by_shape_and_a_lowered_train_step(path, arg, millions):
  """The paper-size tokenizers, never run: parameter counts by jax.eval_shape, token grids at
  224 and 448 (resolution-agnostic positions), and the whole train step traced and lowered
  on abstract state and batch with the core's sharding."""
  import flax.linen as nn
  from pretrain_jax import mesh as mesh_lib, optim, partitioning, train_state as ts
  cfg = load_config(path, arg)
  task = tok_train.build_task(cfg)
  model = tok_train.build_model(cfg)
  boxed = ts.abstract_params(task.init_params, jax.random.key(0))
  n = ts.count_params(nn.unbox(boxed))
  assert millions[0] * 1e6 < n < millions[1] * 1e6, n
  vector = cfg.kind == "mlp_vae"
  if vector:
    x = jax.ShapeDtypeStruct((2, cfg.model.in_dim), np.float32)
    variables = {"params": nn.unbox(boxed)}
    assert jax.eval_shape(lambda v, x: model.apply(v, x, method=model.tokenize),
                          variables, x).shape == (2, cfg.model.num_tokens)
  else:
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                                  *_init_inputs(cfg, 224)))
    for size, grid in ((224, 14), (448, 28)):
      x = jax.ShapeDtypeStruct((2, size, size, 3), np.float32)
      tokens = jax.eval_shape(lambda v, x: model.apply(v, x, method=model.tokenize), variables, x)
      assert tokens.shape == (2, grid, grid) and tokens.dtype == np.int32
  tx, schedule = optim.create_optimizer(cfg.optimizer, cfg.total_steps, nn.unbox(boxed))
  mesh = mesh_lib.create_mesh(cfg.mesh, jax.devices()[:1])
  state, shardings = ts.abstract_train_state(task.init_params, tx, jax.random.key(0), mesh,
                                             partitioning.RULES, task.init_extra)
  shape = (cfg.batch_size, cfg.model.in_dim) if vector else (cfg.batch_size, 224, 224, 3)
  batch = {"x": jax.ShapeDtypeStruct(shape, np.float32),
           "valid": jax.ShapeDtypeStruct((cfg.batch_size,), np.float32)}
  step = jax.jit(loop.make_train_step(task, tx, schedule),
                 in_shardings=(shardings, partitioning.batch_sharding(mesh)),
                 out_shardings=(shardings, None))
  with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.RULES):
    traced = step.trace(state, batch)
    traced.lower()                                      # sharding and shapes check out
  out_state, metrics = traced.out_info
  assert metrics["loss"].shape == () and "perplexity" in metrics
  assert jax.tree.structure(out_state) == jax.tree.structure(state)


def _init_inputs(cfg, size):
  x = np.zeros((1, size, size, 3), np.float32)
  if cfg.kind == "diffusion":
    return x, np.ones((1,), np.int32), x
  return (x,)


@pytest.mark.slow     # about 75 s
def test_feature_map_tokenizer_on_aim_features_beats_the_mean_feature(tmp_path):
  """Feature maps (CLIP/DINOv2-style; here the aim_features labeller's) -> one token per
  feature vector, smooth L1 (4M Table 3's feature-map tokenizers)."""
  from fourm_jax import pseudo_label as pl
  from tokenizers_jax import tokenize as tok_lib
  pcfg = load_config("configs/fourm/pseudo_label.py", "scenes")
  pcfg.resolution, pcfg.shards, pcfg.labellers = 32, 1, ("aim_features",)
  pcfg.labeller_options.aim_features.image_size = 56          # the tiny AIM: a 4 x 4 map
  pcfg.labeller_options.aim_features.init_from = "random:tiny"
  pl.pseudo_label(pcfg, "scenes:160", str(tmp_path / "labelled"))
  cfg = load_config("configs/tokenizers/vqvae.py", "modality=features,variant=tiny")
  cfg.data.train = cfg.data.eval = f"arrayrecord:{tmp_path}/labelled/*.array_record"
  cfg.total_steps, cfg.eval_every, cfg.checkpoint_every = 200, 200, 200
  loop.train(cfg, str(tmp_path / "tok"), tok_train.build_task(cfg))
  tok = tok_lib.Tokenizer(str(tmp_path / "tok"))
  assert tok.config.model.feature_dim == 64 and tok.config.data.resolution == 4
  ds = tok_train._dataset(cfg.data, cfg.data.eval, "features", "eval")
  x = np.stack([ds[i]["x"] for i in range(64)])                   # [64, 4, 4, 64]
  shards = tok_train.multimodal.dataset(f"{tmp_path}/labelled/*.array_record",
                                        fields=("aim_features",))
  raw = [shards[i]["aim_features"] for i in range(64)]          # as stored: float16 [16, 64]
  tokens = tok(raw)
  assert tokens.shape == (64, 4, 4)
  recon = tok.detokenize(tokens)
  smooth_l1 = lambda d: float(np.mean(np.where(np.abs(d) < 1, 0.5 * d * d, np.abs(d) - 0.5)))
  err, baseline = smooth_l1(recon - x), smooth_l1(x - x.mean((0, 1, 2)))
  assert err < 0.6 * baseline, (err, baseline)
  assert (tmp_path / "tok" / "reconstructions" / "step_000200.png").exists()
