"""Official 4M / 4M-21 checkpoints (apple/ml-4m `FM`) <-> fourm_jax workdirs.

  python -m fourm_jax.convert --input=4M-21_B/ --out=workdir/4m21_b
  python -m fourm_jax.convert --input=model.safetensors --out=workdir/4m21_b
  python -m fourm_jax.convert --to_official --input=workdir/4m_tiny --out=tiny_fm.safetensors

A checkpoint with modalities the registry lacks (fourm_jax.modalities) takes their rows
with --modalities='{"tok_x@64": {"kind": "image", "vocab_size": 256, "grid": [4, 4]}}'.

--input is a released checkpoint: a directory holding `model.safetensors` and
`config.json` (the HF-hub layout), or a `.safetensors` file whose metadata
key `config` holds that JSON (else a `config.json` beside it). The config
(domains_in/out, dim, depths, heads, mlp_ratio, gated_mlp/act_layer, biases,
qk_norm) builds the model; the weights are mapped onto it and written as a
workdir that fourm_jax.generate, fourm_jax.backbone, fourm_jax.retrieval and
`--config.init_from` read. `--to_official` goes the other way: a workdir's
params as an official state dict with its config (the round trip is exact).

Layouts: Linear weights are (out, in) there and (in, out) here; attention
weights are split into heads ([D, 3, H, hd] for qkv); LayerNorm biases are
fixed zeros there and absent here; positions are fixed sine-cosine buffers
there (computed here), learned tables for global-embedding modalities (one
for the encoder, one for the decoder, on both sides).

In Python:
  params = convert.from_official(state_dict, model)   # model: a fourm_jax.model.FourM
  state_dict = convert.to_official(params, model)
"""
from __future__ import annotations

import json
import os
from typing import Mapping

import numpy as np

from fourm_jax.model import FourM, SIZES, _name
from pretrain_jax import positions

# Official sequence embeddings slice their 1D sine-cosine table along the batch axis, so
# every sequence modality's pos_emb buffer keeps this many rows whatever its max_length.
OFFICIAL_SEQ_TABLE = 512
# Tensors of the official state dict that its forward pass never reads: untied image-like
# targets' decoder token embeddings (they enter the decoder as the mask token). Kept in a
# side file of the workdir so that --to_official writes them back unchanged.
UNUSED_FILE = "official_unused.safetensors"


def _f32(x) -> np.ndarray:
  return np.asarray(x, np.float32)


# ---- config ---------------------------------------------------------------------------------
def model_config(official: Mapping) -> dict:
  """An official FM config (its `config.json`) -> this project's `config.model` entries.

  Raises ValueError naming the key for what the model here cannot represent."""
  cfg = dict(official)
  missing = [k for k in ("domains_in", "domains_out", "dim", "encoder_depth", "decoder_depth",
                         "num_heads") if k not in cfg]
  if missing:
    raise ValueError(f"official 4M config lacks {missing}; is this an ml-4m FM config?")
  act, gated = cfg.get("act_layer", "GELU"), bool(cfg.get("gated_mlp", False))
  if gated and act == "SiLU":
    ffn = "swiglu"
  elif not gated and act == "GELU":
    ffn = "gelu"
  else:
    raise ValueError(f"official config: act_layer={act!r} with gated_mlp={gated} has no "
                     "equivalent here (SiLU+gated is SwiGLU, GELU+not gated the GELU MLP)")
  biases = {k: bool(cfg.get(k, True)) for k in ("qkv_bias", "proj_bias", "mlp_bias")}
  if len(set(biases.values())) != 1:
    raise ValueError(f"official config: {biases}; the model here has attention and "
                     "feed-forward biases all on or all off")
  checks = {"decoder_causal_mask": (False, "a causal decoder mask"),
            "decoder_sep_mask": (True, "decoder attention across modalities"),
            "num_register_tokens": (0, "register tokens"),
            "share_modality_embeddings": (True, "separate encoder/decoder modality embeddings")}
  for key, (want, what) in checks.items():
    if key in cfg and cfg[key] != want:
      raise ValueError(f"official config: {key}={cfg[key]!r} ({what}) is not supported here")
  size = next((s for s, v in SIZES.items()
               if v == (cfg["encoder_depth"], cfg["decoder_depth"], cfg["dim"], cfg["num_heads"])),
              "B")
  return {"size": size, "dim": int(cfg["dim"]), "encoder_depth": int(cfg["encoder_depth"]),
          "decoder_depth": int(cfg["decoder_depth"]), "num_heads": int(cfg["num_heads"]),
          "mlp_ratio": float(cfg.get("mlp_ratio", 4.0)), "qk_norm": bool(cfg.get("qk_norm", False)),
          "ffn": ffn, "use_bias": biases["qkv_bias"], "tie_embeddings": False,
          # the official decoder concatenates targets in a random order at every call;
          # here the order is fixed, to the sorted names (the fixtures' order)
          "inputs": list(cfg["domains_in"]), "targets": sorted(cfg["domains_out"]),
          "dtype": "float32", "remat": "none"}


