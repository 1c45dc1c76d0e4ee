"""Official 4M tokenizer checkpoints (apple/ml-4m, fourm.vq) -> tokenizer workdirs.

  python -m tokenizers_jax.convert --input=tok_semseg.safetensors --out=workdir/tok_semseg

The input is a safetensors file of the official model's state_dict() whose
metadata `config` holds JSON: `official_class` (fourm.vq.vqvae.VQVAE or
DiVAE), `kwargs` (the constructor's arguments) and optionally `presets`
(encoder/decoder names beyond the official ones, as {name: {"builder":
"ViTEncoder" | "ViTDecoder" | "PatchedUNetCondCat", **sizes}}). The official
presets (vit_{s,b,l}_{enc,dec}, unet_patched) and MLP model ids
(`BottleneckMLP/B_6-Wi_1024[-E_4]`) are known by name. The output is a
workdir like tokenizers_jax.train's (config.json and an Orbax checkpoint)
that tokenizers_jax.tokenize.Tokenizer, tokenizers_jax.tokenize and
fourm_jax.generate --tokenizers read:

- VQVAE with ViT encoder/decoder -> kind 'vqvae' (segmentation with
  `n_labels` -> modality 'semantic' with the official class embedding;
  `patch_proj=False` feature maps -> 'features', one token per vector);
- DiVAE (ViT encoder, PatchedUNetCondCat) -> kind 'diffusion' with the
  official scheduler settings (beta schedule, prediction type,
  zero-terminal-SNR);
- VQVAE with BottleneckMLP encoder/decoder and Memcodes -> kind 'mlp_vae'
  (modality 'global': one token per Memcodes head).

Layouts: PyTorch Linear weights are [out, in], convolutions [out, in, kh,
kw]; the decoder's out_proj emits (c, ph, pw) per token, which is
permuted here to our (ph, pw, c) patches. Fixed sin-cos position tables are
recomputed (and checked against the file's).
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

import ml_collections
import numpy as np

from pretrain_jax import positions

# fourm.vq.models presets: name -> builder and sizes
PRESETS = {
    "vit_s_enc": {"builder": "ViTEncoder", "dim_tokens": 512, "depth": 8, "num_heads": 8},
    "vit_b_enc": {"builder": "ViTEncoder", "dim_tokens": 768, "depth": 12, "num_heads": 12},
    "vit_l_enc": {"builder": "ViTEncoder", "dim_tokens": 1024, "depth": 24, "num_heads": 16},
    "vit_s_dec": {"builder": "ViTDecoder", "dim_tokens": 512, "depth": 8, "num_heads": 8},
    "vit_b_dec": {"builder": "ViTDecoder", "dim_tokens": 768, "depth": 12, "num_heads": 12},
    "vit_l_dec": {"builder": "ViTDecoder", "dim_tokens": 1024, "depth": 24, "num_heads": 16},
    "unet_patched": {"builder": "PatchedUNetCondCat", "patch_size": 4, "model_channels": 256,
                     "num_res_blocks": 3, "attention_resolutions": [4, 8],
                     "channel_mult": [1, 2, 2, 2], "num_heads": 1},
}
VIT_DEFAULTS = {"mlp_ratio": 4.0, "qkv_bias": True}
UNET_DEFAULTS = {"num_heads": 1, "num_head_channels": -1, "dropout": 0.0, "conv_resample": True,
                 "use_scale_shift_norm": False, "resblock_updown": False,
                 "use_new_attention_order": False}
_MLP_ID = re.compile(r"^BottleneckMLP/B_(\d+)-Wi_(\d+)(?:-E_(\d+))?$")


def read(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """A safetensors file -> (state dict as float32 numpy, metadata config)."""
  from etils import epath
  from safetensors import safe_open
  from pretrain_jax import paths
  if not epath.Path(path).exists():
    raise FileNotFoundError(f"checkpoint not found: {path}")
  if not path.endswith(".safetensors"):
    raise ValueError(f"{path}: give a .safetensors file whose metadata 'config' holds the "
                     "official class and constructor kwargs")
  with paths.local_copy(path) as local, safe_open(local, "np") as f:
    meta = f.metadata() or {}
    sd = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("__")}
  if "config" not in meta:
    raise ValueError(f"{path} has no metadata 'config' (JSON with official_class and kwargs)")
  sd = {k: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v
        for k, v in sd.items()}
  return sd, json.loads(meta["config"])


def preset(name: str, presets: dict) -> dict:
  """The sizes of an encoder/decoder name: the file's `presets` first, then the official ones."""
  if name in (presets or {}):
    p = dict(presets[name])
  elif name in PRESETS:
    p = dict(PRESETS[name])
  else:
    raise ValueError(f"unknown encoder/decoder preset {name!r}: not in the file's presets "
                     f"({sorted(presets or {})}) nor the official ones ({sorted(PRESETS)})")
  defaults = UNET_DEFAULTS if p["builder"] == "PatchedUNetCondCat" else VIT_DEFAULTS
  return {**defaults, **p}


