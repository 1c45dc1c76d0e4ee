"""tokenize writes 4M-21's human_poses and t5_caption (issue 21, item 5).

Expected results follow the official ml-4m code:
- HumanPoseTransform.convert_humanposes_to_string: per person `human` and its
  box (v0..v3, round(c * 999)), then the groups pose (8 tokenizer ids, v0=i
  below 512, v1=i-512 above), global (9 values, round(499.5 * x + 499.5)),
  camera (3, clipped to [-1, 19], round(49.95 * x + 49.95)) and shape (10
  betas, round(166.5 * x + 499.5)) in the order of `torch.randperm(4)`, drawn
  at every load. The shards store one fixed order; training shuffles.
- CaptionEmbTransform: the caption's embeddings, padding rows dropped
  (`emb[mask_valid]`), at most 77 rows.
"""
import os

import grain
import numpy as np
import pytest
from array_record.python import array_record_module as arm

from conftest import load_config
from fourm_jax import sequence_augment
from pretrain_jax import loop
from pretrain_jax.data import multimodal, records, schema as schema_lib
from pretrain_jax.data.schema import FieldSpec
from tokenizers_jax import poses, sequences, text, text_encoders, tokenize as tok_lib
from tokenizers_jax import train as tok_train

N = 6
CAPTIONS = ["a red ball on a table", "two cats", "a person walking a dog in the park",
            "an empty room", "people", "a tall person next to a short person"]


def _people(i):
  rng = np.random.default_rng(i)
  n = i % 3                                     # 0, 1 or 2 people
  lo = rng.uniform(0, 0.5, (n, 2))
  return {"human_boxes": np.concatenate([lo, lo + rng.uniform(0.1, 0.5, (n, 2))], 1),
          "human_body_pose": np.array([poses.synthetic_body_pose(1, 10 * i + k)
                                       for k in range(n)]).reshape(n, 207),
          "human_global_orient": rng.uniform(-1, 1, (n, 9)),
          "human_camera": rng.uniform(-2, 21, (n, 3)),   # outside [-1, 19]: clipped
          "human_betas": rng.uniform(-3, 3, (n, 10))}


def _toy_encoder(arg):
  """Deterministic stand-in for T5: one row per word, width int(arg)."""
  width = int(arg)

  def encode(captions):
    out = []
    for c in captions:
      rows = [np.random.default_rng(sum(map(ord, w))).normal(size=width) for w in c.split()]
      out.append(np.stack(rows).astype(np.float32))
    return out
  return encode


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  root = tmp_path_factory.mktemp("people")
  labelled = root / "labelled"
  labelled.mkdir()
  schema = {"index": FieldSpec("scalar"), "key": FieldSpec("text"), "caption": FieldSpec("text"),
            **{f: FieldSpec("array", "float32", (None, n)) for f, n in
               zip(tok_lib.HUMAN_FIELDS, (4, 207, 9, 3, 10))}}
  schema_lib.write_schema(str(labelled), schema)
  w = arm.ArrayRecordWriter(str(labelled / "part-00000.array_record"), "group_size:1")
  for i in range(N):
    rec = {"index": i, "key": f"{i:05d}", "caption": CAPTIONS[i],
           **{k: v.astype(np.float32) for k, v in _people(i).items()}}
    assert not schema_lib.problems(rec, schema)
    w.write(records.encode_record(rec))
  w.close()
  pcfg = load_config("configs/tokenizers/mlp_vae.py", "target=pose,variant=tiny")
  pcfg.total_steps, pcfg.checkpoint_every, pcfg.eval_every = 10, 10, 0
  pcfg.optimizer.warmup_steps = 2
  loop.train(pcfg, str(root / "tok_pose"), tok_train.build_task(pcfg))
  text.fit_wordpiece(CAPTIONS * 10, vocab_size=4500).save(str(root / "text.json"))
  text_encoders.register("toy_words", _toy_encoder, replace=True)
  c = load_config("configs/tokenizers/tokenize.py", "")
  c.text_tokenizer = str(root / "text.json")
  c.pose_tokenizer = str(root / "tok_pose")
  c.text_encoder = "toy_words:24"
  c.copy_fields = ()
  tok_lib.tokenize(c, f"{labelled}/*.array_record", str(root / "tokens"))
  return root


