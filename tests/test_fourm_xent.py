"""fourm_jax.xent: the per-modality sums of cross-entropy, each token over its own vocabulary,
in chunks with a custom gradient, equal the dense computation (every vocabulary at every
position, then the own one picked), in value and gradient, whatever the mix of modalities."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fourm_jax import xent

VOCABS = (50, 17, 33)


def dense_losses(tables, y, ids, mods, valid):
  """The reference: log-softmax over each modality's full vocabulary at every position, then
  each modality's sum over its valid tokens."""
  out = []
  for k, w in enumerate(tables):
    logp = jax.nn.log_softmax(y @ w.T)
    own = jnp.where(mods == k, ids, 0)
    nll = -jnp.take_along_axis(logp, own[..., None], -1)[..., 0]
    out.append(jnp.sum(jnp.where(valid & (mods == k), nll, 0.0)))
  return jnp.stack(out)


def make(seed, b=3, m=20, d=8, mods_p=None, valid_p=0.8):
  rng = np.random.default_rng(seed)
  tables = [jnp.asarray(rng.normal(size=(v, d)), jnp.float32) for v in VOCABS]
  y = jnp.asarray(rng.normal(size=(b, m, d)), jnp.float32)
  mods = rng.choice(len(VOCABS), size=(b, m), p=mods_p)
  ids = np.array([[rng.integers(VOCABS[k]) for k in row] for row in mods])
  valid = rng.random((b, m)) < valid_p
  return tables, y, jnp.asarray(ids), jnp.asarray(mods), jnp.asarray(valid)


@pytest.mark.parametrize("case", [
    dict(seed=0, chunk=None), dict(seed=1, mods_p=[1.0, 0.0, 0.0], chunk=8),
    dict(seed=2, valid_p=0.0, chunk=8), dict(seed=3, valid_p=1.0, mods_p=[0.1, 0.1, 0.8], chunk=8),
    dict(seed=4, b=1, m=7, chunk=64),
    # exactly one and exactly two full chunks: chunk 0 runs outside the loop, which then
    # runs zero times or once
    dict(seed=5, b=1, m=8, mods_p=[1.0, 0.0, 0.0], valid_p=1.0, chunk=8),
    dict(seed=6, b=2, m=8, mods_p=[1.0, 0.0, 0.0], valid_p=1.0, chunk=8)])
def test_values_and_gradients_equal_dense(case):
  chunk = case.pop("chunk")
  tables, y, ids, mods, valid = make(**case)
  weight = jnp.asarray([0.7, -1.3, 2.0], jnp.float32)     # any linear use of the sums

  def total(fn, tables, y):
    return jnp.sum(fn(tables, y, ids, mods, valid) * weight)

  chunked = lambda *a: xent.own_vocab_losses(*a, chunk=chunk)
  np.testing.assert_allclose(chunked(tables, y, ids, mods, valid),
                             dense_losses(tables, y, ids, mods, valid), rtol=1e-5, atol=1e-5)
  g_chunked = jax.grad(lambda t, y: total(chunked, t, y), argnums=(0, 1))(tables, y)
  g_dense = jax.grad(lambda t, y: total(dense_losses, t, y), argnums=(0, 1))(tables, y)
  for a, b in zip(jax.tree.leaves(g_chunked), jax.tree.leaves(g_dense)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_kernel_layout_equals_table_layout():
  """Tables given as [D, V] kernels (layout 'dv', the untied to_logits) give the same sums, and
  each gradient in its kernel's layout: the [V, D] layout's gradient, transposed."""
  tables, y, ids, mods, valid = make(7)
  weight = jnp.asarray([0.7, -1.3, 2.0], jnp.float32)
  total = lambda t, y, layout: jnp.sum(
      xent.own_vocab_losses(t, y, ids, mods, valid, chunk=8, layout=layout) * weight)
  kernels = [w.T for w in tables]
  np.testing.assert_allclose(total(kernels, y, "dv"), total(tables, y, "vd"), rtol=1e-6)
  (gk, gy_k), (gt, gy_t) = (jax.grad(total, argnums=(0, 1))(kernels, y, "dv"),
                            jax.grad(total, argnums=(0, 1))(tables, y, "vd"))
  for a, b in zip(gk, gt):
    assert a.shape == b.T.shape
    np.testing.assert_allclose(a, b.T, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gy_k, gy_t, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="layout must be"):
    xent.own_vocab_losses(tables, y, ids, mods, valid, layout="VD")


def test_bfloat16_inputs_get_bfloat16_gradients():
  tables, y, ids, mods, valid = make(6)
  y16 = y.astype(jnp.bfloat16)
  g = jax.grad(lambda y: xent.own_vocab_losses(tables, y, ids, mods, valid).sum())(y16)
  assert g.dtype == jnp.bfloat16
  ref = jax.grad(lambda y: dense_losses(tables, y, ids, mods, valid).sum())(
      y16.astype(jnp.float32))
  np.testing.assert_allclose(np.asarray(g, np.float32), ref, rtol=2e-2, atol=2e-2)


def test_only_each_modalitys_chunks_run():
  """The loops run ceil(n_k / c) chunks for modality k: the sorted runs hold each modality's
  valid tokens, contiguous, in token order, and nothing else."""
  _, _, _, mods, valid = make(5, b=4, m=50, valid_p=0.7)
  order, first, counts = map(np.asarray, xent._sorted_runs(mods.reshape(-1), valid.reshape(-1),
                                                          len(VOCABS)))
  flat_mods, flat_valid = np.asarray(mods).reshape(-1), np.asarray(valid).reshape(-1)
  for k in range(len(VOCABS)):
    run = order[first[k]:first[k] + counts[k]]
    assert run.tolist() == np.flatnonzero(flat_valid & (flat_mods == k)).tolist()


def test_chunk_size_bounds():
  assert xent.chunk_size(512, 3) == 64       # sqrt(24 * 512 / 3) = 64
  assert xent.chunk_size(10, 5) == 8
  assert xent.chunk_size(1 << 20, 2) == 256


def test_shape_errors_are_clear():
  tables, y, ids, mods, valid = make(0)
  with pytest.raises(ValueError, match="expected y"):
    xent.own_vocab_losses(tables, y[0], ids, mods, valid)
