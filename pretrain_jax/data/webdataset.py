"""Random access to webdataset tar shards in the layout ml-4m uses.

  ROOT/{modality}/shard-00000.tar, shard-00001.tar, ...

Each tar holds `KEY.EXT` files; files of one sample share KEY across the
modality folders (`ROOT/rgb/shard-00000.tar:000123.jpg` and
`ROOT/caption/shard-00000.tar:000123.txt`). The image modality is indexed
once (member offsets, no extraction); other modalities are looked up by key.
Records are in the order of the sorted shards and, within a shard, of the tar.
ROOT may be local or gs://... (read through etils.epath).

Besides rgb and captions, `modalities=` (folder names, or "all") reads ml-4m's
other modalities, as its loaders (fourm/data/modality_transforms.py) read
them, into this repo's record fields (pretrain_jax/data/records.py):

  det            .json {"instances": [{"boxes": [xmin, ymin, xmax, ymax] in [0, 1],
                 "class_name": str, "score": float}, ...]} (DetectionTransform); instances
                 with score < det_threshold (0.6, ml-4m's default) are dropped ->
                 boxes float32 [N, 4], box_names [N] str, box_scores float32 [N], and
                 box_classes int32 [N] (indices into `class_names`) when it is given
  tok_X@R        .npy int [A, N] (save_vq_tokens.py: A crop settings / augmentations, N
                 flattened tokens; TokTransform takes v[rand_aug_idx]) -> field tok_Y int32
                 [s, s] (N = s * s) of augmentation `crop_index` (default 0: ml-4m's
                 first crop setting, the unflipped centre crop); Y is X with ml-4m's
                 names mapped to this repo's (normal->normals, semseg->semantic,
                 canny_edge->edges, sam_edge->sam_edges, as configs/fourm/pretrain.py's
                 FIELDS); when one X comes at several resolutions, the lowest gets tok_Y
                 and the others tok_Y_R (tok_rgb@448 -> tok_rgb_448)
  tok_X          (no @R, e.g. tok_dinov2_global) .npy int [A, N] -> tok_X int32 [N]
  color_palette  .json [{"1": [[c0, c1, c2]], ..., "K": [K colours]}] (ColorPaletteTransform
                 reads sample[0][str(k)]) -> color_palette uint8 [K, K, 3], row k-1 = the
                 k-colour palette then zeros (fourm_jax.palette's layout)
  metadata       .json {official key: number} (MetadataTransform) -> metadata {key: float}
  sam_instance   .npy of [A] dicts {"points", "bbox" (ymin, xmin, ymax, xmax pixels),
                 "token_ids" [N, 16]} (SAMInstanceTokTransform; loaded with pickles allowed,
                 as ml-4m does: read only shards you trust) -> sam_instance_boxes int32
                 [N, 4] xmin, ymin, xmax, ymax pixels, sam_instance_ids int32 [N, 16],
                 sam_instance_points [N] int32 [P, 2] (x, y) outer contours
  crop_settings  .npy int [A, 5] -> crop_settings int32 [5] (top, left, h, w, flip)

A sample without a file in some modality's folder just lacks those fields
(as for captions). A folder name of no known modality, or a member that does
not decode, raises an error naming the shard, key and modality.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import tarfile
from typing import Any, Sequence

import numpy as np
from etils import epath

from pretrain_jax import paths as paths_lib
from pretrain_jax.data import records
from pretrain_jax.data.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
TEXT_EXTENSIONS = (".txt", ".json", ".json.gz")

DET_THRESHOLD = 0.6   # ml-4m's modality_info.py: DetectionTransform(det_threshold=0.6, ...)
# ml-4m's token modality stems -> this repo's field stems (configs/fourm/pretrain.py FIELDS)
FIELD_STEMS = {"normal": "normals", "semseg": "semantic", "canny_edge": "edges",
               "sam_edge": "sam_edges"}
ML4M_STEMS = {v: k for k, v in FIELD_STEMS.items()}
# modality folder -> the extensions ml-4m stores it with
MODALITY_EXTENSIONS = {"det": (".json",), "color_palette": (".json",), "metadata": (".json",),
                       "sam_instance": (".npy",), "crop_settings": (".npy",),
                       "tok": (".npy",)}
KNOWN = ("caption", "det", "tok_<name>[@<resolution>]", "color_palette", "metadata",
         "sam_instance", "crop_settings")


def _split_name(name: str) -> tuple[str, str]:
  """'dir/000123.jpg' -> ('000123', '.jpg'): webdataset keys end at the first dot of the basename."""
  base = os.path.basename(name)
  key, dot, ext = base.partition(".")
  return key, (dot + ext).lower()


def _members(paths: list[str], extensions=None) -> list[tuple[str, str, int, int, str]]:
  """[(key, path, offset, size, ext)] of the files in the tars `paths` (extension in
  `extensions`, or any when None)."""
  out = []
  for path in paths:
    with epath.Path(path).open("rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
      for member in tar:
        if member.isfile():
          key, ext = _split_name(member.name)
          if extensions is None or ext in extensions:
            out.append((key, path, member.offset_data, member.size, ext))
  return out


def _index(paths: list[str], extensions) -> list[tuple[str, str, int, int]]:
  """[(key, path, offset, size)] of the members of `paths` whose extension is in `extensions`."""
  return [m[:4] for m in _members(paths, extensions)]


def _read(path: str, offset: int, size: int) -> bytes:
  with epath.Path(path).open("rb") as f:
    f.seek(offset)
    return f.read(size)


# --- modality names <-> fields ----------------------------------------------------------------

_TOK = re.compile(r"tok_([A-Za-z0-9_]+?)(?:@(\d+))?")


def modality_kind(name: str) -> str:
  """A modality folder's kind: 'caption', 'tok', or the name itself; ValueError if unknown."""
  if name == "caption":
    return "caption"
  if _TOK.fullmatch(name):
    return "tok"
  if name in MODALITY_EXTENSIONS:
    return name
  raise ValueError(f"unknown ml-4m modality folder {name!r}; this reader knows {', '.join(KNOWN)}")


