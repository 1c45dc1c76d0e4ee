"""Out-of-the-box quality of a tiny 4M on scenes, where the labels are exact.

  python benchmarks/fourm_oob.py [--train=2048] [--val=128] [--steps=1500] \
      [--out=benchmarks/results/fourm_oob.json]

Builds everything from nothing: pseudo-labels `train` scenes at 32 px (exact
labels), trains tiny VQ-VAEs for RGB, depth, normals and segmentation,
fits the WordPiece vocabulary, tokenizes, trains a tiny 4M whose inputs and
targets are RGB (pixels and tokens), depth, normals, segmentation, captions
and boxes, then generates every target from RGB pixels alone for `val`
fresh scenes (another seed) and scores them with fourm_jax.evaluate: depth
standardised L1, normals mean angle error, segmentation mIoU, detection
AP50, caption object-mention exact match, each beside the tokenizer bound
and the trivial baseline, for one sample and for an ensemble of 4.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the repository instead of this folder, whose tokenizers.py would shadow the tokenizers package
sys.path[0] = ROOT

from fourm_jax import evaluate, load as load_lib, pseudo_label as pl  # noqa: E402
from fourm_jax import train as fourm_train  # noqa: E402
from pretrain_jax import cli, loop  # noqa: E402
from pretrain_jax.data.scenes import SEMANTIC_CLASSES, render_scene  # noqa: E402
from tokenizers_jax import text, tokenize as tok_lib, train as tok_train  # noqa: E402
from tokenizers_jax.tokenize import Tokenizer  # noqa: E402

IMAGE = {"rgb": "tok_rgb@32", "depth": "tok_depth@32", "normals": "tok_normal@32",
         "semantic": "tok_semseg@32"}


def config(path: str, arg: str):
  return cli.config_from_file(f"{ROOT}/{path}", arg)


def build(root: str, n_train: int, steps: int, log) -> str:
  cfg = config("configs/fourm/pseudo_label.py", "scenes")
  cfg.resolution, cfg.shards, cfg.labellers = 32, 4, ()
  pl.pseudo_label(cfg, f"scenes:{n_train}", f"{root}/labelled")
  tcfg = config("configs/tokenizers/tokenize.py", "")
  for modality in IMAGE:
    c = config("configs/tokenizers/vqvae.py", f"modality={modality},variant=tiny")
    c.eval_every = 0
    loop.train(c, f"{root}/tok_{modality}", tok_train.build_task(c))
    tcfg.image_tokenizers[modality] = f"{root}/tok_{modality}"
    log(f"tokenizer {modality} trained")
  captions = [render_scene(0, i, 32)["caption"] for i in range(n_train)]
  wp = text.fit_wordpiece(captions, vocab_size=4500,
                          extra_words=text.MARKER_WORDS + SEMANTIC_CLASSES)
  wp.save(f"{root}/text.json")
  tcfg.text_tokenizer = f"{root}/text.json"
  tok_lib.tokenize(tcfg, f"{root}/labelled/*.array_record", f"{root}/tokens")
  c = config("configs/fourm/pretrain.py", "variant=tiny")
  for name in IMAGE.values():
    c.modalities[name] = {"kind": "image", "vocab_size": 256, "grid": (4, 4)}
  c.modalities.det = {"kind": "seq", "vocab_size": 4500, "length": 48}
  mods = ("rgb@32",) + tuple(IMAGE.values()) + ("caption", "det")
  c.model.inputs, c.model.targets = mods, mods[1:]
  c.data.datasets.scenes.train = f"{root}/tokens/*.array_record"
  c.data.datasets.scenes.fields = {"rgb@32": "image", "tok_rgb@32": "tok_rgb",
                                   "tok_depth@32": "tok_depth", "tok_normal@32": "tok_normals",
                                   "tok_semseg@32": "tok_semantic", "caption": "caption",
                                   "det": "det"}
  c.total_steps, c.checkpoint_every, c.eval_every, c.log_every = steps, steps, 0, 100
  c.model.num_encoder_tokens = c.masking.input_tokens = 48
  c.model.num_decoder_tokens = c.masking.target_tokens = 48
  t0 = time.perf_counter()
  loop.train(c, f"{root}/fourm", fourm_train.build_task(c))
  log(f"4M trained {steps} steps in {time.perf_counter() - t0:.0f}s")
  return f"{root}/fourm"


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--train", type=int, default=2048)
  parser.add_argument("--val", type=int, default=128)
  parser.add_argument("--steps", type=int, default=1500)
  parser.add_argument("--workdir", default="")
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/fourm_oob.json"))
  args = parser.parse_args()
  root = args.workdir or tempfile.mkdtemp(prefix="fourm_oob_")
  t0 = time.perf_counter()
  log = lambda msg: print(f"[{time.perf_counter() - t0:6.0f}s] {msg}", flush=True)
  workdir = f"{root}/fourm"
  if not os.path.exists(f"{workdir}/checkpoints/{args.steps}"):
    workdir = build(root, args.train, args.steps, log)
  model, params, _ = load_lib.load(workdir)
  toks = {m: Tokenizer(f"{root}/tok_{m}") for m in IMAGE}
  wp = text.load(f"{root}/text.json")
  val = []
  for i in range(args.val):
    s = render_scene(101, i, 32)
    val.append({"image": s["rgb"], "depth": s["depth"], "normals": s["normals"],
                "semantic": s["semantic"], "boxes": s["boxes"], "box_classes": s["box_classes"],
                "caption": s["caption"]})
  targets = list(IMAGE.values())[1:] + ["caption", "det"]
  results = {}
  for ensemble in (1, 4):
    results[ensemble] = evaluate.evaluate(model, params, val, toks, targets, wp,
                                          SEMANTIC_CLASSES, steps=4,
                                          temperature=0.0 if ensemble == 1 else 0.7,
                                          ensemble=ensemble, batch_size=32)
    log(f"evaluated with ensemble {ensemble}")
  header = f"{'target':16s} {'metric':30s} {'4M':>8s} {'4M x4':>8s} {'tok. bound':>10s} {'trivial':>8s}"
  print(header)
  print("-" * len(header))
  for t in targets:
    a, b = results[1][t], results[4][t]
    print(f"{t:16s} {a['metric']:30s} {a['model']:8.3f} {b['model']:8.3f} "
          f"{a['tokenizer_bound']:10.3f} {a['baseline']:8.3f}")
  for t in ("caption", "det"):
    print(f"{t} examples: {results[1][t]['examples'][:2]}")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
               "train_scenes": args.train, "val_scenes": args.val, "steps": args.steps,
               "single": results[1], "ensemble_4": results[4],
               "note": "ensemble of 4: samples at temperature 0.7, averaged / voted; single: "
                       "greedy (temperature 0)"}, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
