"""Text encoders for caption-embedding modalities (4M-21's `t5_caption`).

4M-21 gives the encoder T5-XXL's embeddings of the caption as an input-only
modality (`seq_emb`: up to 77 vectors of width 4096, the padding rows dropped,
as ml-4m's `CaptionEmbTransform` keeps `emb[mask_valid]`). No T5 weights can be
downloaded here, so none is built in: you register the encoder you have, and
`tokenizers_jax.tokenize` writes its embeddings of every record's caption.

An encoder is a callable `encode(captions: list[str]) -> list[float [L_i, D]]`
(one array per caption, its valid rows only). Register a factory that builds
it from an optional argument, in a module the tokenize run imports:

  # my_encoders.py
  import numpy as np
  from tokenizers_jax import text_encoders

  def t5_xxl(path):               # e.g. with Hugging Face transformers' Flax T5
    from transformers import AutoTokenizer, FlaxT5EncoderModel
    tok, model = AutoTokenizer.from_pretrained(path), FlaxT5EncoderModel.from_pretrained(path)
    def encode(captions):
      t = tok(captions, max_length=77, padding="max_length", truncation=True, return_tensors="np")
      emb = model(input_ids=t.input_ids, attention_mask=t.attention_mask).last_hidden_state
      return [e[m.astype(bool)] for e, m in zip(np.asarray(emb), t.attention_mask)]
    return encode

  text_encoders.register("t5_xxl", t5_xxl)

  python -m tokenizers_jax.tokenize ... --config.text_encoder_import=my_encoders \\
      --config.text_encoder=t5_xxl:/path/to/t5-v1_1-xxl

(that example is not run here: transformers and the weights are not installed).
"""
from __future__ import annotations

import importlib
from typing import Callable, Sequence

import numpy as np

Encoder = Callable[[Sequence[str]], Sequence[np.ndarray]]
ENCODERS: dict[str, Callable[..., Encoder]] = {}


def register(name: str, factory: Callable[..., Encoder], replace: bool = False) -> None:
  """Makes `factory(arg)` (arg: the text after 'NAME:' in the spec, or None) available as
  NAME."""
  if name in ENCODERS and ENCODERS[name] is not factory and not replace:
    raise ValueError(f"text encoder {name!r} is already registered; pass replace=True")
  ENCODERS[name] = factory


def load(spec: str, imports: str = "") -> Encoder:
  """'NAME' or 'NAME:ARG' -> the registered encoder, after importing the comma-separated
  modules of `imports` (where encoders register themselves)."""
  for module in filter(None, (m.strip() for m in imports.split(","))):
    importlib.import_module(module)
  name, _, arg = spec.partition(":")
  if name not in ENCODERS:
    raise ValueError(f"config key 'text_encoder': no text encoder {name!r} is registered "
                     f"(registered: {sorted(ENCODERS)}); register one with "
                     "tokenizers_jax.text_encoders.register in a module named by "
                     "'text_encoder_import'")
  return ENCODERS[name](arg or None)


def embed(encoder: Encoder, captions: Sequence[str], max_len: int,
          dtype: str = "float16") -> list[np.ndarray]:
  """The encoder's embeddings of `captions`, each cut to `max_len` rows, as `dtype`
  [L_i, D] arrays; checks what the encoder returns."""
  out = list(encoder(list(captions)))
  if len(out) != len(captions):
    raise ValueError(f"the text encoder returned {len(out)} embeddings for {len(captions)} "
                     "captions")
  embs = []
  for caption, e in zip(captions, out):
    e = np.asarray(e)
    if e.ndim != 2 or not np.all(np.isfinite(e)):
      raise ValueError(f"the text encoder must return finite float [L, D] per caption; got "
                       f"shape {e.shape} for {caption!r}")
    embs.append(e[:max_len].astype(dtype))
  return embs