def token_field(modality: str) -> tuple[str, int | None]:
  """'tok_normal@224' -> ('tok_normals', 224); 'tok_dinov2_global' -> ('tok_dinov2_global', None)."""
  m = _TOK.fullmatch(modality)
  if not m:
    raise ValueError(f"{modality!r} is not a token modality (tok_NAME or tok_NAME@RES)")
  stem, res = m.group(1), m.group(2)
  return f"tok_{FIELD_STEMS.get(stem, stem)}", (int(res) if res else None)


def token_modality(field: str, shape: Sequence[int], resolution: int) -> str:
  """The inverse of token_field for an int field of `shape`: a grid [h, w] is an image's
  tokens, 'tok_Y' -> 'tok_X@resolution' ('tok_Y_R' -> 'tok_X@R'); a vector keeps its name."""
  if not field.startswith("tok_"):
    raise ValueError(f"{field!r} is not a token field (tok_...)")
  if len(shape) == 1:
    return field
  stem = field[len("tok_"):]
  m = re.fullmatch(r"(.+)_(\d+)", stem)
  if m:
    stem, resolution = m.group(1), int(m.group(2))
  return f"tok_{ML4M_STEMS.get(stem, stem)}@{resolution}"


def _token_fields(modalities: Sequence[str]) -> dict[str, str]:
  """{token modality: field}; one stem at several resolutions: lowest plain, others _R."""
  by_field: dict[str, list[tuple[int, str]]] = {}
  for m in modalities:
    field, res = token_field(m)
    by_field.setdefault(field, []).append((res or 0, m))
  out = {}
  for field, mods in by_field.items():
    mods.sort()
    for i, (res, m) in enumerate(mods):
      out[m] = field if i == 0 else f"{field}_{res}"
  return out


# --- decoders of one file ---------------------------------------------------------------------

def _json(data: bytes) -> Any:
  import gzip
  if data[:2] == b"\x1f\x8b":
    data = gzip.decompress(data)
  try:
    return json.loads(data.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"not valid JSON ({e})") from None


def _npy(data: bytes, allow_pickle: bool = False) -> np.ndarray:
  try:
    return np.load(io.BytesIO(data), allow_pickle=allow_pickle)
  except Exception as e:   # numpy raises ValueError / UnpicklingError / EOFError
    raise ValueError(f"not a .npy array ({type(e).__name__}: {e})") from None


def _crop(value: np.ndarray, crop_index: int, what: str):
  if value.ndim < 1 or value.shape[0] == 0:
    raise ValueError(f"{what} needs a leading augmentation axis, got shape {list(value.shape)}")
  if not -value.shape[0] <= crop_index < value.shape[0]:
    raise ValueError(f"crop_index {crop_index} out of range: {value.shape[0]} augmentations")
  return value[crop_index]


