"""Any-to-any generation with a trained 4M, from the command line.

  python -m fourm_jax.generate --workdir=workdir/4m_tiny \\
      --condition=caption:"a red sphere left of a blue cube" --targets=rgb,depth \\
      --tokenizers=workdir/tok_rgb,workdir/tok_depth --text_tokenizer=text.json \\
      --num_samples=4 --steps=8 --temperature=0.7 --out=workdir/generations

Conditions are `MODALITY:VALUE`: a caption's text, an image file (PNG/JPEG)
for RGB (the pixel input if the model has one, else RGB tokens through the
RGB tokenizer) or for any image-like modality with a tokenizer, or a .npy of
tokens. Targets are decoded in the order given (chained: each finished one
conditions the next), image-like ones with MaskGIT (or --scheme=roar) in
--steps steps, sequences left to right. Short names resolve to the model's
modalities (`depth` -> `tok_depth@224`).

A per-target schedule replaces --targets/--scheme/--steps/--temperature:

  --schedule=tok_depth@224:maskgit:8:0.5,caption:ar:1:0.7

is TARGET:SCHEME:STEPS:TEMPERATURE per target, in decoding order (SCHEME:
maskgit, roar, or ar = autoregressive, which decodes a sequence whole, so its
STEPS is ignored). --schedule may instead name a JSON file holding a list of
such entries as objects with the keys target, scheme, steps, temperature and,
optionally, token_schedule (cosine | linear; ROAR always linear),
temperature_schedule (constant | linear | onex:MIN:POWER), top_k, top_p,
guidance and guidance_schedule (constant | cosine); keys left out take the
flags' values (steps: --steps).

In-painting: a sequence target also given by --condition, with its missing
spans marked [S_1], [S_2], ... in order, has those spans filled (the rest is
kept), as ml-4m's sampler fills them:

  --condition=caption:"a red sphere [S_1] cube [S_2]" --targets=caption,rgb

A text with sentinels is given without the [EOS] that ends other texts (the
official custom_text), so the last span may run on to the caption's end;
generations.json's sequences hold the filled text.

Guidance: --guidance=S is classifier-free guidance with scale S (1: none):
the unconditional pass empties every condition and every finished target (an
image gives nothing, a sequence its [S_1] alone), as the official sampler
does. --condition_weights=MODALITY:W,... is multimodal weighted guidance
instead: logits = uncond + sum_i W_i (cond_i - uncond), one term per
condition (every --condition needs a weight; weights may be negative), and a
target named there becomes, once decoded, a condition of its own with that
weight for the targets after it.

Writes generations.png (fourm_jax.figure: a header naming each column, one row
per sample, the conditions then the targets, images enlarged to at least 128
px, sequences and text conditions as wrapped text), generations.json (the
columns, the sequences as text, the settings, the decoding steps) and
tokens.npz; a global-embedding target (tok_dinov2_global, ...) is shown as its
tokens, and with an MLP tokenizer among --tokenizers (modality 'global') also
detokenized into embeddings.npz. A --tokenizers entry DIR serves every
modality of its kind; MODALITY=DIR serves that modality alone (two global
embeddings, or CLIP and DINOv2 feature maps, in one call).
"""
from __future__ import annotations

import dataclasses
import io
import json
import sys
from typing import Sequence

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
  stem = modality.split("@")[0].removeprefix("tok_")
  if stem.endswith("_global"):      # tok_dinov2_global, tok_aim_global: an MLP tokenizer's
    return "global"
  return TOKENIZER_OF.get(stem, "")


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


def tokenizer_for(name: str, tokenizers: dict):
  """The tokenizer of the model modality `name`: one given for it by name (--tokenizers
  MODALITY=DIR), else the one of its kind (a plain DIR, keyed by the tokenizer's modality);
  None when there is neither."""
  return tokenizers.get(name) or tokenizers.get(tokenizer_kind(name))


def load_tokenizers(dirs, model) -> dict:
  """--tokenizers entries -> {model modality or tokenizer kind: Tokenizer}. DIR is keyed by
  its tokenizer's modality (rgb, depth, global, ...); MODALITY=DIR by the model modality it
  names, so two modalities of one kind (tok_dinov2_global and tok_imagebind_global, CLIP and
  DINOv2 feature maps) each get their own."""
  from tokenizers_jax.tokenize import Tokenizer
  names = [m.name for m in (*model.inputs, *model.targets)]
  out = {}
  for entry in dirs:
    key, eq, d = entry.partition("=")
    if eq and key and "/" not in key:
      out[resolve(key, names)] = Tokenizer(d)
    else:
      tok = Tokenizer(entry)
      out[tok.modality] = tok
  return out


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
      ids = text.encode(text_tok, value, m.length, eos=False)
      # text with sentinels is partly given: no [EOS] after it, as ml-4m's custom_text
      if not any(sampler_lib.is_sentinel(np.asarray(ids))):
        ids = text.encode(text_tok, value, m.length)
      ids = np.array(ids, np.int32)
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
      tok = tokenizer_for(name, tokenizers)
      if tok is None:
        raise ValueError(f"--condition={cond!r}: no --tokenizers entry for "
                         f"{tokenizer_kind(name) or name}")
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


