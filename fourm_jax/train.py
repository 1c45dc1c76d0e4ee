"""4M pretraining on token shards (tokenizers_jax.tokenize output).

  python -m fourm_jax.train --config=configs/fourm/pretrain.py:variant=tiny --workdir=/tmp/4m \\
      --config.data.train='data/scenes_4m_tokens/train-*.array_record'

Each record's fields are read as the configured modalities
(config.data.fields: modality -> field), masked per sample in the Grain
pipeline (fourm_jax.masking; a fresh mask per index, seeded), batched with
fixed shapes, and trained with the per-modality cross-entropy of
fourm_jax.model on the core loop (sharding, checkpoints, resume, MFU).
config.modalities adds or overrides registry rows (e.g. the tiny scenes
tokenizers' 4 x 4 grids).
"""
from __future__ import annotations

import grain
import jax
import jax.numpy as jnp
import numpy as np

from fourm_jax import flops as flops_lib, masking, modalities, model as model_lib
from fourm_jax import sequence_augment
from pretrain_jax import cli, loop
from pretrain_jax.data import multimodal, pipeline, transforms


def registry(config) -> dict[str, modalities.Modality]:
  """The registry with config.modalities' rows added (name -> Modality fields)."""
  reg = dict(modalities.REGISTRY)
  for name, row in config.get("modalities", {}).items():
    row = dict(row)
    if "grid" in row:
      row["grid"] = tuple(row["grid"])
    reg[name] = modalities.Modality(name, **row)
  return reg


def build_model(config) -> model_lib.FourM:
  return model_lib.from_config(config.model, registry(config))


def _strategy(s, names, inputs_only, targets_only) -> masking.Strategy:
  """One config.masking.strategies entry -> masking.Strategy over `names`."""
  known = ("name", "weight", "input_alpha", "target_alpha", "inputs", "targets", "keep")
  unknown = sorted(set(s) - set(known))
  if unknown:
    raise ValueError(f"masking strategy {s.get('name', '?')!r}: unknown keys {unknown}; "
                     f"known: {known}")
  return masking.strategy(s.get("name", ""), names, input_alpha=s.get("input_alpha", 0.0),
                          target_alpha=s.get("target_alpha", 0.0),
                          inputs=dict(s.get("inputs", {})), targets=dict(s.get("targets", {})),
                          keep=dict(s.get("keep", {})), weight=s.get("weight", 1.0),
                          inputs_only=inputs_only, targets_only=targets_only)


def build_masker(config, model: model_lib.FourM, dataset: str | None = None
                 ) -> masking.UnifiedMasking:
  """The strategy mixture of one dataset (its own `strategies`, else config.masking's) over
  the model's modalities that the dataset has (its `fields`)."""
  mods = {m.name: m for m in (*model.inputs, *model.targets)}
  ins, tgts = {m.name for m in model.inputs}, {m.name for m in model.targets}
  ds = datasets(config)[dataset or next(iter(datasets(config)))]
  names = [n for n in mods if n in ds.fields]
  if not names:
    raise ValueError(f"dataset {dataset!r} has none of the model's modalities {list(mods)}")
  specs = list(ds.get("strategies", ()) or config.masking.strategies)
  strategies = [_strategy(s, names, [n for n in names if n not in tgts],
                          [n for n in names if n not in ins]) for s in specs]
  useful = [s for s in strategies if sum(s.input_alphas.values()) > 0 or
            sum(s.target_alphas.values()) > 0]
  if not useful:
    raise ValueError(f"dataset {dataset!r}: no masking strategy selects any of its modalities "
                     f"{names}")
  return masking.UnifiedMasking(tuple(mods[n] for n in names), useful,
                                config.masking.input_tokens, config.masking.target_tokens,
                                dict(config.masking.chunks))


def datasets(config) -> dict:
  """config.data.datasets (name -> dataset config), checked."""
  out = dict(config.data.datasets)
  if not out:
    raise ValueError("config key 'data.datasets' names no dataset")
  for name, ds in out.items():
    if not ds.get("weight", 1.0) > 0:
      raise ValueError(f"config key 'data.datasets.{name}.weight' must be > 0, got {ds.weight}")
    if not dict(ds.get("fields", {})):
      raise ValueError(f"config key 'data.datasets.{name}.fields' maps no modality to a field")
  return out


