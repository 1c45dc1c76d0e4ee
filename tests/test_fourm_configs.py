"""Every 4M pretraining variant (configs/fourm/pretrain.py) by shape: model, masking, data."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from conftest import load_config
from fourm_jax import model as model_lib
from fourm_jax import train as fourm_train

PRETRAIN = "configs/fourm/pretrain.py"
VARIANTS = ("tiny", "4m7_B", "4m7_L", "4m7_XL", "ref_B", "4m21_B", "4m21_L", "4m21_XL", "sr_L")
# size -> 4M Table 4 parameters without embeddings (millions)
TABLE4 = {"B": 198, "L": 705, "XL": 2818}


def _sample(masker, rng):
  """A random sample with the shapes of each of the masker's modalities."""
  out = {}
  for m in masker.modalities:
    if m.kind == "pixels":
      out[m.name] = rng.integers(0, 256, (m.grid[0] * m.patch_size, m.grid[1] * m.patch_size, 3),
                                 dtype=np.uint8)
    elif m.kind == "seq_emb":
      out[m.name] = rng.normal(size=(20, m.emb_dim)).astype(np.float32)
    elif m.kind == "seq":
      n = int(rng.integers(2, m.length - 1))
      body = rng.integers(4204, 4404, n)
      out[m.name] = np.concatenate([body - body % 2 if m.name == "metadata" else body, [3]])
    else:
      out[m.name] = rng.integers(0, m.vocab_size, m.num_tokens)
  return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_builds_its_model_masking_and_datasets(variant):
  cfg = load_config(PRETRAIN, f"variant={variant}")
  model = fourm_train.build_model(cfg)
  params = jax.eval_shape(lambda r: model.init(r, fourm_train.dummy_batch(model),
                                               cfg.model.num_encoder_tokens,
                                               cfg.model.num_decoder_tokens),
                          jax.random.key(0))["params"]
  size = cfg.model.size
  if size in TABLE4:
    n = model_lib.count_params(nn.unbox(params)) / 1e6
    assert abs(n - TABLE4[size]) / TABLE4[size] < 0.03, n
  rng = np.random.default_rng(0)
  lo, hi = np.broadcast_to(np.asarray(cfg.masking.input_tokens), (2,))
  for name in fourm_train.datasets(cfg):
    masker = fourm_train.build_masker(cfg, model, name)
    for _ in range(20):
      out = masker(_sample(masker, rng), rng)
      given = sum(int((~out[m.name]["input_mask"]).sum()) for m in masker.modalities)
      wanted = sum(int((~out[m.name]["target_mask"]).sum()) for m in masker.modalities)
      assert given <= hi + 1 and wanted <= cfg.masking.target_tokens, (name, given, wanted)
  if not variant == "tiny":
    tokens = {"4m21": 512, "sr": 2048}.get(variant.split("_")[0], 256)
    total = cfg.total_steps * cfg.batch_size * tokens
    assert abs(total - (100e9 if variant.split("_")[0] in ("ref", "sr") else 500e9)) < 1e-3 * total
    assert cfg.model.dtype == "bfloat16" and cfg.model.remat == "block"


def test_4m21_co_trains_three_datasets_with_the_official_strategy_mixture():
  cfg = load_config(PRETRAIN, "variant=4m21_B")
  ds = fourm_train.datasets(cfg)
  assert {n: d.weight for n, d in ds.items()} == {"cc12m": 0.6, "coyo": 0.2, "c4": 0.2}
  assert len(ds["cc12m"].fields) == 19 and len(ds["coyo"].fields) == 8
  assert set(ds["c4"].fields) == {"caption"} and ds["cc12m"].repeats == 4
  model = fourm_train.build_model(cfg)
  masker = fourm_train.build_masker(cfg, model, "cc12m")
  assert [s.weight for s in masker.strategies] == [1, 1, 1, 1, 1, 0.5, 0.5]
  cap = masker.strategies[5]
  assert cap.input_alphas["caption"] == 5.0 and cap.keep["caption"] == "all"
  assert cap.target_alphas["caption"] == 0.0 and cap.target_alphas["t5_caption"] == 0.0
  assert masker.strategies[0].keep["color_palette"] == "binary"
  # the coyo masker covers only its 8 modalities, with the same mixture
  coyo = fourm_train.build_masker(cfg, model, "coyo")
  assert len(coyo.modalities) == 8 and [s.name for s in coyo.strategies][-1] == "caption_biased"
  assert len(coyo.strategies) == 6                   # no T5 embeddings: no T5-biased strategy


def test_bad_dataset_configs_are_refused_naming_the_key():
  cfg = load_config(PRETRAIN, "variant=tiny")
  cfg.data.datasets.scenes.fields["tok_bogus"] = "x"
  with pytest.raises(ValueError, match="fields' maps modalities \\['tok_bogus'\\]"):
    fourm_train.build_task(cfg)
  cfg = load_config(PRETRAIN, "variant=tiny")
  cfg.data.datasets.scenes.weight = 0.0
  with pytest.raises(ValueError, match="data.datasets.scenes.weight"):
    fourm_train.build_task(cfg)
  cfg = load_config(PRETRAIN, "variant=tiny")
  cfg.model.ffn = "relu"
  with pytest.raises(ValueError, match="model.ffn"):
    fourm_train.build_model(cfg)
