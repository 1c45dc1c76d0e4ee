"""4M pretraining end to end on scenes token shards (fourm_jax.train)."""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, config_module, load_config, subprocess_env
from fourm_jax import pseudo_label as pl
from fourm_jax import train as fourm_train
from pretrain_jax import loop, metrics as metrics_lib
from pretrain_jax.data import multimodal
from pretrain_jax.data.scenes import SEMANTIC_CLASSES, render_scene
from tokenizers_jax import text, tokenize as tok_lib
from tokenizers_jax import train as tok_train


# the module trains tokenizers and a tiny 4M (about 4 min of one worker): the slow suite
pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def token_shards(tmp_path_factory):
  """scenes -> labelled shards (with a random tiny AIM's global embedding) -> tiny rgb/depth
  tokenizers, the global embedding's MLP dVAE and WordPiece -> token shards."""
  root = tmp_path_factory.mktemp("fourm")
  cfg = load_config("configs/fourm/pseudo_label.py", "scenes")
  cfg.resolution, cfg.shards, cfg.labellers = 32, 2, ("aim_features",)
  cfg.labeller_options.aim_features.image_size = 56
  cfg.labeller_options.aim_features.init_from = "random:tiny"
  pl.pseudo_label(cfg, "scenes:256", str(root / "labelled"))
  tcfg = load_config("configs/tokenizers/tokenize.py", "")
  for modality in ("rgb", "depth"):
    c = load_config("configs/tokenizers/vqvae.py", f"modality={modality},variant=tiny")
    c.total_steps, c.checkpoint_every, c.eval_every = 60, 60, 0
    loop.train(c, str(root / f"tok_{modality}"), tok_train.build_task(c))
    tcfg.image_tokenizers[modality] = str(root / f"tok_{modality}")
  c = load_config("configs/tokenizers/mlp_vae.py", "target=global,variant=tiny")
  c.data.train = f"arrayrecord:{root}/labelled/*.array_record"
  c.total_steps, c.checkpoint_every, c.eval_every = 60, 60, 0
  loop.train(c, str(root / "tok_aim_global"), tok_train.build_task(c))
  tcfg.vector_tokenizers.aim_global = str(root / "tok_aim_global")
  captions = [render_scene(0, i, 32)["caption"] for i in range(300)]
  wp = text.fit_wordpiece(captions, vocab_size=4500, extra_words=text.MARKER_WORDS + SEMANTIC_CLASSES)
  wp.save(str(root / "text.json"))
  tcfg.text_tokenizer = str(root / "text.json")
  tok_lib.tokenize(tcfg, f"{root}/labelled/*.array_record", str(root / "tokens"))
  return root / "tokens"


def _tiny(token_shards, **datasets):
  cfg = load_config("configs/fourm/pretrain.py", "variant=tiny")
  cfg.data.datasets.scenes.train = f"{token_shards}/*.array_record"
  cfg.data.datasets.scenes.eval = cfg.data.datasets.scenes.train
  for name, ds in datasets.items():
    cfg.data.datasets[name] = ds
  return cfg


@pytest.fixture(scope="module")
def trained(token_shards, tmp_path_factory):
  """A tiny 4M trained 150 steps on the scenes tokens: (workdir, metrics rows)."""
  workdir = str(tmp_path_factory.mktemp("fourm_tiny"))
  cfg = _tiny(token_shards)
  cfg.total_steps, cfg.log_every, cfg.eval_every, cfg.checkpoint_every = 150, 10, 150, 150
  rec = multimodal.dataset(cfg.data.datasets.scenes.train)[0]
  assert rec["tok_rgb"].shape == (4, 4) and rec["caption"][-1] == text.EOS_ID
  assert rec["image"].shape == (32, 32, 3)       # tokenize copies the RGB pixels
  loop.train(cfg, workdir, fourm_train.build_task(cfg))
  return workdir, metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))


