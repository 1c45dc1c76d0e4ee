"""The tiny 4M-21 (configs/fourm/pretrain.py:variant=tiny21) end to end on pseudo-labelled
scenes: a feature map, a global embedding, boxes, palettes and metadata besides RGB, depth
and captions (issue 21)."""
import os

import numpy as np
import pytest

from conftest import load_config
from fourm_jax import pseudo_label as pl, train as fourm_train
from pretrain_jax import loop, metrics as metrics_lib
from pretrain_jax.data import multimodal
from pretrain_jax.data.scenes import SEMANTIC_CLASSES, render_scene
from tokenizers_jax import sequences, text, tokenize as tok_lib
from tokenizers_jax import train as tok_train


def _tokenizer(root, config, arg, name, steps=30, data=""):
  c = load_config(config, arg)
  if data:
    c.data.train = data
    c.data.eval = data
  c.total_steps, c.checkpoint_every, c.eval_every = steps, steps, 0
  c.optimizer.warmup_steps = 5
  loop.train(c, str(root / name), tok_train.build_task(c))
  return str(root / name)


@pytest.mark.slow     # pseudo-labels, four tokenizers, a vocabulary, token shards, 4M: minutes
def test_tiny_4m21_trains_on_pseudo_labelled_scenes(tmp_path):
  root = tmp_path
  labelled = f"arrayrecord:{root}/labelled/*.array_record"
  cfg = load_config("configs/fourm/pseudo_label.py", "scenes")
  cfg.resolution, cfg.shards = 32, 2
  cfg.labeller_options.aim_features.image_size = 56          # the tiny AIM: a 4 x 4 map
  cfg.labeller_options.aim_features.init_from = "random:tiny"
  pl.pseudo_label(cfg, "scenes:128", str(root / "labelled"))
  tcfg = load_config("configs/tokenizers/tokenize.py", "")
  for modality in ("rgb", "depth"):
    tcfg.image_tokenizers[modality] = _tokenizer(
        root, "configs/tokenizers/vqvae.py", f"modality={modality},variant=tiny", f"tok_{modality}")
  features = _tokenizer(root, "configs/tokenizers/vqvae.py", "modality=features,variant=tiny",
                        "tok_features", data=labelled)
  tcfg.outputs = f"tok_aim=aim_features:{features}"     # the feature map under its 4M name
  tcfg.vector_tokenizers.aim_global = _tokenizer(
      root, "configs/tokenizers/mlp_vae.py", "target=global,variant=tiny", "tok_global",
      data=labelled)
  captions = [render_scene(0, i, 32)["caption"] for i in range(300)]
  text.fit_wordpiece(captions, vocab_size=4500,
                     extra_words=text.MARKER_WORDS + SEMANTIC_CLASSES).save(str(root / "text.json"))
  tcfg.text_tokenizer = str(root / "text.json")
  tcfg.max_len = 64
  tok_lib.tokenize(tcfg, f"{root}/labelled/*.array_record", str(root / "tokens"))

  c = load_config("configs/fourm/pretrain.py", "variant=tiny21")
  c.data.datasets.scenes.train = f"{root}/tokens/*.array_record"
  c.data.datasets.scenes.eval = ""
  c.total_steps, c.log_every, c.checkpoint_every, c.eval_every = 40, 5, 40, 0
  rec = multimodal.dataset(c.data.datasets.scenes.train)[0]
  for field in c.data.datasets.scenes.fields.values():
    assert field in rec, field
  assert rec["tok_aim"].shape == (4, 4) and rec["tok_aim_global"].shape == (16,)
  wp = text.load(str(root / "text.json"))
  assert sequences.decode_boxes(text.decode(wp, rec["det"]))[1]     # boxes with class names
  loop.train(c, str(root / "fourm21"), fourm_train.build_task(c))
  rows = metrics_lib.read_jsonl(os.path.join(root / "fourm21", "metrics.jsonl"))   # step -> row
  train_rows = [rows[k] for k in sorted(rows) if "loss" in rows[k]]
  for name in c.model.targets:         # every target modality was predicted, with a finite loss
    seen = [r[f"loss/{name}"] for r in train_rows if f"loss/{name}" in r]
    assert seen and np.isfinite(seen).all(), name
  assert train_rows[-1]["loss"] < train_rows[0]["loss"], (train_rows[0], train_rows[-1])
