"""Probing frozen backbone features (AIM paper Sec. 4.2, 5.4): attentive or linear probes
for several blocks at once, optionally with LoRA adapters on the trunk, for any backbone
registered in pretrain_jax.backbones (`--config.backbone=aim|fourm|<registered>`).

  python -m aimjax.probe --config=configs/aim/probe.py:variant=tiny \\
      --config.backbone=fourm --config.init_from=WORKDIR_OR_CHECKPOINT --workdir=DIR

A project's entry point calls `main` (`aimjax.probe` is AIM's). `layers` lists the probed
groups: an int is one block, a tuple of ints the mean of those blocks' outputs (the
official AIM heads read such a mean: `heads.average_layers`). One backbone forward per
batch (with the backbone's own attention; `causal` asks a backbone that has the option
for causal features) feeds one probe per group; the probes (and adapters, for a
backbone with `with_lora`) train together with one optimizer whose state covers only
them. Validation top-1 per group is logged every epoch; the final table goes to
probe_results.json and probe_layers.png in the workdir, and the best group's head to
probe.safetensors (with its blocks, backbone and init_from in the metadata), which
a project's classifier applies (`aimjax.classify`).
"""
from __future__ import annotations

import io
import json
import logging
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from pretrain_jax import backbones, export, heads, metrics as metrics_lib, optim
from pretrain_jax.data import pipeline, transforms

Group = tuple[int, ...]


def layer_groups(layers, depth: int) -> tuple[Group, ...]:
  """config key 'layers' -> the probed groups: each entry an int (one block) or a sequence
  of ints (the mean of those blocks), negative counting from the last. Returns distinct
  groups of sorted block indices in 0..depth-1: single blocks first, in block order."""
  groups = set()
  for entry in layers:
    ids = (entry,) if np.ndim(entry) == 0 else tuple(entry)
    if not ids:
      raise ValueError("config key 'layers': an empty group names no block")
    for i in ids:
      if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not -depth <= i < depth:
        raise ValueError(f"config key 'layers': {i!r} is not a block index of a backbone with "
                         f"{depth} blocks (0..{depth - 1}, or negative from the last)")
    groups.add(tuple(sorted({int(i) % depth for i in ids})))
  if not groups:
    raise ValueError("config key 'layers' must list at least one block or group")
  return tuple(sorted(groups, key=lambda g: (len(g) > 1, g)))


def group_name(group: Group) -> str:
  """'3' for one block, '14-19' for a run of blocks, '0+2' otherwise."""
  if len(group) == 1:
    return str(group[0])
  if list(group) == list(range(group[0], group[-1] + 1)):
    return f"{group[0]}-{group[-1]}"
  return "+".join(map(str, group))


def group_features(backbone, params, images, groups: tuple[Group, ...], adapters=None):
  """One backbone pass -> a tuple with, per group, the mean of its blocks' outputs [B, K, D]."""
  blocks = sorted({l for g in groups for l in g})
  feats = backbone.features(params, images, blocks, **({"adapters": adapters} if adapters else {}))
  by_block = dict(zip(blocks, feats))
  return tuple(heads.average_layers(by_block, g) for g in groups)


class MultiLayerProbe(nn.Module):
  """One probe per probed group: features tuple of [B, K, D] -> logits [L, B, C]."""
  kind: str
  num_heads: int
  num_classes: int
  names: tuple[str, ...]

  @nn.compact
  def __call__(self, features, train: bool = False):
    outs = []
    for name, f in zip(self.names, features):
      if self.kind == "attentive":
        probe = heads.AttentiveProbe(self.num_heads, self.num_classes, name=name)
      else:
        probe = heads.LinearProbe(self.num_classes, name=name)
      outs.append(probe(f.astype(jnp.float32), train=train))
    return jnp.stack(outs)


def module_name(group: Group) -> str:
  return f"block_{group[0]}" if len(group) == 1 else f"blocks_{group_name(group)}"


