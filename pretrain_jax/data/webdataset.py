"""Random access to webdataset tar shards in the layout ml-4m uses.

  ROOT/{modality}/shard-00000.tar, shard-00001.tar, ...

Each tar holds `KEY.EXT` files; files of one sample share KEY across the
modality folders (`ROOT/rgb/shard-00000.tar:000123.jpg` and
`ROOT/caption/shard-00000.tar:000123.txt`). The image modality is indexed
once (member offsets, no extraction); other modalities are looked up by key.
Records are in the order of the sorted shards and, within a shard, of the tar.
ROOT may be local or gs://... (read through etils.epath).
"""
from __future__ import annotations

import json
import os
import tarfile
from typing import Any

import numpy as np
from etils import epath

from pretrain_jax import paths as paths_lib
from pretrain_jax.data import records

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
TEXT_EXTENSIONS = (".txt", ".json", ".json.gz")


def _split_name(name: str) -> tuple[str, str]:
  """'dir/000123.jpg' -> ('000123', '.jpg'): webdataset keys end at the first dot of the basename."""
  base = os.path.basename(name)
  key, dot, ext = base.partition(".")
  return key, (dot + ext).lower()


def _index(paths: list[str], extensions) -> list[tuple[str, str, int, int]]:
  """[(key, path, offset, size)] of the members of `paths` whose extension is in `extensions`."""
  out = []
  for path in paths:
    with epath.Path(path).open("rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
      for member in tar:
        if member.isfile():
          key, ext = _split_name(member.name)
          if ext in extensions:
            out.append((key, path, member.offset_data, member.size))
  return out


def _read(path: str, offset: int, size: int) -> bytes:
  with epath.Path(path).open("rb") as f:
    f.seek(offset)
    return f.read(size)


class WebDatasetSource:
  """Images of `ROOT/{image_modality}/*.tar` with their captions from `ROOT/{caption_modality}`.

  decode() gives {"image": uint8 [H, W, 3], "label": -1, "caption": str} (no
  caption key when the sample has none). Captions come as ml-4m stores them
  (`caption_text`): `.txt`, or `.json` / `.json.gz` holding a string, a dict
  with a "caption" field, or a list of either (the first is taken, as ml-4m
  does without augmentation).
  """

  def __init__(self, root: str, image_modality: str = "rgb", caption_modality: str = "caption",
               key: str | None = None):
    where = f"config key '{key}': " if key else ""
    pattern = os.path.join(root, image_modality, "*.tar")
    paths = paths_lib.glob(pattern)
    if not paths:
      raise FileNotFoundError(f"{where}no files match {pattern} "
                              "(expected ROOT/{modality}/shard-*.tar)")
    self.root = root
    self._images = _index(paths, IMAGE_EXTENSIONS)
    text_paths = paths_lib.glob(os.path.join(root, caption_modality, "*.tar"))
    self._captions = {key: (path, off, size) for key, path, off, size in
                      _index(text_paths, TEXT_EXTENSIONS)}

  def __len__(self) -> int:
    return len(self._images)

  def __getitem__(self, index: int):
    key, path, offset, size = self._images[index]
    return f"{path}:{key}", (key, path, offset, size)

  def decode(self, payload) -> dict[str, Any]:
    key, path, offset, size = payload
    out: dict[str, Any] = {"image": records.decode_image(_read(path, offset, size)),
                           "label": np.int32(-1)}
    if key in self._captions:
      cpath, coff, csize = self._captions[key]
      out["caption"] = caption_text(_read(cpath, coff, csize), f"{cpath}:{key}")
    return out


def caption_text(data: bytes, where: str = "") -> str:
  """A caption file's bytes (.txt, .json or gzip-compressed .json.gz) -> its caption."""
  import gzip
  if data[:2] == b"\x1f\x8b":                  # gzip magic: .json.gz
    data = gzip.decompress(data)
  text = data.decode("utf-8")
  if not text.lstrip()[:1] in ("{", "[", '"'):  # plain text
    return text.strip()
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"caption {where}: not valid JSON ({e})") from None
  if isinstance(value, (list, tuple)):
    if not value:
      raise ValueError(f"caption {where}: an empty list of captions")
    value = value[0]
  if isinstance(value, dict):
    if "caption" not in value:
      raise ValueError(f"caption {where}: a dict without a 'caption' field "
                       f"(keys {sorted(value)[:6]})")
    value = value["caption"]
  if not isinstance(value, str):
    raise ValueError(f"caption {where}: expected text, got {type(value).__name__}")
  return value.strip()