def check_registry(official: Mapping, mods) -> None:
  """The official patch_size against the registry rows of the pixel modalities (their
  resolution is in their names, e.g. 'rgb@448', and comes from the registry)."""
  patch = official.get("patch_size")
  for m in mods:
    if m.kind == "pixels" and patch and m.patch_size != patch:
      raise ValueError(f"official config: patch_size {patch}, but modality {m.name!r} here "
                       f"has {m.patch_size}-pixel patches")


def build(official: Mapping, registry=None) -> tuple[FourM, dict]:
  """(model, config.model dict) for an official config; modalities from `registry`."""
  import ml_collections
  from fourm_jax import model as model_lib, modalities
  model_cfg = model_config(official)
  try:
    mods = modalities.get(sorted(set(model_cfg["inputs"]) | set(model_cfg["targets"])), registry)
  except (KeyError, ValueError) as e:
    raise ValueError(f"official config names a modality this project has no row for: {e}; "
                     "add it with fourm_jax.modalities.register") from None
  check_registry(official, mods)
  return model_lib.from_config(ml_collections.ConfigDict(model_cfg), registry), model_cfg


# ---- weights: official -> ours --------------------------------------------------------------
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
    if model.use_bias:
      if cross:
        out["q_bias"] = get(prefix + ".q.bias").reshape(h, hd)
        out["kv_bias"] = get(prefix + ".kv.bias").reshape(2, 1, 1, h, hd)
      else:
        out["qkv_bias"] = get(prefix + ".qkv.bias").reshape(3, 1, 1, h, hd)
      out["proj_bias"] = get(prefix + ".proj.bias")
    if model.qk_norm:
      out["q_norm"] = {"scale": get(prefix + ".q_norm.weight")}
      out["k_norm"] = {"scale": get(prefix + ".k_norm.weight")}
    return out

  def norm(key):
    return {"scale": get(key + ".weight")}

  def mlp(prefix):
    names = ("fc1", "fc2", "fc3") if model.ffn == "swiglu" else ("fc1", "fc2")
    out = {n: {"kernel": linear(f"{prefix}.{n}")} for n in names}
    if model.use_bias:
      for n in names:
        out[n]["bias"] = get(f"{prefix}.{n}.bias")
    return out

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
      p[f"enc_pos_emb_{dst}"] = get(src + ".pos_emb")[0]
    else:
      used.add(src + ".pos_emb")        # fixed sine-cosine buffer, computed here
  for m in model.targets:
    src, dst = f"decoder_embeddings.{m.name}", _name(m.name)
    mod_emb = get(src + ".mod_emb")
    if f"mod_emb_{dst}" in p and not np.array_equal(p[f"mod_emb_{dst}"], mod_emb):
      raise ValueError(f"{m.name}: the encoder's and decoder's mod_emb differ (a model with "
                       "share_modality_embeddings=False); the model here shares one")
    p.setdefault(f"mod_emb_{dst}", mod_emb)
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
    if m.kind == "global":
      p[f"dec_pos_emb_{dst}"] = get(src + ".pos_emb")[0]
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


def unused_official(sd: Mapping[str, np.ndarray], model: FourM) -> dict[str, np.ndarray]:
  """The state dict's tensors that `from_official` reads but the model here has no place
  for (untied image-like targets' decoder token embeddings), to keep beside the params."""
  keys = [f"decoder_embeddings.{m.name}.token_emb.weight" for m in model.targets
          if not model.tie_embeddings and m.kind != "seq"]
  return {k: np.asarray(sd[k]) for k in keys if k in sd}


