"""Text vocabulary and sequence encoders (tokenizers_jax.text, tokenizers_jax.sequences)."""
import os

import numpy as np
import pytest

from conftest import SHARED
from tokenizers_jax import sequences as seq
from tokenizers_jax import text

CAPTIONS = [f"a {s} {c} {o} left of a {s2} {c2} cube." for s in ("small", "large")
            for c in ("red", "blue", "green") for o in ("sphere", "cone", "cylinder")
            for s2 in ("small", "large") for c2 in ("yellow", "cyan")] * 3


@pytest.fixture(scope="module")
def tok():
  return text.fit_wordpiece(CAPTIONS, vocab_size=4400, class_names=text.COCO_CLASSES,
                            extra_words=text.MARKER_WORDS + ("sphere", "cube", "cylinder", "cone"))


def test_vocabulary_layout_matches_the_official_ids(tok):
  assert [tok.token_to_id(t) for t in ("[PAD]", "[UNK]", "[SOS]", "[EOS]")] == [0, 1, 2, 3]
  assert tok.token_to_id("[S_0]") == 4 and tok.token_to_id("[S_199]") == 203
  assert tok.token_to_id("v0=0") == 204 and tok.token_to_id("v3=999") == 4203
  assert tok.token_to_id("airplane") == 4204 and tok.token_to_id("zebra") == 4283
  assert tok.get_vocab_size() <= 4400 and tok.token_to_id("red") is not None


def test_captions_round_trip_through_ids(tok):
  cap = "a large red sphere left of a small cyan cube."
  ids = text.encode(tok, cap)
  assert ids[-1] == text.EOS_ID and text.UNK_ID not in ids
  assert text.decode(tok, ids + [text.PAD_ID] * 3) == cap
  assert len(text.encode(tok, cap, max_len=4)) == 4


def test_boxes_round_trip_within_binning(tok):
  rng = np.random.default_rng(0)
  boxes = np.sort(rng.uniform(0, 1, (5, 2, 2)), axis=1).transpose(0, 2, 1).reshape(5, 4)
  boxes = boxes[:, [0, 2, 1, 3]]                      # xmin, ymin, xmax, ymax
  names = ["person", "baseball bat", "sphere", "dog", "cube"]
  s = seq.encode_boxes(boxes, names)
  order = np.argsort(boxes[:, 0] ** 2 + boxes[:, 1] ** 2, kind="stable")   # nearest (0, 0) first
  boxes, names = boxes[order], [names[i] for i in order]
  got, got_names = seq.decode_boxes(s)
  assert got_names == names
  assert np.abs(got - boxes).max() <= 0.5 / 999 + 1e-12
  again, again_names = seq.decode_boxes(text.decode(tok, text.encode(tok, s)))   # through ids
  np.testing.assert_array_equal(again, got)
  assert again_names == names
  with pytest.raises(ValueError, match="truncated box"):
    seq.decode_boxes("v0=1 v1=2 v2=3")


def test_palettes_round_trip_exactly(tok):
  colours = np.array([[255, 0, 10], [3, 200, 128], [0, 0, 0]], np.uint8)
  s = seq.encode_palette(colours)
  assert s.startswith("v1=3 v0=255 v0=0 v0=10 v0=3")     # the official layout
  np.testing.assert_array_equal(seq.decode_palette(text.decode(tok, text.encode(tok, s))), colours)
  with pytest.raises(ValueError, match="needs 7 tokens"):
    seq.decode_palette("v1=2 v0=1 v0=2 v0=3")


def test_metadata_round_trips_within_one_bin_in_any_order(tok):
  meta = {"brightness": 97.6, "entropy": 2.146, "n_sam_instances": 5.0, "walkability": 0.9001,
          "geometric_complexity": 0.0648, "original_height": 480.0, "caption_n_words": 26.0,
          "aesthetic_score": 5.7, "watermark_score": 0.2}
  s = seq.encode_metadata(meta, rng=np.random.default_rng(3))
  assert s != seq.encode_metadata(meta)                # shuffled order
  assert "v1=10 v0=18" in s                            # brightness: type 10, floor(97.6/255*49)
  back = seq.decode_metadata(text.decode(tok, text.encode(tok, s)))
  assert set(back) == set(meta)
  for k, v in meta.items():
    t = seq.METADATA_TYPES[k]
    assert t.to_bin(back[k]) == t.to_bin(v), k        # decodes into the same bin
    if t.kind == "range":
      assert abs(back[k] - v) <= (t.high - t.low) / (t.bins - 1) + 1e-9, k
  assert back["n_sam_instances"] == 5.0 and back["caption_n_words"] == 26.0   # counts exact
  assert abs(back["original_height"] - 480) <= 16
  chunks = seq.encode_metadata(meta, chunks=True)
  assert len(chunks) == len(meta) and " ".join(chunks) == seq.encode_metadata(meta)
  with pytest.raises(ValueError, match="unknown metadata keys"):
    seq.encode_metadata({"loudness": 3.0})


