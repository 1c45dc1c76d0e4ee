"""Tokenizer throughput and reconstruction quality on this machine.

  python benchmarks/tokenizers.py [--steps=300] [--out=...]

1. Encode (input -> tokens) and decode (tokens -> input) samples/s of every
   tokenizer kind at its tiny and paper sizes: the ViT VQ-VAE (RGB, 32 / 224
   px), the same encoder with the diffusion decoder (25 DDIM steps), the SAM
   instance-mask VQ-VAE (64 px crops) and the pose MLP dVAE.
2. Trains the tiny tokenizers on scenes for `--steps` steps and measures
   reconstruction on 128 validation samples: PSNR for RGB, standardised L1
   for depth, mean angle error for normals, mIoU for segmentation, mask IoU
   for SAM instances (VQ-VAE decoders), PSNR and standardised L1 with the
   diffusion decoder, smooth L1 for synthetic poses; each beside a trivial
   baseline.
Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import logging
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pretrain_jax import loop  # noqa: E402
from tokenizers_jax import diffusion, poses  # noqa: E402
from tokenizers_jax import tokenize as tok_lib, train as tok_train  # noqa: E402

# name -> (config file, argument of its tiny variant, of its paper variant)
KINDS = {
    "vqvae_rgb": ("vqvae.py", "modality=rgb,variant=tiny", "modality=rgb,variant=B16"),
    "diffusion_rgb": ("diffusion.py", "modality=rgb,variant=tiny", "modality=rgb,variant=B16"),
    "sam_mask": ("vqvae.py", "modality=sam_mask,variant=tiny", "modality=sam_mask,variant=B16"),
    "mlp_pose": ("mlp_vae.py", "target=pose,variant=tiny", "target=pose,variant=paper"),
    "vqvae_depth": ("vqvae.py", "modality=depth,variant=tiny", "modality=depth,variant=B16"),
    "vqvae_semantic": ("vqvae.py", "modality=semantic,variant=tiny",
                       "modality=semantic,variant=B16"),
    "vqvae_features": ("vqvae.py", "modality=features,variant=tiny",
                       "modality=features,variant=B16"),
    "diffusion_depth": ("diffusion.py", "modality=depth,variant=tiny",
                        "modality=depth,variant=B16"),
    "mlp_global": ("mlp_vae.py", "target=global,variant=tiny", "target=global,variant=paper"),
}
# vector and feature widths where the data would set them (a ViT-B embedding: 768)
WIDTHS = {"mlp_global": {"model.in_dim": 768}, "vqvae_features": {"model.feature_dim": 768}}


def _config(file, arg):
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, "configs/tokenizers", file))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def throughput(file: str, arg: str, batch: int = 8, reps: int = 3,
               overrides: dict | None = None) -> dict[str, float]:
  cfg = _config(file, arg)
  for key, value in (overrides or {}).items():
    section, name = key.split(".")
    cfg[section][name] = value
  if cfg.get("modality") == "features" and not cfg.data.resolution:
    cfg.data.resolution = 16          # a 16 x 16 feature map (ViT-B/14 at 224 px)
  task = tok_train.build_task(cfg)
  model = tok_train.build_model(cfg)
  key = jax.random.key(0)
  v = {"params": jax.jit(task.init_params)(key)}
  if task.init_extra is not None:
    v.update(jax.jit(task.init_extra)(key))
  shape = tok_train._dummy_input(cfg).shape[1:]
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (batch, *shape)), jnp.float32)
  if cfg.modality == "sam_mask":
    x = (x > 0).astype(jnp.int32)
  enc = jax.jit(lambda v, x: model.apply(v, x, method=model.tokenize))
  if cfg.kind == "diffusion":
    dec = jax.jit(lambda v, t: diffusion.reconstruct(model, v, tokens=t,
                                                     num_steps=cfg.diffusion.sample_steps))
  else:
    dec = jax.jit(lambda v, t: model.apply(v, t, method=model.decode_tokens))
  toks = enc(v, x).block_until_ready()
  dec(v, toks).block_until_ready()
  out = {}
  for name, fn, a in (("encode", enc, x), ("decode", dec, toks)):
    t = time.perf_counter()
    for _ in range(reps):
      fn(v, a).block_until_ready()
    out[name] = batch * reps / (time.perf_counter() - t)
  out["params_M"] = sum(a.size for a in jax.tree.leaves(v["params"])) / 1e6
  out["batch"] = batch
  return out


def quality(file: str, modality: str, steps: int, tmp: str) -> dict[str, float]:
  arg = f"target={modality}" if file == "mlp_vae.py" else f"modality={modality},variant=tiny"
  cfg = _config(file, arg)
  cfg.total_steps, cfg.checkpoint_every, cfg.eval_every = steps, steps, 0
  workdir = os.path.join(tmp, f"{file}_{modality}")
  loop.train(cfg, workdir, tok_train.build_task(cfg))
  tok = tok_lib.Tokenizer(workdir)
  if modality == "pose":
    train = np.stack([poses.synthetic_body_pose(0, i) for i in range(2000)])
    x = np.stack([poses.synthetic_body_pose(1_000_003, i) for i in range(128)])
    sl1 = lambda d: float(np.mean(np.where(np.abs(d) < 1, 0.5 * d * d, np.abs(d) - 0.5)))
    return {"metric": "smooth L1 (lower is better)",
            "tokenizer": sl1(tok.detokenize(tok(list(x))) - x),
            "baseline (mean pose)": sl1(x - train.mean(0))}
  ds = tok_train._dataset(cfg.data, "scenes:128", modality, "eval")
  x = np.stack([ds[i]["x"] for i in range(128)])
  recon = np.asarray(tok.detokenize(np.asarray(tok._fn(tok.variables, jnp.asarray(x)))))
  if modality == "sam_mask":
    pred = recon.argmax(-1)
    def iou(p):
      return float(np.mean([np.sum(a & b) / max(np.sum(a | b), 1)
                            for a, b in zip(p.astype(bool), x.astype(bool))]))
    return {"metric": "mask IoU (higher is better)", "tokenizer": iou(pred),
            "baseline (whole box)": iou(np.ones_like(x))}
  if modality == "rgb":
    def psnr(p):
      mse = np.mean(((np.clip(p, -1, 1) - x) / 2) ** 2, axis=(1, 2, 3))
      return float(np.mean(10 * np.log10(1 / np.maximum(mse, 1e-10))))
    return {"metric": "PSNR dB (higher is better)", "tokenizer": psnr(recon),
            "baseline (mean image)": psnr(np.broadcast_to(x.mean(0), x.shape))}
  if modality == "depth":   # targets are standardised per image already
    return {"metric": "standardised L1 (lower is better)",
            "tokenizer": float(np.mean(np.abs(recon[..., 0] - x))),
            "baseline (per-image mean)": float(np.mean(np.abs(x)))}
  if modality == "normals":
    def angle(p):
      p = p / np.maximum(np.linalg.norm(p, axis=-1, keepdims=True), 1e-8)
      return float(np.degrees(np.arccos(np.clip(np.sum(p * x, -1), -1, 1))).mean())
    return {"metric": "mean angle error deg (lower is better)", "tokenizer": angle(recon),
            "baseline (mean normal)": angle(np.broadcast_to(x.mean((0, 1, 2)), x.shape))}
  pred = recon.argmax(-1)
  def miou(p):
    ious = [np.sum((p == c) & (x == c)) / np.sum((p == c) | (x == c))
            for c in range(tok_train.modality_spec(cfg).out_channels) if np.any(x == c)]
    return float(np.mean(ious))
  majority = np.bincount(x.ravel()).argmax()
  return {"metric": "mIoU (higher is better)", "tokenizer": miou(pred),
          "baseline (majority class)": miou(np.full_like(x, majority))}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/tokenizers.json"))
  parser.add_argument("--throughput_only", action="store_true",
                      help="skip training the tiny tokenizers; keep the quality table (and its "
                           "date) of an earlier run in --out")
  parser.add_argument("--quality_only", action="store_true",
                      help="skip the throughput table; keep the one of an earlier run in --out "
                           "(--old names another file to take it from)")
  parser.add_argument("--old", default="", help="JSON of an earlier run (default: --out)")
  args = parser.parse_args()
  logging.getLogger().setLevel(logging.WARNING)
  speed = {}
  if args.quality_only:
    with open(args.old or args.out, encoding="utf-8") as f:
      speed = json.load(f)["throughput"]
  for name, (file, tiny, paper) in KINDS.items():
    if args.quality_only:
      break
    extra = WIDTHS.get(name)
    speed[f"{name} tiny"] = throughput(file, tiny, overrides=extra)
    # the B/16 diffusion decoder runs 25 UNet passes at 224 px: one small batch on CPU
    big = name.startswith("diffusion")
    speed[f"{name} paper"] = throughput(file, paper, batch=2 if big else 8, reps=1 if big else 3,
                                        overrides=extra)
  runs = [("vqvae.py", m) for m in ("rgb", "depth", "normals", "semantic", "sam_mask")] + \
         [("diffusion.py", m) for m in ("rgb", "depth")] + [("mlp_vae.py", "pose")]
  now = datetime.datetime.now(datetime.timezone.utc).isoformat()
  if args.throughput_only:
    with open(args.old or args.out, encoding="utf-8") as f:
      old = json.load(f)
    qual, quality_date = old["quality"], old.get("quality_date", old["date"])
  else:
    with tempfile.TemporaryDirectory() as tmp:
      qual = {f"{f[:-3]} {m}": quality(f, m, args.steps, tmp) for f, m in runs}
    quality_date = now
  print(f"{'tokenizer':20s} {'params (M)':>10s} {'encode /s':>10s} {'decode /s':>10s}")
  for v, s in speed.items():
    print(f"{v:20s} {s['params_M']:10.2f} {s['encode']:10.1f} {s['decode']:10.2f}")
  print(f"\n{'tiny tokenizer':18s} {'metric':40s} {'tokenizer':>10s} {'baseline':>10s}")
  for m, q in qual.items():
    base = [v for k, v in q.items() if k.startswith("baseline")][0]
    print(f"{m:18s} {q['metric']:40s} {q['tokenizer']:10.3f} {base:10.3f}")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump({"date": now, "quality_date": quality_date,
               "machine": f"{platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0].platform}",
               "steps": args.steps, "throughput": speed, "quality": qual}, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
