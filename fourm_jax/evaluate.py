"""Out-of-the-box evaluation of 4M on labelled scenes (4M Sec. 3; 4M-21 App. C.2).

  python -m fourm_jax.evaluate --workdir=workdir/4m_tiny \\
      --data='data/scenes_4m_val/*.array_record' --targets=depth,caption \\
      --tokenizers=workdir/tok_depth --text_tokenizer=text.json

RGB in, each target generated (MaskGIT, or left to right for sequences),
detokenized and compared with the exact labels of the scenes validation
shards (fourm_jax.pseudo_label's output, whose labels are exact for scenes):

  depth      standardised L1 (both maps standardised per image, mean |a - b|)
  normals    mean angle error in degrees
  semantic   mean IoU over the classes present
  det        AP at IoU 0.5 of the decoded boxes (in decoded order), per class, averaged
  caption    exact match of the set of object classes the caption mentions

Each is set beside two references: the tokenizer bound (the ground truth
encoded and decoded, what a perfect 4M would get) and the trivial
prediction (the mean depth, the mean normal, the most frequent class, no
boxes). With `ensemble` > 1 (and a temperature > 0) that many samples are
generated per image and averaged (depth, normals) or voted (classes), as
4M-21 App. C.2; sequences are scored on their first sample.
"""
from __future__ import annotations

import re
from typing import Sequence

import jax
import numpy as np

from fourm_jax import sampler as sampler_lib, schedules
from fourm_jax.generate import tokenizer_kind
from pretrain_jax.data import transforms


# ---- metrics ------------------------------------------------------------------------------------
def standardised_l1(pred: np.ndarray, truth: np.ndarray) -> float:
  """Mean over images of mean |std(pred) - std(truth)|, each map standardised per image."""
  s = lambda x: (x - x.mean(axis=(1, 2), keepdims=True)) / np.maximum(
      x.std(axis=(1, 2), keepdims=True), 1e-6)
  return float(np.mean(np.abs(s(np.asarray(pred, np.float64)) - s(np.asarray(truth, np.float64)))))


def mean_angle_error(pred: np.ndarray, truth: np.ndarray) -> float:
  """Degrees between normal maps [B, H, W, 3] (normalised first)."""
  n = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)
  cos = np.clip(np.sum(n(np.asarray(pred, np.float64)) * n(np.asarray(truth, np.float64)), -1),
                -1, 1)
  return float(np.degrees(np.arccos(cos)).mean())


def mean_iou(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> float:
  """Mean IoU over the classes present in the prediction or the truth (int maps)."""
  p, t = np.asarray(pred).ravel(), np.asarray(truth).ravel()
  conf = np.bincount(t * num_classes + p, minlength=num_classes ** 2).reshape(num_classes, -1)
  inter = np.diag(conf)
  union = conf.sum(0) + conf.sum(1) - inter
  present = union > 0
  return float((inter[present] / union[present]).mean()) if present.any() else 1.0


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """IoU of boxes a [N, 4] with b [M, 4] (xmin, ymin, xmax, ymax) -> [N, M]."""
  lo = np.maximum(a[:, None, :2], b[None, :, :2])
  hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
  inter = np.prod(np.clip(hi - lo, 0, None), -1)
  area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), -1)
  return inter / np.maximum(area(a)[:, None] + area(b)[None] - inter, 1e-12)