def build(config, backbone):
  """Returns (probe module, the backbone with LoRA adapters when config.lora.rank > 0,
  groups: the probed groups of block indices, layer_groups)."""
  if config.probe not in ("attentive", "linear"):
    raise ValueError(f"config key 'probe' must be 'attentive' or 'linear', got {config.probe!r}")
  groups = layer_groups(config.layers, backbone.depth)
  if config.lora.rank > 0:
    if not hasattr(backbone, "with_lora"):
      raise ValueError(f"config key 'lora.rank': {type(backbone).__name__} has no LoRA "
                       "adapters (no with_lora); probe it frozen (lora.rank=0)")
    backbone = backbone.with_lora(config.lora.rank, config.lora.alpha, tuple(config.lora.targets))
  probe = MultiLayerProbe(config.probe, backbone.num_heads, config.num_classes,
                          tuple(module_name(g) for g in groups))
  return probe, backbone, groups


def train_probes(config, workdir: str) -> dict:
  """Trains the probes; returns {"top1": {block: acc}, "best_block": ..., ...}."""
  if not config.init_from:
    raise ValueError("config key 'init_from' must name a workdir, checkpoint or variant")
  name = config.get("backbone") or ""
  if not name:
    raise ValueError(f"config key 'backbone' must name a registered backbone: {backbones.names()}")
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)   # local or gs://...
  rng = jax.random.key(config.seed)
  options = {"causal": True} if config.get("causal") else {}
  backbone, trunk_params = backbones.load(name, config.init_from, config.data.image_size,
                                          config.get("init_step") or None, **options)
  if backbone.image_size != config.data.image_size:
    raise ValueError(f"config key 'data.image_size' ({config.data.image_size}) must be the "
                     f"{name} backbone's resolution ({backbone.image_size})")
  probe, backbone, groups = build(config, backbone)
  names = [group_name(g) for g in groups]
  lora_vars = backbone.init_adapters(rng) if config.lora.rank > 0 else {}
  feats0 = [jnp.zeros((2, backbone.num_patches, backbone.width))] * len(groups)
  probe_vars = nn.unbox(jax.jit(probe.init)(jax.random.fold_in(rng, 1), feats0))
  trainable = {"probe": probe_vars["params"], "lora": lora_vars}

  train_ds = pipeline.train_dataset(config.data, config.batch_size, config.seed)
  eval_ds = pipeline.eval_batches(config.data, config.batch_size, config.data.eval_batches)
  # An epoch is one pass over the (first) training source.
  kind, arg, _ = pipeline.parse_spec(config.data.train)[0]
  steps_per_epoch = max(
      len(pipeline.make_source(kind, arg, config.data, "train")) // config.batch_size, 1)
  total = steps_per_epoch * config.epochs
  tx, _ = optim.create_optimizer(config.optimizer, total, trainable)
  opt_state = tx.init(trainable)

  def features(lora, images, train):
    images = transforms.normalize_images(images)   # uint8 batches from the pipeline
    feats = group_features(backbone, trunk_params, images, groups, lora)
    return feats if lora else jax.lax.stop_gradient(feats)

  def loss_fn(trainable, batch_stats, batch):
    feats = features(trainable["lora"], batch["image"], True)
    logits, updates = probe.apply({"params": trainable["probe"], "batch_stats": batch_stats},
                                  feats, train=True, mutable=["batch_stats"])
    labels = jax.nn.one_hot(batch["label"], config.num_classes)
    w = batch["valid"] / jnp.maximum(batch["valid"].sum(), 1.0)
    ce = optax.softmax_cross_entropy(logits, labels[None])   # [L, B]
    loss = jnp.sum(ce * w[None])                             # sum over layers: independent probes
    return loss, (updates["batch_stats"], jnp.sum(ce * w[None], axis=1))

  @jax.jit
  def train_step(trainable, batch_stats, opt_state, batch):
    (loss, (batch_stats, per_layer)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        trainable, batch_stats, batch)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), batch_stats, opt_state, per_layer

  @jax.jit
  def eval_step(trainable, batch_stats, batch):
    feats = features(trainable["lora"], batch["image"], False)
    logits = probe.apply({"params": trainable["probe"], "batch_stats": batch_stats}, feats)
    hit = (jnp.argmax(logits, -1) == batch["label"][None]) * batch["valid"][None]
    return hit.sum(axis=1), batch["valid"].sum()

  writer = metrics_lib.create_writer(workdir)
  batch_stats = probe_vars["batch_stats"]
  it = iter(train_ds)
  history = []
  step = 0
  t0 = time.perf_counter()
  for epoch in range(1, config.epochs + 1):
    for _ in range(steps_per_epoch):
      batch = {k: jnp.asarray(v) for k, v in next(it).items()}
      trainable, batch_stats, opt_state, per_layer = train_step(trainable, batch_stats,
                                                                opt_state, batch)
      step += 1
      if step % config.log_every == 0:
        writer.write_scalars(step, {f"train/loss_block_{l}": float(v)
                                    for l, v in zip(names, per_layer)})
    hits, count = np.zeros(len(groups)), 0.0
    for batch in eval_ds:
      h, n = eval_step(trainable, batch_stats, {k: jnp.asarray(v) for k, v in batch.items()})
      hits += np.asarray(h)
      count += float(n)
    top1 = {l: float(h / max(count, 1)) for l, h in zip(names, hits)}
    history.append(top1)
    writer.write_scalars(step, {"epoch": epoch, **{f"eval/top1_block_{l}": a
                                                   for l, a in top1.items()}})
    logging.info("epoch %d/%d: top-1 %s (%.0fs)", epoch, config.epochs,
                 {l: round(a, 4) for l, a in top1.items()}, time.perf_counter() - t0)
  writer.flush()
  final = history[-1]
  best = max(final, key=final.get)
  best_group = groups[names.index(best)]
  result = {"init_from": config.init_from, "backbone": name, "probe": config.probe,
            "causal": bool(config.causal),
            "lora_rank": int(config.lora.rank), "top1": dict(final),
            "groups": {n: list(g) for n, g in zip(names, groups)},
            "best_block": best, "best_top1": final[best], "eval_examples": int(count),
            "history": history}
  (epath.Path(workdir) / "probe_results.json").write_text(json.dumps(result, indent=2))
  _plot(final, os.path.join(workdir, "probe_layers.png"), config)
  merged = ""
  if config.lora.rank > 0 and hasattr(backbone, "save_merged"):
    merged = "merged_params.safetensors"
    backbone.save_merged(trunk_params, trainable["lora"], os.path.join(workdir, merged))
  save_head(os.path.join(workdir, "probe.safetensors"),
            {"params": trainable["probe"][module_name(best_group)],
             "batch_stats": batch_stats.get(module_name(best_group), {})},
            {"kind": config.probe, "layers": list(best_group), "num_heads": backbone.num_heads,
             "num_classes": config.num_classes, "linear_bias": False,
             "backbone": name, "init_from": _absolute(config.init_from),
             "init_step": int(config.get("init_step") or 0), "image_size": backbone.image_size,
             "causal": bool(config.causal), "lora_rank": int(config.lora.rank),
             "merged_params": merged})
  logging.info("best block %s: top-1 %.4f; wrote %s", best, final[best],
               os.path.join(workdir, "probe_results.json"))
  return result


