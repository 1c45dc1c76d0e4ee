"""AIM pretraining entry point.

  python -m aimjax.train --config=configs/aim/pretrain.py:variant=tiny --workdir=/tmp/aim
  python -m aimjax.train --config=configs/aim/pretrain.py:variant=0.6B --workdir=DIR \
      --config.init_from=ckpt/aim_600m --config.data.train=...   # continue released weights

`init_from` (a training workdir, or one aimjax.convert wrote) starts a new run from
its trunk; the pixel head, which the released files lack, starts fresh.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
from etils import epath

from aimjax import model as model_lib
from aimjax import objective
from pretrain_jax import cli, loop
from pretrain_jax.data import pipeline, transforms


def make_loss_fn(model: model_lib.AIM, objective_cfg):
  """(params, batch, rng) -> (loss, metrics) for batch {"image", "valid"}."""
  perm = model.sequence_order()

  def loss_fn(params, batch, rng):
    images = transforms.normalize_images(batch["image"])   # uint8 -> standardised float32
    b = images.shape[0]
    if objective_cfg.prefix:
      prefix_len = objective.sample_prefix_lengths(rng, b, model.num_patches)
    else:  # causal-only ablation: no bidirectional prefix
      prefix_len = jnp.zeros((b,), jnp.int32)
    pred = model.apply({"params": params}, images.astype(model.dtype), prefix_len)
    targets = objective.patchify(images.astype(jnp.float32), model.patch_size)[:, perm]
    if objective_cfg.norm_targets:
      targets = objective.normalize_patches(targets)
    valid = batch.get("valid")
    loss, _ = objective.next_patch_loss(pred, targets, prefix_len, valid)
    # the loss's denominator (non-prefix patches of valid rows): gradient accumulation weighs
    # micro-batches by it, so the accumulated loss is this ratio of sums over the whole batch
    w = objective.loss_weights(prefix_len, pred.shape[1])
    metrics = {loop.LOSS_WEIGHT: jnp.sum(w if valid is None else w * valid[:, None])}
    if valid is not None:
      metrics["data/invalid"] = jnp.sum(1.0 - valid)
    return loss, metrics
  return loss_fn


def check_data(config) -> None:
  """The data specs, checked before anything is built (the sources themselves, paths and
  sizes, are checked when the loop builds the datasets, before the first step). Not part
  of build_task: planners and benchmarks build full-size tasks without data."""
  if not config.data.train.strip():
    raise ValueError(
        f"config key 'data.train' is empty: the {config.get('variant', '?')} variant has no "
        "default data; set --config.data.train=... (e.g. "
        "arrayrecord:/data/dfn/*.array_record, or scenes for a toy run)")
  pipeline.parse_spec(config.data.train, "data.train")
  if config.get("eval_every", 0) and config.data.get("eval"):
    pipeline.parse_spec(config.data.eval, "data.eval")


def check_init_from(config) -> None:
  """A config.init_from workdir must hold a trunk of this config's shape (its config.json's
  model): the loop copies parameters by name and shape, and a trunk of another size would
  copy nothing or only part of it."""
  init_from = config.get("init_from")
  if not init_from:
    return
  path = epath.Path(init_from) / "config.json"
  if not epath.Path(init_from).is_dir() or not path.exists():
    raise ValueError(f"config key 'init_from' must be a workdir holding config.json and "
                     f"checkpoints/ (a training run, or aimjax.convert's output), got "
                     f"{init_from!r}")
  theirs = json.loads(path.read_text()).get("model", {})
  for key in ("patch_size", "width", "depth", "num_heads", "mlp_ratio"):
    if key in theirs and theirs[key] != config.model[key]:
      raise ValueError(f"config key 'model.{key}' is {config.model[key]} but the init_from "
                       f"workdir {init_from} has {theirs[key]}: pick the matching variant "
                       f"or set --config.model.{key}={theirs[key]}")


def build_task(config) -> loop.Task:
  """Model, data and objective for `loop.train`."""
  model = model_lib.from_config(config.model, config.objective)
  if config.data.image_size != config.model.image_size:
    raise ValueError(f"config key 'data.image_size' ({config.data.image_size}) must equal "
                     f"model.image_size ({config.model.image_size})")
  dummy = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
  init_params = lambda rng: model.init(rng, dummy, jnp.ones((1,), jnp.int32))["params"]
  eval_data = None
  if config.get("eval_every", 0) and config.data.get("eval"):
    eval_data = lambda rows: pipeline.eval_batches(
        config.data, config.batch_size, config.data.eval_batches, rows)
  return loop.Task(
      init_params=init_params,
      loss_fn=make_loss_fn(model, config.objective),
      train_data=lambda rows: pipeline.train_dataset(
          config.data, config.batch_size, config.seed, rows),
      eval_data=eval_data,
      flops_per_step=3 * model_lib.forward_flops(model, config.batch_size),
      num_layers=config.model.depth,
      batch_spec=lambda b: {
          "image": jax.ShapeDtypeStruct((b, model.image_size, model.image_size, 3), jnp.uint8),
          "label": jax.ShapeDtypeStruct((b,), jnp.int32),
          "valid": jax.ShapeDtypeStruct((b,), jnp.float32)})


def main(config, workdir):
  check_data(config)
  check_init_from(config)
  return loop.train(config, workdir, build_task(config))


if __name__ == "__main__":
  cli.run(main, validate=loop.validate_config)
