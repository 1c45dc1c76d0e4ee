"""Diffusion decoder (tokenizers_jax.diffusion): samplers against exact cases, the patched UNet."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tokenizers_jax import diffusion

MU, S = 1.5, 0.5


def gaussian_x0(schedule):
  """E[x0 | x_t] for data N(MU, S^2): the exact x0 predictor of that distribution."""
  def predict(x, t):
    a = schedule.abar(t).reshape((-1,) + (1,) * (x.ndim - 1))
    return MU + jnp.sqrt(a) * S ** 2 * (x - jnp.sqrt(a) * MU) / (a * S ** 2 + 1 - a)
  return predict


def test_ddim_with_eta_one_and_all_steps_is_ddpm():
  sch = diffusion.Schedule()
  pred = gaussian_x0(sch)
  x_T = jax.random.normal(jax.random.key(0), (64, 3))
  a = jax.jit(lambda x: diffusion.ddpm_sample(pred, sch, x, jax.random.key(1)))(x_T)
  b = jax.jit(lambda x: diffusion.ddim_sample(pred, sch, x, jax.random.key(1), 1000, eta=1.0))(x_T)
  np.testing.assert_allclose(a, b, atol=2e-4)


def test_ddim_1000_steps_reproduces_ddpm_mean_on_gaussian_data():
  sch = diffusion.Schedule()
  pred = gaussian_x0(sch)
  x_T = jax.random.normal(jax.random.key(2), (4096, 1))
  ddpm = np.asarray(jax.jit(lambda x: diffusion.ddpm_sample(pred, sch, x, jax.random.key(3)))(x_T))
  ddim = np.asarray(jax.jit(lambda x: diffusion.ddim_sample(pred, sch, x, num_steps=1000))(x_T))
  assert abs(ddim.mean() - ddpm.mean()) < 0.03
  assert abs(ddpm.mean() - MU) < 0.03 and abs(ddim.mean() - MU) < 0.03
  assert abs(ddim.std() - S) < 0.03 and abs(ddpm.std() - S) < 0.05
  few = np.asarray(diffusion.ddim_sample(pred, sch, x_T, num_steps=25))   # the default at inference
  assert abs(few.mean() - MU) < 0.05


@pytest.mark.slow
def test_patched_unet_shapes_and_a_few_training_steps_lower_the_loss():
  unet = diffusion.PatchedUNet(out_channels=1, base_channels=16, channel_mult=(1, 2),
                               num_res_blocks=1)
  sch = diffusion.Schedule()
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:16, 0:16] / 16.0
  x0 = jnp.asarray(np.stack([np.sin(6 * (xx * c + yy * (1 - c)))[..., None]
                             for c in rng.uniform(0, 1, 8)]), jnp.float32)   # [8, 16, 16, 1]
  cond = x0[:, ::4, ::4, :].repeat(4, axis=-1)             # a 4x4 "token" grid of 4-d codes
  params = unet.init(jax.random.key(0), x0, jnp.ones((8,), jnp.int32), cond)["params"]
  out = unet.apply({"params": params}, x0, jnp.ones((8,), jnp.int32), cond)
  assert out.shape == x0.shape
  tx = optax.adam(2e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, key):
    loss, g = jax.value_and_grad(lambda p: diffusion.diffusion_loss(
        lambda x, t: unet.apply({"params": p}, x, t, cond), sch, x0, key))(params)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), opt, loss

  losses = []
  for i in range(60):
    params, opt, loss = step(params, opt, jax.random.key(i))
    losses.append(float(loss))
  assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5]), (losses[:5], losses[-10:])
  sample = diffusion.ddim_sample(lambda x, t: unet.apply({"params": params}, x, t, cond), sch,
                                 jax.random.normal(jax.random.key(9), x0.shape))
  assert sample.shape == x0.shape and bool(jnp.all(jnp.isfinite(sample)))
