"""TrainState pytree and its creation already sharded over the mesh.

Parameters are never materialised on one host: shapes come from
`jax.eval_shape`, shardings from the logical rules, and the init function is
jitted with those `out_shardings`, so each device creates only its shard.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from pretrain_jax import partitioning

PyTree = Any


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 scalar: number of updates applied
  params: PyTree           # unboxed parameters (param dtype, f32 by default)
  opt_state: PyTree        # optax state, sharded like the params it mirrors
  rng: jax.Array           # base PRNG key; step keys are fold_in(rng, step)
  extra: PyTree            # non-trainable model state updated by the step (e.g. EMA
                           # codebooks of vector quantizers); {} for most models; replicated


def abstract_params(init_fn: Callable[[jax.Array], PyTree], rng: jax.Array) -> PyTree:
  """Boxed (LogicallyPartitioned) abstract params of `init_fn(rng)`."""
  return jax.eval_shape(init_fn, rng)


def state_shardings(tx: optax.GradientTransformation, boxed_abstract: PyTree,
                    mesh: jax.sharding.Mesh, rules=partitioning.RULES, extra_abstract=None):
  """NamedShardings for every leaf of the TrainState.

  Optimizer-state copies of the parameter tree (Adam's mu, nu) take the
  parameters' shardings; everything else (counts) is replicated.
  """
  p_sh = partitioning.param_shardings(boxed_abstract, mesh, rules)
  params = nn.unbox(boxed_abstract)
  opt_abstract = jax.eval_shape(tx.init, params)
  replicated = NamedSharding(mesh, P())
  opt_sh = optax.tree_map_params(
      tx, lambda _, s: s, opt_abstract, p_sh,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, NamedSharding))
  extra_sh = jax.tree.map(lambda _: replicated, extra_abstract or {})
  return TrainState(step=replicated, params=p_sh, opt_state=opt_sh, rng=replicated,
                    extra=extra_sh)


def _state_fns(init_fn, tx, rng, init_extra=None):
  init_rng, state_rng = jax.random.split(rng)

  def init(r):
    params = nn.unbox(init_fn(r))
    extra = nn.unbox(init_extra(jax.random.fold_in(r, 1))) if init_extra else {}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=state_rng, extra=extra)
  return init, init_rng


def _extra_abstract(init_extra, init_rng):
  if init_extra is None:
    return {}
  return nn.unbox(jax.eval_shape(init_extra, jax.random.fold_in(init_rng, 1)))


def abstract_train_state(init_fn: Callable[[jax.Array], PyTree],
                         tx: optax.GradientTransformation, rng: jax.Array,
                         mesh: jax.sharding.Mesh, rules=partitioning.RULES, init_extra=None):
  """(TrainState of ShapeDtypeStructs carrying shardings, shardings), allocating nothing.

  The restore target of a checkpoint: resuming never builds a fresh state
  next to the restored one.
  """
  init, init_rng = _state_fns(init_fn, tx, rng, init_extra)
  shardings = state_shardings(tx, abstract_params(init_fn, init_rng), mesh, rules,
                              _extra_abstract(init_extra, init_rng))
  shapes = jax.eval_shape(init, init_rng)
  abstract = jax.tree.map(lambda s, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          shardings, shapes)
  return abstract, shardings


def create_train_state(init_fn: Callable[[jax.Array], PyTree], tx: optax.GradientTransformation,
                       rng: jax.Array, mesh: jax.sharding.Mesh, rules=partitioning.RULES,
                       init_extra=None):
  """Creates (state, shardings) with every array born on its devices.

  init_fn: rng -> boxed params (e.g. `lambda r: model.init(r, x)["params"]`).
  rng: the run's key; one half initialises the params, the other is kept as
  the state's base key for per-step randomness.
  init_extra: optional rng -> non-trainable state (TrainState.extra).
  """
  init, init_rng = _state_fns(init_fn, tx, rng, init_extra)
  shardings = state_shardings(tx, abstract_params(init_fn, init_rng), mesh, rules,
                              _extra_abstract(init_extra, init_rng))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = jax.jit(init, out_shardings=shardings)(init_rng)
  return state, shardings


def count_params(params: PyTree) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
