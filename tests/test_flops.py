"""Analytic model FLOPs (aimjax.model.forward_flops, fourm_jax.flops) against XLA's count of the
compiled train step (compiled on CPU with abstract inputs, never run).

The tiny configs at width 256 (depth 2, batch 32): at width 64 the element-wise work XLA also
counts (softmax, norms, log-softmax over the vocabularies, the optimizer) is ~3-4% of the
step; at 256 the matmuls are ~99% of it.
"""
import functools

import flax.linen as nn
import jax
import pytest

from conftest import load_config
from pretrain_jax import flops as flops_lib, loop, mesh as mesh_lib, partitioning, plan

WIDE = {"aim": {"width": 256, "num_heads": 4}, "fourm": {"dim": 256, "num_heads": 4}}


def _config(name: str, remat: str):
  config = load_config(f"configs/{name}/pretrain.py", "variant=tiny")
  for key, value in WIDE[name].items():
    config.model[key] = value
  config.model.remat = remat
  config.model.attention_impl = "xla"     # plain attention: XLA sees (and counts) every matmul
  return config


@functools.lru_cache(maxsize=None)
def _counts(name: str, remat: str) -> tuple[float, float]:
  """(analytic flops_per_step of the task, XLA's FLOPs of its compiled train step)."""
  config = _config(name, remat)
  task = plan.task_module(f"configs/{name}/pretrain.py").build_task(config)
  mesh = mesh_lib.create_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  jitted, state, batch, _ = plan.abstract_step(config, task, mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.RULES):
    compiled = jitted.lower(state, batch).compile()
  return task.flops_per_step, loop.xla_flops(compiled, mesh.size)


def _xent_xla_flops(name: str) -> float:
  """XLA's count of 4M's chunked loss (fourm_jax.xent) with its gradient, alone, on the step's
  shapes. XLA counts a loop body once, so the step's count holds this much of the logits
  whatever the tokens: subtracting it leaves the rest of the step to compare."""
  import jax.numpy as jnp
  from fourm_jax import train, xent
  config = _config(name, "none")
  model = train.build_model(config)
  b, m, d = config.batch_size, config.model.num_decoder_tokens, model.dim
  tables = [jax.ShapeDtypeStruct((t.vocab_size, d), jnp.float32) for t in model.targets]
  y = jax.ShapeDtypeStruct((b, m, d), jnp.float32)
  ints = jax.ShapeDtypeStruct((b, m), jnp.int32)
  valid = jax.ShapeDtypeStruct((b, m), jnp.bool_)
  grad = jax.grad(lambda t, y, *a: xent.own_vocab_losses(t, y, *a).sum(), argnums=(0, 1))
  return loop.xla_flops(jax.jit(grad).lower(tables, y, ints, ints, valid).compile(), 1)


@pytest.mark.parametrize("name", ["aim", "fourm"])
def test_analytic_flops_match_xla_without_remat(name):
  analytic, xla = _counts(name, "none")
  assert analytic and xla
  if name == "fourm":   # the logits, in loops XLA counts once, are compared apart (below)
    from fourm_jax import flops, train
    config = _config(name, "none")
    analytic -= flops_lib.train_step_flops(flops.logits_flops(train.build_model(config), config.batch_size,
                                                   config.model.num_decoder_tokens))
    xla -= _xent_xla_flops(name)
  assert analytic == pytest.approx(xla, rel=0.05), (analytic, xla, analytic / xla)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["aim", "fourm"])
def test_block_remat_adds_xla_flops_but_not_model_flops(name):
  """The logged MFU uses the analytic count, so it does not rise with recomputation."""
  analytic, xla = _counts(name, "none")
  analytic_remat, xla_remat = _counts(name, "block")
  assert analytic_remat == analytic
  assert xla_remat > 1.1 * xla          # the forward pass again


def test_fourm_count_ignores_the_attention_kernel_and_follows_the_shapes():
  from fourm_jax import flops, train
  model = train.build_model(_config("fourm", "none"))
  count = lambda m, b=4: flops.forward_flops(m, b, 24, 24)
  assert count(model.clone(attention_impl="cudnn")) == count(model)   # XLA counts 0 for cuDNN
  assert count(model, 8) == 2 * count(model)
  # each decoder token against its own target's vocabulary (fourm_jax.xent), an equal
  # expected share of the tokens per target
  mean_vocab = sum(t.vocab_size for t in model.targets) / len(model.targets)
  assert flops.logits_flops(model, 4, 24) == 2 * 4 * 24 * model.dim * mean_vocab
  assert flops.train_step_flops(model, 4, 24, 24) == 3 * count(model)