def save_head(path: str, variables, probe_info: dict) -> None:
  """Writes one probe's variables ({"params", "batch_stats"}) with `probe_info` (kind,
  layers: the blocks whose mean it reads, num_heads, num_classes, linear_bias, and where
  its backbone comes from) as the metadata's "probe"."""
  export.save_safetensors(jax.device_get(variables), path, {"probe": probe_info})


def _absolute(init_from: str) -> str:
  """A local path made absolute (a probe workdir's head then finds its backbone from
  anywhere); variant names and URLs as given."""
  return os.path.abspath(init_from) if os.path.exists(init_from) else init_from


def _plot(top1: dict[str, float], path: str, config) -> None:
  """Accuracy per block or group as a PNG (matplotlib's Figure API: no global backend
  switch)."""
  from matplotlib.figure import Figure
  fig = Figure(figsize=(5, 3))
  ax = fig.subplots()
  names = list(top1)
  ax.plot(range(len(names)), [100 * top1[b] for b in names], marker="o")
  ax.set_xticks(range(len(names)), names)
  ax.set_xlabel("block (a-b: the mean of blocks a..b)")
  ax.set_ylabel("validation top-1 (%)")
  ax.set_title(f"{config.probe} probe of {os.path.basename(str(config.init_from).rstrip('/'))}")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, dpi=100, format="png")
  epath.Path(path).write_bytes(png.getvalue())


def main(config, workdir):
  return train_probes(config, workdir)

