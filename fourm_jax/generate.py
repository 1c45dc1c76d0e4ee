"""Any-to-any generation with a trained 4M, from the command line.

  python -m fourm_jax.generate --workdir=workdir/4m_tiny \\
      --condition=caption:"a red sphere left of a blue cube" --targets=rgb,depth \\
      --tokenizers=workdir/tok_rgb,workdir/tok_depth --text_tokenizer=text.json \\
      --num_samples=4 --steps=8 --temperature=0.7 --out=workdir/generations

Conditions are `MODALITY:VALUE`: a caption's text, an image file (PNG/JPEG)
for RGB (the pixel input if the model has one, else RGB tokens through the
RGB tokenizer) or for any image-like modality with a tokenizer, or a .npy of
tokens. Targets are decoded in the order given (chained: each finished one
conditions the next), image-like ones with MaskGIT (or --scheme=roar),
sequences left to right. Short names resolve to the model's modalities
(`depth` -> `tok_depth@224`). Writes generations.png (fourm_jax.figure: a
header naming each column, one row per sample, the conditions then the targets,
images enlarged to at least 128 px, sequences and text conditions as wrapped
text), generations.json (the columns, the sequences as text, the settings) and
tokens.npz.
"""
from __future__ import annotations

import io
import json
import sys

import jax
import numpy as np
from etils import epath

from fourm_jax import figure, sampler as sampler_lib, schedules
from pretrain_jax.data import transforms

# the tokenizers_jax modality that detokenizes each kind of 4M token modality
TOKENIZER_OF = {"rgb": "rgb", "depth": "depth", "normal": "normals", "semseg": "semantic",
                "canny_edge": "edges", "sam_edge": "edges", "clip": "features",
                "dinov2": "features", "imagebind": "features"}


def resolve(name: str, names) -> str:
  """A short modality name ('depth', 'rgb', 'caption') -> the model's modality."""
  names = list(names)
  if name in names:
    return name
  stem = {"normals": "normal", "semantic": "semseg", "edges": "canny_edge"}.get(name, name)
  hits = [n for n in names if n.split("@")[0] in (f"tok_{stem}", stem)]
  if not hits:
    raise ValueError(f"no modality of the model matches {name!r}; the model has {names}")
  return hits[0]


def tokenizer_kind(modality: str) -> str:
  return TOKENIZER_OF.get(modality.split("@")[0].removeprefix("tok_"), "")


def visualize(kind: str, values: np.ndarray) -> np.ndarray:
  """Detokenized values (tokenizers_jax.train.prepare's scale) [B, H, W, C] -> uint8 RGB."""
  v = np.asarray(values, np.float32)
  if kind == "rgb":
    return np.clip((v + 1) * 127.5, 0, 255).astype(np.uint8)
  if kind == "normals":
    return np.clip((v + 1) * 127.5, 0, 255).astype(np.uint8)
  if kind == "semantic":
    from matplotlib import colormaps
    ids = v.argmax(-1)
    return (colormaps["tab20"](ids % 20)[..., :3] * 255).astype(np.uint8)
  if kind == "edges":
    g = np.clip(v[..., :1] * 255, 0, 255).astype(np.uint8)
    return np.repeat(g, 3, -1)
  if kind == "depth":
    from matplotlib import colormaps
    d = v[..., 0] if v.ndim == 4 else v
    lo, hi = d.min(axis=(1, 2), keepdims=True), d.max(axis=(1, 2), keepdims=True)
    return (colormaps["viridis"]((d - lo) / np.maximum(hi - lo, 1e-6))[..., :3] * 255).astype(
        np.uint8)
  raise ValueError(f"cannot draw a {kind!r} modality")


def _read_image(path: str) -> np.ndarray:
  from pretrain_jax.data import records
  from etils import epath
  return records.decode_image(epath.Path(path).read_bytes())


def condition_modality(key: str, model) -> str:
  """A --condition's MODALITY -> the model's input modality: 'rgb'/'image' is the pixel
  input when the model has one; other short names resolve as `resolve` does."""
  pixels = next((m.name for m in model.inputs if m.kind == "pixels"), None)
  if pixels and key in ("rgb", "image"):
    return pixels
  return resolve(key, [m.name for m in model.inputs])