def mlp_sizes(model_id: str) -> tuple[int, int, int]:
  """'BottleneckMLP/B_6-Wi_1024[-E_4]' -> (blocks, width, expansion)."""
  m = _MLP_ID.match(model_id)
  if not m:
    raise ValueError(f"unsupported MLP model id {model_id!r}: expected "
                     "BottleneckMLP/B_<blocks>-Wi_<width>[-E_<expansion>]")
  return int(m[1]), int(m[2]), int(m[3] or 4)


class _Keys:
  """Reads a state dict by key, remembering which keys were used (to report leftovers)."""

  def __init__(self, sd: dict[str, np.ndarray]):
    self.sd, self.used = sd, set()

  def __call__(self, key: str, shape=None) -> np.ndarray:
    if key not in self.sd:
      raise ValueError(f"state dict has no {key!r}")
    v = self.sd[key]
    if shape is not None and tuple(v.shape) != tuple(shape):
      raise ValueError(f"{key}: shape {tuple(v.shape)}, expected {tuple(shape)}")
    self.used.add(key)
    return v

  def linear(self, prefix: str, out: int | None = None, inp: int | None = None) -> dict:
    w = self(prefix + ".weight")
    if w.ndim == 4:         # a 1x1 conv is a per-position linear
      w = w[:, :, 0, 0]
    elif w.ndim == 3:       # conv1d of kernel 1
      w = w[:, :, 0]
    if (out, inp) != (None, None) and w.shape != (out, inp):
      raise ValueError(f"{prefix}.weight: shape {w.shape}, expected {(out, inp)}")
    return {"kernel": w.T, "bias": self(prefix + ".bias", (w.shape[0],))}

  def norm(self, prefix: str) -> dict:
    return {"scale": self(prefix + ".weight"), "bias": self(prefix + ".bias")}

  def conv(self, prefix: str) -> dict:
    w = self(prefix + ".weight")
    return {"kernel": w.transpose(2, 3, 1, 0), "bias": self(prefix + ".bias", (w.shape[0],))}

  def leftover(self) -> list[str]:
    return sorted(set(self.sd) - self.used)


def _vit(k: _Keys, prefix: str, width: int, depth: int, heads: int, mlp_ratio: float,
         post_mlp: bool) -> dict:
  """The blocks (and post-MLP) of an official ViTEncoder/ViTDecoder in our _ViT layout."""
  d, hd, hidden = width, width // heads, int(width * mlp_ratio)
  params = {}
  for i in range(depth):
    p = f"{prefix}.blocks.{i}."
    params[f"blocks_{i}"] = {
        "norm1": k.norm(p + "norm1"), "norm2": k.norm(p + "norm2"),
        "qkv": k(p + "attn.qkv.weight", (3 * d, d)).reshape(3, heads, hd, d).transpose(3, 0, 1, 2),
        "qkv_bias": k(p + "attn.qkv.bias", (3 * d,)).reshape(3, heads, hd),
        "proj": k(p + "attn.proj.weight", (d, d)).T.reshape(heads, hd, d),
        "proj_bias": k(p + "attn.proj.bias", (d,)),
        "fc1": k.linear(p + "mlp.fc1", hidden, d), "fc2": k.linear(p + "mlp.fc2", d, hidden)}
  if post_mlp:
    params["norm_mlp"] = k.norm(prefix + ".norm_mlp")
    params["post_mlp_fc1"] = k.linear(prefix + ".post_mlp.fc1", hidden, d)
    params["post_mlp_fc2"] = k.linear(prefix + ".post_mlp.fc2", d, hidden)
  return params