SCHEME_NAMES = {"maskgit": "maskgit", "roar": "roar", "ar": "autoregressive",
                "autoregressive": "autoregressive"}
ENTRY_KEYS = ("target", "scheme", "steps", "temperature", "token_schedule",
              "temperature_schedule", "top_k", "top_p", "guidance", "guidance_schedule")


def parse_schedule(spec: str) -> list[dict]:
  """--schedule -> one dict per target: 'T:SCHEME:STEPS:TEMP,...' or a JSON file's list."""
  path = epath.Path(spec)
  if spec.endswith(".json") or (":" not in spec and path.exists()):
    entries = json.loads(path.read_text())
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
      raise ValueError(f"--schedule={spec}: expected a JSON list of objects")
    for e in entries:
      unknown = sorted(set(e) - set(ENTRY_KEYS))
      if unknown or "target" not in e:
        raise ValueError(f"--schedule={spec}: entry {e} needs 'target' and knows only "
                         f"{list(ENTRY_KEYS)} (unknown: {unknown})")
    return [dict(e) for e in entries]
  entries = []
  for item in spec.split(","):
    parts = item.rsplit(":", 3)     # a target name may hold ':' only before the last three
    if len(parts) != 4:
      raise ValueError(f"--schedule entry {item!r}: expected TARGET:SCHEME:STEPS:TEMPERATURE")
    target, scheme, steps, temp = parts
    try:
      entries.append({"target": target, "scheme": scheme, "steps": int(steps),
                      "temperature": float(temp)})
    except ValueError:
      raise ValueError(f"--schedule entry {item!r}: STEPS must be an integer and "
                       "TEMPERATURE a number") from None
  return entries


def build_plan(entries, modalities: dict, steps: int = 8, temperature: float = 1.0,
               top_k: int = 0, top_p: float = 0.0, guidance: float = 1.0):
  """Schedule entries (parse_schedule's) -> (target names, [schedules.Step]); `modalities`:
  the model's targets by name; left-out entry keys take these defaults."""
  names, plan = [], []
  for e in entries:
    name = resolve(e["target"], list(modalities))
    m = modalities[name]
    scheme = SCHEME_NAMES.get(str(e.get("scheme", "ar" if m.kind == "seq" else "maskgit")))
    if scheme is None:
      raise ValueError(f"target {name}: unknown scheme {e.get('scheme')!r}; use maskgit, "
                       "roar or ar")
    if (scheme == "autoregressive") != (m.kind == "seq"):
      raise ValueError(f"target {name} is a {m.kind} modality: decode "
                       + ("it with ar" if m.kind == "seq" else "it with maskgit or roar"))
    count = m.length if m.kind == "seq" else m.num_tokens
    names.append(name)
    plan.extend(schedules.chained(
        [name], [count], [scheme], [int(e.get("steps", steps))],
        token_schedules=[e["token_schedule"]] if "token_schedule" in e else [],
        temperatures=[float(e.get("temperature", temperature))],
        temperature_schedules=[e.get("temperature_schedule", "constant")],
        top_k=[int(e.get("top_k", top_k))], top_p=[float(e.get("top_p", top_p))],
        guidance=[float(e.get("guidance", guidance))],
        guidance_schedules=[e.get("guidance_schedule", "constant")]))
  return names, plan


def _weighted(key: str, conditions, targets) -> str:
  """A --condition_weights name: a condition's first, else a target's."""
  for names in (conditions, targets):
    try:
      return resolve(key, names)
    except ValueError:
      pass
  raise ValueError(f"--condition_weights names {key!r}, neither a condition ({list(conditions)}) "
                   f"nor a target ({list(targets)})")


