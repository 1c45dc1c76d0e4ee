"""pretrain_jax.attention: the head-major XLA attention with its written-out backward pass
against jax.nn.dot_product_attention (autodiff of jax's own XLA path is the reference)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pretrain_jax import attention
from pretrain_jax import activations


def _inputs(b=2, t=12, s=12, h=3, d=8, seed=0, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(seed), 4)
  q, k, v = (jax.random.normal(kk, (b, n, h, d), jnp.float32).astype(dtype)
             for kk, n in zip(ks, (t, s, s)))
  return q, k, v, jax.random.normal(ks[3], (b, t, h, d), jnp.float32)


def _prefix_causal(b, t, prefix):
  i = np.arange(t)
  m = (i[None, :] <= i[:, None])[None] | (i[None, None, :] < np.asarray(prefix)[:, None, None])
  return jnp.asarray(m[:, None])                           # [B, 1, T, T]


def _loss(fn, mask, w):
  return lambda q, k, v: jnp.sum(fn(q, k, v, mask=mask).astype(jnp.float32) * w)


CASES = {
    "no mask": lambda b, t, s: None,
    "prefix-causal": lambda b, t, s: _prefix_causal(b, t, [3, 7]),
    # 4M's padded decoder: a query row that may attend to nothing averages every value
    "fully masked rows": lambda b, t, s: jnp.asarray(
        np.arange(s)[None, None, None, :] < np.array([s, 0])[:, None, None, None]
        ).repeat(t, axis=2),
}


@pytest.mark.parametrize("case,t,s", [("no mask", 12, 12), ("no mask", 5, 12),
                                      ("prefix-causal", 12, 12),   # square by definition
                                      ("fully masked rows", 12, 12),
                                      ("fully masked rows", 5, 12)])
def test_matches_jax_attention_and_its_gradients(case, t, s):
  q, k, v, w = _inputs(t=t, s=s)
  mask = CASES[case](2, t, s)
  ours = attention.dot_product_attention(q, k, v, mask=mask)
  ref = jax.nn.dot_product_attention(q, k, v, mask=mask)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
  g_ours = jax.grad(_loss(attention.dot_product_attention, mask, w), argnums=(0, 1, 2))(q, k, v)
  g_ref = jax.grad(_loss(jax.nn.dot_product_attention, mask, w), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g_ours, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_bfloat16_keeps_jax_dtypes_and_values():
  q, k, v, w = _inputs(dtype=jnp.bfloat16)
  mask = _prefix_causal(2, 12, [2, 5])
  ours = attention.dot_product_attention(q, k, v, mask=mask)
  ref = jax.nn.dot_product_attention(q, k, v, mask=mask)
  assert ours.dtype == ref.dtype == jnp.bfloat16
  np.testing.assert_allclose(ours.astype(np.float32), ref.astype(np.float32), atol=2e-2)
  g = jax.grad(_loss(attention.dot_product_attention, mask, w), argnums=(0, 1, 2))(q, k, v)
  g_ref = jax.grad(_loss(jax.nn.dot_product_attention, mask, w), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g, g_ref):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=6e-2)


def test_composes_with_remat_and_vmap():
  """The custom backward composes: rematerialised and vmapped callers give the same values."""
  q, k, v, w = _inputs()
  mask = _prefix_causal(2, 12, [3, 7])
  f = _loss(attention.dot_product_attention, mask, w)
  g_remat = jax.grad(jax.checkpoint(f))(q, k, v)
  np.testing.assert_allclose(g_remat, jax.grad(f)(q, k, v), rtol=1e-6)
  per_row = jax.vmap(lambda a, b, c: attention.dot_product_attention(
      a[None], b[None], c[None], mask=mask[:1])[0])(q, k, v)
  np.testing.assert_allclose(per_row[0], attention.dot_product_attention(
      q, k, v, mask=mask)[0], rtol=1e-6)


def test_gelu_exact_is_the_erf_gelu():
  """torch's nn.GELU(): 0.5 x (1 + erf(x / sqrt 2)); jax's erfc form is the same function."""
  x = jnp.linspace(-8.0, 8.0, 1001)
  np.testing.assert_allclose(activations.gelu_exact(x), jax.nn.gelu(x, approximate=False),
                             atol=1e-6)
  np.testing.assert_allclose(jax.grad(lambda y: activations.gelu_exact(y).sum())(x),
                             jax.grad(lambda y: jax.nn.gelu(y, approximate=False).sum())(x),
                             atol=1e-5)