def test_tiny_4m_trains_on_scenes_tokens_and_the_loss_falls(trained):
  _, rows = trained
  first, last = rows[10], rows[150]
  for key in ("loss/tok_rgb@32", "loss/tok_depth@32", "loss/caption"):
    assert key in last
  # starts near the uniform guess (mean of log V) and falls well below it
  assert first["loss"] > 4.0, first["loss"]
  assert last["eval/loss"] < 0.75 * first["loss"], (first["loss"], last["eval/loss"])
  assert last["loss/caption"] < 0.5 * np.log(4500)


@pytest.mark.slow
def test_killed_4m_run_resumes_with_exactly_the_uninterrupted_losses(token_shards, tmp_path):
  """kill -9 at step 7 (checkpoints every 3 steps), resume: every logged loss is bit-identical
  to an uninterrupted run, masks and data order included."""
  fast = {"total_steps": 10, "log_every": 1, "checkpoint_every": 3, "eval_every": 0,
          "optimizer.warmup_steps": 3}
  cfg = _tiny(token_shards)
  cfg.update_from_flattened_dict(fast)
  loop.train(cfg, str(tmp_path / "straight"), fourm_train.build_task(cfg))
  straight = metrics_lib.read_jsonl(str(tmp_path / "straight" / "metrics.jsonl"))
  workdir = str(tmp_path / "killed")
  cmd = [sys.executable, "-m", "fourm_jax.train", "--config=configs/fourm/pretrain.py:variant=tiny",
         f"--workdir={workdir}",
         f"--config.data.datasets.scenes.train={cfg.data.datasets.scenes.train}",
         "--config.debug.crash_at_step=7", *[f"--config.{k}={v}" for k, v in fast.items()]]
  proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  cfg.debug.crash_at_step = 0
  loop.train(cfg, workdir, fourm_train.build_task(cfg))
  resumed = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert {s: r["loss"] for s, r in resumed.items()} == {s: r["loss"] for s, r in straight.items()}
  assert sorted(resumed) == list(range(1, 11))


def test_co_training_mixes_datasets_by_weight_and_masks_absent_modalities(token_shards):
  """A text-only dataset (caption alone: language modelling, as 4M-21 uses C4) at weight 0.25
  beside the full scenes set: the batches hold the datasets in proportion, and the text-only
  samples have no other modality as input or target."""
  pre = config_module("configs/fourm/pretrain.py")
  cfg = _tiny(token_shards, text=pre.dataset(f"{token_shards}/*.array_record", weight=1 / 3,
                                             fields={"caption": "caption"},
                                             strategies=[pre.all2all(1.0)]))
  cfg.data.datasets.scenes.repeats = 2
  task = fourm_train.build_task(cfg)
  it = iter(task.train_data(tuple(range(cfg.batch_size))))
  batches = [next(it) for _ in range(8)]
  ds = np.concatenate([b["dataset"] for b in batches])
  assert abs(np.mean(ds == 1) - 0.25) < 0.03, np.mean(ds == 1)
  for b in batches:
    text_rows = b["dataset"] == 1
    for name in ("rgb@32", "tok_rgb@32", "tok_depth@32"):
      assert b[name]["input_mask"][text_rows].all() and b[name]["target_mask"][text_rows].all()
    cap = b["caption"]
    assert (~cap["input_mask"][text_rows]).any(axis=1).all()      # the caption is input...
    assert (~cap["target_mask"][text_rows]).any(axis=1).all()     # ...and target
    scene_rows = ~text_rows
    given = sum((~b[n]["input_mask"][scene_rows]).sum(1) for n in ("rgb@32", "tok_rgb@32",
                                                                   "tok_depth@32", "caption"))
    assert (given <= cfg.masking.input_tokens).all() and (given > 0).all()
  # the loss sees both datasets
  import jax
  params = jax.jit(task.init_params)(jax.random.key(0))
  loss, metrics = jax.jit(task.loss_fn)(params, jax.tree.map(np.asarray, batches[0]),
                                        jax.random.key(1))
  assert np.isfinite(float(loss)) and 0 < float(metrics["data/share_text"]) < 1


