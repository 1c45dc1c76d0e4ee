"""4M-21's augmented sequence modalities, serialised per sample at training time.

The official data pipeline draws these afresh at every load: a colour
palette of 1..7 colours (uniform), and the metadata entries in a random
order (`MetadataTransform(shuffle=True)`). Token shards therefore keep the
raw values beside the token ids that `tokenizers_jax.tokenize` writes:

  color_palette_raw  uint8 [7, 7, 3]: row k-1 holds the palette of k colours
                     (the color_palette labeller's output)
  metadata_raw       float32 [T]: one value per tokenizers_jax.sequences.METADATA_TYPES
                     entry, in that order, NaN where the record has none

and a copy of the WordPiece file (`text_tokenizer.json`) with the sequence
length (`sequences.json`). The 4M training pipeline re-serialises
`color_palette` and `metadata` from them in its per-record random map, so a
record gets another palette size and metadata order at every epoch, and the
same ones for the same seed and step (a resumed run sees the same data).
Evaluation keeps the ids written in the shards (a fixed palette size, the
official metadata order).
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np
from etils import epath

from tokenizers_jax import sequences

RAW = sequences.RAW_FIELDS
MAX_COLORS = 7


class SequenceAugment:
  """Re-serialises the augmented sequences of one record with the map's `rng`.

  fields: {modality: record field} of the dataset (only 'color_palette' and 'metadata'
  are augmented). The WordPiece file is read on first use (the object is pickled into
  data workers)."""

  def __init__(self, directory: str, fields: Mapping[str, str], max_len: int):
    self.tokenizer_path = os.path.join(directory, sequences.TOKENIZER_FILE)
    self.targets = {m: f for m, f in fields.items() if m in RAW}
    self.max_len = max_len
    self._tok = None

  @property
  def raw_fields(self) -> list[str]:
    return [RAW[m] for m in self.targets]

  def _tokenizer(self):
    if self._tok is None:
      from tokenizers_jax import text
      self._tok = text.load(self.tokenizer_path)
    return self._tok

  def texts(self, element: Mapping[str, Any], rng: np.random.Generator) -> dict[str, str]:
    """{modality: its text for this draw}."""
    out = {}
    if "color_palette" in self.targets:
      raw = np.asarray(element[RAW["color_palette"]])
      k = int(rng.integers(1, MAX_COLORS + 1))     # official: random.randint(1, 7)
      out["color_palette"] = sequences.encode_palette(raw[k - 1, :k])
    if "metadata" in self.targets:
      meta = sequences.metadata_dict(element[RAW["metadata"]])
      out["metadata"] = sequences.encode_metadata(meta, rng=rng)   # shuffled
    return out

  def __call__(self, element: dict, rng: np.random.Generator) -> dict:
    from tokenizers_jax import text
    element = dict(element)
    for m, t in self.texts(element, rng).items():
      element[self.targets[m]] = np.array(text.encode(self._tokenizer(), t, self.max_len),
                                          np.int32)
    for f in self.raw_fields:
      element.pop(f, None)
    return element


def for_shards(pattern: str, fields: Mapping[str, str], schema) -> SequenceAugment | None:
  """The augmentation of the token shards `pattern` (their directory's settings), or None
  when the dataset maps no augmented modality or the shards keep no raw values."""
  if not any(m in RAW for m in fields):
    return None
  from pretrain_jax.data.sources import ArrayRecordSource
  directory = os.path.dirname(ArrayRecordSource(pattern).paths[0])
  settings = epath.Path(directory) / sequences.SETTINGS_FILE
  wanted = [RAW[m] for m in fields if m in RAW]
  if not settings.exists() or any(f not in schema for f in wanted):
    return None
  max_len = json.loads(settings.read_text())["max_len"]
  return SequenceAugment(directory, fields, max_len)