def test_labeller_metadata_maps_to_official_keys_and_units():
  got = seq.metadata_from_labellers({"occlusion": 12.0, "walkability": 40.0, "unrelated": 1.0},
                                    {"sam_clutter": 3.0, "caption_chars": 40.0})
  assert got == {"occlusion_score": 0.12, "walkability": 0.4, "n_sam_instances": 3.0,
                 "caption_n_chars": 40.0}


def _humans(rng, n):
  return [seq.Human(box=np.sort(rng.uniform(0, 1, 4).reshape(2, 2), 0).T.reshape(-1),
                    pose=rng.integers(0, 1024, 8), global_orient=rng.uniform(-1, 1, 9),
                    camera=rng.uniform(-1, 19, 3), shape=rng.uniform(-3, 3, 10))
          for _ in range(n)]


def test_human_poses_round_trip_within_binning_in_any_group_order(tok):
  rng = np.random.default_rng(0)
  humans = _humans(rng, 3)
  s = seq.encode_poses(humans, rng=np.random.default_rng(1))
  assert s.split()[0] == "human" and len(s.split()) == 3 * (1 + 4 + 4 + 8 + 9 + 3 + 10)
  assert s != seq.encode_poses(humans)                 # groups shuffled
  back = seq.decode_poses(text.decode(tok, text.encode(tok, s)))
  assert len(back) == 3
  for h, b in zip(humans, back):
    np.testing.assert_array_equal(b.pose, h.pose)      # tokenizer ids exact, 512.. via v1=
    for name, (_, lo, hi) in seq.POSE_GROUPS.items():
      if name != "pose":
        assert np.abs(b.group(name) - h.group(name)).max() <= 0.5 * (hi - lo) / 999 + 1e-9
    assert np.abs(b.box - h.box).max() <= 0.5 / 999 + 1e-9
  assert seq.encode_poses([]) == "none" and seq.decode_poses("none") == []
  with pytest.raises(ValueError, match="lacks groups"):
    seq.decode_poses("human v0=1 v1=2 v2=3 v3=4 camera v0=1 v0=2 v0=3")
  with pytest.raises(ValueError, match="does not fit"):
    seq.id_tokens([1024])


def test_sam_instances_round_trip_exactly(tok):
  inst = np.zeros((20, 30), np.int64)
  inst[2:8, 3:12] = 1
  inst[10:18, 5:25] = 2
  boxes = np.array([[3, 2, 11, 7], [5, 10, 24, 17]])
  ids = np.random.default_rng(0).integers(0, 1024, (2, 16))
  queries = seq.sam_queries(inst, boxes, ids, 12, np.random.default_rng(4))
  for q in queries:                                    # each point finds the instance under it
    x, y = q.point
    assert len(q.boxes) == (inst[y, x] > 0)
    if inst[y, x]:
      np.testing.assert_array_equal(q.ids[0], ids[inst[y, x] - 1])
  assert any(len(q.boxes) for q in queries) and any(not len(q.boxes) for q in queries)
  s = seq.encode_sam_instances(queries)
  assert s.startswith(f"point v0={queries[0].point[1]} v1={queries[0].point[0]}")
  back = seq.decode_sam_instances(text.decode(tok, text.encode(tok, s)))
  assert [q.point for q in back] == [q.point for q in queries]
  for q, b in zip(queries, back):
    np.testing.assert_array_equal(b.boxes, q.boxes)
    np.testing.assert_array_equal(b.ids, q.ids)


OFFICIAL = os.path.join(SHARED, "reference", "ml4m_text_tokenizer_wordpiece_30k.json")


@pytest.mark.skipif(not os.path.exists(OFFICIAL), reason="../shared/reference/ (official 4M "
                    "text tokenizer file) is not present")
