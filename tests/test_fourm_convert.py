"""Released 4M / 4M-21 checkpoints through `python -m fourm_jax.convert` (issue 20).

The fixtures are outputs of the official ml-4m FM on random weights (read
../shared/fixtures/README.md): the converted workdir must reproduce the
official loss, per-modality losses and logits, and `--to_official` must give
back the official state dict.
"""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SHARED
from fourm_jax import convert, load as load_lib, model as model_lib

FIXTURES = os.path.join(SHARED, "fixtures")
FOURM = os.path.join(FIXTURES, "fourm_small.safetensors")
FOURM21 = os.path.join(FIXTURES, "fourm21_small.safetensors")
needs = lambda path: pytest.mark.skipif(
    not os.path.exists(path), reason=f"../shared/fixtures/{os.path.basename(path)} (official "
    "4M outputs on random weights) is not present")


def _cli(*args, cwd=None):
  out = subprocess.run([sys.executable, "-m", "fourm_jax.convert", *args], cwd=cwd,
                       capture_output=True, text=True, timeout=300)
  return out.returncode, out.stdout + out.stderr


def _fixture(path):
  from safetensors import safe_open
  from safetensors.numpy import load_file
  with safe_open(path, "np") as f:
    meta = f.metadata()
  return load_file(path), meta


def _batch(sd, names):
  """The fixture's batch (`__in__.*`, as the official forward got it) in this model's layout:
  NHWC pixels, int32 tokens, float32 embeddings."""
  batch = {}
  for name in names:
    d = {k: sd[f"__in__.{name}.{k}"] for k in ("tensor", "input_mask", "target_mask",
                                               "decoder_attention_mask")}
    t = d["tensor"]
    d["tensor"] = (t.transpose(0, 2, 3, 1) if t.ndim == 4 else
                   t.astype(np.int32) if t.dtype.kind in "iu" else t.astype(np.float32))
    batch[name] = {k: jnp.asarray(v) for k, v in d.items()}
  return batch


def _check_reproduces(workdir, sd, meta):
  """Loss and per-modality losses to 1e-4, logits at every decoder position to float16
  precision, the decoder's target ids and modality layout exactly."""
  model, params, _ = load_lib.load(workdir)
  cfg = json.loads(meta["config"])
  batch = _batch(sd, cfg["domains_in"])
  n_enc, n_dec = int(meta["num_encoder_tokens"]), int(meta["num_decoder_tokens"])
  variables = {"params": jax.tree.map(jnp.asarray, params)}
  total, per_mod = jax.jit(model_lib.loss, static_argnums=(0, 3, 4))(model, variables, batch,
                                                                    n_enc, n_dec)
  np.testing.assert_allclose(float(total), float(sd["__loss__"][0]), atol=1e-4)
  assert sorted(per_mod) == sorted(cfg["domains_out"])
  for name, value in per_mod.items():
    np.testing.assert_allclose(float(value), float(sd[f"__modloss__.{name}"][0]), atol=1e-4)
  y, ids, mods, valid = model.apply(variables, batch, n_enc, n_dec)
  if "__dec_target_ids__" in sd:
    np.testing.assert_array_equal(np.asarray(ids), sd["__dec_target_ids__"])
    mod_ids = json.loads(meta["modality_ids"])
    want = np.where(np.asarray(valid), np.asarray(
        [mod_ids[m.name] for m in model.targets])[np.asarray(mods)], -1)
    np.testing.assert_array_equal(want, sd["__dec_mod_mask__"])
  for m in model.targets:
    got = np.asarray(model.apply(variables, y, m.name, method=model.logits))
    np.testing.assert_allclose(got, sd[f"__logits__.{m.name}"].astype(np.float32), atol=4e-3)


@needs(FOURM21)
def test_fourm21_checkpoint_converts_through_the_cli_and_reproduces_the_official_outputs(
    tmp_path):
  """4M-21 modalities: a global-token modality with separate learned encoder and decoder
  positions, boxes (det) and T5 caption embeddings (seq_emb)."""
  sd, meta = _fixture(FOURM21)
  rc, out = _cli(f"--input={FOURM21}", "--out=wd", cwd=tmp_path)
  assert rc == 0, out
  assert "wrote wd" in out
  _check_reproduces(str(tmp_path / "wd"), sd, meta)
  # the decoder reads its own position table (the encoder's would change the loss)
  _, params, _ = load_lib.load(str(tmp_path / "wd"))
  np.testing.assert_array_equal(np.asarray(params["dec_pos_emb_tok_dinov2_global"]),
                                sd["decoder_embeddings.tok_dinov2_global.pos_emb"][0])
  assert not np.array_equal(sd["decoder_embeddings.tok_dinov2_global.pos_emb"],
                            sd["encoder_embeddings.tok_dinov2_global.pos_emb"])


