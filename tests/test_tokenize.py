"""Pseudo-labelled shards -> token shards (tokenizers_jax.tokenize): content, determinism, resume."""
import glob
import os

import numpy as np
import pytest

from conftest import load_config
from fourm_jax import pseudo_label as pl
from pretrain_jax import loop
from pretrain_jax.data import multimodal, schema as schema_lib
from pretrain_jax.data.scenes import SEMANTIC_CLASSES, render_scene
from tokenizers_jax import sequences, text, tokenize as tok_lib
from tokenizers_jax import train as tok_train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("tok")
  cfg = load_config("configs/fourm/pseudo_label.py", "scenes")
  cfg.resolution, cfg.shards = 32, 3
  assert "aim_features" in cfg.labellers   # the scenes labellers include the AIM features
  cfg.labeller_options.aim_features.image_size = 56          # the tiny AIM's size
  cfg.labeller_options.aim_features.init_from = "random:tiny"
  pl.pseudo_label(cfg, "scenes:9", str(root / "labelled"))
  tcfg = load_config("configs/tokenizers/vqvae.py", "modality=depth,variant=tiny")
  tcfg.total_steps, tcfg.checkpoint_every, tcfg.eval_every = 20, 20, 0
  tcfg.optimizer.warmup_steps = 5
  loop.train(tcfg, str(root / "tok_depth"), tok_train.build_task(tcfg))
  scfg = load_config("configs/tokenizers/vqvae.py", "modality=sam_mask,variant=tiny")
  scfg.total_steps, scfg.checkpoint_every, scfg.eval_every = 10, 10, 0
  scfg.optimizer.warmup_steps = 2
  loop.train(scfg, str(root / "tok_sam"), tok_train.build_task(scfg))
  gcfg = load_config("configs/tokenizers/mlp_vae.py", "target=global,variant=tiny")
  gcfg.data.train = f"arrayrecord:{root}/labelled/*.array_record"
  gcfg.total_steps, gcfg.checkpoint_every, gcfg.eval_every, gcfg.batch_size = 10, 10, 0, 8
  gcfg.optimizer.warmup_steps = 2
  loop.train(gcfg, str(root / "tok_global"), tok_train.build_task(gcfg))
  captions = [render_scene(0, i, 32)["caption"] for i in range(200)]
  wp = text.fit_wordpiece(captions, vocab_size=4500, extra_words=text.MARKER_WORDS + SEMANTIC_CLASSES)
  wp.save(str(root / "text.json"))
  return root


def _config(root, **debug):
  c = load_config("configs/tokenizers/tokenize.py", "")
  c.image_tokenizers.depth = str(root / "tok_depth")
  c.text_tokenizer = str(root / "text.json")
  c.sam_instance_tokenizer = str(root / "tok_sam")
  c.vector_tokenizers.aim_global = str(root / "tok_global")
  c.batch_size = 2
  c.debug.stop_after_records = debug.get("stop_after_records", 0)
  return c


def _files(d):
  return {os.path.basename(p): open(p, "rb").read() for p in sorted(glob.glob(f"{d}/*"))}