# ---- weights: ours -> official --------------------------------------------------------------
def _pos_buffer(m, dim: int) -> np.ndarray:
  """The official fixed position buffer of modality `m`: (1, N, D)."""
  if m.is_sequence:
    return positions.sincos_1d(OFFICIAL_SEQ_TABLE, dim)[None]
  return positions.sincos_2d(*m.grid, dim, rows_first=True)[None]


def to_official(params: Mapping, model: FourM, unused: Mapping | None = None
                ) -> dict[str, np.ndarray]:
  """The inverse of `from_official`: params -> the official state dict (float32 numpy),
  zero LayerNorm bias buffers and sine-cosine position buffers included. `unused` gives
  the tensors the forward pass never reads (`unused_official`); absent ones are zeros."""
  d = model.dim
  sd: dict[str, np.ndarray] = {}
  a = lambda x: np.asarray(x, np.float32)

  def linear(key, kernel, shape_in):
    sd[key + ".weight"] = a(kernel).reshape(shape_in, -1).T.copy()

  def norm(key, tree):
    sd[key + ".weight"] = a(tree["scale"])
    sd[key + ".bias"] = np.zeros_like(sd[key + ".weight"])

  def attention(prefix, tree, cross):
    if cross:
      linear(prefix + ".q", tree["q"], d)
      linear(prefix + ".kv", tree["kv"], d)
    else:
      linear(prefix + ".qkv", tree["qkv"], d)
    linear(prefix + ".proj", tree["proj"], d)
    if model.use_bias:
      if cross:
        sd[prefix + ".q.bias"] = a(tree["q_bias"]).reshape(-1)
        sd[prefix + ".kv.bias"] = a(tree["kv_bias"]).reshape(-1)
      else:
        sd[prefix + ".qkv.bias"] = a(tree["qkv_bias"]).reshape(-1)
      sd[prefix + ".proj.bias"] = a(tree["proj_bias"])
    if model.qk_norm:
      for n in ("q_norm", "k_norm"):
        norm(f"{prefix}.{n}", tree[n])

  def mlp(prefix, tree):
    for n, sub in tree.items():
      linear(f"{prefix}.{n}", sub["kernel"], sub["kernel"].shape[0])
      if "bias" in sub:
        sd[f"{prefix}.{n}.bias"] = a(sub["bias"])

  for m in model.inputs:
    src, dst = f"encoder_embeddings.{m.name}", _name(m.name)
    sd[src + ".mod_emb"] = a(params[f"mod_emb_{dst}"])
    if m.kind in ("image", "global", "seq"):
      sd[src + ".token_emb.weight"] = a(params[f"enc_tok_{dst}"]["embedding"])
    elif m.kind == "pixels":
      linear(src + ".proj", params[f"enc_proj_{dst}"]["kernel"], m.patch_size ** 2 * m.channels)
    else:
      proj = params[f"enc_proj_{dst}"]
      linear(src + ".emb_proj", proj["kernel"], m.emb_dim)
      sd[src + ".emb_proj.bias"] = a(proj["bias"])
    sd[src + ".pos_emb"] = (a(params[f"enc_pos_emb_{dst}"])[None] if m.kind == "global"
                            else _pos_buffer(m, d))
  for m in model.targets:
    src, dst = f"decoder_embeddings.{m.name}", _name(m.name)
    sd[src + ".mod_emb"] = a(params[f"mod_emb_{dst}"])
    key = src + ".token_emb.weight"
    if f"dec_tok_{dst}" in params:
      sd[key] = a(params[f"dec_tok_{dst}"]["embedding"])
    else:
      sd[key] = a(unused[key]) if unused and key in unused else np.zeros((m.vocab_size, d),
                                                                         np.float32)
    if model.tie_embeddings:
      sd[src + ".to_logits.weight"] = sd[key]
    else:
      sd[src + ".to_logits.weight"] = a(params[f"to_logits_{dst}"]["kernel"]).T.copy()
    sd[src + ".pos_emb"] = (a(params[f"dec_pos_emb_{dst}"])[None] if m.kind == "global"
                            else _pos_buffer(m, d))
  for i in range(model.encoder_depth):
    s, t = f"encoder.{i}", params[f"encoder_{i}"]
    norm(s + ".norm1", t["norm1"])
    norm(s + ".norm2", t["norm2"])
    attention(s + ".attn", t["attn"], False)
    mlp(s + ".mlp", t["mlp"])
  for i in range(model.decoder_depth):
    s, t = f"decoder.{i}", params[f"decoder_{i}"]
    for n in ("norm1", "query_norm", "context_norm", "norm2"):
      norm(f"{s}.{n}", t[n])
    attention(s + ".self_attn", t["self_attn"], False)
    attention(s + ".cross_attn", t["cross_attn"], True)
    mlp(s + ".mlp", t["mlp"])
  norm("encoder_norm", params["encoder_norm"])
  norm("decoder_norm", params["decoder_norm"])
  linear("decoder_proj_context", params["decoder_proj_context"]["kernel"], d)
  sd["decoder_proj_context.bias"] = a(params["decoder_proj_context"]["bias"])
  sd["mask_token"] = a(params["mask_token"])
  return sd


