"""Tokenizer throughput and reconstruction quality on this machine.

  python benchmarks/tokenizers.py [--steps=300] [--out=...]

1. Encode (image -> tokens) and decode (tokens -> image) images/s of the ViT
   VQ-VAE at the tiny size (32 px) and at B/16 (224 px), batch 8.
2. Trains the tiny tokenizers for RGB, depth, normals and segmentation on
   scenes for `--steps` steps and measures reconstruction on 128 validation
   scenes: PSNR for RGB, standardised L1 for depth, mean angle error for
   normals, mIoU for segmentation, each beside the trivial baseline.
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
from tokenizers_jax import tokenize as tok_lib, train as tok_train, vqvae  # noqa: E402


def _config(modality, variant):
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, "configs/tokenizers/vqvae.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(f"modality={modality},variant={variant}")


def throughput(variant: str, batch: int = 8, reps: int = 3) -> dict[str, float]:
  cfg = _config("rgb", variant)
  model = tok_train.build_model(cfg)
  r = cfg.data.resolution
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (batch, r, r, 3)), jnp.float32)
  v = jax.jit(model.init)({"params": jax.random.key(0)}, x[:1])
  enc = jax.jit(lambda v, x: model.apply(v, x, method=model.tokenize))
  dec = jax.jit(lambda v, t: model.apply(v, t, method=model.decode_tokens))
  toks = enc(v, x).block_until_ready()
  dec(v, toks).block_until_ready()
  out = {}
  for name, fn, arg in (("encode", enc, x), ("decode", dec, toks)):
    t = time.perf_counter()
    for _ in range(reps):
      fn(v, arg).block_until_ready()
    out[name] = batch * reps / (time.perf_counter() - t)
  out["params_M"] = sum(a.size for a in jax.tree.leaves(v["params"])) / 1e6
  return out


def quality(modality: str, steps: int, tmp: str) -> dict[str, float]:
  cfg = _config(modality, "tiny")
  cfg.total_steps, cfg.checkpoint_every, cfg.eval_every = steps, steps, 0
  workdir = os.path.join(tmp, modality)
  loop.train(cfg, workdir, tok_train.build_task(cfg))
  tok = tok_lib.ImageTokenizer(workdir)
  ds = tok_train._dataset(cfg.data, "scenes:128", modality, "eval")
  x = np.stack([ds[i]["x"] for i in range(128)])
  recon = np.asarray(jax.jit(lambda v, x: tok.model.apply(v, x)[0])(tok.variables, jnp.asarray(x)))
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
            for c in range(vqvae.MODALITIES["semantic"].out_channels) if np.any(x == c)]
    return float(np.mean(ious))
  majority = np.bincount(x.ravel()).argmax()
  return {"metric": "mIoU (higher is better)", "tokenizer": miou(pred),
          "baseline (majority class)": miou(np.full_like(x, majority))}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/tokenizers.json"))
  args = parser.parse_args()
  logging.getLogger().setLevel(logging.WARNING)
  speed = {v: throughput(v) for v in ("tiny", "B16")}
  with tempfile.TemporaryDirectory() as tmp:
    qual = {m: quality(m, args.steps, tmp) for m in ("rgb", "depth", "normals", "semantic")}
  print(f"{'VQ-VAE':8s} {'params (M)':>10s} {'encode img/s':>13s} {'decode img/s':>13s}")
  for v, s in speed.items():
    print(f"{v:8s} {s['params_M']:10.2f} {s['encode']:13.1f} {s['decode']:13.1f}")
  print(f"\n{'modality':9s} {'metric':40s} {'tokenizer':>10s} {'baseline':>10s}")
  for m, q in qual.items():
    base = [v for k, v in q.items() if k.startswith("baseline")][0]
    print(f"{m:9s} {q['metric']:40s} {q['tokenizer']:10.3f} {base:10.3f}")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
               "machine": f"{platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0].platform}",
               "steps": args.steps, "throughput": speed, "quality": qual}, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