def test_token_shards_hold_image_tokens_and_sequences(setup):
  out = str(setup / "tokens")
  result = tok_lib.tokenize(_config(setup), f"{setup}/labelled/*.array_record", out)
  assert result == {"shards": 3, "written": 3, "records": 9}
  schema = schema_lib.read_schema(out)
  assert set(schema) == {"index", "key", "image", "tok_depth", "tok_aim_global", "caption", "det",
                         "color_palette", "metadata", "sam_instance",
                         "color_palette_raw", "metadata_raw",   # raw: fourm_jax.sequence_augment
                         *sequences.SAM_RAW_FIELDS}
  ds = multimodal.dataset(f"{out}/*.array_record")
  rec, truth = ds[4], render_scene(0, 4, 32)
  np.testing.assert_array_equal(rec["image"], truth["rgb"])      # copied unchanged
  assert rec["tok_depth"].shape == (4, 4) and rec["tok_depth"].dtype == np.int32
  wp = text.load(str(setup / "text.json"))
  assert text.decode(wp, rec["caption"]) == truth["caption"]
  boxes, names = sequences.decode_boxes(text.decode(wp, rec["det"]))
  assert names == [SEMANTIC_CLASSES[c] for c in truth["box_classes"]]
  assert np.abs(boxes - truth["boxes"]).max() <= 0.5 / 999 + 1e-6
  assert len(sequences.decode_palette(text.decode(wp, rec["color_palette"]))) == 3
  meta = sequences.decode_metadata(text.decode(wp, rec["metadata"]))
  assert meta["n_sam_instances"] == len(truth["boxes"])
  # SAM instances: each query point lists the instance under it, box in pixels, mask tokens
  sam = tok_lib.Tokenizer(str(setup / "tok_sam"))
  hits = 0
  for index in range(len(ds)):
    queries = sequences.decode_sam_instances(text.decode(wp, ds[index]["sam_instance"]))
    scene = render_scene(0, index, 32)
    assert len(queries) == 7
    for q in queries:
      x, y = q.point
      i = int(scene["instance"][y, x]) - 1
      assert len(q.boxes) == (i >= 0)
      if i >= 0:
        hits += 1
        np.testing.assert_array_equal(q.boxes[0], np.rint(scene["boxes"][i] * 32))
        crop = tok_train.instance_mask_crop(scene["instance"], scene["boxes"], i, 64)
        np.testing.assert_array_equal(q.ids[0], sam([crop])[0].reshape(-1))
  assert hits >= 3
  # image and vector tokens are those of the tokenizers applied directly
  tok = tok_lib.Tokenizer(str(setup / "tok_depth"))
  np.testing.assert_array_equal(tok([truth["depth"].astype(np.float16)])[0], rec["tok_depth"])
  glob_tok = tok_lib.Tokenizer(str(setup / "tok_global"))
  labelled = multimodal.dataset(f"{setup}/labelled/*.array_record", fields=("aim_global",))[4]
  assert rec["tok_aim_global"].shape == (16,)
  np.testing.assert_array_equal(glob_tok([labelled["aim_global"]])[0], rec["tok_aim_global"])
  assert glob_tok.detokenize(rec["tok_aim_global"][None]).shape == labelled["aim_global"][None].shape


def test_training_redraws_the_sam_query_points_at_every_load(setup):
  """Official SAMInstanceTokTransform(point_order='random') draws 7 points uniformly over the
  image at every load and lists, per point, the instances whose polygon contains it (its box
  in pixels and 16 mask ids). The 4M pipeline's per-record map does the same from the raw
  instance fields: expected points are checked against the scene's own instance map."""
  import grain
  from fourm_jax import sequence_augment
  out = str(setup / "tokens_sam")
  tok_lib.tokenize(_config(setup), f"{setup}/labelled/*.array_record", out)
  pattern = f"{out}/*.array_record"
  aug = sequence_augment.for_shards(pattern, {"sam_instance": "sam_instance"},
                                    multimodal.schema_of(pattern))
  assert aug is not None and aug.sam_points == 7 and aug.lengths["sam_instance"] == 290
  ds = multimodal.dataset(pattern, fields=("index", "sam_instance", *aug.raw_fields))

  class Map(grain.transforms.RandomMap):
    def random_map(self, element, rng):
      return aug(element, rng)
  def epochs(seed):
    d = ds.repeat(2).random_map(Map(), seed=seed)
    return [d[i] for i in range(len(d))]
  got, wp, n = epochs(5), text.load(str(setup / "text.json")), len(ds)
  sam = tok_lib.Tokenizer(str(setup / "tok_sam"))
  points = []
  for i, rec in enumerate(got):
    assert not set(sequences.SAM_RAW_FIELDS) & set(rec)       # raw fields dropped after use
    assert rec["sam_instance"].ndim == 1 and len(rec["sam_instance"]) <= 290   # cut as stored
    scene = render_scene(0, int(rec["index"]), 32)
    queries = sequences.decode_sam_instances(text.decode(wp, rec["sam_instance"]))
    assert len(queries) == 7
    for q in queries:
      x, y = q.point
      k = int(scene["instance"][y, x]) - 1
      assert len(q.boxes) == (k >= 0)
      if k >= 0:
        np.testing.assert_array_equal(q.boxes[0], np.rint(scene["boxes"][k] * 32))
        crop = tok_train.instance_mask_crop(scene["instance"], scene["boxes"], k, 64)
        np.testing.assert_array_equal(q.ids[0], sam([crop])[0].reshape(-1))
    points.append([q.point for q in queries])
  assert all(points[i] != points[i + n] for i in range(n))      # fresh points every epoch
  stored = [sequences.decode_sam_instances(text.decode(wp, ds[i]["sam_instance"]))
            for i in range(n)]
  assert sum(points[i] == [q.point for q in stored[i]] for i in range(n)) == 0
  again = epochs(5)                                             # same seed, same draws
  for a, b in zip(got, again):
    np.testing.assert_array_equal(a["sam_instance"], b["sam_instance"])