def _check_pos_emb(k: _Keys, key: str, grid: int, width: int) -> None:
  if key not in k.sd:
    return
  table = k(key, (1, width, grid, grid))[0].reshape(width, -1).T
  ours = positions.sincos_2d(grid, grid, width, rows_first=True)
  if np.abs(table - ours).max() > 1e-4:
    raise ValueError(f"{key} is not the fixed 2D sin-cos table (a learned position embedding?); "
                     "only sincos_pos_emb checkpoints convert")


def _encoder(k: _Keys, kw: dict, enc: dict, grid: int) -> tuple[dict, dict]:
  """Official ViTEncoder + quant_proj -> (our encoder params, model config entries)."""
  if enc["builder"] != "ViTEncoder":
    raise ValueError(f"encoder {kw['enc_type']!r} is a {enc['builder']}, not a ViTEncoder")
  d, c, p = enc["dim_tokens"], kw["n_channels"], kw["patch_size"]
  w = k("encoder.proj.weight")
  if kw.get("patch_proj", True):
    proj_in = {"kernel": w.transpose(2, 3, 1, 0).reshape(p * p * c, d),
               "bias": k("encoder.proj.bias", (d,))}
  else:
    proj_in = k.linear("encoder.proj", d, c)
  _check_pos_emb(k, "encoder.pos_emb", grid, d)
  params = {"proj_in": proj_in,
            **_vit(k, "encoder", d, enc["depth"], enc["num_heads"], enc["mlp_ratio"],
                   kw.get("post_mlp", False)),
            "proj_out": k.linear("quant_proj", kw["latent_dim"], d)}
  model = {"width": d, "enc_depth": enc["depth"], "heads": enc["num_heads"],
           "mlp_ratio": float(enc["mlp_ratio"]), "qkv_bias": bool(enc["qkv_bias"]),
           "post_mlp": bool(kw.get("post_mlp", False))}
  return params, model


def _lucid(k: _Keys, kw: dict) -> dict:
  """The Lucid cosine codebook -> our 'vq' collection (raw rows; EMA state from them)."""
  if kw.get("quant_type", "lucid") != "lucid":
    raise ValueError(f"quant_type {kw['quant_type']!r} with a ViT: only 'lucid' converts")
  if not kw.get("norm_codes", True):
    raise ValueError("norm_codes=False (Euclidean codebook) is not supported: only the cosine "
                     "codebook of the 4M tokenizers converts")
  if kw.get("num_codebooks", 1) != 1:
    raise ValueError(f"num_codebooks={kw['num_codebooks']} with a Lucid quantizer: only 1 "
                     "converts")
  embed = k("quantize._codebook.embed", (kw["codebook_size"], kw["latent_dim"]))
  if "quantize._codebook.initted" in k.sd and not float(k("quantize._codebook.initted")[0]):
    raise ValueError("quantize._codebook.initted is 0: the codebook was never initialised")
  k.used.add("quantize._codebook.cluster_size")
  return {"codebook": embed, "ema_count": np.ones(embed.shape[0], np.float32),
          "ema_sum": embed.copy()}