class _Mask(grain.transforms.RandomMap):
  """Record -> masked sample of every model modality (the dataset's own through its masker,
  the others empty), with its dataset's index (`dataset`) and strategy (`strategy`)."""

  def __init__(self, masker: masking.UnifiedMasking, fields: dict[str, str],
               modalities: list, dataset_id: int, augment=None):
    self.masker, self.fields, self.dataset_id = masker, fields, dataset_id
    self.absent = {m.name: masking.empty(m) for m in modalities if m.name not in fields}
    self.augment = augment    # sequence_augment.SequenceAugment: palettes, metadata per draw

  def random_map(self, element, rng: np.random.Generator):
    if self.augment is not None:
      element = self.augment(element, rng)
    sample = {m: element[f] for m, f in self.fields.items() if m in self.masker.names}
    out = self.masker(sample, rng)
    out.update(self.absent)           # read-only: batching copies them
    out["dataset"] = np.int32(self.dataset_id)
    out["valid"] = np.float32(element.get("valid", 1.0))
    return out


def dummy_batch(model: model_lib.FourM, b: int = 1) -> dict:
  """Zeros with the shapes the masking produces (for init and ahead-of-time compilation);
  pixels as float32, as the step sees them."""
  batch = {}
  for m in {m.name: m for m in (*model.inputs, *model.targets)}.values():
    empty = masking.empty(m)
    if m.kind == "pixels":
      empty["tensor"] = empty["tensor"].astype(np.float32)
    batch[m.name] = {k: np.repeat(v[None], b, 0) for k, v in empty.items()}
  return batch