def test_4m_encoder_is_a_backbone_for_the_aim_probe(trained, tmp_path):
  from aimjax import probe as probe_lib
  from fourm_jax import backbone as backbone_lib
  workdir, _ = trained
  bb, params = backbone_lib.load(workdir)
  assert (bb.modality, bb.image_size, bb.num_patches, bb.width) == ("rgb@32", 32, 16, 64)
  images = np.stack([render_scene(7, i, 32)["rgb"] for i in range(5)])
  (f5,) = bb.extract(params, images, chunk=4)
  (f1,) = bb.extract(params, images[:1], chunk=4)
  assert f5.shape == (5, 16, 64) and np.isfinite(f5).all()
  np.testing.assert_allclose(f1[0], f5[0], atol=1e-5)     # independent of the batch
  cfg = load_config("configs/aim/probe.py", "variant=tiny")
  cfg.backbone, cfg.init_from = "fourm", workdir
  cfg.data.image_size, cfg.data.scenes_resolution = 32, 32
  cfg.data.train, cfg.data.eval, cfg.epochs, cfg.batch_size = "scenes:256", "scenes:128", 2, 32
  cfg.optimizer.warmup_steps = 4
  result = probe_lib.train_probes(cfg, str(tmp_path))
  assert result["backbone"] == "fourm" and set(result["top1"]) == {"0", "1"}
  assert all(0.0 <= a <= 1.0 for a in result["top1"].values())
  assert os.path.exists(tmp_path / "probe_results.json")
  cfg.lora.rank = 4
  with pytest.raises(ValueError, match="LoRA adapters exist for AIM trunks only"):
    probe_lib.train_probes(cfg, str(tmp_path / "lora"))


def test_init_from_copies_matching_parameters_and_keeps_new_ones(trained, token_shards):
  """A model with one more target modality starts from the trained run: shared parameters
  are copied, the new modality's embedding keeps its initialisation."""
  import jax
  import flax.linen as nn
  from pretrain_jax import checkpoint as checkpoint_lib
  workdir, _ = trained
  cfg = _tiny(token_shards)
  cfg.modalities["tok_normal@32"] = {"kind": "image", "vocab_size": 256, "grid": (4, 4)}
  cfg.model.targets = tuple(cfg.model.targets) + ("tok_normal@32",)
  model = fourm_train.build_model(cfg)
  fresh = nn.unbox(jax.jit(lambda r: model.init(r, fourm_train.dummy_batch(model), 24, 24))(
      jax.random.key(3))["params"])
  params, report = checkpoint_lib.warm_start(fresh, workdir)
  assert "['dec_tok_tok_normal_at_32']['embedding']" in report["new"]
  assert len(report["copied"]) > 20 and not report["mismatched"]
  from fourm_jax import backbone as backbone_lib
  _, trained_params = backbone_lib.load(workdir)
  np.testing.assert_array_equal(np.asarray(params["encoder_0"]["mlp"]["fc1"]["kernel"]),
                                trained_params["encoder_0"]["mlp"]["fc1"]["kernel"])
  np.testing.assert_array_equal(np.asarray(params["dec_tok_tok_normal_at_32"]["embedding"]),
                                np.asarray(fresh["dec_tok_tok_normal_at_32"]["embedding"]))
  with pytest.raises(ValueError, match="no parameter of its checkpoint matches"):
    checkpoint_lib.warm_start({"other": np.zeros(3)}, workdir)


def _val_scenes(n, seed=11):
  out = []
  for i in range(n):
    s = render_scene(seed, i, 32)
    out.append({"image": s["rgb"], "depth": s["depth"], "normals": s["normals"],
                "semantic": s["semantic"], "boxes": s["boxes"], "box_classes": s["box_classes"],
                "caption": s["caption"]})
  return out