def guidance_weights(spec: str, conditions: Sequence[str], targets: Sequence[str]):
  """--condition_weights 'MOD:W,...' -> (condition groups, weights) for Sampler.generate:
  one group per condition (every one needs a weight), then weights of the targets that
  finish before the last, in decoding order (0 for one left out). `conditions`, `targets`:
  the model's modality names; the spec's names are resolved among them."""
  given = {}
  for item in spec.split(","):
    key, sep, value = item.rpartition(":")
    try:
      w = float(value)
    except ValueError:
      w = None
    if not sep or w is None:
      raise ValueError(f"--condition_weights entry {item!r}: expected MODALITY:WEIGHT")
    given[_weighted(key, conditions, targets)] = w
  missing = [c for c in conditions if c not in given]
  if missing:
    raise ValueError(f"--condition_weights gives no weight to the conditions {missing}")
  extra = [given.get(t, 0.0) for t in targets[:-1]]
  while extra and extra[-1] == 0.0 and targets[len(extra) - 1] not in given:
    extra.pop()
  if targets and targets[-1] in given and targets[-1] not in conditions:
    raise ValueError(f"--condition_weights weighs {targets[-1]}, the last target: nothing is "
                     "decoded after it")
  return [(c,) for c in conditions], [given[c] for c in conditions] + extra


def run(workdir: str, conditions, targets, out: str, tokenizer_dirs=(), text_tokenizer="",
        num_samples: int = 4, steps: int = 8, scheme: str = "maskgit",
        temperature: float = 1.0, guidance: float = 1.0, top_k: int = 0, top_p: float = 0.0,
        seed: int = 0, schedule: str = "", condition_weights: str = "") -> dict:
  """Generates `targets` (or the per-target `schedule`, see the module docstring) from
  `conditions` and writes the figure, the JSON and the tokens to `out`."""
  from fourm_jax import load as load_lib
  from tokenizers_jax import text
  model, params, _ = load_lib.load(workdir)
  tokenizers = load_tokenizers(tokenizer_dirs, model)
  text_tok = text.load(text_tokenizer) if text_tokenizer else None
  given, drawn = build_conditions(conditions, model, num_samples, tokenizers, text_tok)
  sampler = sampler_lib.Sampler(model, params)
  if schedule:
    entries = parse_schedule(schedule)
  else:     # sequences left to right, image-like targets with --scheme
    names = [m.name for m in model.targets]
    entries = [{"target": t} if sampler.modalities[resolve(t, names)].kind == "seq" else
               {"target": t, "scheme": scheme} for t in targets]
  target_names, plan = build_plan(entries, {m.name: m for m in model.targets}, steps,
                                  temperature, top_k, top_p, guidance)
  for name in target_names:      # global tokens are written without a tokenizer too
    if (sampler.modalities[name].kind not in ("seq", "global")
        and tokenizer_for(name, tokenizers) is None):
      raise ValueError(f"target {name}: no --tokenizers entry to detokenize it "
                       f"({tokenizer_kind(name) or 'unknown kind'})")
  groups = weights = None
  if condition_weights:
    cond_names = list(dict.fromkeys(condition_modality(c.partition(":")[0], model)
                                    for c in conditions))
    groups, weights = guidance_weights(condition_weights, cond_names, target_names)
  for name in target_names:      # a target given by --condition is in-painted
    if name in given and sampler.modalities[name].kind == "seq" and not np.any(
        sampler_lib.is_sentinel(np.asarray(given[name]["tensor"]))):
      raise ValueError(f"target {name} is given whole by --condition: mark the spans to fill "
                       "with [S_1], [S_2], ... to in-paint it, or drop it from --targets")
  state = sampler.init_state(num_samples, given)
  state = sampler.generate(state, plan, jax.random.key(seed), groups, weights)
  out_dir = epath.Path(out)   # local or gs://...
  out_dir.mkdir(parents=True, exist_ok=True)
  images, sequences, tokens, embeddings = {}, {}, {}, {}
  for name in target_names:
    m = sampler.modalities[name]
    t = np.asarray(state[name]["tensor"])
    tokens[name] = t
    if m.kind == "seq":
      sequences[name] = [text.decode(text_tok, row) if text_tok else row.tolist() for row in t]
    elif m.kind == "global":    # an embedding: its vector (with a tokenizer) and its tokens
      texts = [f"tokens {' '.join(map(str, row))}" for row in t]
      tok = tokenizer_for(name, tokenizers)
      if tok is not None:
        vec = np.asarray(tok.detokenize(t.reshape(num_samples, -1), seed=seed))
        embeddings[name] = vec
        texts = [f"embedding [{v.size}]: norm {np.linalg.norm(v):.3g}, first "
                 f"{' '.join(f'{x:.2f}' for x in v.reshape(-1)[:4])} ... ({tx})"
                 for v, tx in zip(vec, texts)]
      sequences[name] = texts
    else:
      tok = tokenizer_for(name, tokenizers)
      values = tok.detokenize(t.reshape(num_samples, *m.grid), seed=seed)
      images[name] = visualize(tok.modality, values)
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
  if embeddings:     # detokenized global targets, [num_samples, D] each
    npz = io.BytesIO()
    np.savez(npz, **{k.replace("@", "_at_"): v for k, v in embeddings.items()})
    (out_dir / "embeddings.npz").write_bytes(npz.getvalue())
  result = {"workdir": workdir, "conditions": list(conditions), "targets": target_names,
            "columns": [name for name, _ in columns],
            "titles": [title for _, (title, _, _) in columns], "sequences": sequences,
            "settings": {"num_samples": num_samples, "steps": steps, "scheme": scheme,
                         "temperature": temperature, "guidance": guidance, "top_k": top_k,
                         "top_p": top_p, "seed": seed, "schedule": schedule,
                         "condition_weights": condition_weights},
            "embeddings": sorted(embeddings),
            "plan": [dataclasses.asdict(s) for s in plan],
            "compilations": sampler.traces}
  (out_dir / "generations.json").write_text(json.dumps(result, indent=2))
  return result