def build_task(config) -> loop.Task:
  model = build_model(config)
  mods = list({m.name: m for m in (*model.inputs, *model.targets)}.values())
  all_ds = datasets(config)
  names = list(all_ds)
  maskers, fields = {}, {}
  for name, ds in all_ds.items():
    fields[name] = dict(ds.fields)
    unknown = sorted(set(fields[name]) - {m.name for m in mods})
    if unknown:
      raise ValueError(f"config key 'data.datasets.{name}.fields' maps modalities {unknown} "
                       f"that the model does not use ({[m.name for m in mods]})")
    maskers[name] = build_masker(config, model, name)
  covered = {m for f in fields.values() for m in f}
  missing = sorted({m.name for m in mods} - covered)
  if missing:
    raise ValueError(f"no dataset in 'data.datasets' has a record field for modalities {missing}")
  n_enc, n_dec = config.model.num_encoder_tokens, config.model.num_decoder_tokens
  pixels = [m.name for m in mods if m.kind == "pixels"]
  dummy = jax.tree.map(jnp.asarray, dummy_batch(model))

  def init_params(rng):
    return model.init(rng, dummy, n_enc, n_dec)["params"]

  def loss_fn(params, batch, rng):
    del rng
    batch = prepare(batch, pixels)
    total, per_mod, count = model_lib.loss(model, {"params": params}, batch, n_enc, n_dec,
                                           config.loss_type, with_count=True)
    metrics = {f"loss/{k}": v for k, v in per_mod.items()}
    if config.loss_type == "token":
      # one ratio of sums: gradient accumulation weighs micro-batches by its denominator
      # (exact); 'mod', a mean of per-modality ratios, has none (see loop.make_train_step)
      metrics[loop.LOSS_WEIGHT] = count
    metrics["data/invalid"] = jnp.sum(1.0 - batch["valid"])
    if len(names) > 1:
      for i, name in enumerate(names):
        metrics[f"data/share_{name}"] = jnp.mean(batch["dataset"] == i)
    return total, metrics

  def masked(k, name, pattern, seed, train):
    ds = all_ds[name]
    key = f"data.datasets.{name}.{'train' if train else 'eval'}"
    read = set(fields[name].values())
    augment = None
    if train and config.data.get("augment_sequences", True):
      # palettes and metadata drawn afresh per sample, when the shards keep their raw values
      schema = multimodal.schema_of(pattern, key=key)
      augment = sequence_augment.for_shards(pattern, fields[name], schema)
      read |= set(augment.raw_fields) if augment else set()
    records = multimodal.dataset(pattern, fields=tuple(sorted(read)),
                                 skip_corrupt=config.data.skip_corrupt, key=key)
    if not train:
      pipeline.check_eval_size(len(records), config.batch_size, key, pattern)
    if train:
      records = pipeline.repeated(records.shuffle(seed=seed), ds.get("repeats", 1),
                                  seed=seed + 1, window=config.data.repeat_window).repeat(None)
    return records.random_map(_Mask(maskers[name], fields[name], mods, k, augment),
                              seed=seed + 2)

  def train_data(rows):
    for n in names:
      if not all_ds[n].train:
        raise ValueError(f"config key 'data.datasets.{n}.train' names no token shards")
    parts = [(masked(k, n, all_ds[n].train, config.seed + 7919 * k, True), all_ds[n].weight)
             for k, n in enumerate(names)]
    ds = parts[0][0] if len(parts) == 1 else grain.MapDataset.mix(
        [d for d, _ in parts], [w for _, w in parts])
    ds = pipeline.ProcessRows(ds, config.batch_size, rows).batch(len(rows), drop_remainder=True)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=config.data.threads,
                                                prefetch_buffer_size=2))

  eval_data = None
  evals = [n for n in names if all_ds[n].get("eval")]
  if config.get("eval_every", 0) and evals:
    def eval_data(rows):
      out = []
      for n in evals:     # each dataset's first eval_batches batches, masked with its strategies
        ds = masked(names.index(n), n, all_ds[n].eval, config.seed + 1, False)
        m = min(len(ds), config.batch_size * config.data.eval_batches)
        ds = pipeline.ProcessRows(ds[:m], config.batch_size, rows)
        out.append(ds.batch(len(rows), drop_remainder=True))
      return out[0] if len(out) == 1 else pipeline.Chain(out)   # lazy: read when iterated

  def batch_spec(b):   # what train_data yields: the masked modalities (pixels uint8) and ids
    spec = {m.name: {k: jax.ShapeDtypeStruct((b, *v.shape), v.dtype)
                     for k, v in masking.empty(m).items()} for m in mods}
    spec["strategy"] = jax.ShapeDtypeStruct((b,), jnp.int32)    # the masking's choice
    spec["dataset"] = jax.ShapeDtypeStruct((b,), jnp.int32)
    spec["valid"] = jax.ShapeDtypeStruct((b,), jnp.float32)
    return spec

  return loop.Task(init_params=init_params, loss_fn=loss_fn, train_data=train_data,
                   eval_data=eval_data, num_layers=model.encoder_depth + model.decoder_depth,
                   flops_per_step=flops_lib.train_step_flops(model, config.batch_size, n_enc,
                                                             n_dec),
                   batch_spec=batch_spec)


def prepare(batch: dict, pixels) -> dict:
  """On the device: uint8 pixel modalities -> ImageNet-normalised float32 (the rest as is)."""
  out = dict(batch)
  for name in pixels:
    t = batch[name]["tensor"]
    if t.dtype == jnp.uint8:
      out[name] = {**batch[name], "tensor": transforms.normalize_images(t)}
  return out


def check_data(config) -> None:
  """Every dataset names its token shards, checked before anything is built (paths and eval
  sizes are checked when the loop builds the datasets, before the first step). Not part of
  build_task: planners and benchmarks build full-size tasks without data."""
  empty = [n for n, ds in datasets(config).items() if not str(ds.get("train", "")).strip()]
  if empty:
    keys = ", ".join(f"'data.datasets.{n}.train'" for n in empty)
    raise ValueError(
        f"config key{'s' if len(empty) > 1 else ''} {keys} {'are' if len(empty) > 1 else 'is'} "
        f"empty: the {config.get('variant', '?')} variant has no default data; set "
        f"--config.data.datasets.{empty[0]}.train=GLOB (token shards of tokenizers_jax.tokenize, "
        f"e.g. /data/{empty[0]}_tokens/*.array_record){' and the others' if len(empty) > 1 else ''}")


def main(config, workdir):
  check_data(config)
  return loop.train(config, workdir, build_task(config))


if __name__ == "__main__":
  cli.run(main, validate=loop.validate_config)
