"""The shared WordPiece vocabulary of 4M's sequence modalities (HF `tokenizers`).

Layout of the added tokens, as in the official 4M text tokenizer file (so
the ids of every special and value token agree with it):

  0 [PAD]   1 [UNK]   2 [SOS]   3 [EOS]
  4..203    sentinels [S_0]..[S_199] (T5 span masking)
  204..4203 special value tokens v0=0..v0=999, v1=0.., v2=0.., v3=0..v3=999
  4204..    class names in alphabetical order (COCO's 80 by default, multi-word
            names stay one token), then `extra_words` (e.g. modality marker words)

then the WordPiece vocabulary fitted on captions (BERT normaliser with
lowercasing, BERT pre-tokeniser, '##' continuation prefix).

The added tokens carry the official file's flags (its "added_tokens"): all are
special; the sentinels, value tokens and words match only as whole words
(single_word, so 'car' is no prefix of 'carpet'); the words are matched after
normalisation (normalized, so 'Traffic Light' is the class 'traffic light');
[PAD], [UNK], [SOS], [EOS] have neither flag.
"""
from __future__ import annotations

from typing import Iterable, Sequence

SPECIAL = ("[PAD]", "[UNK]", "[SOS]", "[EOS]")
PAD_ID, UNK_ID, SOS_ID, EOS_ID = 0, 1, 2, 3
NUM_SENTINELS = 200
VALUE_GROUPS = 4
VALUE_BINS = 1000

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush")
# words that introduce sub-sequences of 4M-21's human poses and SAM instances
MARKER_WORDS = ("human", "pose", "global", "camera", "shape", "point", "polygon", "none")


def sentinel(i: int) -> str:
  return f"[S_{i}]"


def value_token(group: int, value: int) -> str:
  if not (0 <= group < VALUE_GROUPS and 0 <= value < VALUE_BINS):
    raise ValueError(f"value token v{group}={value} is outside v0..v{VALUE_GROUPS - 1}=0..{VALUE_BINS - 1}")
  return f"v{group}={value}"


def added_tokens(class_names: Sequence[str] = COCO_CLASSES,
                 extra_words: Sequence[str] = MARKER_WORDS) -> list[str]:
  values = [value_token(g, v) for g in range(VALUE_GROUPS) for v in range(VALUE_BINS)]
  words = list(dict.fromkeys([*sorted(class_names), *extra_words]))   # drop repeats
  return [*SPECIAL, *(sentinel(i) for i in range(NUM_SENTINELS)), *values, *words]


def added_token_objects(class_names: Sequence[str] = COCO_CLASSES,
                        extra_words: Sequence[str] = MARKER_WORDS) -> list:
  """`added_tokens` as `tokenizers.AddedToken`s with the official file's flags."""
  from tokenizers import AddedToken
  names = added_tokens(class_names, extra_words)
  first_word = len(SPECIAL) + NUM_SENTINELS + VALUE_GROUPS * VALUE_BINS
  return [AddedToken(t, single_word=i >= len(SPECIAL), normalized=i >= first_word,
                     special=True)
          for i, t in enumerate(names)]


def fit_wordpiece(captions: Iterable[str], vocab_size: int = 30_000,
                  class_names: Sequence[str] = COCO_CLASSES,
                  extra_words: Sequence[str] = MARKER_WORDS):
  """Fits the vocabulary on `captions`; returns a `tokenizers.Tokenizer`."""
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
  specials = added_token_objects(class_names, extra_words)
  if vocab_size <= len(specials):
    raise ValueError(f"vocab_size {vocab_size} leaves no room beside the {len(specials)} added "
                     "tokens")
  tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=None)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece(prefix="##")
  trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      show_progress=False)
  tok.train_from_iterator(captions, trainer)
  return tok


def load(path: str):
  """Reads a tokenizer file (ours or the official 4M one; local or gs://...) and checks the
  layout above."""
  from etils import epath
  from tokenizers import Tokenizer
  tok = Tokenizer.from_str(epath.Path(path).read_text())
  want = added_tokens(class_names=(), extra_words=())
  wrong = [(t, i, tok.token_to_id(t)) for i, t in enumerate(want) if tok.token_to_id(t) != i]
  if wrong:
    raise ValueError(f"{path} is not a 4M text tokenizer: {len(wrong)} special/value tokens are "
                     f"missing or at other ids, e.g. {wrong[:3]} (token, expected id, found id)")
  return tok


def encode(tok, text: str, max_len: int | None = None, eos: bool = True) -> list[int]:
  """Token ids of `text`, with [EOS] appended; truncated to `max_len` (EOS kept last)."""
  ids = tok.encode(text, add_special_tokens=False).ids
  if max_len is not None:
    ids = ids[:max_len - int(eos)]
  return ids + [EOS_ID] if eos else ids


def decode(tok, ids: Sequence[int]) -> str:
  """Text of `ids`, up to the first [EOS] and without [PAD]; value tokens and classes kept."""
  ids = list(ids)
  if EOS_ID in ids:
    ids = ids[:ids.index(EOS_ID)]
  return tok.decode([i for i in ids if i != PAD_ID], skip_special_tokens=False)