def _base_config(kind: str, modality: str, official: dict) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.kind, c.modality, c.seed = kind, modality, 0
  c.official = ml_collections.ConfigDict({"official_class": official["official_class"],
                                          "kwargs": json.dumps(official["kwargs"])})
  c.data = ml_collections.ConfigDict({"resolution": 0, "field": ""})
  c.model = ml_collections.ConfigDict()
  return c


def _image_modality(kw: dict, modality: str) -> str:
  if kw.get("n_labels"):
    return "semantic"
  if not kw.get("patch_proj", True):
    return "features"
  if modality:
    return modality
  if kw["n_channels"] == 3:
    return "rgb"
  if kw["n_channels"] == 1:
    return "depth"
  raise ValueError(f"n_channels={kw['n_channels']}: name the modality with --modality")


def convert_vqvae(sd, cfg, modality: str = "") -> tuple[ml_collections.ConfigDict, dict, dict]:
  """Official VQVAE (ViT encoder and decoder, Lucid) -> (config, params, extra)."""
  kw, k = cfg["kwargs"], _Keys(sd)
  presets = cfg.get("presets", {})
  enc, dec = preset(kw["enc_type"], presets), preset(kw["dec_type"], presets)
  if dec["builder"] != "ViTDecoder":
    raise ValueError(f"decoder {kw['dec_type']!r} is a {dec['builder']}, not a ViTDecoder")
  if kw.get("out_conv"):
    raise ValueError("out_conv=True (ConvNeXt blocks after the decoder) is not supported")
  patch_proj = kw.get("patch_proj", True)
  p = kw["patch_size"] if patch_proj else 1
  grid = kw["image_size"] // kw["patch_size"]
  modality = _image_modality(kw, modality)
  c = _base_config("vqvae", modality, cfg)
  n_out = kw["n_labels"] or kw["n_channels"]
  enc_params, model = _encoder(k, kw, enc, grid)
  if (dec["dim_tokens"], dec["depth"], dec["num_heads"], dec["mlp_ratio"], dec["qkv_bias"]) != (
      model["width"], model["enc_depth"], model["heads"], model["mlp_ratio"], model["qkv_bias"]):
    raise ValueError(f"encoder {kw['enc_type']} and decoder {kw['dec_type']} differ in width, "
                     "heads, mlp_ratio or qkv_bias: our VQVAE shares them")
  d = dec["dim_tokens"]
  _check_pos_emb(k, "decoder.pos_emb", grid, d)
  w = k("decoder.out_proj.weight", (n_out * p * p, d))
  b = k("decoder.out_proj.bias", (n_out * p * p,))
  # official rows are (c, ph, pw); our patches are (ph, pw, c)
  w = w.reshape(n_out, p, p, d).transpose(1, 2, 0, 3).reshape(p * p * n_out, d)
  b = b.reshape(n_out, p, p).transpose(1, 2, 0).reshape(-1)
  dec_params = {"proj_in": k.linear("post_quant_proj", d, kw["latent_dim"]),
                **_vit(k, "decoder", d, dec["depth"], dec["num_heads"], dec["mlp_ratio"],
                       kw.get("post_mlp", False)),
                "proj_out": {"kernel": w.T, "bias": b}}
  params = {"encoder": enc_params, "decoder": dec_params}
  if kw.get("n_labels"):
    params["class_embed"] = {"embedding": k("cls_emb.weight", (kw["n_labels"], kw["n_channels"]))}
    c.model.num_classes = kw["n_labels"]
    c.model.class_embed_dim = kw["n_channels"]
  c.model.update(model)
  c.model.dec_depth = dec["depth"]
  c.model.patch_size = p
  c.model.num_codes, c.model.code_dim = kw["codebook_size"], kw["latent_dim"]
  c.model.ema_decay = float(kw.get("ema_decay", 0.99))
  c.model.restart_factor, c.model.commitment = 32.0, float(kw.get("commitment_weight", 1.0))
  c.model.feature_dim = kw["n_channels"] if modality == "features" else 0
  c.data.resolution = grid if modality == "features" else kw["image_size"]
  # the official position table is fixed at the grid of image_size, bicubic-resized to others
  c.model.pos_grid = grid
  extra = {"vq": {"quantizer": _lucid(k, kw)}}
  _no_leftovers(k)
  return c, params, extra