@needs(FOURM)
def test_fourm_checkpoint_with_config_json_beside_it_round_trips_exactly(tmp_path):
  """The HF-hub layout (a directory with model.safetensors + config.json), then
  --to_official: every official tensor comes back (parameters bit for bit, the fixed
  sine-cosine buffers, which this fixture stores as float16, to float16 rounding, the zero
  LayerNorm biases)."""
  sd, meta = _fixture(FOURM)
  from safetensors.numpy import save_file
  hub = tmp_path / "hub"
  hub.mkdir()
  weights = {k: v for k, v in sd.items() if not k.startswith("__")}
  save_file(weights, str(hub / "model.safetensors"))             # no config in the metadata
  (hub / "config.json").write_text(meta["config"])
  rc, out = _cli("--input=hub", "--out=wd", cwd=tmp_path)
  assert rc == 0, out
  _check_reproduces(str(tmp_path / "wd"), sd, meta)
  rc, out = _cli("--to_official", "--input=wd", "--out=back", cwd=tmp_path)
  assert rc == 0, out
  back, back_meta = _fixture(str(tmp_path / "back" / "model.safetensors"))
  assert json.loads(back_meta["config"]) == json.loads(meta["config"])
  assert json.loads((tmp_path / "back" / "config.json").read_text()) == json.loads(
      meta["config"])
  assert sorted(back) == sorted(weights)
  for k, v in weights.items():
    assert back[k].shape == v.shape, k
    if k.endswith(".pos_emb") and "global" not in k:    # computed here; stored as float16
      np.testing.assert_allclose(back[k], v.astype(np.float32),
                                 atol=1e-3 if v.dtype == np.float16 else 1e-6, err_msg=k)
    else:
      np.testing.assert_array_equal(back[k], v.astype(np.float32), err_msg=k)


def test_to_official_inverts_from_official_for_biases_gelu_and_qk_norm():
  """Configurations the fixtures do not cover (GELU MLP with biases, QK-norm, tied
  embeddings): params -> official -> params is the identity."""
  from fourm_jax import modalities
  mods = modalities.get(["rgb@224", "tok_rgb@224", "caption", "tok_dinov2_global"])
  for kw in ({"ffn": "gelu", "use_bias": True, "qk_norm": True, "tie_embeddings": False},
             {"ffn": "swiglu", "tie_embeddings": True}):
    model = model_lib.FourM(mods, mods[1:], dim=32, encoder_depth=1, decoder_depth=1,
                            num_heads=4, **kw)
    batch = {m.name: {"tensor": (jnp.zeros((1, 224, 224, 3)) if m.kind == "pixels" else
                                 jnp.zeros((1, m.num_tokens), jnp.int32)),
                      "input_mask": jnp.zeros((1, m.num_tokens), bool),
                      "target_mask": jnp.zeros((1, m.num_tokens), bool),
                      "decoder_attention_mask": jnp.ones((1, m.num_tokens), jnp.int32)}
             for m in mods}
    shapes = jax.eval_shape(lambda r: model.init(r, batch, 8, 8), jax.random.key(1))
    rng = np.random.default_rng(0)      # random values of the parameters' shapes
    params = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32),
                          nn.unbox(shapes["params"]))
    sd = convert.to_official(params, model)
    back = convert.from_official(sd, model)
    flat = lambda t: dict(jax.tree_util.tree_flatten_with_path(t)[0])
    a, b = flat(params), flat(back)
    assert sorted(map(str, a)) == sorted(map(str, b)), kw
    for k, v in a.items():
      np.testing.assert_array_equal(v, b[k], err_msg=str(k))


def test_official_configs_the_model_cannot_represent_are_refused_by_name(tmp_path):
  base = {"domains_in": ["rgb@224", "caption"], "domains_out": ["caption"], "dim": 32,
          "encoder_depth": 1, "decoder_depth": 1, "num_heads": 4, "act_layer": "SiLU",
          "gated_mlp": True, "qkv_bias": False, "proj_bias": False, "mlp_bias": False}
  assert convert.model_config(base)["ffn"] == "swiglu"
  for change, words in (({"decoder_causal_mask": True}, "decoder_causal_mask"),
                        ({"num_register_tokens": 4}, "register tokens"),
                        ({"act_layer": "GELU"}, "act_layer"),
                        ({"qkv_bias": True}, "qkv_bias"),
                        ({"domains_in": ["rgb@224", "caption", "tok_nonexistent"]},
                         "tok_nonexistent")):
    with pytest.raises(ValueError, match=words):
      convert.build({**base, **change})
  rc, out = _cli("--input=missing.safetensors", "--out=wd", cwd=tmp_path)
  assert rc == 1 and "no such checkpoint: missing.safetensors" in out, out
  (tmp_path / "empty").mkdir()
  rc, out = _cli("--input=empty", "--out=wd", cwd=tmp_path)
  assert rc == 1 and "has no model.safetensors" in out, out