def _expected_words(person, ids, order):
  """The official string of one person, groups in `order` (HumanPoseTransform)."""
  box, orient, camera, betas = (person[k] for k in ("box", "global", "camera", "betas"))
  words = ["human"] + [f"v{g}={round(float(c) * 999)}" for g, c in enumerate(box)]
  groups = {
      "pose": ["pose"] + [f"v0={i}" if i < 512 else f"v1={i - 512}" for i in ids],
      "global": ["global"] + [f"v0={round(499.5 * float(x) + 499.5)}" for x in orient],
      "camera": ["camera"] + [f"v0={round(49.95 * float(np.clip(x, -1, 19)) + 49.95)}"
                              for x in camera],
      "shape": ["shape"] + [f"v0={round(166.5 * float(x) + 499.5)}" for x in betas]}
  for g in order:
    words += groups[g]
  return words


def _person(i, k):
  p = {a: v[k].astype(np.float32) for a, v in _people(i).items()}
  return {"box": p["human_boxes"], "global": p["human_global_orient"],
          "camera": p["human_camera"], "betas": p["human_betas"], "body": p["human_body_pose"]}


def test_human_poses_are_written_in_the_official_format(shards):
  out = shards / "tokens"
  schema = schema_lib.read_schema(str(out))
  assert {"human_poses", "t5_caption", *sequences.POSE_RAW_FIELDS} <= set(schema)
  ds = multimodal.dataset(f"{out}/*.array_record")
  wp = text.load(str(shards / "text.json"))
  pose_tok = tok_lib.Tokenizer(str(shards / "tok_pose"))
  fixed = ("pose", "global", "camera", "shape")
  for i in range(N):
    words = text.decode(wp, ds[i]["human_poses"]).split()
    want = []
    for k in range(i % 3):
      p = _person(i, k)
      want += _expected_words(p, pose_tok([p["body"]])[0].tolist(), fixed)
    assert words == (want or ["none"]), i


def test_caption_embeddings_come_from_the_registered_encoder(shards):
  ds = multimodal.dataset(f"{shards}/tokens/*.array_record")
  enc = _toy_encoder(24)
  for i in range(N):
    want = enc([CAPTIONS[i]])[0].astype(np.float16)
    np.testing.assert_array_equal(ds[i]["t5_caption"], want)
  emb = ds[2]["t5_caption"]
  assert emb.dtype == np.float16 and emb.shape == (len(CAPTIONS[2].split()), 24)
  unknown = "no_such_encoder"
  c = load_config("configs/tokenizers/tokenize.py", "")
  c.text_encoder = unknown
  with pytest.raises(ValueError, match=f"no text encoder '{unknown}' is registered"):
    tok_lib.tokenize(c, f"{shards}/labelled/*.array_record", str(shards / "x"))


def test_training_shuffles_each_persons_pose_groups_at_every_load(shards):
  pattern = f"{shards}/tokens/*.array_record"
  aug = sequence_augment.for_shards(pattern, {"human_poses": "human_poses"},
                                    multimodal.schema_of(pattern))
  assert aug is not None and aug.lengths["human_poses"] == 263
  ds = multimodal.dataset(pattern, fields=("index", "human_poses", *aug.raw_fields))

  class Map(grain.transforms.RandomMap):
    def random_map(self, element, rng):
      return aug(element, rng)
  epochs = ds.repeat(4).random_map(Map(), seed=1)
  wp = text.load(str(shards / "text.json"))
  pose_tok = tok_lib.Tokenizer(str(shards / "tok_pose"))
  orders = set()
  for j in range(len(epochs)):
    rec = epochs[j]
    i = int(rec["index"])
    words = text.decode(wp, rec["human_poses"]).split()
    if i % 3 == 0:
      assert words == ["none"]
      continue
    people = " ".join(words).split("human ")[1:]
    assert len(people) == i % 3
    for k, chunk in enumerate(people):
      order = tuple(w for w in chunk.split() if w in ("pose", "global", "camera", "shape"))
      assert sorted(order) == sorted(("pose", "global", "camera", "shape"))
      p = _person(i, k)
      assert chunk.split() == _expected_words(p, pose_tok([p["body"]])[0].tolist(),
                                              order)[1:]
      orders.add(order)
  assert len(orders) >= 6                       # many of the 24 orders are drawn