def test_tokenizing_is_deterministic_and_resumes_after_an_interruption(setup):
  whole, resumed = str(setup / "whole"), str(setup / "resumed")
  tok_lib.tokenize(_config(setup), f"{setup}/labelled/*.array_record", whole)
  with pytest.raises(RuntimeError, match="stop_after_records"):
    tok_lib.tokenize(_config(setup, stop_after_records=4), f"{setup}/labelled/*.array_record",
                     resumed)
  assert any(n.endswith(".tmp") for n in os.listdir(resumed))
  again = tok_lib.tokenize(_config(setup), f"{setup}/labelled/*.array_record", resumed)
  assert again["written"] == 2
  assert _files(resumed) == _files(whole)


def test_a_tokenizer_for_another_modality_is_refused(setup):
  c = _config(setup)
  c.image_tokenizers.normals = str(setup / "tok_depth")
  with pytest.raises(ValueError, match="image_tokenizers.normals points at a 'depth' tokenizer"):
    tok_lib.tokenize(c, f"{setup}/labelled/*.array_record", str(setup / "x"))


def test_shards_at_another_resolution_than_the_tokenizer_are_refused_naming_the_fix(
    setup, tmp_path):
  cfg = load_config("configs/fourm/pseudo_label.py", "scenes")
  cfg.resolution, cfg.labellers = 48, ()
  pl.pseudo_label(cfg, "scenes:2", str(tmp_path / "labelled48"))
  c = _config(setup)
  c.sam_instance_tokenizer, c.vector_tokenizers.aim_global = "", ""
  with pytest.raises(ValueError, match=r"'depth' field .* is 48x48 px, but the depth tokenizer "
                     r".* was trained at 32 px: pseudo-label with --config.resolution=32"):
    tok_lib.tokenize(c, f"{tmp_path}/labelled48/*.array_record", str(tmp_path / "x"))


