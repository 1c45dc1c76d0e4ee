"""Parity with the official 4M tokenizers (fourm.vq; fixtures computed with apple/ml-4m's code).

Each fixture is converted by the CLI (`python -m tokenizers_jax.convert`) into a workdir, which
is loaded as every consumer loads a tokenizer (tokenizers_jax.tokenize.Tokenizer). Tokens must
match exactly (the fixtures' best/second-best similarity gap is >= 2e-3); latents and
reconstructions to ~1e-5 relative to their largest value.
"""
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, SHARED, subprocess_env

FIXTURES = SHARED / "fixtures"
pytestmark = pytest.mark.skipif(not (FIXTURES / "tok_vqvae_small.safetensors").exists(),
                                reason=f"{FIXTURES} absent: ../shared/ is not beside the checkout")


def _rel(ours, theirs) -> float:
  """Largest absolute difference relative to the largest magnitude of the reference."""
  return float(np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max())


def _fixture(name):
  from safetensors import safe_open
  with safe_open(str(FIXTURES / f"{name}.safetensors"), "np") as f:
    return ({k: f.get_tensor(k) for k in f.keys() if k.startswith("__")},
            json.loads(f.metadata()["config"]))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """name -> (Tokenizer of the CLI-converted workdir, the fixture's tensors, its config)."""
  from tokenizers_jax.tokenize import Tokenizer
  cache = {}

  def get(name):
    if name not in cache:
      out = tmp_path_factory.mktemp(name)
      proc = subprocess.run(
          [sys.executable, "-m", "tokenizers_jax.convert",
           f"--input={FIXTURES / name}.safetensors", f"--out={out}"],
          cwd=ROOT, capture_output=True, text=True, timeout=300,
          env=subprocess_env(JAX_PLATFORMS="cpu"))
      assert proc.returncode == 0, proc.stderr[-3000:]
      cache[name] = (Tokenizer(str(out)),) + _fixture(name)
    return cache[name]
  return get


def _nhwc(x):
  return jnp.asarray(x.transpose(0, 2, 3, 1))


@pytest.mark.parametrize("name", ["tok_vqvae_small", "tok_vqvae_feat_small"])
def test_vit_vqvae_reproduces_official_latents_tokens_and_reconstructions(converted, name):
  """Segmentation input (class embedding, 16 px patch conv, channel-major out_proj) and a
  feature map (1x1 projections): pre-quantization latent, tokens, the raw-codebook latent and
  the decoded tokens."""
  tok, fx, cfg = converted(name)
  model, v = tok.model, tok.variables
  seg = fx["__input__"].ndim == 3
  assert tok.modality == ("semantic" if seg else "features")
  x = jnp.asarray(fx["__input__"]) if seg else _nhwc(fx["__input__"])
  pre = model.apply(v, x, method=lambda m, x: m.encoder(m._patchify(x)))
  assert _rel(np.asarray(pre).transpose(0, 3, 1, 2), fx["__pre_quant__"]) < 1e-5
  latent = model.apply(v, x, method=lambda m, x: m.encode(x)[0])
  assert _rel(np.asarray(latent).transpose(0, 3, 1, 2), fx["__latent__"]) < 1e-6
  # through the Tokenizer, with its input convention (class ids; [K, D] feature rows)
  values = list(fx["__input__"]) if seg else [
      f.reshape(f.shape[0], -1).T for f in fx["__input__"]]
  np.testing.assert_array_equal(tok(values), fx["__tokens__"])
  recon = tok.detokenize(fx["__tokens__"])
  assert _rel(recon.transpose(0, 3, 1, 2), fx["__recon__"]) < 1e-5
  if seg:   # the decoded maps agree pixel for pixel
    np.testing.assert_array_equal(recon.argmax(-1), fx["__recon__"].argmax(1))


def test_the_quantized_vector_is_the_raw_codebook_row_not_the_normalised_one(converted):
  """The fixture's codebook rows have norms in [0.5, 2]: the official Lucid quantizer picks by
  cosine similarity but returns (and decodes) the stored row."""
  tok, fx, _ = converted("tok_vqvae_small")
  codebook = np.asarray(tok.variables["vq"]["quantizer"]["codebook"])
  norms = np.linalg.norm(codebook, axis=-1)
  assert norms.min() < 0.9 and norms.max() > 1.1
  looked_up = tok.model.apply(tok.variables, jnp.asarray(fx["__tokens__"]),
                              method=lambda m, t: m.quantizer.lookup(t))
  np.testing.assert_array_equal(np.asarray(looked_up).transpose(0, 3, 1, 2),
                                codebook[fx["__tokens__"]].transpose(0, 3, 1, 2))


def test_convert_refuses_an_unknown_preset_naming_the_known_ones(tmp_path):
  from tokenizers_jax import convert
  with pytest.raises(ValueError, match="vit_b_enc"):
    convert.preset("vit_xxl_enc", {})
  assert convert.preset("vit_b_enc", {})["dim_tokens"] == 768
  assert convert.mlp_sizes("BottleneckMLP/B_6-Wi_1024") == (6, 1024, 4)
  assert convert.mlp_sizes("BottleneckMLP/B_2-Wi_128-E_2") == (2, 128, 2)
