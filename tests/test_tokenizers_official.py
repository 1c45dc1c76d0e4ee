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


def test_global_mlp_tokenizer_reproduces_official_memcodes_tokens_per_head(converted):
  """BottleneckMLP/B_2-Wi_128 + Memcodes with 16 heads (one codebook each): 16 tokens per
  vector, the latent from each head's value projection, the decoded vectors."""
  tok, fx, _ = converted("tok_global_small")
  model, v = tok.model, tok.variables
  assert tok.kind == "mlp_vae" and tok.modality == "global"
  x = jnp.asarray(fx["__input__"][:, :, 0, 0])
  assert _rel(model.apply(v, x, method=model.latent), fx["__pre_quant__"][:, :, 0, 0]) < 1e-5
  tokens = tok(list(fx["__input__"]))
  np.testing.assert_array_equal(tokens, fx["__tokens__"][:, :, 0, 0])     # (B, 16)
  latent = model.apply(v, jnp.asarray(tokens), method=model.lookup)
  assert _rel(latent, fx["__latent__"][:, :, 0, 0]) < 1e-6
  assert _rel(tok.detokenize(tokens), fx["__recon__"][:, :, 0, 0]) < 1e-5


def test_divae_reproduces_official_schedule_noising_and_one_unet_forward(converted):
  """DiVAE (ViT encoder, Lucid, PatchedUNetCondCat with attention at ds 2, x0 prediction,
  linear betas rescaled to zero terminal SNR): tokens, schedule, x_t, one decoder forward,
  the training target and loss."""
  tok, fx, _ = converted("tok_divae_small")
  model, v = tok.model, tok.variables
  assert tok.kind == "diffusion" and tok.modality == "rgb"
  x = _nhwc(fx["__input__"])
  # the Tokenizer reads stored RGB (0..255) and maps it to [-1, 1] as the official input
  np.testing.assert_array_equal(tok(list((fx["__input__"].transpose(0, 2, 3, 1) + 1) * 127.5)),
                                fx["__tokens__"])
  latent = model.apply(v, jnp.asarray(fx["__tokens__"]), method=model.lookup)
  assert _rel(np.asarray(latent).transpose(0, 3, 1, 2), fx["__latent__"]) < 1e-6
  sch = model.schedule()
  assert _rel(sch.betas, fx["__betas__"]) < 1e-5
  np.testing.assert_allclose(sch.alpha_bar, fx["__alphas_cumprod__"], atol=1e-6)
  assert sch.alpha_bar[-1] == 0
  t = jnp.asarray(fx["__t__"]) + 1          # ours count 1..1000; the UNet sees the official t
  x_t = sch.q_sample(x, t, _nhwc(fx["__noise__"]))
  assert _rel(np.asarray(x_t).transpose(0, 3, 1, 2), fx["__x_t__"]) < 1e-5
  out = model.apply(v, _nhwc(fx["__x_t__"]), t, latent, method=model.decoder)
  assert _rel(np.asarray(out).transpose(0, 3, 1, 2), fx["__decoder_out__"]) < 1e-5
  out, target, _ = model.apply(v, x, t, _nhwc(fx["__noise__"]))      # DiVAE.forward + target
  assert _rel(np.asarray(target).transpose(0, 3, 1, 2), fx["__target__"]) < 1e-6
  loss = float(jnp.mean((out - target) ** 2))
  official = float(np.mean((fx["__decoder_out__"] - fx["__target__"]) ** 2))
  assert abs(loss - official) < 1e-5 * official, (loss, official)


@pytest.mark.slow
def test_divae_tokens_decode_by_ddim_through_the_tokenizer(converted):
  tok, fx, _ = converted("tok_divae_small")
  recon = tok.detokenize(fx["__tokens__"])
  assert recon.shape == (2, 32, 32, 3) and np.isfinite(recon).all()
  np.testing.assert_array_equal(tok.detokenize(fx["__tokens__"]), recon)   # seeded


@pytest.mark.parametrize("prediction", ["sample", "epsilon", "v_prediction"])
@pytest.mark.parametrize("schedule,zero_snr", [("linear", False), ("squaredcos_cap_v2", True)])
def test_every_official_scheduler_setting_turns_its_target_back_into_x0(prediction, schedule,
                                                                         zero_snr):
  from tokenizers_jax import diffusion
  sch = diffusion.Schedule(1000, beta_schedule=schedule, zero_terminal_snr=zero_snr)
  if schedule == "squaredcos_cap_v2" and not zero_snr:
    abar = lambda s: np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2
    np.testing.assert_allclose(sch.betas[10], 1 - abar(11 / 1000) / abar(10 / 1000), rtol=1e-5)
  assert (sch.alpha_bar[-1] == 0) == zero_snr
  x0, noise = jax.random.normal(jax.random.key(0), (2, 2, 4, 4, 3))
  t = jnp.array([1, 500])                 # (t = 1000 with zero SNR leaves epsilon undefined)
  x_t = sch.q_sample(x0, t, noise)
  target = sch.target(prediction, x0, t, noise)
  np.testing.assert_allclose(sch.to_x0(prediction, target, x_t, t), x0, atol=2e-4)