def test_official_tokenizer_file_loads_and_gives_the_same_value_token_ids(tok):
  official = text.load(OFFICIAL)
  s = seq.encode_boxes(np.array([[0.1, 0.2, 0.5, 0.9]]), ["baseball bat"]) + " " + \
      seq.encode_palette(np.array([[1, 2, 3]], np.uint8))
  assert text.encode(official, s) == text.encode(tok, s)
  boxes = seq.encode_boxes(np.array([[0.1, 0.2, 0.5, 0.9]]), ["baseball bat"])
  assert seq.decode_boxes(text.decode(official, text.encode(official, boxes)))[1] == ["baseball bat"]
  # poses and SAM instances written here read back through the official vocabulary
  rng = np.random.default_rng(2)
  humans = _humans(rng, 2)
  back = seq.decode_poses(text.decode(official, text.encode(official, seq.encode_poses(humans))))
  assert [b.pose.tolist() for b in back] == [h.pose.tolist() for h in humans]
  q = [seq.Query((5, 7), np.array([[1, 2, 30, 40]]), rng.integers(0, 1024, (1, 16))),
       seq.Query((9, 9), np.zeros((0, 4), np.int64), np.zeros((0, 16), np.int64))]
  s = seq.encode_sam_instances(q)
  assert text.UNK_ID not in text.encode(official, s)
  back = seq.decode_sam_instances(text.decode(official, text.encode(official, s)))
  np.testing.assert_array_equal(back[0].ids, q[0].ids)
  assert back[1].point == (9, 9) and not len(back[1].boxes)


def test_a_file_with_another_layout_is_refused(tmp_path, tok):
  from tokenizers import Tokenizer, models
  other = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
  path = str(tmp_path / "other.json")
  other.save(path)
  with pytest.raises(ValueError, match="is not a 4M text tokenizer"):
    text.load(path)


OFFICIAL_SENTENCES = ("a carpet and a traffic light", "A Traffic Light near a Carpet.",
                      "cartoon cat v0=12 [S_1] catalog")


def test_fitted_added_tokens_carry_the_official_flags():
  """The official file's "added_tokens": [PAD] [UNK] [SOS] [EOS] plain; sentinels and value
  tokens single_word; class names single_word and normalized; all special."""
  import json
  from configs.tokenizers import text as text_config
  from tokenizers_jax import fit_text
  config = text_config.get_config()
  config.vocab_size, config.class_names, config.extra_words = 4400, "coco", ()
  tok = fit_text.fit_captions(config, CAPTIONS)
  flags = {(a["content"]): (a["single_word"], a["normalized"], a["special"])
           for a in json.loads(tok.to_str())["added_tokens"]}
  assert flags["[PAD]"] == flags["[EOS]"] == (False, False, True)
  assert flags["[S_1]"] == flags["v3=999"] == (True, False, True)
  assert flags["car"] == flags["traffic light"] == (True, True, True)


@pytest.mark.skipif(not os.path.exists(OFFICIAL), reason="../shared/reference/ (official 4M "
                    "text tokenizer file) is not present")
def test_coco_vocabulary_fitted_here_splits_text_as_the_official_file():
  """A vocabulary fitted by tokenizers_jax.fit_text with the COCO class names splits
  sentences into the same token strings as the official file: 'carpet' is a word of its own,
  not the class 'car' then '##pet'; 'Traffic Light' is the class after lowercasing. The
  captions hold every word of the sentences so that both vocabularies know them."""
  from tokenizers import Tokenizer
  from configs.tokenizers import text as text_config
  from tokenizers_jax import fit_text
  config = text_config.get_config()
  config.vocab_size, config.class_names, config.extra_words = 4400, "coco", ()
  words = "a carpet and traffic light near cartoon catalog"
  ours = fit_text.fit_captions(config, CAPTIONS + [words] * 20)
  official = Tokenizer.from_file(OFFICIAL)
  for sentence in OFFICIAL_SENTENCES:
    want = official.encode(sentence, add_special_tokens=False).tokens
    assert ours.encode(sentence, add_special_tokens=False).tokens == want, sentence
  assert official.encode(OFFICIAL_SENTENCES[0], add_special_tokens=False).tokens == [
      "a", "carpet", "and", "a", "traffic light"]
