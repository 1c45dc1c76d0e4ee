"""4M pretraining end to end on scenes token shards (fourm_jax.train)."""
import os

import numpy as np
import pytest

from conftest import load_config
from fourm_jax import pseudo_label as pl
from fourm_jax import train as fourm_train
from pretrain_jax import loop, metrics as metrics_lib
from pretrain_jax.data import multimodal
from pretrain_jax.data.scenes import SEMANTIC_CLASSES, render_scene
from tokenizers_jax import text, tokenize as tok_lib
from tokenizers_jax import train as tok_train


@pytest.fixture(scope="module")
def token_shards(tmp_path_factory):
  """scenes -> labelled shards -> tiny rgb/depth tokenizers + WordPiece -> token shards."""
  root = tmp_path_factory.mktemp("fourm")
  cfg = load_config("configs/fourm/pseudo_label.py", "scenes")
  cfg.resolution, cfg.shards, cfg.labellers = 32, 2, ()
  pl.pseudo_label(cfg, "scenes:256", str(root / "labelled"))
  tcfg = load_config("configs/tokenizers/tokenize.py", "")
  for modality in ("rgb", "depth"):
    c = load_config("configs/tokenizers/vqvae.py", f"modality={modality},variant=tiny")
    c.total_steps, c.checkpoint_every, c.eval_every = 60, 60, 0
    loop.train(c, str(root / f"tok_{modality}"), tok_train.build_task(c))
    tcfg.image_tokenizers[modality] = str(root / f"tok_{modality}")
  captions = [render_scene(0, i, 32)["caption"] for i in range(300)]
  wp = text.fit_wordpiece(captions, vocab_size=4500, extra_words=text.MARKER_WORDS + SEMANTIC_CLASSES)
  wp.save(str(root / "text.json"))
  tcfg.text_tokenizer = str(root / "text.json")
  tok_lib.tokenize(tcfg, f"{root}/labelled/*.array_record", str(root / "tokens"))
  return root / "tokens"


def test_tiny_4m_trains_on_scenes_tokens_and_the_loss_falls(token_shards, tmp_path):
  cfg = load_config("configs/fourm/pretrain.py", "variant=tiny")
  cfg.data.train = f"{token_shards}/*.array_record"
  cfg.data.eval = cfg.data.train
  cfg.total_steps, cfg.log_every, cfg.eval_every, cfg.checkpoint_every = 150, 10, 150, 150
  rec = multimodal.dataset(cfg.data.train)[0]
  assert rec["tok_rgb"].shape == (4, 4) and rec["caption"][-1] == text.EOS_ID
  loop.train(cfg, str(tmp_path), fourm_train.build_task(cfg))
  rows = metrics_lib.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  first, last = rows[10], rows[150]
  for key in ("loss/tok_rgb@32", "loss/tok_depth@32", "loss/caption"):
    assert key in last
  # starts near the uniform guess (mean of log V) and falls well below it
  assert first["loss"] > 4.0, first["loss"]
  assert last["eval/loss"] < 0.75 * first["loss"], (first["loss"], last["eval/loss"])
  assert last["loss/caption"] < 0.5 * np.log(4500)
