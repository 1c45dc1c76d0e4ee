"""4M-21's augmented sequence modalities, serialised per sample at training time.

The official data pipeline draws these afresh at every load: a colour
palette of 1..7 colours (uniform), the metadata entries in a random order
(`MetadataTransform(shuffle=True)`), and the SAM query points
(`SAMInstanceTokTransform(point_order='random')`: 7 points uniform over the
image, each followed by the instances containing it), and the order of each
person's four pose groups (`HumanPoseTransform`: `torch.randperm(4)`). Token shards therefore keep the
raw values beside the token ids that `tokenizers_jax.tokenize` writes:

  color_palette_raw  uint8 [7, 7, 3]: row k-1 holds the palette of k colours
                     (the color_palette labeller's output)
  metadata_raw       float32 [T]: one value per tokenizers_jax.sequences.METADATA_TYPES
                     entry, in that order, NaN where the record has none
  sam_instance_map   int [H, W]: 0 = no instance, i + 1 = instance i
  sam_instance_boxes int32 [N, 4]: the instances' boxes in pixels
  sam_instance_ids   int32 [N, 16]: their SAM-mask tokenizer ids
  human_poses_*      per person: box, pose-tokenizer ids, global orientation, camera,
                     betas (tokenizers_jax.sequences.POSE_RAW_FIELDS)

and a copy of the WordPiece file (`text_tokenizer.json`) with the sequence
lengths and point count (`sequences.json`). The 4M training pipeline
re-serialises `color_palette`, `metadata`, `sam_instance` and `human_poses`
from them in its per-record random map, so a
record gets another palette size and metadata order at every epoch, and the
same ones for the same seed and step (a resumed run sees the same data).
Evaluation keeps the ids written in the shards (a fixed palette size, the
official metadata order, query points drawn once per record).
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np
from etils import epath

from tokenizers_jax import sequences

RAW = sequences.RAW_FIELDS
SAM_RAW = sequences.SAM_RAW_FIELDS
POSE_RAW = sequences.POSE_RAW_FIELDS
AUGMENTED = (*RAW, "sam_instance", "human_poses")


def raw_of(modality: str) -> tuple[str, ...]:
  """The raw fields token shards keep for an augmented modality."""
  return {"sam_instance": SAM_RAW, "human_poses": POSE_RAW}.get(modality) or (RAW[modality],)
MAX_COLORS = 7


class SequenceAugment:
  """Re-serialises the augmented sequences of one record with the map's `rng`.

  fields: {modality: record field} of the dataset (only 'color_palette', 'metadata' and
  'sam_instance' are augmented); max_len: the sequences' length, [EOS] included
  (sam_max_len for sam_instance); sam_points: query points per draw. The WordPiece file
  is read on first use (the object is pickled into data workers)."""

  def __init__(self, directory: str, fields: Mapping[str, str], max_len: int,
               sam_max_len: int = 0, sam_points: int = 7, pose_max_len: int = 0):
    self.tokenizer_path = os.path.join(directory, sequences.TOKENIZER_FILE)
    self.targets = {m: f for m, f in fields.items() if m in AUGMENTED}
    self.max_len, self.sam_points = max_len, sam_points
    self.lengths = {"sam_instance": sam_max_len or max_len,
                    "human_poses": pose_max_len or max_len}
    self._tok = None

  @property
  def raw_fields(self) -> list[str]:
    return [f for m in self.targets for f in raw_of(m)]

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
    if "sam_instance" in self.targets:
      out["sam_instance"] = sequences.encode_sam_instances(sequences.sam_queries(
          *(np.asarray(element[f]) for f in SAM_RAW), self.sam_points, rng))
    if "human_poses" in self.targets:
      humans = sequences.humans_from_raw(*(element[f] for f in POSE_RAW))
      out["human_poses"] = sequences.encode_poses(humans, rng=rng)   # groups shuffled
    return out

  def __call__(self, element: dict, rng: np.random.Generator) -> dict:
    from tokenizers_jax import text
    element = dict(element)
    for m, t in self.texts(element, rng).items():
      n = self.lengths.get(m, self.max_len)
      element[self.targets[m]] = np.array(text.encode(self._tokenizer(), t, n), np.int32)
    for f in self.raw_fields:
      element.pop(f, None)
    return element


def for_shards(pattern: str, fields: Mapping[str, str], schema) -> SequenceAugment | None:
  """The augmentation of the token shards `pattern` (their directory's settings), or None
  when the dataset maps no augmented modality or the shards keep no raw values."""
  if not any(m in AUGMENTED for m in fields):
    return None
  from pretrain_jax.data.sources import ArrayRecordSource
  directory = os.path.dirname(ArrayRecordSource(pattern).paths[0])
  settings = epath.Path(directory) / sequences.SETTINGS_FILE
  if not settings.exists():
    return None
  # modalities whose raw values the shards keep (older shards have no SAM instances)
  kept = {m: f for m, f in fields.items() if m in AUGMENTED and all(
      r in schema for r in raw_of(m))}
  if not kept:
    return None
  s = json.loads(settings.read_text())
  return SequenceAugment(directory, kept, s["max_len"], s.get("sam_max_len", 0),
                         s.get("sam_points", 7), s.get("pose_max_len", 0))