@pytest.mark.slow
def test_generate_cli_writes_images_and_captions(trained, token_shards, tmp_path):
  from PIL import Image
  from fourm_jax import figure, generate
  workdir, _ = trained
  root = token_shards.parent
  Image.fromarray(render_scene(11, 0, 32)["rgb"]).save(tmp_path / "scene.png")
  result = generate.run(workdir, [f"rgb:{tmp_path}/scene.png"], ["depth", "caption", "rgb"],
                        str(tmp_path / "out"), [str(root / "tok_rgb"), str(root / "tok_depth")],
                        str(root / "text.json"), num_samples=2, steps=4, temperature=0.5)
  assert result["targets"] == ["tok_depth@32", "caption", "tok_rgb@32"]
  assert result["columns"] == ["rgb@32", "tok_depth@32", "caption", "tok_rgb@32"]
  assert result["titles"] == ["condition: rgb@32", "-> tok_depth@32", "-> caption",
                              "-> tok_rgb@32"]
  png = np.asarray(Image.open(tmp_path / "out" / "generations.png"))
  kinds = [(None, k, None) for k in ("image", "image", "text", "image")]
  assert png.shape == figure.figure_size(kinds, 2, 128) + (3,)   # 32 px tiles drawn at 128
  captions = result["sequences"]["caption"]
  assert len(captions) == 2 and all(isinstance(c, str) and c for c in captions)
  toks = np.load(tmp_path / "out" / "tokens.npz")
  assert toks["tok_depth_at_32"].shape == (2, 16) and (toks["tok_depth_at_32"] < 256).all()
  with pytest.raises(ValueError, match="no modality of the model matches 'normals'"):
    generate.run(workdir, [], ["normals"], str(tmp_path / "bad"))
  # the command line
  proc = subprocess.run([sys.executable, "-m", "fourm_jax.generate", f"--workdir={workdir}",
                         f"--condition=rgb:{tmp_path}/scene.png", "--targets=caption,depth",
                         f"--tokenizers={root / 'tok_depth'}", f"--text_tokenizer={root / 'text.json'}",
                         "--num_samples=1", "--steps=2", f"--out={tmp_path / 'cli'}"],
                        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.startswith("caption: ") and (tmp_path / "cli" / "generations.png").exists()


def test_tiny_4m_generates_depth_from_rgb_better_than_the_mean_depth(trained, token_shards):
  from fourm_jax import evaluate, load as load_lib
  from tokenizers_jax.tokenize import Tokenizer
  workdir, _ = trained
  model, params, _ = load_lib.load(workdir)
  tok = Tokenizer(str(token_shards.parent / "tok_depth"))
  result = evaluate.evaluate(model, params, _val_scenes(48), {"depth": tok}, ["tok_depth@32"],
                             steps=4, temperature=0.0, batch_size=16)
  r = result["tok_depth@32"]
  # the tokenizer bound < the model < the mean depth (standardised L1)
  assert r["tokenizer_bound"] < r["model"] < 0.8 * r["baseline"], r


@pytest.mark.slow
def test_tiny_4m_on_two_processes_gives_the_one_process_losses(token_shards, tmp_path):
  """launch/local.sh --processes=2 --fake-devices=4 and --fake-devices=8, same arguments:
  the same loss at every logged step (masks and data order depend on the global row only)."""
  args = ["fourm_jax.train", "--config=configs/fourm/pretrain.py:variant=tiny",
          f"--config.data.datasets.scenes.train={token_shards}/*.array_record",
          "--config.total_steps=30", "--config.log_every=10", "--config.mesh.fsdp=8",
          "--config.eval_every=0"]
  losses = {}
  for name, launch in (("one", ["--fake-devices=8"]),
                       ("two", ["--processes=2", "--fake-devices=4"])):
    proc = subprocess.run(["bash", "launch/local.sh", *launch, *args,
                           f"--workdir={tmp_path / name}"], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = metrics_lib.read_jsonl(str(tmp_path / name / "metrics.jsonl"))
    losses[name] = {s: r["loss"] for s, r in rows.items()}
  assert sorted(losses["one"]) == sorted(losses["two"]) == [10, 20, 30]
  for step, loss in losses["one"].items():
    assert abs(loss - losses["two"][step]) <= 1e-5, (step, loss, losses["two"][step])
