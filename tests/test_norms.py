"""pretrain_jax.norms.LayerNorm: the same parameters and, in value and gradient, the same
function as flax's two-pass nn.LayerNorm (torch's formula), whatever the dtype, with or
without bias; its hand-written gradient also checked against finite differences."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pretrain_jax import norms


def setup(seed, shape=(3, 5, 16), dtype=jnp.float32, use_bias=True):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(1.5, 2.0, size=shape), dtype)
  ours = norms.LayerNorm(epsilon=1e-6, use_bias=use_bias, dtype=dtype)
  ref = nn.LayerNorm(epsilon=1e-6, use_bias=use_bias, dtype=dtype, use_fast_variance=False)
  params = ref.init(jax.random.key(0), x)
  # non-trivial scale and bias, so that their gradients and uses are checked
  params = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
  return x, ours, ref, params


@pytest.mark.parametrize("use_bias", [True, False])
def test_same_parameters(use_bias):
  x, ours, ref, _ = setup(0, use_bias=use_bias)
  a, b = ours.init(jax.random.key(0), x), ref.init(jax.random.key(0), x)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for p, q in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert p.shape == q.shape and p.dtype == q.dtype
    np.testing.assert_array_equal(p, q)


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("shape", [(3, 5, 16), (7, 33)])
def test_values_and_gradients_equal_flax(use_bias, shape):
  x, ours, ref, params = setup(1, shape, use_bias=use_bias)
  dy = jnp.asarray(np.random.default_rng(2).normal(size=shape), jnp.float32)

  def loss(module, p, x):
    return jnp.sum(module.apply(p, x) * dy)       # any linear use of the output
  np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-5, atol=1e-5)
  g_ours = jax.grad(lambda p, x: loss(ours, p, x), argnums=(0, 1))(params, x)
  g_ref = jax.grad(lambda p, x: loss(ref, p, x), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_gradient_matches_finite_differences():
  x, ours, _, params = setup(3, (2, 8))
  x64 = np.asarray(x, np.float64)
  f = lambda x: float(jnp.sum(jnp.sin(ours.apply(params, jnp.asarray(x, jnp.float32)))))
  g = np.asarray(jax.grad(lambda x: jnp.sum(jnp.sin(ours.apply(params, x))))(x))
  eps = 1e-2
  for i, j in [(0, 0), (1, 5), (0, 7)]:
    e = np.zeros_like(x64)
    e[i, j] = eps
    fd = (f(x64 + e) - f(x64 - e)) / (2 * eps)
    assert abs(fd - g[i, j]) < 2e-2 * max(1.0, abs(fd)), (i, j, fd, g[i, j])


def test_bfloat16_activations_keep_their_dtype():
  x, ours, ref, params = setup(4, dtype=jnp.bfloat16)
  y = ours.apply(params, x)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32),
                             np.asarray(ref.apply(params, x), np.float32), atol=0.05)
  gx = jax.grad(lambda x: jnp.sum(ours.apply(params, x).astype(jnp.float32)))(x)
  assert gx.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(gx, np.float32)))