def box_ap50(preds: Sequence[tuple[np.ndarray, list[str]]],
             truths: Sequence[tuple[np.ndarray, list[str]]]) -> float:
  """Mean over classes of VOC-style AP at IoU 0.5; predictions ranked in decoded order."""
  classes = sorted({c for _, names in truths for c in names})
  aps = []
  for c in classes:
    hits, n_true = [], 0
    for (pb, pn), (tb, tn) in zip(preds, truths):
      pb, tb = np.asarray(pb).reshape(-1, 4), np.asarray(tb).reshape(-1, 4)
      p_idx = [i for i, n in enumerate(pn) if n == c]
      t_idx = [i for i, n in enumerate(tn) if n == c]
      n_true += len(t_idx)
      used = set()
      for rank, i in enumerate(p_idx):
        ious = _iou(pb[i:i + 1], tb[t_idx])[0] if t_idx else np.zeros(0)
        j = int(np.argmax(ious)) if len(ious) else -1
        ok = j >= 0 and ious[j] >= 0.5 and j not in used
        if ok:
          used.add(j)
        hits.append((rank, ok))
    if not n_true:
      continue
    hits.sort(key=lambda h: h[0])
    tp = np.cumsum([h[1] for h in hits]) if hits else np.zeros(0)
    if not len(tp):
      aps.append(0.0)
      continue
    recall = tp / n_true
    precision = tp / np.arange(1, len(tp) + 1)
    ap, prev = 0.0, 0.0
    for r, p in zip(recall, np.maximum.accumulate(precision[::-1])[::-1]):
      ap += (r - prev) * p
      prev = r
    aps.append(ap)
  return float(np.mean(aps)) if aps else 0.0


def mentioned(caption: str, classes: Sequence[str]) -> frozenset:
  """The classes a caption names (whole words; plural 's' allowed)."""
  low = caption.lower()
  return frozenset(c for c in classes if re.search(rf"\b{re.escape(c.lower())}s?\b", low))


def _boxes_or_none(sequences, text_: str):
  """Decoded boxes of a generated det sequence; a malformed one counts as no boxes."""
  try:
    return sequences.decode_boxes(text_) if text_.strip() else (np.zeros((0, 4)), [])
  except ValueError:
    return np.zeros((0, 4)), []


# ---- evaluation --------------------------------------------------------------------------------
def _truth(kind: str, rec: dict) -> np.ndarray:
  return np.asarray(rec[kind], np.float32 if kind in ("depth", "normals") else None)