def build_conditions(conditions, model, n: int, tokenizers: dict, text_tok):
  """['MOD:VALUE', ...] -> ({modality: {"tensor"}} for Sampler.init_state, {modality: uint8
  image to draw})."""
  rows = {m.name: m for m in model.inputs}
  given, drawn = {}, {}
  for cond in conditions:
    key, sep, value = cond.partition(":")
    if not sep or not value:
      raise ValueError(f"--condition={cond!r}: expected MODALITY:VALUE")
    name = condition_modality(key, model)
    m = rows[name]
    if m.kind == "seq":
      if text_tok is None:
        raise ValueError(f"--condition={cond!r} needs --text_tokenizer")
      from tokenizers_jax import text
      ids = np.array(text.encode(text_tok, value, m.length), np.int32)
      given[name] = {"tensor": np.repeat(ids[None], n, 0)}
    elif value.endswith(".npy"):
      toks = np.load(value)
      given[name] = {"tensor": np.repeat(toks.reshape(1, -1), n, 0)}
    elif m.kind == "pixels":
      size = m.grid[0] * m.patch_size
      image = transforms.resize_center_crop(_read_image(value), size, crop_fraction=1.0)
      drawn[name] = image
      given[name] = {"tensor": np.repeat(transforms.normalize(image)[None], n, 0)}
    else:
      kind = tokenizer_kind(name)
      if kind not in tokenizers:
        raise ValueError(f"--condition={cond!r}: no --tokenizers entry for {kind or name}")
      tok = tokenizers[kind]
      size = tok.config.data.resolution
      image = transforms.resize_center_crop(_read_image(value), size, crop_fraction=1.0)
      drawn[name] = image
      toks = tok([image])
      given[name] = {"tensor": np.repeat(toks.reshape(1, -1), n, 0)}
  return given, drawn


def condition_columns(conditions, model, drawn: dict, n: int) -> list:
  """The figure's condition columns, in the order given: [(modality, (title, kind, data))]
  for fourm_jax.figure, an image condition as drawn, any other (a caption, a .npy of
  tokens) as its given text.

  Args:
    conditions: ['MODALITY:VALUE', ...], as build_conditions took them.
    model: the 4M model, for its input modalities' names.
    drawn: {modality: uint8 [H, W, 3]}, build_conditions' images.
    n: the number of samples (rows).
  """
  values = {}   # a modality given twice keeps its first place and its last value
  for cond in conditions:
    key, _, value = cond.partition(":")
    values[condition_modality(key, model)] = value
  return [(name, (f"condition: {name}", "image", np.repeat(drawn[name][None], n, 0))
           if name in drawn else (f"condition: {name}", "text", [value] * n))
          for name, value in values.items()]