def _mlp(k: _Keys, prefix: str, blocks: int, width: int, expansion: int, dim_in: int,
         dim_out: int) -> dict:
  """An official BottleneckMLP -> our BottleneckMLP params."""
  params = {"proj_in": k.linear(prefix + ".linear_in", width, dim_in),
            "proj_out": k.linear(prefix + ".linear_out", dim_out, width)}
  for i in range(blocks):
    params[f"norm_{i}"] = k.norm(f"{prefix}.layernorms.{i}")
    params[f"fc1_{i}"] = k.linear(f"{prefix}.blocks.{i}.block.0", expansion * width, width)
    params[f"fc2_{i}"] = k.linear(f"{prefix}.blocks.{i}.block.2", width, expansion * width)
  return params


def convert_mlp_vae(sd, cfg, modality: str = ""):
  """Official VQVAE with BottleneckMLP encoder/decoder and Memcodes -> (config, params, {})."""
  kw, k = cfg["kwargs"], _Keys(sd)
  if kw.get("quant_type") != "memcodes":
    raise ValueError(f"an MLP tokenizer with quant_type {kw.get('quant_type')!r}: only "
                     "'memcodes' converts")
  sizes = mlp_sizes(kw["enc_type"])
  if mlp_sizes(kw["dec_type"]) != sizes:
    raise ValueError(f"encoder {kw['enc_type']} and decoder {kw['dec_type']} differ: our "
                     "MLPVAE shares their sizes")
  blocks, width, expansion = sizes
  heads, latent, vocab, c_in = (kw.get("num_codebooks", 1), kw["latent_dim"],
                                kw["codebook_size"], kw["n_channels"])
  d = latent // heads
  params = {
      "encoder": _mlp(k, "encoder", blocks, width, expansion, c_in, width),
      "quant_proj": k.linear("quant_proj", latent, width),
      "quantizer": {"codes": k("quantize.codes", (heads, vocab, d)),
                    "to_k": k("quantize.to_k.weight", (heads, d, d)),
                    "to_v": k("quantize.to_v.weight", (heads, d, d))},
      "post_quant_proj": k.linear("post_quant_proj", width, latent),
      "decoder": _mlp(k, "decoder", blocks, width, expansion, width, c_in)}
  _no_leftovers(k)
  c = _base_config("mlp_vae", modality or "global", cfg)
  c.model.update({"in_dim": c_in, "num_tokens": heads, "num_codes": vocab, "width": width,
                  "blocks": blocks, "code_dim": d, "expansion": expansion, "official": True})
  c.data.field = "aim_global" if c.modality == "global" else ""
  return c, params, {}


