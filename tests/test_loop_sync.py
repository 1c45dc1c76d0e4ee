"""The step loop does not wait for the device every step: training metrics cross to the
host only at log and checkpoint steps; profiling writes a TensorBoard trace; the config
is logged at start."""
import glob
import logging
import os

import jax
import pytest

from aimjax import train as aim_train
from conftest import load_config
from pretrain_jax import loop


def _tiny(**overrides):
  cfg = load_config("configs/aim/pretrain.py", "variant=tiny")
  cfg.update_from_flattened_dict({"total_steps": 20, "log_every": 10, "checkpoint_every": 20,
                                  "eval_every": 0, "optimizer.warmup_steps": 5, **overrides})
  return cfg


@pytest.mark.slow
def test_metrics_reach_the_host_only_at_log_steps(tmp_path, monkeypatch, caplog):
  fetched = []
  real = loop.fetch_metrics
  monkeypatch.setattr(loop, "fetch_metrics", lambda steps: fetched.append(len(steps)) or real(steps))
  cfg = _tiny()
  caplog.set_level(logging.INFO)
  # No implicit device-to-host copy anywhere in the loop (a float(loss) per step would be
  # one): the guard raises on any; fetch_metrics' jax.device_get is explicit.
  with jax.transfer_guard_device_to_host("disallow"):
    last = loop.train(cfg, str(tmp_path), aim_train.build_task(cfg))
  assert fetched == [10, 10]            # two transfers for 20 steps, 10 steps' metrics each
  assert last["loss"] > 0 and "perf/step_time_s" in last
  assert any(r.getMessage().startswith("Config:\n") and "total_steps: 20" in r.getMessage()
             for r in caplog.records)


def test_a_nan_between_log_steps_is_caught_before_the_checkpoint(tmp_path):
  cfg = _tiny(**{"debug.nan_at_step": 13})
  with pytest.raises(loop.NonFiniteLossError, match="grad_norm is nan at step 13"):
    loop.train(cfg, str(tmp_path), aim_train.build_task(cfg))
  assert not os.path.exists(tmp_path / "checkpoints" / "20")


@pytest.mark.slow
def test_profile_steps_write_a_tensorboard_trace(tmp_path):
  cfg = _tiny(total_steps=6, log_every=3, checkpoint_every=6, profile_steps=(3, 2))
  loop.train(cfg, str(tmp_path), aim_train.build_task(cfg))
  assert glob.glob(str(tmp_path / "plugins" / "profile" / "*" / "*.xplane.pb"))
  with pytest.raises(ValueError, match="profile_steps"):
    loop.Profile((0, 3), str(tmp_path))