def run(workdir: str, conditions, targets, out: str, tokenizer_dirs=(), text_tokenizer="",
        num_samples: int = 4, steps: int = 8, scheme: str = "maskgit",
        temperature: float = 1.0, guidance: float = 1.0, top_k: int = 0, top_p: float = 0.0,
        seed: int = 0) -> dict:
  from fourm_jax import load as load_lib
  from tokenizers_jax import text
  from tokenizers_jax.tokenize import Tokenizer
  model, params, _ = load_lib.load(workdir)
  tokenizers = {}
  for d in tokenizer_dirs:
    tok = Tokenizer(d)
    tokenizers[tok.modality] = tok
  text_tok = text.load(text_tokenizer) if text_tokenizer else None
  given, drawn = build_conditions(conditions, model, num_samples, tokenizers, text_tok)
  sampler = sampler_lib.Sampler(model, params)
  target_names = [resolve(t, [m.name for m in model.targets]) for t in targets]
  plan = []
  for name in target_names:
    m = sampler.modalities[name]
    if m.kind == "seq":
      plan.append(schedules.Step(name, "autoregressive", m.length, temperature, top_k, top_p,
                                 guidance))
    else:
      if not tokenizer_kind(name) in tokenizers:
        raise ValueError(f"target {name}: no --tokenizers entry to detokenize it "
                         f"({tokenizer_kind(name) or 'unknown kind'})")
      plan.extend(schedules.chained([name], [m.num_tokens], [scheme], [steps],
                                    temperatures=[temperature], guidance=[guidance],
                                    top_k=[top_k], top_p=[top_p]))
  state = sampler.init_state(num_samples, given)
  state = sampler.generate(state, plan, jax.random.key(seed))
  out_dir = epath.Path(out)   # local or gs://...
  out_dir.mkdir(parents=True, exist_ok=True)
  images, sequences, tokens = {}, {}, {}
  for name in target_names:
    m = sampler.modalities[name]
    t = np.asarray(state[name]["tensor"])
    tokens[name] = t
    if m.kind == "seq":
      sequences[name] = [text.decode(text_tok, row) if text_tok else row.tolist() for row in t]
    else:
      kind = tokenizer_kind(name)
      values = tokenizers[kind].detokenize(t.reshape(num_samples, *m.grid), seed=seed)
      images[name] = visualize(kind, values)
  columns = condition_columns(conditions, model, drawn, num_samples)
  for name in target_names:
    if name in images:
      columns.append((name, (f"-> {name}", "image", images[name])))
    else:   # token ids when there is no text tokenizer to decode them
      texts = [s if isinstance(s, str) else " ".join(map(str, s)) for s in sequences[name]]
      columns.append((name, (f"-> {name}", "text", texts)))
  from PIL import Image
  png = io.BytesIO()
  Image.fromarray(figure.draw([column for _, column in columns])).save(png, format="png")
  (out_dir / "generations.png").write_bytes(png.getvalue())
  npz = io.BytesIO()
  np.savez(npz, **{k.replace("@", "_at_"): v for k, v in tokens.items()})
  (out_dir / "tokens.npz").write_bytes(npz.getvalue())
  result = {"workdir": workdir, "conditions": list(conditions), "targets": target_names,
            "columns": [name for name, _ in columns],
            "titles": [title for _, (title, _, _) in columns], "sequences": sequences,
            "settings": {"num_samples": num_samples, "steps": steps, "scheme": scheme,
                         "temperature": temperature, "guidance": guidance, "top_k": top_k,
                         "top_p": top_p, "seed": seed},
            "compilations": sampler.traces}
  (out_dir / "generations.json").write_text(json.dumps(result, indent=2))
  return result


def main(argv):
  from absl import flags, logging as absl_logging
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)     # no checkpoint-library chatter
  f = flags.FLAGS
  if not f.workdir or not f.targets or not f.out:
    print("error: --workdir, --targets and --out are required", file=sys.stderr)
    sys.exit(2)
  try:
    result = run(f.workdir, f.condition, f.targets.split(","), f.out,
                 [d for d in f.tokenizers.split(",") if d], f.text_tokenizer, f.num_samples,
                 f.steps, f.scheme, f.temperature, f.guidance, f.top_k, f.top_p, f.seed)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  for name, texts in result["sequences"].items():
    for t in texts:
      print(f"{name}: {t}")
  print(f"wrote {f.out}/generations.png, generations.json, tokens.npz")


if __name__ == "__main__":
  from absl import app, flags
  from pretrain_jax import cli  # defines --workdir: the fourm_jax.train workdir
  cli.show_in_help("workdir")
  flags.DEFINE_multi_string("condition", [], "MODALITY:VALUE (text, image file or .npy).")
  flags.DEFINE_string("targets", "", "Comma-separated modalities to generate, in order.")
  flags.DEFINE_string("tokenizers", "", "Comma-separated tokenizers_jax.train workdirs.")
  flags.DEFINE_string("text_tokenizer", "", "The WordPiece file of the sequence modalities.")
  flags.DEFINE_string("out", "", "Output directory.")
  flags.DEFINE_integer("num_samples", 4, "Samples per condition.")
  flags.DEFINE_integer("steps", 8, "Decoding steps per image-like target.")
  flags.DEFINE_enum("scheme", "maskgit", ["maskgit", "roar"], "Image-like decoding scheme.")
  flags.DEFINE_float("temperature", 1.0, "Sampling temperature (0: greedy).")
  flags.DEFINE_float("guidance", 1.0, "Classifier-free guidance scale (1: none).")
  flags.DEFINE_integer("top_k", 0, "Top-k filtering (0: off).")
  flags.DEFINE_float("top_p", 0.0, "Nucleus filtering (0: off).")
  flags.DEFINE_integer("seed", 0, "Random seed.")
  app.run(main, flags_parser=cli.parse_flags)
