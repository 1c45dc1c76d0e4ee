"""Tokenizer training losses as the official ml-4m tokenizer training computes them.

Each expected value is derived by hand from the official algorithm (fourm.vq's
Lucid VectorQuantize / Memcodes, run_training_vqvae.py, run_training_divae.py
and cfgs/default/tokenization), not from our code.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from tokenizers_jax import diffusion, quantizers as q, train as tok_train


def _vq(codebook, **kw):
  vq = q.VectorQuantizer(num_codes=codebook.shape[0], code_dim=codebook.shape[1], **kw)
  cb = jnp.asarray(codebook, jnp.float32)
  return vq, {"vq": {"codebook": cb, "ema_count": jnp.ones(cb.shape[0]), "ema_sum": cb}}


def test_commitment_is_the_official_mse_on_raw_latents_with_weight_one():
  """Official (norm_latents=False, commitment_weight=1): the cosine codebook picks by
  cosine similarity, quantize = x + sg(code - x) and the loss is F.mse_loss(sg(code), x),
  the mean over every element. By hand, codes e0, e1 and latents (3, 4) -> e1 (cos .8),
  (0, -2) -> e0 (cos 0 > -1): ((3-0)^2 + (4-1)^2 + (0-1)^2 + (-2-0)^2) / 4 = 23 / 4."""
  vq, v = _vq(np.eye(2))
  assert vq.commitment == 1.0 and not vq.norm_latents
  z = jnp.array([[3.0, 4.0], [0.0, -2.0]])
  out, aux = vq.apply(v, z)
  assert aux["indices"].tolist() == [1, 0]
  np.testing.assert_allclose(out, [[0, 1], [1, 0]], atol=1e-6)
  assert float(aux["commit_loss"]) == pytest.approx(23 / 4, rel=1e-6)
  # the gradient reaches the raw latent unchanged (straight through x, not through l2norm(x))
  g = jnp.array([[1.0, -2.0], [0.5, 3.0]])
  np.testing.assert_allclose(jax.grad(lambda z: jnp.sum(vq.apply(v, z)[0] * g))(z), g, rtol=1e-6)
  # the commitment gradient is 2 (x - code) / N_elements, toward the code
  grad_c = jax.grad(lambda z: vq.apply(v, z)[1]["commit_loss"])(z)
  np.testing.assert_allclose(grad_c, 2 * (np.asarray(z) - [[0, 1], [1, 0]]) / 4, rtol=1e-6)


def test_norm_latents_takes_the_commitment_on_the_unit_latent():
  """norm_latents=True (the official option): x = l2norm(z), so (.6, .8) vs e1 and (0, -1)
  vs e0: (.36 + .04 + 1 + 1) / 4 = 0.6, times the weight."""
  vq, v = _vq(np.eye(2), norm_latents=True, commitment=0.5)
  _, aux = vq.apply(v, jnp.array([[3.0, 4.0], [0.0, -2.0]]))
  assert float(aux["commit_loss"]) == pytest.approx(0.5 * 0.6, rel=1e-6)


def test_masked_latents_do_not_count_in_the_commitment():
  """Only weighted latents average: with the second one masked, (9 + 9) / 2 elements."""
  vq, v = _vq(np.eye(2))
  _, aux = vq.apply(v, jnp.array([[3.0, 4.0], [0.0, -2.0]]), weights=jnp.array([1.0, 0.0]))
  assert float(aux["commit_loss"]) == pytest.approx(18 / 2, rel=1e-6)


def test_vqvae_configs_use_the_official_commitment_and_class_counts():
  """cfgs/default/tokenization/vqvae: commitment_weight 1.0, norm_latents unset (False);
  semseg_coco has 133 + 1 classes (COCO_SEMSEG_NUM_CLASSES); the scenes have 7."""
  for variant in ("tiny", "B16"):
    c = load_config("configs/tokenizers/vqvae.py", f"modality=depth,variant={variant}")
    assert c.model.commitment == 1.0 and c.model.norm_latents is False
  assert load_config("configs/tokenizers/vqvae.py",
                     "modality=semantic,variant=tiny").model.num_classes == 7
  assert load_config("configs/tokenizers/vqvae.py",
                     "modality=semantic,variant=B16").model.num_classes == 134


def test_the_number_of_segmentation_classes_comes_from_the_config():
  """model.num_classes sizes the input one-hot / class embedding and the decoder's logits."""
  c = load_config("configs/tokenizers/vqvae.py", "modality=semantic,variant=tiny")
  c.model.num_classes = 12
  model = tok_train.build_model(c)
  ids = jnp.full((1, 32, 32), 11, jnp.int32)
  v = model.init({"params": jax.random.key(0)}, ids)
  logits, _ = model.apply(v, ids)
  assert logits.shape == (1, 32, 32, 12)
  # one id too many for the config: the data pipeline stops, naming the key
  c.model.num_classes = 5                     # the scenes hold ids up to 6
  c.data.train = "scenes:4"
  task = tok_train.build_task(c)
  with pytest.raises(ValueError, match="model.num_classes=5"):
    next(iter(task.train_data(np.arange(c.batch_size))))


