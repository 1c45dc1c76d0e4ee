"""fourm_jax.sampler.sample_tokens: inverse-CDF draws from softmax(logits / temperature)."""
import jax
import jax.numpy as jnp
import numpy as np

from fourm_jax import sampler


def _draw(logits, temperature, n, seed=0):
  keys = jax.random.split(jax.random.key(seed), n)
  return jax.jit(jax.vmap(sampler.sample_tokens, in_axes=(0, None, None)))(
      keys, jnp.asarray(logits), jnp.float32(temperature))


def test_draws_follow_the_tempered_softmax_across_blocks():
  """V = 300 (three blocks of 128, the last one short), mass in all of them, entries of
  -inf (top-k/top-p filtered) never drawn; frequencies of 200k draws within 5 standard
  errors of softmax(logits / T), and the returned probability is that of the token."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=300).astype(np.float32) * 2
  logits[[5, 130, 299]] = -np.inf
  for temperature in (1.0, 0.5):
    n = 200_000
    tokens, probs = _draw(logits, temperature, n)
    p = np.exp(logits / temperature - np.max(logits / temperature))
    p /= p.sum()
    freq = np.bincount(np.asarray(tokens), minlength=300) / n
    assert freq[[5, 130, 299]].sum() == 0
    se = np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(freq - p) <= 5 * se + 1e-6), np.max(np.abs(freq - p) / (se + 1e-12))
    np.testing.assert_allclose(np.asarray(probs), p[np.asarray(tokens)], rtol=1e-5)


def test_a_single_allowed_token_and_greedy_rows():
  logits = np.full((2, 260), -np.inf, np.float32)
  logits[0, 257] = 3.0                     # only one token left after filtering
  logits[1] = np.linspace(0, 1, 260)
  tokens, probs = _draw(logits, 1.0, 500)
  assert np.all(np.asarray(tokens)[:, 0] == 257) and np.allclose(probs[:, 0], 1.0)
  tok, prob = sampler.sample_tokens(jax.random.key(1), jnp.asarray(logits), jnp.float32(0.0))
  assert tok.tolist() == [257, 259]
  p1 = np.exp(logits[1] - logits[1].max())
  np.testing.assert_allclose(prob, [1.0, 1 / p1.sum()], rtol=1e-5)


def test_same_key_same_draws_and_batch_rows_independent():
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(4, 7, 1000)), jnp.float32)
  a = sampler.sample_tokens(jax.random.key(3), logits, jnp.float32(1.0))[0]
  b = sampler.sample_tokens(jax.random.key(3), logits, jnp.float32(1.0))[0]
  c = sampler.sample_tokens(jax.random.key(4), logits, jnp.float32(1.0))[0]
  assert a.shape == (4, 7) and np.array_equal(a, b) and not np.array_equal(a, c)