def _unet(k: _Keys, u: dict) -> dict:
  """An official PatchedUNetCondCat (guided-diffusion UNetModel) -> our PatchedUNet params."""
  for key in ("use_scale_shift_norm", "resblock_updown", "use_new_attention_order"):
    if u.get(key):
      raise ValueError(f"UNet option {key}=True is not supported")
  if u.get("num_head_channels", -1) != -1:
    raise ValueError("UNet num_head_channels is not supported: give num_heads")
  if u.get("num_classes") is not None:
    raise ValueError("class-conditional UNets are not supported")
  levels, nrb = len(u["channel_mult"]), u["num_res_blocks"]
  attends = lambda level: 2 ** level in u["attention_resolutions"]
  heads = u["num_heads"]

  def res(prefix):
    out = {"norm1": k.norm(prefix + ".in_layers.0"), "conv1": k.conv(prefix + ".in_layers.2"),
           "temb": k.linear(prefix + ".emb_layers.1"), "norm2": k.norm(prefix + ".out_layers.0"),
           "conv2": k.conv(prefix + ".out_layers.3")}
    if prefix + ".skip_connection.weight" in k.sd:
      out["skip"] = k.conv(prefix + ".skip_connection")
    return out

  def attn(prefix):
    w = k(prefix + ".qkv.weight")[:, :, 0]                      # [3C, C], per head (q, k, v)
    c = w.shape[1]
    hd = c // heads
    return {"norm": k.norm(prefix + ".norm"),
            "qkv": {"kernel": w.reshape(heads, 3, hd, c).transpose(3, 0, 1, 2),
                    "bias": k(prefix + ".qkv.bias", (3 * c,)).reshape(heads, 3, hd)},
            "proj": {"kernel": k(prefix + ".proj_out.weight", (c, c, 1))[:, :, 0].T.reshape(
                heads, hd, c), "bias": k(prefix + ".proj_out.bias", (c,))}}

  d = "decoder."
  params = {"temb_1": k.linear(d + "time_embed.0"), "temb_2": k.linear(d + "time_embed.2"),
            "conv_in": k.conv(d + "input_blocks.0.0"),
            "mid_1": res(d + "middle_block.0"), "mid_attn": attn(d + "middle_block.1"),
            "mid_2": res(d + "middle_block.2"),
            "norm_out": k.norm(d + "out.0"), "conv_out": k.conv(d + "out.2")}
  n = 1
  for i in range(levels):
    for j in range(nrb):
      params[f"down_{i}_{j}"] = res(f"{d}input_blocks.{n}.0")
      if attends(i):
        params[f"down_attn_{i}_{j}"] = attn(f"{d}input_blocks.{n}.1")
      n += 1
    if i < levels - 1:
      params[f"downsample_{i}"] = k.conv(f"{d}input_blocks.{n}.0.op")
      n += 1
  n = 0
  for i in reversed(range(levels)):
    for j in range(nrb + 1):
      params[f"up_{i}_{j}"] = res(f"{d}output_blocks.{n}.0")
      if attends(i):
        params[f"up_attn_{i}_{j}"] = attn(f"{d}output_blocks.{n}.1")
      if i > 0 and j == nrb:
        params[f"upsample_{i}"] = k.conv(f"{d}output_blocks.{n}.{2 if attends(i) else 1}.conv")
      n += 1
  return params


def convert_divae(sd, cfg, modality: str = ""):
  """Official DiVAE (ViT encoder, Lucid, PatchedUNetCondCat) -> (config, params, extra)."""
  kw, k = cfg["kwargs"], _Keys(sd)
  presets = cfg.get("presets", {})
  enc, u = preset(kw["enc_type"], presets), preset(kw["dec_type"], presets)
  if u["builder"] != "PatchedUNetCondCat":
    raise ValueError(f"decoder {kw['dec_type']!r} is a {u['builder']}: only the patched UNet "
                     "(PatchedUNetCondCat, e.g. unet_patched) converts")
  if kw.get("scheduler", "ddpm") not in ("ddpm", "ddim"):
    raise ValueError(f"scheduler {kw['scheduler']!r}: only ddpm and ddim schedules convert")
  if kw.get("conditioning", "concat") != "concat":
    raise ValueError(f"conditioning {kw['conditioning']!r}: only 'concat' converts")
  grid = kw["image_size"] // kw["patch_size"]
  enc_params, model = _encoder(k, kw, enc, grid)
  params = {"tokenizer": {"encoder": enc_params}, "unet": _unet(k, u)}
  extra = {"vq": {"tokenizer": {"quantizer": _lucid(k, kw)}}}
  _no_leftovers(k)
  c = _base_config("diffusion", _image_modality(kw, modality), cfg)
  c.model.update(model)
  c.model.update({"dec_depth": 0, "patch_size": kw["patch_size"],
                  "num_codes": kw["codebook_size"], "code_dim": kw["latent_dim"],
                  "ema_decay": float(kw.get("ema_decay", 0.99)), "restart_factor": 32.0,
                  "commitment": float(kw.get("commitment_weight", 1.0)), "feature_dim": 0})
  c.data.resolution = kw["image_size"]
  c.model.pos_grid = grid     # the official encoder's fixed table (see the ViT case)
  c.diffusion = ml_collections.ConfigDict({
      "base_channels": u["model_channels"], "channel_mult": tuple(u["channel_mult"]),
      "num_res_blocks": u["num_res_blocks"], "attn_levels": 0,
      "attention_resolutions": tuple(u["attention_resolutions"]), "num_heads": u["num_heads"],
      "patch_size": u["patch_size"], "steps": kw.get("num_train_timesteps", 1000),
      "beta_schedule": kw.get("beta_schedule", "linear"),
      "zero_terminal_snr": bool(kw.get("zero_terminal_snr", True)),
      "prediction_type": kw.get("prediction_type", "v_prediction"), "sample_steps": 25})
  return c, params, extra