TOK_SEMSEG = os.path.join(FIXTURES, "tok_vqvae_small.safetensors")
TOK_GLOBAL = os.path.join(FIXTURES, "tok_global_small.safetensors")


@pytest.mark.slow     # three subprocesses: about 30 s
@needs(TOK_SEMSEG)
@needs(TOK_GLOBAL)
def test_a_converted_4m_generates_a_picture_through_a_converted_tokenizer(tmp_path):
  """Released weights end to end: the official segmentation VQ-VAE (the fixture: 64 px,
  4 x 4 tokens, 256 codes) through tokenizers_jax.convert, an official-layout FM whose
  semseg target matches it (our random model written by --to_official's function, with
  the config an official checkpoint carries) through fourm_jax.convert --modalities, then
  fourm_jax.generate from an RGB picture to a semantic map PNG and, through the official
  global-embedding tokenizer (tok_global_small), to an embedding."""
  from PIL import Image
  from safetensors.numpy import save_file
  from fourm_jax import modalities
  for fixture, out in ((TOK_SEMSEG, "tok_semseg"), (TOK_GLOBAL, "tok_global")):
    proc = subprocess.run([sys.executable, "-m", "tokenizers_jax.convert",
                           f"--input={fixture}", f"--out={out}"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
  rows = {"rgb@64": {"kind": "pixels", "grid": [4, 4], "patch_size": 16, "target": False},
          "tok_semseg@64": {"kind": "image", "vocab_size": 256, "grid": [4, 4]},
          "tok_feat_global": {"kind": "global", "vocab_size": 256, "length": 16}}
  reg = convert.registry_with(rows)
  mods = modalities.get(["rgb@64", "tok_semseg@64", "tok_feat_global"], reg)
  model = model_lib.FourM(mods, mods[1:], dim=32, encoder_depth=1, decoder_depth=1,
                          num_heads=4, tie_embeddings=False)
  batch = {m.name: {"tensor": (jnp.zeros((1, 64, 64, 3)) if m.kind == "pixels" else
                               jnp.zeros((1, 16), jnp.int32)),
                    "input_mask": jnp.zeros((1, 16), bool), "target_mask": jnp.zeros((1, 16), bool),
                    "decoder_attention_mask": jnp.ones((1, 16), jnp.int32)} for m in mods}
  shapes = jax.eval_shape(lambda r: model.init(r, batch, 32, 32), jax.random.key(0))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: 0.2 * rng.standard_normal(a.shape).astype(np.float32),
                        nn.unbox(shapes["params"]))
  official = convert.official_config(model, image_size=64)
  save_file(convert.to_official(params, model), str(tmp_path / "fm.safetensors"),
            {"config": json.dumps(official)})
  rc, out = _cli("--input=fm.safetensors", "--out=fm", f"--modalities={json.dumps(rows)}",
                 cwd=tmp_path)
  assert rc == 0, out
  Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "in.png")
  proc = subprocess.run([sys.executable, "-m", "fourm_jax.generate", "--workdir=fm",
                         "--condition=rgb@64:in.png", "--targets=tok_semseg@64,tok_feat_global",
                         "--tokenizers=tok_semseg,tok_global", "--out=gen", "--num_samples=2"],
                        cwd=tmp_path, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  png = Image.open(tmp_path / "gen" / "generations.png")
  assert png.size[0] > 64 and png.size[1] > 64
  tokens = np.load(tmp_path / "gen" / "tokens.npz")["tok_semseg_at_64"]   # npz keys: @ spelt _at_
  assert tokens.shape == (2, 16) and tokens.max() < 256
  # the global target: its tokens through the MLP tokenizer into embeddings of its width (96)
  emb = np.load(tmp_path / "gen" / "embeddings.npz")["tok_feat_global"]
  assert emb.shape == (2, 96) and np.isfinite(emb).all()
  assert json.loads((tmp_path / "gen" / "generations.json").read_text())["embeddings"] == [
      "tok_feat_global"]
