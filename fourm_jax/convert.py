"""Official 4M checkpoints (PyTorch state dicts, e.g. safetensors from the HF hub) -> params.

  params = convert.from_official(state_dict, model)   # model: a fourm_jax.model.FourM

Linear weights are (out, in) there and (in, out) here; attention weights are
split into heads ([D, 3, H, hd] for qkv); LayerNorm biases are fixed zeros
there and absent here; the decoder's tied output layer is its token
embedding. Positions are fixed sine-cosine tables there (buffers) and
computed here, except for learned ones (global-embedding modalities).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from fourm_jax.model import FourM, _name


def _f32(x) -> np.ndarray:
  return np.asarray(x, np.float32)


def from_official(sd: Mapping[str, np.ndarray], model: FourM) -> dict:
  """Maps the official state dict onto `model`'s parameter tree (float32 numpy)."""
  d, h = model.dim, model.num_heads
  hd = d // h
  used: set[str] = set()

  def get(key):
    if key not in sd:
      raise KeyError(f"official checkpoint has no {key!r}: is it a 4M model with these "
                     f"modalities ({[m.name for m in model.inputs]} -> "
                     f"{[m.name for m in model.targets]})?")
    used.add(key)
    return _f32(sd[key])

  def linear(key):                      # (out, in) -> kernel (in, out)
    return get(key + ".weight").T

  def attention(prefix, cross):
    if cross:
      out = {"q": linear(prefix + ".q").reshape(d, h, hd),
             "kv": linear(prefix + ".kv").reshape(d, 2, h, hd)}
    else:
      out = {"qkv": linear(prefix + ".qkv").reshape(d, 3, h, hd)}
    out["proj"] = linear(prefix + ".proj").reshape(h, hd, d)
    if model.qk_norm:
      out["q_norm"] = {"scale": get(prefix + ".q_norm.weight")}
      out["k_norm"] = {"scale": get(prefix + ".k_norm.weight")}
    return out

  def norm(key):
    return {"scale": get(key + ".weight")}

  def mlp(prefix):
    return {n: {"kernel": linear(f"{prefix}.{n}")} for n in ("fc1", "fc2", "fc3")}

  p = {}
  for m in model.inputs:
    src, dst = f"encoder_embeddings.{m.name}", _name(m.name)
    p[f"mod_emb_{dst}"] = get(src + ".mod_emb")
    if m.kind in ("image", "global", "seq"):
      p[f"enc_tok_{dst}"] = {"embedding": get(src + ".token_emb.weight")}
    elif m.kind == "pixels":
      p[f"enc_proj_{dst}"] = {"kernel": linear(src + ".proj")}
    else:
      p[f"enc_proj_{dst}"] = {"kernel": linear(src + ".emb_proj"),
                              "bias": get(src + ".emb_proj.bias")}
    if m.kind == "global":
      p[f"pos_emb_{dst}"] = get(src + ".pos_emb")[0]
    else:
      used.add(src + ".pos_emb")
  for m in model.targets:
    src, dst = f"decoder_embeddings.{m.name}", _name(m.name)
    p.setdefault(f"mod_emb_{dst}", get(src + ".mod_emb"))
    used.add(src + ".mod_emb")
    emb = get(src + ".token_emb.weight")
    if model.tie_embeddings or m.kind == "seq":
      # untied image-like targets enter the decoder as the mask token: no embedding here
      p[f"dec_tok_{dst}"] = {"embedding": emb}
    out = get(src + ".to_logits.weight")
    if model.tie_embeddings:
      if not np.array_equal(out, emb):
        raise ValueError(f"{src}: to_logits and token_emb differ; build the model with "
                         "tie_embeddings=False for this checkpoint")
    else:
      p[f"to_logits_{dst}"] = {"kernel": out.T}
    if m.kind == "global" and f"pos_emb_{dst}" not in p:
      p[f"pos_emb_{dst}"] = get(src + ".pos_emb")[0]
    else:
      used.add(src + ".pos_emb")
  for i in range(model.encoder_depth):
    s = f"encoder.{i}"
    p[f"encoder_{i}"] = {"norm1": norm(s + ".norm1"), "norm2": norm(s + ".norm2"),
                         "attn": attention(s + ".attn", False), "mlp": mlp(s + ".mlp")}
  for i in range(model.decoder_depth):
    s = f"decoder.{i}"
    p[f"decoder_{i}"] = {
        "norm1": norm(s + ".norm1"), "query_norm": norm(s + ".query_norm"),
        "context_norm": norm(s + ".context_norm"), "norm2": norm(s + ".norm2"),
        "self_attn": attention(s + ".self_attn", False),
        "cross_attn": attention(s + ".cross_attn", True), "mlp": mlp(s + ".mlp")}
  p["encoder_norm"] = norm("encoder_norm")
  p["decoder_norm"] = norm("decoder_norm")
  p["decoder_proj_context"] = {"kernel": linear("decoder_proj_context"),
                               "bias": get("decoder_proj_context.bias")}
  p["mask_token"] = get("mask_token")
  # LayerNorm biases are zero buffers there; anything else left over is a mismatch
  left = sorted(k for k in sd if k not in used and not k.startswith("__"))
  nonzero = [k for k in left if k.endswith(".bias") and np.any(_f32(sd[k]) != 0)]
  if nonzero:
    raise ValueError(f"LayerNorm biases are not zero in this checkpoint ({nonzero[:4]}); "
                     "the model has no norm biases")
  left = [k for k in left if not k.endswith(".bias")]
  if left:
    raise ValueError(f"official weights not mapped (modalities missing from the model?): "
                     f"{left[:8]}{' ...' if len(left) > 8 else ''}")
  return p