def evaluate(model, params, records: Sequence[dict], tokenizers: dict, targets: Sequence[str],
             text_tok=None, class_names: Sequence[str] = (), steps: int = 8,
             temperature: float = 0.0, ensemble: int = 1, batch_size: int = 16,
             seed: int = 0) -> dict:
  """{target: {"model", "tokenizer_bound", "baseline", "metric"}} on labelled `records`
  (dicts with image and the labels), RGB pixels as the only condition."""
  from tokenizers_jax import sequences, text
  if ensemble > 1 and temperature <= 0:
    raise ValueError("an ensemble needs sampling (temperature > 0): at temperature 0 every "
                     "member is the same")
  pixels = [m for m in model.inputs if m.kind == "pixels"]
  if not pixels:
    raise ValueError("the model has no RGB pixel input to condition on")
  px = pixels[0]
  size = px.grid[0] * px.patch_size
  sampler = sampler_lib.Sampler(model, params)
  rows = {m.name: m for m in model.targets}
  out = {}
  images = np.stack([transforms.resize_center_crop(r["image"], size, 1.0) for r in records])
  for target in targets:
    m = rows[target]
    kind = tokenizer_kind(target) if m.kind != "seq" else target
    if m.kind == "seq":
      plan = [schedules.Step(target, "autoregressive", m.length, temperature)]
    else:
      plan = schedules.chained([target], [m.num_tokens], ["maskgit"], [steps],
                               temperatures=[temperature])
    preds = []
    for start in range(0, len(records), batch_size):
      chunk = images[start:start + batch_size]
      n = len(chunk)
      chunk = np.concatenate([chunk, np.zeros((batch_size - n, *chunk.shape[1:]), chunk.dtype)])
      chunk = np.stack([transforms.normalize(im) for im in chunk])
      samples = []
      for e in range(ensemble):
        state = sampler.init_state(batch_size, {px.name: {"tensor": chunk}})
        state = sampler.generate(state, plan, jax.random.key(seed * 1000 + start + e))
        samples.append(np.asarray(state[target]["tensor"])[:n])
      preds.append(np.stack(samples, 1))          # [n, ensemble, tokens]
    toks = np.concatenate(preds)
    if m.kind == "seq":
      texts = [[text.decode(text_tok, t) for t in per] for per in toks]
      if target == "det":
        pred = [_boxes_or_none(sequences, ts[0]) for ts in texts]
        truth = [(r["boxes"], [class_names[c] for c in r["box_classes"]]) for r in records]
        out[target] = {"metric": "AP50", "model": box_ap50(pred, truth),
                       "baseline": 0.0, "tokenizer_bound": 1.0}
      else:
        got = [mentioned(ts[0], class_names) for ts in texts]
        want = [mentioned(r["caption"], class_names) for r in records]
        exact = float(np.mean([a == b for a, b in zip(got, want)]))
        most = max(set(want), key=want.count)
        out[target] = {"metric": "object mentions exact match", "model": exact,
                       "baseline": float(np.mean([w == most for w in want])),
                       "tokenizer_bound": 1.0}
      out[target]["examples"] = [ts[0] for ts in texts[:4]]
      continue
    tok = tokenizers.get(kind)
    if tok is None:
      raise ValueError(f"target {target}: no tokenizer for {kind}")
    decode = lambda t: tok.detokenize(t.reshape(-1, *m.grid), seed=seed)
    values = np.stack([decode(toks[:, e]) for e in range(ensemble)], 1)   # [n, E, H, W, C]
    truth = np.stack([_truth(kind, r) for r in records])
    bound = decode(tok([r[kind] for r in records]))
    if kind == "depth":
      pred = values.mean(1)[..., 0]
      out[target] = {"metric": "standardised L1", "model": standardised_l1(pred, truth),
                     "tokenizer_bound": standardised_l1(bound[..., 0], truth),
                     "baseline": standardised_l1(np.zeros_like(truth), truth)}   # the mean
    elif kind == "normals":
      mean_normal = truth.reshape(-1, 3).mean(0)
      out[target] = {"metric": "mean angle error (deg)",
                     "model": mean_angle_error(values.mean(1), truth),
                     "tokenizer_bound": mean_angle_error(bound, truth),
                     "baseline": mean_angle_error(np.broadcast_to(mean_normal, truth.shape),
                                                  truth)}
    elif kind == "semantic":
      c = values.shape[-1]
      votes = np.eye(c)[values.argmax(-1)].sum(1).argmax(-1)
      common = np.bincount(truth.ravel(), minlength=c).argmax()
      out[target] = {"metric": "mIoU", "model": mean_iou(votes, truth, c),
                     "tokenizer_bound": mean_iou(bound.argmax(-1), truth, c),
                     "baseline": mean_iou(np.full_like(truth, common), truth, c)}
    else:
      raise ValueError(f"no out-of-the-box metric for {target} ({kind})")
  out["_settings"] = {"records": len(records), "steps": steps, "temperature": temperature,
                      "ensemble": ensemble, "compilations": sampler.traces}
  return out


# ---- command line ------------------------------------------------------------------------------
_LABEL_FIELDS = ("image", "depth", "normals", "semantic", "boxes", "box_classes", "caption")


def read_records(pattern: str, num: int) -> list[dict]:
  """The first `num` records of labelled shards (fourm_jax.pseudo_label's output) as dicts of
  the fields `evaluate` reads (those the shards have)."""
  import os
  from pretrain_jax.data import multimodal, schema as schema_lib
  from pretrain_jax.data.sources import ArrayRecordSource
  paths = ArrayRecordSource(pattern, key="--data").paths
  have = schema_lib.read_schema(os.path.dirname(paths[0]))
  fields = [f for f in _LABEL_FIELDS if f in have]
  if "image" not in fields:
    raise ValueError(f"{pattern}: the shards have no 'image' field to condition on")
  ds = multimodal.dataset(pattern, fields=fields, key="--data")
  return [ds[i] for i in range(min(num, len(ds)))]