def test_diffusion_losses_and_schedule_follow_the_official_divae_configs():
  """cfgs/default/tokenization/divae: loss_fn smooth_l1 for depth and canny edges, mse for
  rgb and normals; run_training_divae.py defaults zero_terminal_snr to True."""
  want = {"rgb": "mse", "normals": "mse", "depth": "smooth_l1", "edges": "smooth_l1"}
  for modality, loss in want.items():
    c = load_config("configs/tokenizers/diffusion.py", f"modality={modality},variant=tiny")
    assert c.diffusion.loss == loss and c.diffusion.zero_terminal_snr is True


def test_zero_terminal_snr_rescale_by_hand():
  """Lin et al. Alg. 1 as the official schedulers apply it: s = sqrt(abar) of the linear
  betas, s' = (s - s_T) * s_1 / (s_1 - s_T): the last step is pure noise, the first kept."""
  betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
  s = np.sqrt(np.cumprod(1 - betas))
  s2 = (s - s[-1]) * s[0] / (s[0] - s[-1])
  sch = diffusion.Schedule(1000, zero_terminal_snr=True)
  abar = np.array([float(sch.abar(t)) for t in (1, 500, 1000)])
  np.testing.assert_allclose(abar, s2[[0, 499, 999]] ** 2, rtol=1e-4, atol=1e-7)
  assert abar[-1] == pytest.approx(0.0, abs=1e-10)


def test_diffusion_train_loss_is_smooth_l1_for_depth():
  """The depth DiVAE's loss is F.smooth_l1_loss(output, x0) + commitment: recomputed by hand
  (Huber, delta 1, mean) from the same noise and timesteps the loss function draws."""
  c = load_config("configs/tokenizers/diffusion.py", "modality=depth,variant=tiny")
  c.diffusion.base_channels, c.diffusion.channel_mult, c.diffusion.attn_levels = 8, (1,), 0
  c.model.width, c.model.heads, c.model.enc_depth = 16, 1, 1
  c.data.resolution = 16
  task = tok_train.build_task(c)
  model = tok_train.build_model(c)
  params = jax.jit(task.init_params)(jax.random.key(0))
  extra = jax.jit(task.init_extra)(jax.random.key(0))
  x = jnp.asarray(np.random.default_rng(0).normal(0, 2, (2, 16, 16)), jnp.float32)
  rng = jax.random.key(3)
  loss, (metrics, _) = jax.jit(task.loss_fn)(params, {"x": x}, rng, extra)
  k_t, k_noise, k_restart = jax.random.split(rng, 3)
  t = jax.random.randint(k_t, (2,), 1, c.diffusion.steps + 1)
  noise = jax.random.normal(k_noise, (2, 16, 16, 1), jnp.float32)
  (out, x0, aux), _ = jax.jit(lambda v: model.apply(v, x, t, noise, train=True, mutable=["vq"],
                                                    rngs={"restart": k_restart}))(
                                                        {"params": params, **extra})
  d = np.abs(np.asarray(out) - np.asarray(x0))
  huber = float(np.mean(np.where(d < 1, 0.5 * d * d, d - 0.5)))
  assert float(metrics["reconstruction"]) == pytest.approx(huber, rel=1e-5)
  assert float(metrics["reconstruction"]) != pytest.approx(float(np.mean(d * d)), rel=1e-3)
  assert float(loss) == pytest.approx(huber + float(aux["commit_loss"]), rel=1e-5)