def official_config(model: FourM, image_size: int = 224, patch_size: int = 16) -> dict:
  """The official FM config (config.json) of `model`."""
  return {"domains_in": [m.name for m in model.inputs],
          "domains_out": [m.name for m in model.targets],
          "image_size": image_size, "patch_size": patch_size, "norm_bias": False,
          "act_layer": "SiLU" if model.ffn == "swiglu" else "GELU",
          "gated_mlp": model.ffn == "swiglu", "encoder_depth": model.encoder_depth,
          "decoder_depth": model.decoder_depth, "dim": model.dim, "num_heads": model.num_heads,
          "mlp_ratio": model.mlp_ratio, "qkv_bias": model.use_bias,
          "proj_bias": model.use_bias, "mlp_bias": model.use_bias, "qk_norm": model.qk_norm,
          "decoder_causal_mask": False, "decoder_sep_mask": True}


# ---- files ----------------------------------------------------------------------------------
def read_official(path: str) -> tuple[dict[str, np.ndarray], dict]:
  """(state dict, official config) of a released checkpoint: a directory with
  model.safetensors + config.json, or a .safetensors file (config in its metadata, else a
  config.json beside it)."""
  from safetensors import safe_open
  from safetensors.numpy import load_file
  if os.path.isdir(path):
    weights, cfg_path = os.path.join(path, "model.safetensors"), os.path.join(path,
                                                                               "config.json")
    if not os.path.exists(weights):
      raise FileNotFoundError(f"{path} has no model.safetensors (the HF-hub layout: "
                              "model.safetensors + config.json)")
  else:
    weights, cfg_path = path, os.path.join(os.path.dirname(path) or ".", "config.json")
    if not os.path.exists(weights):
      raise FileNotFoundError(f"no such checkpoint: {path}")
  if not weights.endswith(".safetensors"):
    raise ValueError(f"{weights}: only .safetensors checkpoints are read (the released 4M "
                     "models are safetensors on the HF hub)")
  try:
    with safe_open(weights, "np") as f:
      meta = f.metadata() or {}
    sd = load_file(weights)
  except Exception as e:     # a truncated or foreign file
    raise ValueError(f"{weights} is not a readable safetensors file: {e}") from None
  if "config" in meta:
    cfg = json.loads(meta["config"])
  elif os.path.exists(cfg_path):
    with open(cfg_path) as f:
      cfg = json.load(f)
  else:
    raise FileNotFoundError(f"{weights}: no config in its metadata and no {cfg_path}; the "
                            "model cannot be built without the official config")
  return sd, cfg


def registry_with(rows: Mapping[str, Mapping] | None):
  """The modality registry with `rows` ({name: Modality fields}, as config.modalities)
  added: modalities of a checkpoint that the official table here does not have."""
  from fourm_jax import modalities
  reg = dict(modalities.REGISTRY)
  for name, row in (rows or {}).items():
    row = dict(row)
    if "grid" in row:
      row["grid"] = tuple(row["grid"])
    try:
      reg[name] = modalities.Modality(name, **row)
    except TypeError as e:
      raise ValueError(f"modality row {name!r}: {e}") from None
  return reg


