"""Quantizers (tokenizers_jax.quantizers): straight-through gradients, EMA, restarts, Memcodes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokenizers_jax import quantizers as q


def _vq_with(codebook, **kw):
  vq = q.VectorQuantizer(num_codes=codebook.shape[0], code_dim=codebook.shape[1], **kw)
  v = vq.init({"params": jax.random.key(0)}, jnp.zeros((1, codebook.shape[1])))
  cb = jnp.asarray(codebook, jnp.float32)
  v = {"vq": {"codebook": cb, "ema_count": jnp.ones(cb.shape[0]), "ema_sum": cb}}
  return vq, v


def test_nearest_code_and_straight_through_gradient():
  vq, v = _vq_with(np.eye(3))
  z = jnp.array([[2.0, 0.5, 0.1], [0.1, -0.3, 4.0]])
  out, aux = vq.apply(v, z)
  assert aux["indices"].tolist() == [0, 2]
  np.testing.assert_allclose(out, [[1, 0, 0], [0, 0, 1]], atol=1e-6)
  g = jnp.array([[1.0, -2.0, 3.0], [0.5, 0.5, -1.0]])
  grad_vq = jax.grad(lambda z: jnp.sum(vq.apply(v, z)[0] * g))(z)
  # quantization is the identity backwards, on the raw latent (official norm_latents=False)
  np.testing.assert_allclose(grad_vq, g, rtol=1e-6)
  # commitment: beta (1) * mean over all elements of (z - q)^2, raw latents
  want = np.mean((np.asarray(z) - np.asarray(out)) ** 2)
  assert float(aux["commit_loss"]) == pytest.approx(want, rel=1e-5)


def test_ema_update_matches_a_hand_computed_case():
  vq, v = _vq_with(np.eye(2))
  z = jnp.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])           # codes 0, 1, 1
  (_, aux), new = vq.apply(v, z, train=True, mutable=["vq"], rngs={"restart": jax.random.key(1)})
  assert aux["indices"].tolist() == [0, 1, 1]
  np.testing.assert_allclose(new["vq"]["ema_count"], [0.99 + 0.01 * 1, 0.99 + 0.01 * 2], rtol=1e-6)
  np.testing.assert_allclose(new["vq"]["ema_sum"], [[1.0, 0.0], [0.006, 0.99 + 0.018]], rtol=1e-5,
                             atol=1e-7)
  c1 = np.array([0.006, 1.008]) / 1.01
  np.testing.assert_allclose(new["vq"]["codebook"][1], c1 / np.linalg.norm(c1), rtol=1e-5)
  np.testing.assert_allclose(new["vq"]["codebook"][0], [1.0, 0.0], atol=1e-7)


def test_dead_codes_are_restarted_from_batch_latents():
  rng = np.random.default_rng(0)
  cb = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [-1.0, 0, 0]])
  vq, v = _vq_with(cb)
  v["vq"]["ema_count"] = jnp.array([1.0, 1.0, 1.0, 1e-4])       # code 3 has died
  z = jnp.asarray(rng.normal(size=(64, 3)) + [3.0, 0, 0], jnp.float32)
  (_, aux), new = vq.apply(v, z, train=True, mutable=["vq"], rngs={"restart": jax.random.key(3)})
  threshold = 64 / (32 * 4)
  assert float(new["vq"]["ema_count"][3]) == pytest.approx(threshold)
  revived = np.asarray(new["vq"]["codebook"][3])
  zn = np.asarray(q.l2_normalize(z))
  assert np.min(np.linalg.norm(zn - revived, axis=1)) < 1e-5      # it is one of the batch latents
  assert not np.allclose(revived, cb[3])
  assert float(new["vq"]["ema_count"][0]) > threshold            # live codes are kept


def test_usage_and_perplexity():
  vq, v = _vq_with(np.eye(4))
  _, aux = vq.apply(v, jnp.eye(4))                               # each code once
  assert float(aux["usage"]) == 1.0 and float(aux["perplexity"]) == pytest.approx(4.0)
  _, aux = vq.apply(v, jnp.array([[1.0, 0, 0, 0]] * 5))
  assert float(aux["usage"]) == 0.25 and float(aux["perplexity"]) == pytest.approx(1.0)


def test_vq_learns_codes_that_fit_clustered_data():
  """A few hundred EMA steps on 8 clusters: every cluster gets its own code."""
  rng = np.random.default_rng(1)
  centres = q.l2_normalize(jnp.asarray(rng.normal(size=(8, 16)), jnp.float32))
  vq = q.VectorQuantizer(num_codes=32, code_dim=16, decay=0.9)
  v = vq.init({"params": jax.random.key(0)}, jnp.zeros((1, 16)))

  @jax.jit
  def step(v, key):
    k1, k2 = jax.random.split(key)
    idx = jax.random.randint(k1, (256,), 0, 8)
    z = centres[idx] + 0.02 * jax.random.normal(k2, (256, 16))
    (_, aux), new = vq.apply(v, z, train=True, mutable=["vq"], rngs={"restart": k2})
    return new, aux

  for i in range(300):
    v, aux = step(v, jax.random.key(i))
  _, aux = vq.apply(v, centres)
  assert len(set(aux["indices"].tolist())) == 8
  assert float(aux["codebook_loss"]) < 2e-3


def test_memcodes_lookup_reproduces_the_forward_and_gradients_reach_the_encoder():
  m = q.Memcodes(num_codes=16, width=4, dim=8, heads=2)
  z = jax.random.normal(jax.random.key(1), (3, 5, 4))
  v = m.init(jax.random.key(0), z)
  out, aux = m.apply(v, z)
  assert aux["indices"].shape == (3, 5, 2) and out.shape == z.shape
  np.testing.assert_allclose(m.apply(v, aux["indices"], method=m.lookup), out, atol=1e-5)
  grads = jax.grad(lambda p: jnp.sum(m.apply({"params": p}, z, train=True,
                                             rngs={"gumbel": jax.random.key(2)})[0] ** 2))(
                                                 v["params"])
  assert float(jnp.abs(grads["to_q"]["kernel"]).sum()) > 0      # through the softmax
  assert float(jnp.abs(grads["codes"]).sum()) > 0


def test_mlp_vae_tokenizes_embeddings_better_than_their_mean():
  """A tiny MLP dVAE (Memcodes) on vectors near 64 directions in 48-d: after a
  few hundred Adam steps the decoded tokens are much closer (cosine) to the
  inputs than the dataset mean is."""
  import optax
  from tokenizers_jax import mlp_vae
  rng = np.random.default_rng(0)
  dirs = rng.normal(size=(64, 48)).astype(np.float32)
  data = dirs[rng.integers(0, 64, 2048)] + 0.05 * rng.normal(size=(2048, 48)).astype(np.float32)
  model = mlp_vae.MLPVAE(in_dim=48, num_tokens=4, vocab=64, width=64, blocks=2, token_dim=16)
  params = model.init(jax.random.key(0), jnp.zeros((1, 48)))["params"]
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, batch, key):
    loss, g = jax.value_and_grad(lambda p: mlp_vae.vector_loss(
        "cosine", model.apply({"params": p}, batch, train=True, rngs={"gumbel": key})[0],
        batch))(params)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), opt, loss

  for i in range(300):
    params, opt, _ = step(params, opt, jnp.asarray(data[(i * 64) % 2048:(i * 64) % 2048 + 64]),
                          jax.random.key(i))
  test = jnp.asarray(dirs[rng.integers(0, 64, 256)] + 0.05 * rng.normal(size=(256, 48)), jnp.float32)
  tokens = model.apply({"params": params}, test, method=model.tokenize)
  assert tokens.shape == (256, 4) and tokens.dtype == jnp.int32
  recon = model.apply({"params": params}, tokens, method=model.decode_tokens)
  np.testing.assert_allclose(recon, model.apply({"params": params}, test)[0], atol=1e-4)
  loss = float(mlp_vae.vector_loss("cosine", recon, test))
  mean_loss = float(mlp_vae.vector_loss("cosine", jnp.broadcast_to(data.mean(0), test.shape), test))
  assert loss < 0.3 * mean_loss, (loss, mean_loss)


def test_head_memcodes_gives_one_token_per_head_from_its_own_codebook():
  """The official layout: head h quantizes channels [h d, (h+1) d) against codebook h only;
  lookup reproduces the forward, and gradients reach the codes through the softmax."""
  m = q.HeadMemcodes(num_codes=16, dim=12, heads=3)
  z = jax.random.normal(jax.random.key(1), (5, 12))
  v = m.init(jax.random.key(0), z)
  out, aux = m.apply(v, z)
  assert aux["indices"].shape == (5, 3) and out.shape == z.shape
  np.testing.assert_allclose(m.apply(v, aux["indices"], method=m.lookup), out, atol=1e-5)
  p = v["params"]
  keys = np.einsum("hnd,hdc->hnc", p["codes"], p["to_k"])
  values = np.einsum("hnd,hdc->hnc", p["codes"], p["to_v"])
  for h in range(3):      # by hand, head by head
    logits = np.asarray(z[:, 4 * h:4 * h + 4]) @ keys[h].T
    np.testing.assert_array_equal(aux["indices"][:, h], logits.argmax(-1))
    np.testing.assert_allclose(out[:, 4 * h:4 * h + 4], values[h][logits.argmax(-1)], atol=1e-5)
  grads = jax.grad(lambda p: jnp.sum(m.apply({"params": p}, z, train=True,
                                             rngs={"gumbel": jax.random.key(2)})[0] ** 2))(p)
  assert float(jnp.abs(grads["codes"]).sum()) > 0 and float(jnp.abs(grads["to_k"]).sum()) > 0