def test_hard_gumbel_softmax_samples_codes_by_their_softmax_probabilities():
  """F.gumbel_softmax(hard=True): argmax(logits + Gumbel noise) is a sample of
  softmax(logits) (the Gumbel-max trick): logits (2, 1, 0) -> probabilities
  e^2, e, 1 over their sum = (.665, .245, .090); the forward is one-hot, the backward the
  softmax of the perturbed logits."""
  logits = jnp.tile(jnp.array([2.0, 1.0, 0.0]), (20000, 1))
  st, idx = q.hard_gumbel_softmax(logits, jax.random.key(0))
  freq = np.bincount(np.asarray(idx), minlength=3) / 20000
  np.testing.assert_allclose(freq, np.exp([2, 1, 0]) / np.exp([2, 1, 0]).sum(), atol=0.015)
  np.testing.assert_allclose(st, jax.nn.one_hot(idx, 3), atol=1e-6)
  g = jax.grad(lambda l: q.hard_gumbel_softmax(l, jax.random.key(1))[0][0, 0])(logits[:1])
  y = logits[0] + jax.random.gumbel(jax.random.key(1), (1, 3))[0]
  p = np.asarray(jax.nn.softmax(y))
  np.testing.assert_allclose(g[0], p[0] * (np.eye(3)[0] - p), rtol=1e-5, atol=1e-7)


def test_memcodes_sample_when_training_and_take_the_argmax_when_evaluating():
  """Official Memcodes: training draws codes by hard Gumbel-softmax at temperature 1, so
  near-tied codes vary with the rng; evaluation takes the argmax whatever the rng."""
  m = q.HeadMemcodes(num_codes=4, dim=4, heads=2)
  z = 0.01 * jax.random.normal(jax.random.key(1), (256, 4))     # logits near 0: all near-tied
  v = m.init(jax.random.key(0), z)
  evals = [m.apply(v, z, rngs={"gumbel": jax.random.key(i)})[1]["indices"] for i in range(2)]
  np.testing.assert_array_equal(evals[0], evals[1])
  trains = [m.apply(v, z, train=True, rngs={"gumbel": jax.random.key(i)})[1]["indices"]
            for i in range(2)]
  assert not np.array_equal(trains[0], trains[1])
  assert not np.array_equal(trains[0], evals[0])
  # with the logits near 0 each of the 4 codes is drawn about a quarter of the time
  freq = np.bincount(np.asarray(trains[0]).ravel(), minlength=4) / trains[0].size
  np.testing.assert_allclose(freq, 0.25, atol=0.06)


def test_the_mlp_dvae_train_step_uses_the_gumbel_rng():
  """tokenizers_jax.train's MLP dVAE loss passes its step rng to the Memcodes Gumbel draw:
  two rngs give two losses (a deterministic argmax would give one)."""
  c = load_config("configs/tokenizers/mlp_vae.py", "target=pose,variant=tiny")
  c.model.width, c.model.blocks, c.model.num_codes = 16, 1, 8
  task = tok_train.build_task(c)
  params = task.init_params(jax.random.key(0))
  x = {"x": jnp.asarray(np.random.default_rng(0).normal(size=(8, 207)), jnp.float32)}
  losses = {float(task.loss_fn(params, x, jax.random.key(i))[0]) for i in range(3)}
  assert len(losses) > 1