def decode_det(data: bytes, threshold: float = DET_THRESHOLD,
               class_names: Sequence[str] | None = None) -> dict[str, Any]:
  """ml-4m det JSON -> boxes float32 [N, 4], box_names, box_scores [, box_classes int32 [N]].

  As DetectionTransform.convert_detection_instance: sample["instances"], each with
  "boxes" (xmin, ymin, xmax, ymax, normalised), "class_name" and "score"; kept when
  score >= threshold, in file order.
  """
  value = _json(data)
  if not isinstance(value, dict) or not isinstance(value.get("instances"), list):
    raise ValueError("expected {'instances': [...]}, got "
                     f"{type(value).__name__}{' keys ' + str(sorted(value)[:6]) if isinstance(value, dict) else ''}")
  boxes, names, scores = [], [], []
  for i, inst in enumerate(value["instances"]):
    try:
      box, name, score = inst["boxes"], inst["class_name"], float(inst["score"])
      box = [float(b) for b in box]
    except (TypeError, KeyError, ValueError) as e:
      raise ValueError(f"instance {i} is not {{'boxes': [4 numbers], 'class_name', 'score'}} "
                       f"({type(e).__name__}: {e})") from None
    if len(box) != 4 or not isinstance(name, str):
      raise ValueError(f"instance {i}: boxes must be 4 numbers and class_name a string")
    if score >= threshold:
      boxes.append(box), names.append(name), scores.append(score)
  out = {"boxes": np.array(boxes, np.float32).reshape(-1, 4), "box_names": names,
         "box_scores": np.array(scores, np.float32)}
  if class_names is not None:
    ids = {n: i for i, n in enumerate(class_names)}
    unknown = sorted(set(names) - set(ids))
    if unknown:
      raise ValueError(f"class names {unknown[:5]} are not in class_names")
    out["box_classes"] = np.array([ids[n] for n in names], np.int32)
  return out


def decode_tokens(data: bytes, crop_index: int = 0, grid: bool = True) -> np.ndarray:
  """Pre-tokenised .npy int [A, N] (or [A, h, w]) -> int32 tokens of augmentation `crop_index`:
  [s, s] when `grid` (N = s * s), else [N]."""
  value = _npy(data)
  if not np.issubdtype(value.dtype, np.integer):
    raise ValueError(f"tokens must be integers, got {value.dtype}")
  v = _crop(value, crop_index, "tokens").astype(np.int32)
  if grid and v.ndim == 1:
    s = math.isqrt(v.size)
    if s * s != v.size:
      raise ValueError(f"{v.size} image tokens are no square grid")
    v = v.reshape(s, s)
  return v


def decode_palette(data: bytes) -> np.ndarray:
  """ml-4m color_palette JSON -> uint8 [K, K, 3] (row k-1: the k-colour palette, then zeros)."""
  value = _json(data)
  if isinstance(value, list) and value:
    value = value[0]     # ColorPaletteTransform: instances[0][str(length)]
  if not isinstance(value, dict) or not value:
    raise ValueError("expected [{'1': [colour], ..., 'K': [K colours]}]")
  try:
    sizes = sorted(int(k) for k in value)
  except ValueError:
    raise ValueError(f"palette sizes must be '1'..'K', got {sorted(value)[:8]}") from None
  k_max = sizes[-1]
  if sizes != list(range(1, k_max + 1)):
    raise ValueError(f"palette sizes must be '1'..'{k_max}', got {sizes}")
  out = np.zeros((k_max, k_max, 3), np.float64)
  for k in sizes:
    colours = np.asarray(value[str(k)], np.float64).reshape(-1, 3)
    if len(colours) != k:
      raise ValueError(f"palette '{k}' has {len(colours)} colours")
    out[k - 1, :k] = colours
  if np.any(out != np.rint(out)) or out.min() < 0 or out.max() > 255:
    raise ValueError("palette colours must be integers in [0, 255]")
  return out.astype(np.uint8)


def decode_metadata(data: bytes) -> dict[str, float]:
  value = _json(data)
  if not isinstance(value, dict):
    raise ValueError(f"expected {{key: number}}, got {type(value).__name__}")
  bad = [k for k, v in value.items() if not isinstance(v, (int, float)) or isinstance(v, bool)]
  if bad:
    raise ValueError(f"non-numeric values for {bad[:5]}")
  return {k: float(v) for k, v in value.items()}


