"""Pseudo-labelled shards -> token shards for 4M training.

  python -m tokenizers_jax.tokenize --config=configs/tokenizers/tokenize.py \\
      --input='data/scenes_4m/*.array_record' --out=data/scenes_4m_tokens \\
      --config.image_tokenizers.depth=workdir/tok_depth \\
      --config.text_tokenizer=data/text_tokenizer.json

Each input shard becomes one output shard of the same name holding, per
record, `index`, `key` and one int32 field per tokenised modality:
`tok_<modality>` [h, w] from a trained image tokenizer (a tokenizers_jax.train
workdir, ViT or diffusion decoder), `tok_<field>` [num_tokens] of a vector
field (e.g. aim_global) from an MLP dVAE (`vector_tokenizers`), and for sequence modalities the WordPiece ids ending in [EOS]:
`caption`, `det` (boxes with their class names), `color_palette` (the
palette with `palette_size` colours), `metadata` (every metadata map of the
record, official keys in a fixed order) and, with a SAM-mask tokenizer
(`sam_instance_tokenizer`), `sam_instance`: `sam_points` query points drawn
per record (seeded by `seed` and the record's index) with the instances
under them, each as its box and 16 mask tokens (tokenizers_jax.sequences
gives every format); with a pose tokenizer (`pose_tokenizer`, an mlp_vae of
SMPL body poses) and the shards' people (HUMAN_FIELDS), `human_poses`; with a
registered text encoder (`text_encoder`, tokenizers_jax.text_encoders), the
caption's embeddings as `t5_caption` (float16 [L, D]). The raw palettes,
metadata, instances and people are kept beside them, for 4M's per-sample draws
(fourm_jax.sequence_augment). Fields named in `copy_fields` (default `image`, the
RGB pixels 4M takes as input) are copied unchanged. Output shards are written to `.tmp` and renamed,
so a rerun skips finished shards and redoes a half-written one; the result
is deterministic, byte for byte.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from pretrain_jax import checkpoint, paths
from pretrain_jax.data import multimodal, records, schema as schema_lib
from pretrain_jax.data.schema import FieldSpec
from pretrain_jax.data.sources import ArrayRecordSource
from tokenizers_jax import diffusion, sequences, text
from tokenizers_jax import train as tok_train

WRITER_OPTIONS = "group_size:1"
# the record field an image tokenizer of a modality reads, where it is not the modality's name
INPUT_FIELDS = {"rgb": "image", "edges": "canny_edges", "features": "aim_features"}
METADATA_FIELDS = ("image_metadata", "semantic_metadata", "geometric_metadata", "caption_length")
# the people of a record (e.g. from 4D-Humans): boxes in [0, 1] float [N, 4], SMPL body pose
# [N, 207] (23 rotation matrices), global orientation [N, 9], camera [N, 3], betas [N, 10]
HUMAN_FIELDS = ("human_boxes", "human_body_pose", "human_global_orient", "human_camera",
                "human_betas")


class Tokenizer:
  """A trained tokenizer (any kind of tokenizers_jax.train) from its workdir (config.json and
  the latest checkpoint): `tok(values)` gives tokens, `tok.detokenize(tokens)` values back."""

  def __init__(self, workdir: str):
    import orbax.checkpoint as ocp
    cfg_path = epath.Path(workdir) / "config.json"   # local or gs://...
    if not cfg_path.exists():
      raise FileNotFoundError(f"{workdir} is not a tokenizer training workdir (no config.json)")
    self.config = ml_collections.ConfigDict(json.loads(cfg_path.read_text()))
    state = ocp.StandardCheckpointer().restore(checkpoint.state_dir(workdir))
    self.variables = {"params": state["params"], **(state.get("extra") or {})}
    self.modality = self.config.modality
    self.kind = self.config.get("kind", "vqvae")
    self.model = tok_train.build_model(self.config)
    self._fn = jax.jit(lambda v, x: self.model.apply(v, x, method=self.model.tokenize))
    if self.kind == "diffusion":
      steps = self.config.diffusion.sample_steps
      self._inverse = jax.jit(lambda v, t, rng: diffusion.reconstruct(
          self.model, v, tokens=t, rng=rng, num_steps=steps))
    else:
      self._inverse = jax.jit(lambda v, t, rng: self.model.apply(
          v, t, method=self.model.decode_tokens))

  def __call__(self, values: list[np.ndarray], resolution: int | None = None) -> np.ndarray:
    """Stored values (as in the shards) -> int32 tokens [B, h, w] or [B, num_tokens];
    resolution: the side to resize images to first (as the multi-resolution training
    resizes its batches), e.g. 448 for 28 x 28 tokens of a tokenizer tuned at 224-448."""
    x = np.stack([tok_train.prepare(self.modality, v, resolution) for v in values])
    return np.asarray(self._fn(self.variables, jnp.asarray(x)), np.int32)

  def detokenize(self, tokens: np.ndarray, seed: int = 0) -> np.ndarray:
    """Tokens -> the prepared modality (tok_train.prepare's scale): images [B, H, W, C]
    (class logits for segmentation; a DDIM sample from `seed` for diffusion decoders) or
    vectors [B, D]."""
    return np.asarray(self._inverse(self.variables, jnp.asarray(tokens, jnp.int32),
                                    jax.random.key(seed)))


def _class_names(config) -> tuple[str, ...]:
  if config.class_names == "scenes":
    from pretrain_jax.data import scenes
    return scenes.SEMANTIC_CLASSES
  return tuple(config.class_names.split(","))


def parse_outputs(spec: str) -> dict[str, tuple[str, str]]:
  """config.outputs, 'OUT=SOURCE:WORKDIR,...' -> {OUT: (SOURCE, WORKDIR)}: the token field
  OUT is the tokenizer of WORKDIR applied to the record field SOURCE (e.g.
  'tok_dinov2=dinov2_features:workdir/tok_feat,tok_sam_edge=sam_edges:workdir/tok_edges').
  SOURCE@RES resizes the field to RES px first ('tok_rgb_448=image@448:workdir/tok_rgb': the
  super-resolution set's 28 x 28 grid from a tokenizer tuned at 224-448)."""
  out = {}
  for item in (i.strip() for i in spec.split(",")):
    if not item:
      continue
    name, eq, rest = item.partition("=")
    source, colon, workdir = rest.partition(":")
    if not (eq and colon and name and source and workdir):
      raise ValueError(f"config key 'outputs': {item!r} is not OUT=SOURCE:WORKDIR "
                       "(e.g. tok_dinov2=dinov2_features:workdir/tok_features)")
    if name in out:
      raise ValueError(f"config key 'outputs': {name!r} is written twice")
    out[name.strip()] = (source.strip(), workdir.strip())
  return out


def split_source(source: str) -> tuple[str, int | None]:
  """'field' -> (field, None); 'field@448' -> (field, 448)."""
  field, at, res = source.partition("@")
  if not at:
    return field, None
  if not res.isdigit() or int(res) <= 0:
    raise ValueError(f"config key 'outputs': {source!r}: the resolution after '@' must be a "
                     "positive integer (e.g. image@448)")
  return field, int(res)


def _grid(tok: "Tokenizer", side: int) -> int:
  """Tokens per side of `tok` on images of `side` px, checked against what it was trained
  at: its resolution, or any multiple of the patch between the multi-resolution bounds
  (data.resolutions: the official tokenizers tuned at 224-448 tokenize any of them)."""
  p, trained = tok.config.model.patch_size, tok.config.data.resolution
  choices = tok_train.resolutions(tok.config)
  lo, hi = (min(choices), max(choices)) if choices else (trained, trained)
  if side % p or not lo <= side <= hi:
    span = f"{lo}-{hi} px (multiples of {p})" if choices else f"{trained} px"
    raise ValueError(f"the {tok.modality} tokenizer was trained at {span}, not {side} px")
  return side // p


def image_side(tok: "Tokenizer", source: str, in_schema) -> int:
  """The side in px `tok` tokenizes the field of `source` ('field' or 'field@RES') at: RES,
  else the stored square image's side; 0 when there is none (vectors, feature maps)."""
  f, res = split_source(source)
  if tok.kind == "mlp_vae" or tok.modality == "features":
    return 0
  shape = tuple(in_schema[f].shape or ()) if f in in_schema else ()
  return res or (shape[0] if len(shape) >= 2 and shape[0] == shape[1] else 0)


def token_jobs(config, in_schema) -> dict[str, tuple["Tokenizer", str]]:
  """{output field: (tokenizer, source field)} of config.image_tokenizers (tok_MODALITY from
  the modality's field), config.vector_tokenizers (tok_FIELD from FIELD) and
  config.outputs (any field from any source)."""
  jobs = {}
  for m, w in config.image_tokenizers.items():
    if w:
      tok = Tokenizer(w)
      if tok.modality != m:
        raise ValueError(f"image_tokenizers.{m} points at a {tok.modality!r} tokenizer")
      jobs[f"tok_{m}"] = (tok, m if m in in_schema else INPUT_FIELDS.get(m, m))
  for field, w in config.get("vector_tokenizers", {}).items():
    if w:
      tok = Tokenizer(w)
      if tok.kind != "mlp_vae":
        raise ValueError(f"vector_tokenizers.{field} points at a {tok.kind} tokenizer, not an "
                         "mlp_vae one")
      jobs[f"tok_{field}"] = (tok, field)
  for name, (source, w) in parse_outputs(config.get("outputs", "")).items():
    if name in jobs:
      raise ValueError(f"config key 'outputs': {name!r} is also written by image_tokenizers "
                       "or vector_tokenizers")
    jobs[name] = (Tokenizer(w), source)
  return jobs


def output_schema(config, in_schema: dict[str, FieldSpec], jobs,
                  sam_tok=None, pose_tok=None) -> dict[str, FieldSpec]:
  out = {"index": FieldSpec("scalar"), "key": FieldSpec("text")}
  out.update({f: in_schema[f] for f in config.get("copy_fields", ()) if f in in_schema})
  for field, (tok, source) in jobs.items():
    if tok.kind == "mlp_vae":
      out[field] = FieldSpec("array", "int32", (tok.config.model.num_tokens,))
    else:
      side = image_side(tok, source, in_schema)
      g = _grid(tok, side) if side else tok.config.data.resolution // tok.config.model.patch_size
      out[field] = FieldSpec("array", "int32", (g, g))
  if config.text_tokenizer:
    for name, needs in (("caption", ("caption",)), ("det", ("boxes", "box_classes")),
                        ("color_palette", ("color_palette",))):
      if all(n in in_schema for n in needs):
        out[name] = FieldSpec("array", "int32", (None,))
    if any(m in in_schema for m in METADATA_FIELDS):
      out["metadata"] = FieldSpec("array", "int32", (None,))
    # raw values, for 4M's per-sample serialisation (fourm_jax.sequence_augment)
    if "color_palette" in out:
      out["color_palette_raw"] = in_schema["color_palette"]
    if "metadata" in out:
      out["metadata_raw"] = FieldSpec("array", "float32", (len(sequences.METADATA_TYPES),))
    if sam_tok is not None:
      out["sam_instance"] = FieldSpec("array", "int32", (None,))
      # raw instances: 4M's pipeline draws the query points per load (sequence_augment)
      m, b, i = sequences.SAM_RAW_FIELDS
      out[m] = in_schema["instance"]
      out[b] = FieldSpec("array", "int32", (None, 4))
      out[i] = FieldSpec("array", "int32", (None, None))
    if pose_tok is not None:
      out["human_poses"] = FieldSpec("array", "int32", (None,))
      widths = (4, pose_tok.config.model.num_tokens, 9, 3, 10)
      for f, n in zip(sequences.POSE_RAW_FIELDS, widths):
        out[f] = FieldSpec("array", "int32" if f.endswith("_ids") else "float32", (None, n))
  if config.get("text_encoder", ""):
    out[config.text_encoder_field] = FieldSpec("array", config.text_encoder_dtype, (None, None))
  return out


def _sequences(rec: dict[str, Any], schema, tok, config, names) -> dict[str, np.ndarray]:
  out = {}
  enc = lambda s: np.array(text.encode(tok, s, config.max_len), np.int32)
  if "caption" in schema:
    out["caption"] = enc(rec["caption"])
  if "det" in schema:
    out["det"] = enc(sequences.encode_boxes(rec["boxes"], [names[c] for c in rec["box_classes"]]))
  if "color_palette" in schema:
    k = config.palette_size
    out["color_palette"] = enc(sequences.encode_palette(rec["color_palette"][k - 1, :k]))
    out["color_palette_raw"] = rec["color_palette"]
  if "metadata" in schema:
    meta = sequences.metadata_from_labellers(*(rec.get(f, {}) for f in METADATA_FIELDS))
    out["metadata"] = enc(sequences.encode_metadata(meta))
    out["metadata_raw"] = sequences.metadata_vector(meta)
  return out


def _sam_instances(rec: dict[str, Any], sam_tok: Tokenizer) -> dict[str, np.ndarray]:
  """The record's instance map and boxes -> the raw sam_instance fields
  (sequences.SAM_RAW_FIELDS): the map, boxes in pixels, each instance's mask tokens."""
  instance, boxes = np.asarray(rec["instance"]), np.asarray(rec["boxes"]).reshape(-1, 4)
  size = sam_tok.config.data.resolution
  crops = [tok_train.instance_mask_crop(instance, boxes, i, size) for i in range(len(boxes))]
  ids = sam_tok(crops).reshape(len(boxes), -1) if crops else np.zeros((0, 16), np.int32)
  h, w = instance.shape
  pixels = np.rint(boxes * np.array([w, h, w, h])).astype(np.int32)
  return dict(zip(sequences.SAM_RAW_FIELDS, (instance, pixels, ids.astype(np.int32))))


def _sam_instance(raw: dict[str, np.ndarray], config, index: int) -> str:
  """The raw sam_instance fields -> the stored sam_instance text: `sam_points` query points
  drawn once per record (seeded by config.seed and the record's index); training redraws
  them per load from the raw fields."""
  rng = np.random.default_rng([config.seed, int(index)])
  return sequences.encode_sam_instances(sequences.sam_queries(
      *(raw[f] for f in sequences.SAM_RAW_FIELDS), config.sam_points, rng))


def _humans(rec: dict[str, Any], pose_tok: Tokenizer) -> dict[str, np.ndarray]:
  """The record's people (HUMAN_FIELDS) -> the raw human_poses fields
  (sequences.POSE_RAW_FIELDS), body poses replaced by the pose tokenizer's ids."""
  boxes, body, orient, camera, betas = (np.asarray(rec[f], np.float32) for f in HUMAN_FIELDS)
  n = len(boxes.reshape(-1, 4))
  ids = (pose_tok(list(body.reshape(n, -1))) if n else
         np.zeros((0, pose_tok.config.model.num_tokens), np.int32))
  return dict(zip(sequences.POSE_RAW_FIELDS, (
      boxes.reshape(n, 4), ids.astype(np.int32), orient.reshape(n, 9),
      camera.reshape(n, 3), betas.reshape(n, 10))))


def _pose_tokenizer(config, in_schema, tok) -> Tokenizer | None:
  if not config.get("pose_tokenizer", ""):
    return None
  pose_tok = Tokenizer(config.pose_tokenizer)
  if pose_tok.kind != "mlp_vae" or pose_tok.config.model.in_dim != 207:
    raise ValueError(f"pose_tokenizer points at a {pose_tok.kind} tokenizer of "
                     f"{pose_tok.modality!r}, not an mlp_vae of SMPL body poses (207 values; "
                     "configs/tokenizers/mlp_vae.py:target=pose)")
  missing = sorted(set(HUMAN_FIELDS) - set(in_schema))
  if missing or tok is None:
    raise ValueError(f"human_poses needs the shards' people {HUMAN_FIELDS} (missing: "
                     f"{missing}) and a text_tokenizer")
  return pose_tok


def tokenize(config, pattern: str, out: str) -> dict[str, int]:
  """Tokenises every shard of `pattern` into `out`; returns {"shards", "written", "records"}."""
  from array_record.python import array_record_module as arm
  source = ArrayRecordSource(pattern)
  in_schema = schema_lib.read_schema(os.path.dirname(source.paths[0]))
  jobs = token_jobs(config, in_schema)
  for name, (t, src) in jobs.items():
    f, res = split_source(src)
    if f not in in_schema:
      raise ValueError(f"the input shards have no {f!r} field to tokenise into {name!r} "
                       f"(fields: {sorted(in_schema)})")
    if t.kind == "mlp_vae" or t.modality == "features":
      if res:
        raise ValueError(f"config key 'outputs': {name!r} gives a resolution to a "
                         f"{t.modality} tokenizer, which has none")
      continue
    shape = tuple(in_schema[f].shape or ())
    size = t.config.data.get("resolution", 0)
    try:
      if len(shape) >= 2 or res:
        _grid(t, image_side(t, src, in_schema))
    except ValueError as e:
      if res:
        raise ValueError(f"config key 'outputs': {name!r}: {e}") from None
      raise ValueError(
          f"the {f!r} field of {pattern} is {shape[0]}x{shape[1]} px, but the {t.modality} "
          f"tokenizer for {name!r} was trained at {size} px: pseudo-label with "
          f"--config.resolution={size} (or train the tokenizer at {shape[0]} px, or give "
          f"a resolution: OUT={f}@{size}:WORKDIR in config.outputs)") from None
  tok = text.load(config.text_tokenizer) if config.text_tokenizer else None
  sam_tok = None
  if config.sam_instance_tokenizer:
    sam_tok = Tokenizer(config.sam_instance_tokenizer)
    if sam_tok.modality != "sam_mask":
      raise ValueError(f"sam_instance_tokenizer points at a {sam_tok.modality!r} tokenizer, "
                       "not a sam_mask one")
    missing = sorted({"instance", "boxes"} - set(in_schema))
    if missing or tok is None:
      raise ValueError(f"sam_instance needs the shards' instance map and boxes (missing: "
                       f"{missing}) and a text_tokenizer")
  pose_tok = _pose_tokenizer(config, in_schema, tok)
  encoder = None
  if config.get("text_encoder", ""):
    from tokenizers_jax import text_encoders
    if "caption" not in in_schema:
      raise ValueError(f"text_encoder {config.text_encoder!r} embeds captions, but the input "
                       f"shards have none (fields: {sorted(in_schema)})")
    encoder = text_encoders.load(config.text_encoder, config.get("text_encoder_import", ""))
  schema = output_schema(config, in_schema, jobs, sam_tok, pose_tok)
  epath.Path(out).mkdir(parents=True, exist_ok=True)   # local or gs://...
  schema_lib.write_schema(out, schema)
  if any(f in schema for f in (*sequences.RAW_FIELDS.values(), *sequences.SAM_RAW_FIELDS,
                                *sequences.POSE_RAW_FIELDS)):
    # the vocabulary and lengths 4M's per-sample serialisation of the raw values uses
    sequences.write_settings(out, config.text_tokenizer, config.max_len,
                             sam_max_len=int(config.sam_max_len),
                             sam_points=int(config.sam_points),
                             pose_max_len=int(config.get("pose_max_len", config.max_len)))
  names = _class_names(config)
  copied = [f for f in config.get("copy_fields", ()) if f in in_schema]
  sources = {split_source(f)[0] for _, f in jobs.values()}
  fields = [f for f in in_schema if f != "image" or "image" in sources or "image" in copied]
  written = records_out = 0
  for path in source.paths:
    final = os.path.join(out, os.path.basename(path))
    if epath.Path(final).exists():
      continue
    ds = multimodal.dataset([path], fields=fields, schema=in_schema)
    tmp = paths.staging_path(final)   # local: FINAL.tmp beside it; for gs://, a local temp file
    writer = arm.ArrayRecordWriter(tmp, WRITER_OPTIONS)
    try:
      for start in range(0, len(ds), config.batch_size):
        recs = [ds[i] for i in range(start, min(start + config.batch_size, len(ds)))]
        toks = {}
        for name, (t, src) in jobs.items():
          f, res = split_source(src)
          toks[name] = t([r[f] for r in recs], res)
        if encoder is not None:
          from tokenizers_jax import text_encoders
          embs = text_encoders.embed(encoder, [r["caption"] for r in recs],
                                     config.text_encoder_max_len, config.text_encoder_dtype)
        for j, rec in enumerate(recs):
          row = {"index": rec["index"], "key": rec["key"], **{f: rec[f] for f in copied}}
          row.update({name: toks[name][j] for name in jobs})
          if tok is not None:
            row.update(_sequences(rec, schema, tok, config, names))
          if sam_tok is not None:
            raw = _sam_instances(rec, sam_tok)
            row.update(raw)
            row["sam_instance"] = np.array(text.encode(
                tok, _sam_instance(raw, config, rec["index"]), config.sam_max_len), np.int32)
          if pose_tok is not None:
            raw = _humans(rec, pose_tok)
            row.update(raw)   # stored with the groups in a fixed order; training shuffles them
            humans = sequences.humans_from_raw(*(raw[f] for f in sequences.POSE_RAW_FIELDS))
            row["human_poses"] = np.array(text.encode(tok, sequences.encode_poses(humans),
                                                      config.pose_max_len), np.int32)
          if encoder is not None:
            row[config.text_encoder_field] = embs[j]
          bad = schema_lib.problems(row, schema)
          if bad:
            raise ValueError(f"{rec['key']}: token record does not match the schema: {bad}")
          writer.write(records.encode_record(row))
          records_out += 1
        if config.debug.stop_after_records and records_out >= config.debug.stop_after_records:
          raise RuntimeError(f"debug.stop_after_records={config.debug.stop_after_records}")
    finally:
      writer.close()
    paths.publish(tmp, final)   # atomic: the final name only ever names a complete shard
    written += 1
    logging.info("tokenised %s -> %s (%d records)", path, final, len(ds))
  return {"shards": len(source.paths), "written": written, "records": records_out}


def main(config, workdir):
  del workdir
  from absl import flags
  pattern, out = flags.FLAGS.input or config.input, flags.FLAGS.out or config.out
  if not pattern or not out:
    raise ValueError("pass --input=SHARDS and --out=DIR (or config.input / config.out)")
  result = tokenize(config, pattern, out)
  print(f"tokenised {result['written']} of {result['shards']} shards "
        f"({result['shards'] - result['written']} already done) into {out}")


if __name__ == "__main__":
  from absl import flags as _flags
  from pretrain_jax import cli
  _flags.DEFINE_string("input", "", "Pseudo-labelled shards (glob or comma-separated paths).")
  _flags.DEFINE_string("out", "", "Output directory for the token shards.")
  cli.run(main, require_workdir=False)
