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
  assert s.startswith("v0=3 v1=255 v2=0 v3=10")
  np.testing.assert_array_equal(seq.decode_palette(text.decode(tok, text.encode(tok, s))), colours)
  with pytest.raises(ValueError, match="needs 7 tokens"):
    seq.decode_palette("v0=2 v1=1 v2=2 v3=3")


def test_metadata_round_trips_within_half_a_bin_in_any_order(tok):
  meta = {"brightness": 97.6, "entropy": 2.146, "sam_clutter": 5.0, "walkability": 90.01,
          "geometric_complexity": 0.0648, "original_height": 480.0, "caption_words": 26.0}
  s = seq.encode_metadata(meta, rng=np.random.default_rng(3))
  assert s != seq.encode_metadata(meta)                # shuffled order
  back = seq.decode_metadata(text.decode(tok, text.encode(tok, s)))
  assert set(back) == set(meta)
  for k, v in meta.items():
    lo, hi = seq.METADATA_RANGES[k]
    assert abs(back[k] - v) <= 0.5 * (hi - lo) / 999 + 1e-9, k
  assert back["sam_clutter"] == 5.0 and back["caption_words"] == 26.0   # counts are exact
  with pytest.raises(ValueError, match="unknown metadata keys"):
    seq.encode_metadata({"loudness": 3.0})


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


def test_a_file_with_another_layout_is_refused(tmp_path, tok):
  from tokenizers import Tokenizer, models
  other = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
  path = str(tmp_path / "other.json")
  other.save(path)
  with pytest.raises(ValueError, match="is not a 4M text tokenizer"):
    text.load(path)