def decode_sam_instance(data: bytes, crop_index: int = 0) -> dict[str, Any]:
  value = _crop(_npy(data, allow_pickle=True), crop_index, "sam_instance")
  if not isinstance(value, dict) or not {"points", "bbox", "token_ids"} <= set(value):
    raise ValueError("expected dicts with 'points', 'bbox' and 'token_ids' per augmentation")
  bbox = np.asarray(value["bbox"], np.float64).reshape(-1, 4)
  ids = np.asarray(value["token_ids"]).astype(np.int32)
  ids = ids.reshape(len(bbox), -1) if ids.size else np.zeros((len(bbox), 16), np.int32)
  if len(value["points"]) != len(bbox):
    raise ValueError(f"{len(value['points'])} instance contours but {len(bbox)} boxes")
  ymin, xmin, ymax, xmax = bbox.T   # SAMInstanceTokTransform: ymin, xmin, ymax, xmax = bbox
  return {"sam_instance_boxes": np.stack([xmin, ymin, xmax, ymax], 1).astype(np.int32),
          "sam_instance_ids": ids,
          "sam_instance_points": [np.asarray(c[0]).reshape(-1, 2).astype(np.int32)
                                  for c in value["points"]]}


class WebDatasetSource:
  """Images of `ROOT/{image_modality}/*.tar` with their captions from `ROOT/{caption_modality}`.

  decode() gives {"image": uint8 [H, W, 3], "label": -1, "caption": str} (no
  caption key when the sample has none). Captions come as ml-4m stores them
  (`caption_text`): `.txt`, or `.json` / `.json.gz` holding a string, a dict
  with a "caption" field, or a list of either (the first is taken, as ml-4m
  does without augmentation).

  modalities: other modality folders to read by key ("all": every folder of ROOT),
  decoded into fields as the module docstring lists; crop_index: the augmentation of
  pre-tokenised modalities; class_names: det class names -> box_classes ids;
  det_threshold: ml-4m's detection score threshold.
  """

  def __init__(self, root: str, image_modality: str = "rgb", caption_modality: str = "caption",
               key: str | None = None, modalities: Sequence[str] | str = (),
               crop_index: int = 0, class_names: Sequence[str] | None = None,
               det_threshold: float = DET_THRESHOLD):
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
    self.crop_index, self.det_threshold = crop_index, det_threshold
    self.class_names = None if class_names is None else tuple(class_names)
    if isinstance(modalities, str):
      if modalities != "all":
        raise ValueError(f"{where}modalities must be folder names or 'all', got {modalities!r}")
      modalities = sorted(p.name for p in epath.Path(root).iterdir()
                          if p.is_dir() and p.name not in (image_modality, caption_modality))
    modalities = [m for m in modalities if m != caption_modality]
    for m in modalities:
      try:
        modality_kind(m)
      except ValueError as e:
        raise ValueError(f"{where}{root}/{m}: {e}") from None
    self._token_fields = _token_fields([m for m in modalities if modality_kind(m) == "tok"])
    self._extra: dict[str, dict[str, tuple[str, int, int, str]]] = {}
    for m in modalities:
      mpattern = os.path.join(root, m, "*.tar")
      mpaths = paths_lib.glob(mpattern)
      if not mpaths:
        raise FileNotFoundError(f"{where}modality {m!r}: no files match {mpattern}")
      self._extra[m] = {k: (p, off, size, ext) for k, p, off, size, ext in _members(mpaths)}

  @property
  def modalities(self) -> list[str]:
    return list(self._extra)

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
    for m, index in self._extra.items():
      if key in index:
        mpath, moff, msize, ext = index[key]
        try:
          out.update(self._decode(m, ext, _read(mpath, moff, msize)))
        except Exception as e:
          raise DataError(f"webdataset shard {mpath}, key {key!r}, modality {m!r} "
                          f"({key}{ext}): {e}") from e
    return out

  def _decode(self, modality: str, ext: str, data: bytes) -> dict[str, Any]:
    kind = modality_kind(modality)
    allowed = MODALITY_EXTENSIONS[kind]
    if ext not in allowed:
      raise ValueError(f"a {ext or 'extensionless'} file where ml-4m stores {kind} as "
                       f"{'/'.join(allowed)}")
    if kind == "tok":
      grid = token_field(modality)[1] is not None
      return {self._token_fields[modality]: decode_tokens(data, self.crop_index, grid)}
    if kind == "det":
      return decode_det(data, self.det_threshold, self.class_names)
    if kind == "color_palette":
      return {"color_palette": decode_palette(data)}
    if kind == "metadata":
      return {"metadata": decode_metadata(data)}
    if kind == "sam_instance":
      return decode_sam_instance(data, self.crop_index)
    value = _npy(data)   # crop_settings
    return {"crop_settings": _crop(value, self.crop_index, "crop_settings").astype(np.int32)}


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