def test_text_and_tokenize_clis_write_a_vocabulary_and_token_shards(setup, tmp_path):
  """The two command lines a user runs, end to end as subprocesses."""
  import subprocess
  import sys
  from conftest import ROOT, subprocess_env
  vocab = tmp_path / "vocab.json"
  run = lambda *args: subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=subprocess_env(),
                                     capture_output=True, text=True, timeout=300)
  proc = run("tokenizers_jax.fit_text", "--config=configs/tokenizers/text.py",
             f"--input={setup}/labelled/*.array_record", f"--out={vocab}",
             "--config.vocab_size=4400")
  assert proc.returncode == 0, proc.stderr[-2000:]
  tok = text.load(str(vocab))
  assert tok.get_vocab_size() <= 4400 and tok.token_to_id("v3=999") is not None
  assert tok.token_to_id("sphere") is not None               # a scenes class, whole
  proc = run("tokenizers_jax.tokenize", "--config=configs/tokenizers/tokenize.py",
             f"--input={setup}/labelled/*.array_record", f"--out={tmp_path}/tokens",
             f"--config.image_tokenizers.depth={setup}/tok_depth",
             f"--config.text_tokenizer={vocab}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  rec = multimodal.dataset(f"{tmp_path}/tokens/*.array_record")[0]
  assert rec["tok_depth"].shape == (4, 4) and rec["image"].shape == (32, 32, 3)
  src = multimodal.dataset(f"{setup}/labelled/*.array_record", fields=("caption",))[0]["caption"]
  words = lambda t: "".join(c if c.isalnum() else " " for c in t.lower()).split()
  assert words(text.decode(tok, rec["caption"])) == words(src)
  bad = run("tokenizers_jax.fit_text", "--config=configs/tokenizers/text.py", f"--out={vocab}")
  assert bad.returncode != 0 and "--input" in bad.stderr


def test_retrieval_predicts_global_embeddings_and_ranks_the_gallery(setup):
  import jax
  from fourm_jax import model as model_lib, modalities, retrieval, sampler as sampler_lib
  from tokenizers_jax.tokenize import Tokenizer
  tok = Tokenizer(str(setup / "tok_global"))
  glob = modalities.Modality("tok_aim_global", "global", vocab_size=tok.config.model.num_codes,
                             length=tok.config.model.num_tokens)
  cap = modalities.Modality("caption", "seq", vocab_size=4500, length=16)
  model = model_lib.FourM((cap, glob), (glob,), dim=32, encoder_depth=1, decoder_depth=1,
                          num_heads=4)
  s = sampler_lib.Sampler(model, None)
  batch = s._batch(s.init_state(3, {}), glob.name, ())
  s.params = jax.jit(lambda r: model.init(r, batch, s.max_encoder_tokens, glob.length))(
      jax.random.key(0))["params"]
  ids = np.array([[4300, 4301, 3], [4302, 3, 0], [4310, 4311, 3]])
  emb = retrieval.predict_embeddings(s, {"caption": {"tensor": ids}}, glob.name, tok, 3)
  ds = multimodal.dataset(f"{setup}/labelled/*.array_record", fields=("aim_global",))
  gallery = np.stack([ds[i]["aim_global"] for i in range(len(ds))]).astype(np.float32)
  assert emb.shape == (3, gallery.shape[1]) and np.isfinite(emb).all()
  idx, sim = retrieval.cosine_rank(emb, gallery, k=4)
  assert idx.shape == (3, 4) and (np.diff(sim, axis=1) <= 1e-12).all()
  # queried with its own embedding, every item comes first
  idx, sim = retrieval.cosine_rank(gallery, gallery, k=1)
  np.testing.assert_array_equal(idx[:, 0], np.arange(len(gallery)))
  np.testing.assert_allclose(sim[:, 0], 1.0, atol=1e-9)
  with pytest.raises(ValueError, match="not a global embedding"):
    retrieval.predict_embeddings(s, {}, "caption", tok, 1)


def test_outputs_map_any_token_field_to_a_tokenizer_and_source_field(setup, tmp_path):
  """config.outputs writes fields the per-modality keys cannot (4M-21: several feature maps,
  SAM edges through the edge tokenizer): here the depth tokenizer twice under other names and
  the global tokenizer on its field, equal to what the named keys write."""
  c = _config(setup)
  c.sam_instance_tokenizer = ""
  c.outputs = (f"tok_depth_copy=depth:{setup}/tok_depth, "
               f"tok_global_copy=aim_global:{setup}/tok_global")
  tok_lib.tokenize(c, f"{setup}/labelled/*.array_record", str(tmp_path / "tokens"))
  schema = schema_lib.read_schema(str(tmp_path / "tokens"))
  assert schema["tok_depth_copy"] == schema["tok_depth"]
  rec = multimodal.dataset(f"{tmp_path}/tokens/*.array_record")[2]
  np.testing.assert_array_equal(rec["tok_depth_copy"], rec["tok_depth"])
  np.testing.assert_array_equal(rec["tok_global_copy"], rec["tok_aim_global"])
  for bad, words in (("tok_x=depth", "not OUT=SOURCE:WORKDIR"),
                     (f"tok_depth=depth:{setup}/tok_depth", "also written by")):
    c.outputs = bad
    with pytest.raises(ValueError, match=words):
      tok_lib.tokenize(c, f"{setup}/labelled/*.array_record", str(tmp_path / "bad"))
  c.outputs = f"tok_y=no_such_field:{setup}/tok_depth"
  with pytest.raises(ValueError, match="no 'no_such_field' field to tokenise into 'tok_y'"):
    tok_lib.tokenize(c, f"{setup}/labelled/*.array_record", str(tmp_path / "bad"))
