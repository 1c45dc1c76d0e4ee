"""fourm_jax.xent: per-token cross-entropy over the token's own vocabulary, in chunks, equals
the dense computation (every vocabulary at every position, then the own one picked), in value
and gradient, whatever the mix of modalities."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fourm_jax import xent

VOCABS = (50, 17, 33)


def dense_nll(tables, y, ids, mods, valid):
  """The reference: log-softmax over each modality's full vocabulary at every position."""
  out = jnp.zeros(ids.shape, jnp.float32)
  for k, w in enumerate(tables):
    logp = jax.nn.log_softmax(y @ w.T)
    own = jnp.where(mods == k, ids, 0)
    out = out + jnp.where(mods == k, -jnp.take_along_axis(logp, own[..., None], -1)[..., 0], 0)
  return jnp.where(valid, out, 0.0)


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
    dict(seed=4, b=1, m=7, chunk=64)])
def test_values_and_gradients_equal_dense(case):
  chunk = case.pop("chunk")
  tables, y, ids, mods, valid = make(**case)
  weight = jnp.asarray(np.random.default_rng(9).random(ids.shape), jnp.float32)

  def total(fn, tables, y):
    return jnp.sum(fn(tables, y, ids, mods, valid) * weight)

  chunked = lambda *a: xent.own_vocab_nll(*a, chunk=chunk)
  np.testing.assert_allclose(chunked(tables, y, ids, mods, valid),
                             dense_nll(tables, y, ids, mods, valid), rtol=1e-5, atol=1e-5)
  g_chunked = jax.grad(lambda t, y: total(chunked, t, y), argnums=(0, 1))(tables, y)
  g_dense = jax.grad(lambda t, y: total(dense_nll, t, y), argnums=(0, 1))(tables, y)
  for a, b in zip(jax.tree.leaves(g_chunked), jax.tree.leaves(g_dense)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_chunks_hold_one_modality_each():
  """The work done is each token's own vocabulary: every used chunk holds tokens of one
  modality, each valid token sits in exactly one chunk, and modality k uses ceil(n_k / c)
  chunks (the switch then runs only that modality's matmul)."""
  _, _, _, mods, valid = make(5, b=4, m=50, valid_p=0.7)
  c = 8
  index, ok, modality = map(np.asarray, xent._chunk_table(mods.reshape(-1), valid.reshape(-1),
                                                         len(VOCABS), c))
  flat_mods, flat_valid = np.asarray(mods).reshape(-1), np.asarray(valid).reshape(-1)
  assert index.shape == (-(-200 // c) + len(VOCABS), c)
  for g in range(index.shape[0]):
    if modality[g] == len(VOCABS):
      assert not ok[g].any()
    else:
      assert (flat_mods[index[g][ok[g]]] == modality[g]).all() and ok[g].any()
  assert sorted(index[ok].tolist()) == np.flatnonzero(flat_valid).tolist()
  for k in range(len(VOCABS)):
    n = int((flat_valid & (flat_mods == k)).sum())
    assert (modality == k).sum() == -(-n // c)


def test_chunk_size_bounds():
  assert xent.chunk_size(512, 3) == 32
  assert xent.chunk_size(10, 5) == 8
  assert xent.chunk_size(1 << 20, 2) == 256


def test_shape_errors_are_clear():
  tables, y, ids, mods, valid = make(0)
  with pytest.raises(ValueError, match="expected y"):
    xent.own_vocab_nll(tables, y[0], ids, mods, valid)
