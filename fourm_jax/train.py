"""4M pretraining on token shards (tokenizers_jax.tokenize output).

  python -m fourm_jax.train --config=configs/fourm/pretrain.py:variant=tiny --workdir=/tmp/4m \
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

from fourm_jax import masking, modalities, model as model_lib
from pretrain_jax import cli, loop
from pretrain_jax.data import multimodal, pipeline


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
  reg = registry(config)
  m = config.model
  if m.size not in model_lib.SIZES:
    raise ValueError(f"config key 'model.size': unknown {m.size!r}; known: "
                     f"{list(model_lib.SIZES)}")
  enc, dec, dim, heads = model_lib.SIZES[m.size]
  return model_lib.FourM(modalities.get(m.inputs, reg), modalities.get(m.targets, reg),
                         dim=m.get("dim", 0) or dim, encoder_depth=m.get("encoder_depth", 0) or enc,
                         decoder_depth=m.get("decoder_depth", 0) or dec,
                         num_heads=m.get("num_heads", 0) or heads, qk_norm=m.qk_norm,
                         tie_embeddings=m.tie_embeddings,
                         dtype=jnp.bfloat16 if m.dtype == "bfloat16" else jnp.float32,
                         remat=m.remat)


def build_masker(config, model: model_lib.FourM) -> masking.UnifiedMasking:
  """The strategy mixture of config.masking over the model's inputs and targets."""
  mods = {m.name: m for m in (*model.inputs, *model.targets)}
  ins, tgts = [m.name for m in model.inputs], [m.name for m in model.targets]
  strategies = []
  for s in config.masking.strategies:
    if s.kind == "all2all":
      strategies.append(masking.Strategy(f"all2all_{s.alpha:g}", {n: s.alpha for n in ins},
                                         {n: s.alpha for n in tgts}, weight=s.weight))
    elif s.kind == "one2all":
      if s.source not in ins:
        raise ValueError(f"masking strategy one2all: source {s.source!r} is not an input of "
                         f"the model ({ins})")
      strategies.append(masking.Strategy(
          f"{s.source}2all_{s.alpha:g}", {s.source: 1.0},
          {n: s.alpha for n in tgts if n != s.source}, keep={s.source: "all"}, weight=s.weight))
    else:
      raise ValueError(f"unknown masking strategy kind {s.kind!r}; use all2all or one2all")
  return masking.UnifiedMasking(tuple(mods.values()), strategies, config.masking.input_tokens,
                                config.masking.target_tokens, dict(config.masking.chunks))


class _Mask(grain.transforms.RandomMap):
  def __init__(self, masker: masking.UnifiedMasking, fields: dict[str, str]):
    self.masker, self.fields = masker, fields

  def random_map(self, element, rng: np.random.Generator):
    sample = {m: element[f] for m, f in self.fields.items()}
    out = self.masker(sample, rng)
    out["valid"] = np.float32(element.get("valid", 1.0))
    return out


def dummy_batch(model: model_lib.FourM, b: int = 1) -> dict:
  """Zeros with the shapes the masking produces (for init and ahead-of-time compilation)."""
  batch = {}
  for m in {m.name: m for m in (*model.inputs, *model.targets)}.values():
    n = 2 * (m.length + 1) if m.kind == "seq" else m.num_tokens
    if m.kind == "pixels":
      t = np.zeros((b, m.grid[0] * m.patch_size, m.grid[1] * m.patch_size, m.channels),
                   np.float32)
    elif m.kind == "seq_emb":
      t = np.zeros((b, n, m.emb_dim), np.float32)
    else:
      t = np.zeros((b, n), np.int32)
    batch[m.name] = {"tensor": t, "input_mask": np.ones((b, n), bool),
                     "target_mask": np.ones((b, n), bool),
                     "decoder_attention_mask": np.zeros((b, n), np.int32)}
  return batch


def _records(config, pattern: str) -> grain.MapDataset:
  fields = tuple(dict(config.data.fields).values())
  return multimodal.dataset(pattern, fields=fields, skip_corrupt=config.data.skip_corrupt)


def build_task(config) -> loop.Task:
  model = build_model(config)
  masker = build_masker(config, model)
  fields = dict(config.data.fields)
  missing = sorted({m.name for m in (*model.inputs, *model.targets)} - set(fields))
  if missing:
    raise ValueError(f"config key 'data.fields' has no record field for modalities {missing}")
  n_enc, n_dec = config.model.num_encoder_tokens, config.model.num_decoder_tokens
  dummy = jax.tree.map(jnp.asarray, dummy_batch(model))

  def init_params(rng):
    return model.init(rng, dummy, n_enc, n_dec)["params"]

  def loss_fn(params, batch, rng):
    del rng
    total, per_mod = model_lib.loss(model, {"params": params}, batch, n_enc, n_dec,
                                    config.loss_type)
    metrics = {f"loss/{k}": v for k, v in per_mod.items()}
    metrics["data/invalid"] = jnp.sum(1.0 - batch["valid"])
    return total, metrics

  def masked(pattern, seed):
    return _records(config, pattern).random_map(_Mask(masker, fields), seed=seed)

  def train_data(rows):
    ds = masked(config.data.train, config.seed).shuffle(seed=config.seed).repeat(None)
    ds = pipeline.ProcessRows(ds, config.batch_size, *rows).batch(rows[1], drop_remainder=True)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=config.data.threads,
                                                prefetch_buffer_size=2))

  eval_data = None
  if config.get("eval_every", 0) and config.data.get("eval"):
    def eval_data(rows):
      ds = masked(config.data.eval, config.seed + 1)
      n = min(len(ds), config.batch_size * config.data.eval_batches)
      ds = pipeline.ProcessRows(ds[:n], config.batch_size, *rows)
      return ds.batch(rows[1], drop_remainder=True)

  return loop.Task(init_params=init_params, loss_fn=loss_fn, train_data=train_data,
                   eval_data=eval_data, num_layers=model.encoder_depth + model.decoder_depth)


def main(config, workdir):
  return loop.train(config, workdir, build_task(config))


if __name__ == "__main__":
  cli.run(main, validate=loop.validate_config)