def format_table(result: dict) -> str:
  """evaluate's result as an aligned text table, one row per target."""
  rows = [("target", "metric", "model", "tokenizer bound", "trivial")]
  for target, r in result.items():
    if not target.startswith("_"):
      rows.append((target, r["metric"], f"{r['model']:.3f}", f"{r['tokenizer_bound']:.3f}",
                   f"{r['baseline']:.3f}"))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def main(argv):
  """Scores a trained 4M's generations from RGB against labelled shards."""
  import json
  import sys
  from absl import flags, logging as absl_logging
  from fourm_jax import generate, load as load_lib
  from pretrain_jax.data.scenes import SEMANTIC_CLASSES
  from tokenizers_jax import text
  from tokenizers_jax.tokenize import Tokenizer
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)     # no checkpoint-library chatter
  f = flags.FLAGS
  if not f.workdir or not f.data or not f.targets:
    print("error: --workdir, --data and --targets are required", file=sys.stderr)
    sys.exit(2)
  try:
    model, params, _ = load_lib.load(f.workdir)
    names = [m.name for m in model.targets]
    targets = [generate.resolve(t, names) for t in f.targets.split(",")]
    tokenizers = {}
    for d in filter(None, f.tokenizers.split(",")):
      tok = Tokenizer(d)
      tokenizers[tok.modality] = tok
    text_tok = text.load(f.text_tokenizer) if f.text_tokenizer else None
    kinds = {m.name: m.kind for m in model.targets}
    if text_tok is None and any(kinds[t] == "seq" for t in targets):
      raise ValueError("sequence targets need --text_tokenizer")
    classes = SEMANTIC_CLASSES if f.class_names == "scenes" else tuple(
        c.strip() for c in f.class_names.split(","))
    records = read_records(f.data, f.num)
    result = evaluate(model, params, records, tokenizers, targets, text_tok, classes,
                      steps=f.steps, temperature=f.temperature, ensemble=f.ensemble,
                      batch_size=min(f.batch_size, len(records)), seed=f.seed)
  except (ValueError, FileNotFoundError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"{len(records)} records of {f.data}, {f.steps} steps, temperature {f.temperature}, "
        f"ensemble {f.ensemble}")
  print(format_table(result))
  if f.out:
    from etils import epath
    epath.Path(f.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {f.out}")


if __name__ == "__main__":
  from absl import app, flags
  from pretrain_jax import cli  # defines --workdir: the fourm_jax.train workdir
  cli.show_in_help("workdir")
  flags.DEFINE_string("data", "", "Labelled shards (glob), e.g. fourm_jax.pseudo_label output.")
  flags.DEFINE_string("targets", "", "Comma-separated targets: depth, normals, semantic, "
                      "caption, det (short names resolve to the model's modalities).")
  flags.DEFINE_string("tokenizers", "", "Comma-separated tokenizers_jax.train workdirs.")
  flags.DEFINE_string("text_tokenizer", "", "The WordPiece file of the sequence modalities.")
  flags.DEFINE_string("class_names", "scenes", "Box/caption classes: 'scenes' or a,b,c.")
  flags.DEFINE_integer("num", 64, "Records to evaluate (the first N).")
  flags.DEFINE_integer("steps", 8, "MaskGIT steps per image-like target.")
  flags.DEFINE_float("temperature", 0.0, "Sampling temperature (0: greedy).")
  flags.DEFINE_integer("ensemble", 1, "Samples averaged per image (needs temperature > 0).")
  flags.DEFINE_integer("batch_size", 16, "Images per generation batch.")
  flags.DEFINE_integer("seed", 0, "Random seed.")
  flags.DEFINE_string("out", "", "Optional JSON file of the results.")
  app.run(main, flags_parser=cli.parse_flags)
