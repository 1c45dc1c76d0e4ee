"""Retrieval with 4M (4M-21 Sec. 3.3): predict a global embedding from any modalities, rank a
gallery by cosine similarity.

  python -m fourm_jax.retrieval --workdir=workdir/4m --target=tok_dinov2_global \\
      --tokenizer=workdir/tok_dinov2_global --condition=caption:"a red sphere" \\
      --text_tokenizer=text.json --gallery='data/val/*.array_record' --gallery_field=dinov2_global

The query's global-embedding tokens are generated (MaskGIT at temperature 0
by default), decoded to a vector by the target's MLP dVAE, and compared with
the gallery's embeddings (a field of pseudo-labelled shards, e.g. the
DINOv2 or ImageBind global embedding, or any [N, D] array).
"""
from __future__ import annotations

import json
import sys

import jax
import numpy as np

from fourm_jax import sampler as sampler_lib, schedules


def cosine_rank(queries: np.ndarray, gallery: np.ndarray, k: int = 5):
  """queries [Q, D], gallery [G, D] -> (indices [Q, k], cosine similarities [Q, k]), best first
  (ties: the lower index first)."""
  q = np.asarray(queries, np.float64)
  g = np.asarray(gallery, np.float64)
  if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
    raise ValueError(f"queries {q.shape} and gallery {g.shape} must be [Q, D] and [G, D]")
  q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
  g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
  sim = q @ g.T
  k = min(k, g.shape[0])
  idx = np.argsort(-sim, axis=1, kind="stable")[:, :k]
  return idx, np.take_along_axis(sim, idx, axis=1)


def predict_embeddings(sampler: sampler_lib.Sampler, given: dict, target: str, tokenizer,
                       batch_size: int, steps: int = 1, temperature: float = 0.0,
                       seed: int = 0) -> np.ndarray:
  """Global-embedding vectors [B, D] predicted for the conditions `given` (Sampler.init_state's
  format): the target's tokens generated, then decoded by its MLP dVAE `tokenizer`."""
  m = sampler.modalities[target]
  if m.kind != "global":
    raise ValueError(f"{target} is a {m.kind} modality, not a global embedding")
  state = sampler.init_state(batch_size, given)
  plan = schedules.chained([target], [m.num_tokens], ["maskgit"], [steps],
                           temperatures=[temperature])
  state = sampler.generate(state, plan, jax.random.key(seed))
  return np.asarray(tokenizer.detokenize(np.asarray(state[target]["tensor"])), np.float32)


def main(argv):
  from absl import flags, logging as absl_logging
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)     # no checkpoint-library chatter
  f = flags.FLAGS
  try:
    from fourm_jax import generate, load as load_lib
    from pretrain_jax.data import multimodal
    from tokenizers_jax import text
    from tokenizers_jax.tokenize import Tokenizer
    if not (f.workdir and f.target and f.tokenizer and f.gallery and f.gallery_field):
      raise ValueError("--workdir, --target, --tokenizer, --gallery and --gallery_field are "
                       "required")
    model, params, _ = load_lib.load(f.workdir)
    text_tok = text.load(f.text_tokenizer) if f.text_tokenizer else None
    given, _ = generate.build_conditions(f.condition, model, 1, {}, text_tok)
    sampler = sampler_lib.Sampler(model, params)
    target = generate.resolve(f.target, [m.name for m in model.targets])
    query = predict_embeddings(sampler, given, target, Tokenizer(f.tokenizer), 1, f.steps)
    ds = multimodal.dataset(f.gallery, fields=(f.gallery_field, "key"))
    rows = [ds[i] for i in range(len(ds))]
    gallery = np.stack([np.asarray(r[f.gallery_field], np.float32).reshape(-1) for r in rows])
    idx, sim = cosine_rank(query, gallery, f.top_k)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  result = [{"rank": r + 1, "index": int(i), "key": rows[i]["key"], "cosine": float(s)}
            for r, (i, s) in enumerate(zip(idx[0], sim[0]))]
  for row in result:
    print(f"{row['rank']:3d}  {row['cosine']:.4f}  {row['key']}")
  if f.out:
    from etils import epath   # local or gs://...
    from pretrain_jax import paths
    out = epath.Path(paths.resolve(f.out))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"conditions": list(f.condition), "target": target,
                               "results": result}, indent=2))


if __name__ == "__main__":
  from absl import app, flags
  from pretrain_jax import cli  # defines --workdir: the fourm_jax.train workdir
  cli.show_in_help("workdir")
  flags.DEFINE_multi_string("condition", [], "MODALITY:VALUE (text, image file or .npy).")
  flags.DEFINE_string("target", "", "The global-embedding modality to predict.")
  flags.DEFINE_string("tokenizer", "", "The target's MLP dVAE (tokenizers_jax.train workdir).")
  flags.DEFINE_string("text_tokenizer", "", "The WordPiece file of the sequence modalities.")
  flags.DEFINE_string("gallery", "", "Shards holding the gallery's embeddings.")
  flags.DEFINE_string("gallery_field", "", "The shards' embedding field.")
  flags.DEFINE_integer("top_k", 5, "How many results.")
  flags.DEFINE_integer("steps", 1, "MaskGIT steps for the embedding tokens.")
  flags.DEFINE_string("out", "", "Optional JSON file of the results.")
  app.run(main, flags_parser=cli.parse_flags)