def _no_leftovers(k: _Keys) -> None:
  left = [n for n in k.leftover() if not n.endswith("pos_emb")]
  if left:
    raise ValueError(f"state dict keys not converted ({len(left)}): {', '.join(left[:20])}")


CONVERTERS = {"fourm.vq.vqvae.VQVAE": "vqvae", "fourm.vq.vqvae.DiVAE": "divae"}


def convert_state(sd, cfg, modality: str = ""):
  """(state dict, metadata config) -> (our config, params, extra collections)."""
  cls = cfg.get("official_class", "")
  if cls not in CONVERTERS:
    raise ValueError(f"official_class {cls!r} is not supported; known: {sorted(CONVERTERS)}")
  kw = cfg.get("kwargs", {})
  if cls.endswith("VQVAE") and "MLP" in kw.get("enc_type", ""):
    return convert_mlp_vae(sd, cfg, modality)
  if cls.endswith("DiVAE"):
    return convert_divae(sd, cfg, modality)
  return convert_vqvae(sd, cfg, modality)


def write_workdir(out: str, config, params, extra) -> None:
  """config.json and checkpoints/0/state (params and extra), as tokenizers_jax.train writes."""
  import jax
  import orbax.checkpoint as ocp
  from etils import epath
  from pretrain_jax import paths
  out = paths.resolve(out)
  epath.Path(out).mkdir(parents=True, exist_ok=True)
  (epath.Path(out) / "config.json").write_text(
      config.to_json_best_effort(indent=2, sort_keys=True))
  state = jax.tree.map(lambda v: np.asarray(v, np.float32), {"params": params, "extra": extra})
  state_path = os.path.join(out, "checkpoints", "0", "state")
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(state_path, state, force=True)
  ckpt.wait_until_finished()


def convert(path: str, out: str, modality: str = "") -> ml_collections.ConfigDict:
  """Converts the official checkpoint `path` into the workdir `out`; returns its config."""
  sd, cfg = read(path)
  config, params, extra = convert_state(sd, cfg, modality)
  write_workdir(out, config, params, extra)
  return config


def main(argv):
  del argv
  from absl import flags
  f = flags.FLAGS
  try:
    c = convert(f.input, f.out, f.modality)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"error: {e}") from None
  print(f"wrote {f.out}: a {c.kind} tokenizer for {c.modality!r} "
        f"({c.official.official_class})")


if __name__ == "__main__":
  from absl import app, flags
  from pretrain_jax import cli
  flags.DEFINE_string("input", None, "Official fourm.vq tokenizer state dict (.safetensors with "
                      "metadata 'config': official_class, kwargs, presets).")
  flags.DEFINE_string("out", None, "Output workdir (read by tokenizers_jax.tokenize.Tokenizer).")
  flags.DEFINE_string("modality", "", "Our modality name (rgb, depth, normals, edges, global, "
                      "pose); default: from the config (n_labels -> semantic, feature maps -> "
                      "features, 3 channels -> rgb, 1 -> depth, MLPs -> global).")
  flags.mark_flags_as_required(["input", "out"])
  app.run(main, flags_parser=cli.parse_flags)
