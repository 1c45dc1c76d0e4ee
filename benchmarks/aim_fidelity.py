"""The scientific check behind AIM, at tiny scale on the scenes data.

  python benchmarks/aim_fidelity.py [--steps=1200] [--probe_epochs=16] [--out=...]

Writes 2048 training and 512 validation scenes (64 px) as ArrayRecord shards,
pretrains the tiny AIM with prefix attention on the training shards, keeping
checkpoints along the way; for each checkpoint reports the validation loss
and the top-1 of attentive probes (bidirectional features) on the scenes
label (colour of the largest object, 8 classes); for the last one also
probes causal features (paper Table 3d: prefix pretraining should make
bidirectional probing better than causal). Also probes a randomly
initialised trunk as the floor. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import logging
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from aimjax import probe as probe_lib  # noqa: E402
from aimjax import train as aim_train  # noqa: E402
from pretrain_jax import loop, metrics as metrics_lib  # noqa: E402
from pretrain_jax.data import make_scenes  # noqa: E402


def _config(name: str, variant: str = "tiny"):
  spec = importlib.util.spec_from_file_location(name, f"{ROOT}/configs/aim/{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(f"variant={variant}")


def _use_shards(cfg, shards: dict) -> None:
  cfg.data.train, cfg.data.eval = shards["train"], shards["eval"]


def probe(init_from: str, workdir: str, epochs: int, shards: dict, causal: bool = False,
          step: int = 0):
  cfg = _config("probe")
  cfg.init_from, cfg.init_step, cfg.epochs, cfg.causal = init_from, step, epochs, causal
  _use_shards(cfg, shards)
  return probe_lib.train_probes(cfg, workdir)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=1200)
  parser.add_argument("--checkpoints", type=int, default=4, help="checkpoints probed, evenly spaced")
  parser.add_argument("--probe_epochs", type=int, default=16)
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/aim_fidelity.json"))
  args = parser.parse_args()
  logging.getLogger().setLevel(logging.WARNING)

  tmp = tempfile.mkdtemp(prefix="aim_fidelity_")
  every = args.steps // args.checkpoints
  probed_steps = [every * (i + 1) for i in range(args.checkpoints)]
  shards = {}
  for split, num, seed in (("train", 2048, 0), ("eval", 512, 1)):
    make_scenes.write_scenes(os.path.join(tmp, split), num, seed=seed, resolution=64, shards=2)
    shards[split] = f"arrayrecord:{os.path.join(tmp, split)}/*.array_record"
  rows = []
  rnd = probe("tiny", os.path.join(tmp, "probe_random"), args.probe_epochs, shards)
  rows.append({"checkpoint": "random init", "step": 0, "val_loss": None,
               "top1": rnd["top1"], "best_top1": rnd["best_top1"]})
  pre = os.path.join(tmp, "pretrain")
  cfg = _config("pretrain")
  cfg.total_steps, cfg.eval_every, cfg.checkpoint_every = args.steps, every, every
  cfg.keep_checkpoints = args.checkpoints + 1
  _use_shards(cfg, shards)
  loop.train(cfg, pre, aim_train.build_task(cfg))
  evals = metrics_lib.read_jsonl(os.path.join(pre, "metrics.jsonl"))
  for step in probed_steps:
    res = probe(pre, os.path.join(tmp, f"probe_{step}"), args.probe_epochs, shards,
                step=step)
    rows.append({"checkpoint": f"prefix pretraining, step {step}", "step": step,
                 "val_loss": evals[step].get("eval/loss"), "top1": res["top1"],
                 "best_top1": res["best_top1"]})
  causal = probe(pre, os.path.join(tmp, "probe_causal"), args.probe_epochs, shards,
                 causal=True)
  rows.append({"checkpoint": f"step {probed_steps[-1]}, causal features", "step": probed_steps[-1],
               "val_loss": rows[-1]["val_loss"], "top1": causal["top1"],
               "best_top1": causal["best_top1"]})

  print(f"{'checkpoint':40s} {'val loss':>9s} {'top-1 per block':>24s} {'best':>6s}")
  for r in rows:
    per_block = " ".join(f"{b}:{100 * a:.1f}" for b, a in sorted(r["top1"].items()))
    val = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "-"
    print(f"{r['checkpoint']:40s} {val:>9s} {per_block:>24s} {100 * r['best_top1']:5.1f}%")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
               "steps": args.steps, "probe_epochs": args.probe_epochs, "rows": rows}, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
