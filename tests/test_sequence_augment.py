"""4M-21's sequence augmentation at training time (fourm_jax.sequence_augment, issue 21).

The official loader draws a palette of 1..7 colours (`random.randint(1, 7)`)
and shuffles the metadata entries (`MetadataTransform(shuffle=True)`) at every
load; token shards keep the raw values so that the 4M pipeline does the same.
"""
import os

import grain
import numpy as np
import pytest

from conftest import load_config
from fourm_jax import pseudo_label as pl, sequence_augment, train as fourm_train
from pretrain_jax.data import multimodal, schema as schema_lib
from pretrain_jax.data.scenes import render_scene
from tokenizers_jax import sequences, text, tokenize as tok_lib

N = 12


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  root = tmp_path_factory.mktemp("seqaug")
  cfg = load_config("configs/fourm/pseudo_label.py", "scenes")
  cfg.resolution, cfg.shards = 32, 2
  cfg.labellers = ("color_palette", "image_metadata", "caption_length")
  pl.pseudo_label(cfg, f"scenes:{N}", str(root / "labelled"))
  captions = [render_scene(0, i, 32)["caption"] for i in range(100)]
  text.fit_wordpiece(captions, vocab_size=4500).save(str(root / "text.json"))
  tcfg = load_config("configs/tokenizers/tokenize.py", "")
  tcfg.text_tokenizer = str(root / "text.json")
  tcfg.max_len = 64
  tok_lib.tokenize(tcfg, f"{root}/labelled/*.array_record", str(root / "tokens"))
  return root


def test_token_shards_keep_raw_palettes_metadata_and_their_vocabulary(shards):
  out = shards / "tokens"
  schema = schema_lib.read_schema(str(out))
  assert {"color_palette", "metadata", "color_palette_raw", "metadata_raw"} <= set(schema)
  assert (out / sequences.TOKENIZER_FILE).read_text() == (shards / "text.json").read_text()
  rec = multimodal.dataset(f"{out}/*.array_record")[3]
  assert rec["color_palette_raw"].shape == (7, 7, 3)
  wp = text.load(str(shards / "text.json"))
  stored = sequences.decode_metadata(text.decode(wp, rec["metadata"]))
  raw = sequences.metadata_dict(rec["metadata_raw"])
  assert set(stored) == set(raw) and len(raw) >= 5
  for k, v in raw.items():   # the stored ids are the raw values binned
    assert sequences.METADATA_TYPES[k].to_bin(v) == sequences.METADATA_TYPES[k].to_bin(stored[k])


def _epochs(pattern, fields, seed, epochs=2):
  """Each record's augmented sequences in `epochs` passes (no shuffling), as the training
  pipeline's per-record random map draws them."""
  schema = multimodal.schema_of(pattern)
  aug = sequence_augment.for_shards(pattern, fields, schema)
  assert aug is not None
  ds = multimodal.dataset(pattern, fields=tuple(set(fields.values()) | set(aug.raw_fields)))

  class Map(grain.transforms.RandomMap):
    def random_map(self, element, rng):
      return aug(element, rng)
  ds = ds.repeat(epochs).random_map(Map(), seed=seed)
  return [ds[i] for i in range(len(ds))]


def test_two_epochs_give_a_record_other_palette_sizes_and_metadata_orders(shards):
  pattern = f"{shards}/tokens/*.array_record"
  fields = {"color_palette": "color_palette", "metadata": "metadata"}
  wp = text.load(str(shards / "text.json"))
  raw = multimodal.dataset(pattern)
  got = _epochs(pattern, fields, seed=3)
  assert len(got) == 2 * N
  sizes, orders = [], []
  for i, rec in enumerate(got):
    truth = raw[i % N]
    colours = sequences.decode_palette(text.decode(wp, rec["color_palette"]))
    k = len(colours)
    assert 1 <= k <= 7
    np.testing.assert_array_equal(colours, truth["color_palette_raw"][k - 1, :k])
    words = text.decode(wp, rec["metadata"]).split()
    order = tuple(words[0::2])                       # the v1=TYPE tokens, in drawn order
    assert sequences.decode_metadata(" ".join(words)) == sequences.decode_metadata(
        text.decode(wp, truth["metadata"]))          # the same entries, another order
    sizes.append(k)
    orders.append(order)
    assert "color_palette_raw" not in rec and "metadata_raw" not in rec
  changed_size = sum(sizes[i] != sizes[i + N] for i in range(N))
  changed_order = sum(orders[i] != orders[i + N] for i in range(N))
  assert changed_size >= N // 2 and changed_order == N, (sizes, changed_order)
  assert len(set(sizes)) >= 5                         # 1..7 colours are all drawn
  again = _epochs(pattern, fields, seed=3)          # deterministic by seed and position
  for a, b in zip(got, again):
    np.testing.assert_array_equal(a["color_palette"], b["color_palette"])
    np.testing.assert_array_equal(a["metadata"], b["metadata"])


def test_the_4m_training_pipeline_serialises_palettes_per_sample(shards, monkeypatch):
  """fourm_jax.train's pipeline draws the sequences before masking (the masked tensors hold
  sentinels, so the draws are watched where they are made), and only when
  data.augment_sequences is on."""
  cfg = load_config("configs/fourm/pretrain.py", "variant=tiny")
  for name, length in (("color_palette", 32), ("metadata", 64)):
    cfg.modalities[name] = {"kind": "seq", "vocab_size": 4500, "length": length}
  cfg.modalities.caption = {"kind": "seq", "vocab_size": 4500, "length": 64}
  cfg.model.inputs = cfg.model.targets = ("caption", "color_palette", "metadata")
  cfg.data.datasets.scenes.fields = {m: m for m in cfg.model.inputs}
  cfg.data.datasets.scenes.train = f"{shards}/tokens/*.array_record"
  cfg.data.datasets.scenes.eval = ""
  cfg.batch_size = 8
  drawn = []
  texts = sequence_augment.SequenceAugment.texts
  def watch(self, element, rng):
    out = texts(self, element, rng)
    drawn.append(len(sequences.decode_palette(out["color_palette"])))
    return out
  monkeypatch.setattr(sequence_augment.SequenceAugment, "texts", watch)
  for augment in (False, True):
    cfg.data.augment_sequences = augment
    task = fourm_train.build_task(cfg)
    it = iter(task.train_data(list(range(cfg.batch_size))))
    batches = [next(it) for _ in range(3)]
    assert batches[0]["color_palette"]["tensor"].shape[0] == cfg.batch_size
    if not augment:
      assert drawn == []                  # off: the shards' ids as written
  assert len(drawn) >= 3 * cfg.batch_size and len(set(drawn)) >= 4, drawn