def main(argv):
  from absl import flags, logging as absl_logging
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)     # no checkpoint-library chatter
  f = flags.FLAGS
  if not f.workdir or not (f.targets or f.schedule) or not f.out:
    print("error: --workdir, --targets (or --schedule) and --out are required", file=sys.stderr)
    sys.exit(2)
  if f.targets and f.schedule:
    print("error: give --targets or --schedule, not both", file=sys.stderr)
    sys.exit(2)
  try:
    result = run(f.workdir, f.condition, [t for t in f.targets.split(",") if t], f.out,
                 [d for d in f.tokenizers.split(",") if d], f.text_tokenizer, f.num_samples,
                 f.steps, f.scheme, f.temperature, f.guidance, f.top_k, f.top_p, f.seed,
                 f.schedule, f.condition_weights)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  for name, texts in result["sequences"].items():
    for t in texts:
      print(f"{name}: {t}")
  print(f"wrote {f.out}/generations.png, generations.json, tokens.npz"
        + (", embeddings.npz" if result.get("embeddings") else ""))


if __name__ == "__main__":
  from absl import app, flags
  from pretrain_jax import cli  # defines --workdir: the fourm_jax.train workdir
  cli.show_in_help("workdir")
  flags.DEFINE_multi_string("condition", [], "MODALITY:VALUE (text, image file or .npy).")
  flags.DEFINE_string("targets", "", "Comma-separated modalities to generate, in order.")
  flags.DEFINE_string("tokenizers", "", "Comma-separated tokenizers_jax.train workdirs, each "
                      "DIR (for every modality of its kind) or MODALITY=DIR (for that one).")
  flags.DEFINE_string("text_tokenizer", "", "The WordPiece file of the sequence modalities.")
  flags.DEFINE_string("out", "", "Output directory.")
  flags.DEFINE_integer("num_samples", 4, "Samples per condition.")
  flags.DEFINE_integer("steps", 8, "Decoding steps per image-like target.")
  flags.DEFINE_enum("scheme", "maskgit", ["maskgit", "roar"], "Image-like decoding scheme.")
  flags.DEFINE_float("temperature", 1.0, "Sampling temperature (0: greedy).")
  flags.DEFINE_string("schedule", "", "Per-target schedule instead of --targets: "
                      "TARGET:SCHEME:STEPS:TEMPERATURE,... (SCHEME maskgit, roar or ar), e.g. "
                      "tok_depth@224:maskgit:8:0.5,caption:ar:1:0.7, or a JSON file of "
                      "entries (see the module docstring).")
  flags.DEFINE_float("guidance", 1.0, "Classifier-free guidance scale (1: none); empties "
                     "the conditions in the unconditional pass as the official sampler does.")
  flags.DEFINE_string("condition_weights", "", "Multimodal weighted guidance, MODALITY:WEIGHT,"
                      "...: one weight per --condition (may be negative); a target named here "
                      "conditions the later targets with its weight once decoded.")
  flags.DEFINE_integer("top_k", 0, "Top-k filtering (0: off).")
  flags.DEFINE_float("top_p", 0.0, "Nucleus filtering (0: off).")
  flags.DEFINE_integer("seed", 0, "Random seed.")
  app.run(main, flags_parser=cli.parse_flags)