def write_workdir(sd: Mapping[str, np.ndarray], official: Mapping, out: str,
                  rows: Mapping[str, Mapping] | None = None, source: str = "") -> FourM:
  """Converts and writes `out/` as a workdir every 4M command reads: config.json (model,
  the extra modality `rows` and the official config), checkpoints/0/state (Orbax,
  {"params": ...}), params.safetensors and the official tensors the model here does not
  use. Returns the model."""
  import orbax.checkpoint as ocp
  from etils import epath
  from pretrain_jax import export, paths
  model, model_cfg = build(official, registry_with(rows))
  params = from_official(sd, model)
  root = paths.resolve(out)
  epath.Path(root).mkdir(parents=True, exist_ok=True)
  (epath.Path(root) / "config.json").write_text(json.dumps(
      {"model": model_cfg, "modalities": {k: dict(v) for k, v in (rows or {}).items()},
       "converted_from": source or "apple/ml-4m FM", "official_config": dict(official)},
      indent=2))
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(os.path.join(root, "checkpoints", "0", "state"), {"params": params}, force=True)
  ckpt.wait_until_finished()
  export.save_safetensors(params, os.path.join(root, "params.safetensors"), {"model": model_cfg})
  unused = unused_official(sd, model)
  if unused:
    from safetensors.numpy import save_file
    save_file(unused, os.path.join(root, UNUSED_FILE))
  return model


def write_official(workdir: str, out: str, step: int | None = None) -> dict:
  """A workdir's params -> `out` (.safetensors, config in the metadata and in a
  config.json beside it). Returns the official config."""
  from safetensors.numpy import load_file, save_file
  from fourm_jax import load as load_lib
  model, params, config = load_lib.load(workdir, step)
  official = dict(config.get("official_config", {})) or official_config(model)
  unused_path = os.path.join(workdir, UNUSED_FILE)
  unused = load_file(unused_path) if os.path.exists(unused_path) else None
  import jax
  sd = to_official(jax.tree.map(np.asarray, params), model, unused)
  if not out.endswith(".safetensors"):
    os.makedirs(out, exist_ok=True)
    out = os.path.join(out, "model.safetensors")
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, out,
            {"config": json.dumps(official)})
  with open(os.path.join(os.path.dirname(out) or ".", "config.json"), "w") as f:
    json.dump(official, f, indent=2)
  return official


def main(argv):
  del argv
  from absl import flags, logging
  logging.set_verbosity(logging.WARNING)     # Orbax logs every save step at INFO
  f = flags.FLAGS
  try:
    if f.to_official:
      official = write_official(f.input, f.out)
      print(f"wrote {f.out} (official FM layout: {official['domains_in']} -> "
            f"{official['domains_out']})")
      return
    sd, official = read_official(f.input)
    rows = json.loads(f.modalities) if f.modalities.lstrip().startswith("{") else (
        json.load(open(f.modalities)) if f.modalities else None)
    model = write_workdir(sd, official, f.out, rows, source=os.path.abspath(f.input))
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise SystemExit(f"error: {e}") from None
  print(f"wrote {f.out} (4M dim={model.dim} encoder={model.encoder_depth} "
        f"decoder={model.decoder_depth} heads={model.num_heads}; "
        f"{[m.name for m in model.inputs]} -> {[m.name for m in model.targets]})")


if __name__ == "__main__":
  from absl import app, flags
  from pretrain_jax import cli
  flags.DEFINE_string("input", None, "A released 4M checkpoint: a directory with "
                      "model.safetensors + config.json, or a .safetensors file; with "
                      "--to_official, a fourm_jax workdir.")
  flags.DEFINE_string("out", None, "The workdir to write; with --to_official, the "
                      ".safetensors file (or directory) to write.")
  flags.DEFINE_bool("to_official", False, "Write a workdir's params in the official layout.")
  flags.DEFINE_string("modalities", "", "Rows for modalities the registry lacks, as JSON "
                      "(or a JSON file): {name: {kind, vocab_size, grid, length, ...}}.")
  flags.mark_flags_as_required(["input", "out"])
  app.run(main, flags_parser=cli.parse_flags)
