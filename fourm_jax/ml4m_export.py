"""This repo's ArrayRecord shards -> ml-4m's webdataset layout.

  python -m fourm_jax.ml4m_export --input='data/scenes_4m/*.array_record' \\
      --out=data/scenes_4m_wds [--shard_size=1000] [--image_format=keep|png|jpg] \\
      [--class_names=scenes|a,b,c]

Reads pseudo-labelled shards (fourm_jax.pseudo_label) or token shards
(tokenizers_jax.tokenize), with the `schema.json` beside them, and writes
OUT/{modality}/shard-00000.tar, ... with `shard_size` records each; record i
of the input (in the shards' order) is `KEY.EXT` in every modality's tar,
KEY = i zero-padded. Fields -> ml-4m modalities (as its loaders read them,
see pretrain_jax/data/webdataset.py, which reads them back):

  image                     rgb/KEY.png|.jpg   stored bytes as they are (`keep`, PNG or
                                               JPEG), or re-encoded (`png`, `jpg` q=95)
  caption (text)            caption/KEY.txt
  boxes + box_classes       det/KEY.json       {"instances": [{"boxes": [xmin, ymin, xmax,
                                               ymax], "class_name", "score": 1.0}]}
  tok_Y int [h, w]          tok_X@R/KEY.npy    [1, h*w] (one augmentation, flattened as
                                               save_vq_tokens.py writes; int16 when the ids
                                               fit, as ml-4m, else int32); R is the image
                                               size, or the field's _R suffix
  tok_Y int [N]             tok_Y/KEY.npy      [1, N]
  color_palette[_raw] [K, K, 3]  color_palette/KEY.json  [{"1": [[r, g, b]], ..., "K": [...]}]
                            (ml-4m draws K in 1..7: the labeller's default K = 7 fits)
  metadata_raw, or image_/semantic_/geometric_metadata + caption_length
                            metadata/KEY.json  {official key: value} (sizes and counts
                                               as ints, as MetadataTransform needs)

Other fields (depth, normals, masks, WordPiece ids of token shards' caption /
det / ...) are not exported and are listed in the summary. Each tar is written
to `.tmp` (a local temporary file when OUT is gs://...) then renamed, so a
rerun skips finished tars and rewrites a half-written one; tars are
deterministic (fixed mtime, owner and mode). OUT/ml4m_export.json records the
run; a rerun with another input size, shard size or set of modalities fails.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import tarfile
import time
from typing import Any, Callable, Sequence

import numpy as np
from etils import epath

from pretrain_jax import paths
from pretrain_jax.data import records, webdataset
from pretrain_jax.data.sources import ArrayRecordSource

MANIFEST = "ml4m_export.json"
IMAGE_FORMATS = ("keep", "png", "jpg")
ML4M_PALETTE_SIZES = 7   # ColorPaletteTransform: random.randint(1, 7)
METADATA_MAPS = ("image_metadata", "semantic_metadata", "geometric_metadata", "caption_length")

Encoder = Callable[[dict[str, Any]], "tuple[str, bytes] | None"]


def class_names_of(spec: str | Sequence[str]) -> tuple[str, ...]:
  """'scenes' (the scenes dataset's classes), 'a,b,c' or a sequence -> class names."""
  if not isinstance(spec, str):
    return tuple(spec)
  if spec == "scenes":
    from pretrain_jax.data import scenes
    return scenes.SEMANTIC_CLASSES
  return tuple(n.strip() for n in spec.split(","))


def _image_encoder(image_format: str) -> Encoder:
  def encode(rec):
    value = rec["image"]
    if isinstance(value, (bytes, bytearray)):
      data = bytes(value)
      if image_format in ("keep", "png") and data[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png", data
      if image_format in ("keep", "jpg") and data[:3] == b"\xff\xd8\xff":
        return ".jpg", data
    image = records.decode_image(value)
    if image_format == "jpg":
      from PIL import Image
      buf = io.BytesIO()
      Image.fromarray(image).save(buf, format="JPEG", quality=95)
      return ".jpg", buf.getvalue()
    return ".png", records.encode_png(image)
  return encode


def det_json(boxes: np.ndarray, classes: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
  """boxes [N, 4] xmin, ymin, xmax, ymax in [0, 1] and class ids -> ml-4m's det JSON (score 1:
  exact or pseudo labels carry none; ml-4m keeps scores >= 0.6)."""
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  classes = np.asarray(classes).reshape(-1)
  if len(classes) != len(boxes):
    raise ValueError(f"{len(boxes)} boxes but {len(classes)} box_classes")
  bad = [int(c) for c in classes if not 0 <= c < len(names)]
  if bad:
    raise ValueError(f"box_classes {bad[:5]} outside the {len(names)} class names "
                     "(pass --class_names)")
  return {"instances": [{"boxes": [float(v) for v in b], "class_name": names[int(c)],
                         "score": 1.0} for b, c in zip(boxes, classes)]}


def palette_json(palette: np.ndarray) -> list[dict[str, list]]:
  """uint8 [K, K, 3] (row k-1: the k-colour palette) -> ml-4m's [{"k": [k colours]}]."""
  p = np.asarray(palette)
  if p.ndim != 3 or p.shape[0] != p.shape[1] or p.shape[2] != 3:
    raise ValueError(f"color_palette must be [K, K, 3], got {list(p.shape)}")
  return [{str(k): p[k - 1, :k].astype(int).tolist() for k in range(1, p.shape[0] + 1)}]


def metadata_json(meta: dict[str, float]) -> dict[str, float | int]:
  """{official key: value} -> ml-4m's metadata JSON: sizes and counts as ints (MetadataTransform
  writes them as `v0={value}` unbinned, so 21.0 would give the token 'v0=21.0')."""
  from tokenizers_jax import sequences
  out: dict[str, float | int] = {}
  for k, v in meta.items():
    kind = sequences.METADATA_TYPES[k].kind if k in sequences.METADATA_TYPES else ""
    out[k] = int(round(v)) if kind in ("size", "count") else float(v)
  return out


def _npy_bytes(tokens: np.ndarray) -> bytes:
  t = np.asarray(tokens).reshape(1, -1)
  fits = t.size == 0 or (t.min() >= np.iinfo(np.int16).min and t.max() <= np.iinfo(np.int16).max)
  buf = io.BytesIO()
  np.save(buf, t.astype(np.int16 if fits else np.int32), allow_pickle=False)
  return buf.getvalue()


def _json_bytes(value) -> bytes:
  return json.dumps(value, sort_keys=True).encode("utf-8")


def plan(schema, image_format: str = "keep", class_names="scenes",
         resolution: int | None = None) -> tuple[dict[str, Encoder], list[str]]:
  """({modality: encoder(record) -> (ext, bytes) | None}, fields not exported) of a schema."""
  if image_format not in IMAGE_FORMATS:
    raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
  enc: dict[str, Encoder] = {}
  used: set[str] = set()
  if "image" in schema and schema["image"].kind == "image":
    enc["rgb"] = _image_encoder(image_format)
    used.add("image")
    if resolution is None and schema["image"].shape and schema["image"].shape[0]:
      resolution = int(schema["image"].shape[0])
  if "caption" in schema and schema["caption"].kind == "text":
    enc["caption"] = lambda r: (".txt", r["caption"].encode("utf-8"))
    used.add("caption")
  if "boxes" in schema and "box_classes" in schema:
    names = class_names_of(class_names)
    enc["det"] = lambda r: (".json", _json_bytes(det_json(r["boxes"], r["box_classes"], names)))
    used |= {"boxes", "box_classes"}
  for field, spec in sorted(schema.items()):
    if not (field.startswith("tok_") and spec.kind == "array"
            and np.issubdtype(np.dtype(spec.dtype), np.integer)
            and len(spec.shape) in (1, 2) and None not in spec.shape):
      continue
    if len(spec.shape) == 2 and resolution is None:
      raise ValueError(f"{field} is an image's tokens but the image size is unknown (no image "
                       "field in the schema): pass resolution (--resolution)")
    modality = webdataset.token_modality(field, spec.shape, resolution or 0)
    if modality in enc:
      raise ValueError(f"fields {field} and another both map to ml-4m modality {modality}")
    enc[modality] = lambda r, f=field: (".npy", _npy_bytes(r[f]))
    used.add(field)
  for field in ("color_palette", "color_palette_raw"):
    spec = schema.get(field)
    if spec is not None and spec.kind == "array" and len(spec.shape) == 3:
      if spec.shape[0] is not None and spec.shape[0] < ML4M_PALETTE_SIZES:
        logging.warning("%s holds palettes of up to %d colours; ml-4m's ColorPaletteTransform "
                        "draws a size in 1..%d and fails on a missing one", field,
                        spec.shape[0], ML4M_PALETTE_SIZES)
      enc["color_palette"] = lambda r, f=field: (".json", _json_bytes(palette_json(r[f])))
      used.add(field)
      break
  if "metadata_raw" in schema:
    def metadata(r):
      from tokenizers_jax import sequences
      return ".json", _json_bytes(metadata_json(sequences.metadata_dict(r["metadata_raw"])))
    enc["metadata"] = metadata
    used.add("metadata_raw")
  elif any(m in schema for m in METADATA_MAPS):
    def metadata(r):
      from tokenizers_jax import sequences
      return ".json", _json_bytes(metadata_json(sequences.metadata_from_labellers(
          *(r.get(m) or {} for m in METADATA_MAPS))))
    enc["metadata"] = metadata
    used |= {m for m in METADATA_MAPS if m in schema}
  skipped = sorted(set(schema) - used - {"index", "key", "label", "original_size"})
  return enc, skipped


def tar_path(out: str, modality: str, shard: int) -> str:
  return os.path.join(out, modality, f"shard-{shard:05d}.tar")


def _write_tar(path: str, members: list[tuple[str, bytes]]) -> None:
  staging = paths.staging_path(path)
  with open(staging, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size, info.mtime, info.mode = len(data), 0, 0o644
      info.uid = info.gid = 0
      info.uname = info.gname = ""
      tar.addfile(info, io.BytesIO(data))
  paths.publish(staging, path)


def export(pattern, out: str, shard_size: int = 1000, image_format: str = "keep",
           class_names="scenes", resolution: int | None = None) -> dict[str, Any]:
  """Writes the records of the shards `pattern` into OUT/{modality}/shard-NNNNN.tar.
  Returns {"records", "shards", "modalities", "skipped_fields", "written", "kept"}."""
  from pretrain_jax.data import multimodal
  if shard_size <= 0:
    raise ValueError(f"shard_size must be positive, got {shard_size}")
  source = ArrayRecordSource(pattern, key="input")
  schema = multimodal.schema_of(pattern, key="input")
  encoders, skipped = plan(schema, image_format, class_names, resolution)
  if not encoders:
    raise ValueError(f"no field of the schema ({sorted(schema)}) maps to an ml-4m modality")
  num = len(source)
  if num == 0:
    raise ValueError(f"the shards {pattern} hold no records")
  num_shards = math.ceil(num / shard_size)
  width = max(6, len(str(num - 1)))
  manifest = {"records": num, "shard_size": shard_size, "shards": num_shards,
              "modalities": sorted(encoders), "image_format": image_format,
              "inputs": list(source.paths)}
  root = epath.Path(out)
  root.mkdir(parents=True, exist_ok=True)
  mpath = root / MANIFEST
  if mpath.exists():
    old = json.loads(mpath.read_text())
    diff = [k for k in ("records", "shard_size", "modalities", "image_format")
            if old.get(k) != manifest[k]]
    if diff:
      was = {k: old.get(k) for k in diff}
      raise ValueError(f"{out} holds an export with other {', '.join(diff)} ({was}); "
                       "use a new --out")
  paths.write_text(os.fspath(mpath), json.dumps(manifest, indent=1))
  for m in encoders:
    (root / m).mkdir(parents=True, exist_ok=True)
  written = kept = 0
  start = time.perf_counter()
  for s in range(num_shards):
    todo = [m for m in encoders if not epath.Path(tar_path(out, m, s)).exists()]
    kept += len(encoders) - len(todo)
    if not todo:
      continue
    members: dict[str, list[tuple[str, bytes]]] = {m: [] for m in todo}
    for i in range(s * shard_size, min(num, (s + 1) * shard_size)):
      where, payload = source[i]
      if isinstance(payload, Exception):
        raise ValueError(f"{where}: {payload}")
      rec = records.decode_record(payload)
      key = f"{i:0{width}d}"
      for m in todo:
        try:
          item = encoders[m](rec)
        except Exception as e:
          raise ValueError(f"{where}: ml-4m modality {m!r}: {type(e).__name__}: {e}") from e
        if item is not None:
          members[m].append((key + item[0], item[1]))
    for m in todo:
      _write_tar(tar_path(out, m, s), members[m])
      written += 1
  logging.info("ml4m_export: %d records -> %d shards x %d modalities under %s (%d tars written, "
               "%d kept) in %.1f s", num, num_shards, len(encoders), out, written, kept,
               time.perf_counter() - start)
  return {"records": num, "shards": num_shards, "modalities": sorted(encoders),
          "skipped_fields": skipped, "written": written, "kept": kept}


def main(argv):
  import sys
  from absl import app, flags
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    r = export(f.input, f.out, f.shard_size, f.image_format, f.class_names, f.resolution)
  except (ValueError, FileNotFoundError) as e:   # bad flags or data: one line, no traceback
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"wrote {r['records']} records in {r['shards']} shards x {len(r['modalities'])} "
        f"modalities ({', '.join(r['modalities'])}) under {f.out}: {r['written']} tars written, "
        f"{r['kept']} already present; not exported: {', '.join(r['skipped_fields']) or 'none'}",
        flush=True)


if __name__ == "__main__":
  from absl import app
  from absl import flags
  from pretrain_jax import cli
  flags.DEFINE_string("input", None, "Shards of this repo (glob or comma-separated paths), "
                      "with schema.json beside them.")
  flags.DEFINE_string("out", None, "Output root: OUT/{modality}/shard-NNNNN.tar.")
  flags.DEFINE_integer("shard_size", 1000, "Records per output tar.")
  flags.DEFINE_enum("image_format", "keep", list(IMAGE_FORMATS),
                    "keep: the stored PNG/JPEG bytes; png / jpg: re-encode.")
  flags.DEFINE_string("class_names", "scenes",
                      "box_classes ids -> det class names: 'scenes' or comma-separated names.")
  flags.DEFINE_integer("resolution", None, "The R of tok_X@R (default: the image field's size).")
  flags.mark_flags_as_required(["input", "out"])
  app.run(main, flags_parser=cli.parse_flags)
