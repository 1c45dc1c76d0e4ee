"""benchmarks/op_profile.py, our side: the phases and kinds it gives the XLA ops of a small
train step whose structure is known (a Dense forward, a custom_vjp loss, its backward and an
SGD update), and a profile of one call of it."""
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from conftest import ROOT

sys.path.insert(0, str(ROOT))
from benchmarks import op_profile  # noqa: E402


@functools.partial(jax.custom_vjp)
def _sq_loss(y):
  return jnp.sum(jnp.tanh(y) ** 2)


def _fwd(y):
  t = jnp.tanh(y)
  return jnp.sum(t ** 2), t


def _bwd(t, ct):
  return (ct * 2 * t * (1 - t ** 2),)


_sq_loss.defvjp(_fwd, _bwd)


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(64, use_bias=False)(nn.gelu(nn.Dense(64, use_bias=False)(x)))


def compiled_step():
  net = Net()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(128, 64)), jnp.float32)
  params = net.init(jax.random.key(0), x)

  @jax.jit
  def step(params, x):
    grads = jax.grad(lambda p: _sq_loss(net.apply(p, x)))(params)
    return jax.tree.map(lambda p, g: p - 0.1 * jnp.sqrt(jnp.abs(g)), params, grads)
  return step.lower(params, x).compile(), params, x


def test_phases_and_kinds_of_a_known_step():
  compiled, _, _ = compiled_step()
  ops = op_profile.hlo_ops(compiled.as_text())
  found = {(o["phase"], o["kind"]) for o in ops.values()}
  # two Dense layers forward and their input/weight gradients backward are dots
  assert ("forward", "matmul") in found and ("backward", "matmul") in found
  # the custom_vjp body (jvp() without a module) is the loss; the update is outside the grad
  assert any(o["phase"] == "loss" for o in ops.values())
  assert any(o["phase"] == "update" and o["kind"] == "other" for o in ops.values())
  # no dot anywhere but in the forward and backward passes
  assert not any(o["kind"] == "matmul" and o["phase"] in ("loss", "update")
                 for o in ops.values())


@pytest.mark.parametrize("op_name, phase", [
    ("jit(train_step)/transpose(jvp(FourM))/FourM.encode/encoder_0/mlp/fc3/dot_general",
     "backward"),
    ("jit(train_step)/jvp(FourM)/FourM.encode/encoder_0/mlp/fc3/dot_general", "forward"),
    ("jit(train_step)/jvp()/while/body/dot_general", "loss"),
    ("jit(train_step)/add", "update"), ("", "update")])
def test_phase_of_op_names(op_name, phase):
  assert op_profile.phase_of(op_name) == phase


def test_profile_of_one_call_groups_the_trace():
  compiled, params, x = compiled_step()
  box = {"params": params}

  def run():
    box["params"] = compiled(box["params"], x)
    jax.block_until_ready(box["params"])
  run()
  out = op_profile.ours(compiled, run, top=5)
  groups = out["by_phase_kind"]
  assert out["op_time_ms"] > 0 and out["step_wall_s"] > 0
  assert abs(sum(g["ms"] for g in groups.values()) - out["op_time_ms"]) < 1e-6
  assert abs(sum(g["scaled_ms"] for g in groups.values()) - 1e3 * out["step_wall_s"]) < 1e-3
  assert groups["forward/matmul"]["ms"] > 0 and groups["backward/matmul"]["ms"] > 0
  assert len(out["top"]) == 5 and out["top"][0]["ms"] >= out["top"][-1]["ms"]
