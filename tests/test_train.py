"""AIM training end to end: learning, exact resume, kill -9, preemption, divergence, CLI errors."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from aimjax import train as aim_train
from conftest import ROOT, subprocess_env
from pretrain_jax import checkpoint as checkpoint_lib
from pretrain_jax import loop
from pretrain_jax import metrics as metrics_lib

CONFIG = "--config=configs/aim/pretrain.py:variant=tiny"
FAST = ["--config.eval_every=0", "--config.log_every=1", "--config.checkpoint_every=4",
        "--config.total_steps=10", "--config.optimizer.warmup_steps=3"]


def run_train(workdir, *overrides, check=True, timeout=300):
  cmd = [sys.executable, "-m", "aimjax.train", CONFIG, f"--workdir={workdir}", *overrides]
  proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                        timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-3000:]}")
  return proc


def losses(workdir):
  rows = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  return {s: r["loss"] for s, r in rows.items() if "loss" in r}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  run_train(workdir, *FAST)
  return losses(workdir)


@pytest.mark.slow
def test_tiny_config_loss_decreases_over_a_few_hundred_steps(tiny_aim_config, tmp_path):
  cfg = tiny_aim_config
  cfg.total_steps = 200
  cfg.eval_every = 100
  cfg.checkpoint_every = 200
  cfg.log_every = 10
  loop.train(cfg, str(tmp_path), aim_train.build_task(cfg))
  curve = losses(str(tmp_path))
  first = np.mean([curve[10], curve[20]])
  last = np.mean([curve[190], curve[200]])
  assert last < 0.75 * first, (first, last)
  rows = metrics_lib.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  assert rows[200]["eval/loss"] < rows[100]["eval/loss"] < 1.2 * first
  # One JSON object per logged step.
  steps = [json.loads(l)["step"] for l in open(os.path.join(tmp_path, "metrics.jsonl"))]
  assert steps == list(range(10, 201, 10))


@pytest.mark.slow     # about 90 s with its fixture
def test_killed_run_resumes_with_exactly_the_uninterrupted_losses(uninterrupted, tmp_path):
  workdir = str(tmp_path)
  # Killed at step 9: the save of step 8 waited for step 4's to finish, so
  # step 4 (and perhaps 8) is committed.
  killed = run_train(workdir, *FAST, "--config.debug.crash_at_step=9", check=False)
  assert killed.returncode == -signal.SIGKILL
  assert losses(workdir).keys() >= {1, 8}
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  latest = ckpt.latest_step()
  ckpt.close()
  assert latest in (4, 8)
  resumed = run_train(workdir, *FAST)
  assert f"Resuming from step {latest}" in resumed.stderr
  assert losses(workdir) == uninterrupted   # bit-exact, every step 1..10


@pytest.mark.slow
def test_kill_during_a_save_leaves_the_previous_checkpoint_loadable(uninterrupted, tmp_path):
  workdir = str(tmp_path)
  # Killed right after the asynchronous save of step 8 starts (Orbax first
  # waits for step 4's save to finish): step 8's files are half written.
  killed = run_train(workdir, *FAST, "--config.debug.crash_at_step=8", check=False)
  assert killed.returncode == -signal.SIGKILL
  ckpt_dir = os.path.join(workdir, "checkpoints")
  leftovers = [d for d in os.listdir(ckpt_dir) if "tmp" in d]
  ckpt = checkpoint_lib.Checkpointer(ckpt_dir)
  latest = ckpt.latest_step()
  ckpt.close()
  assert leftovers, f"the save of step 8 finished before the kill: {os.listdir(ckpt_dir)}"
  assert latest == 4, (latest, os.listdir(ckpt_dir))
  resumed = run_train(workdir, *FAST)
  assert f"Resuming from step {latest}" in resumed.stderr
  assert losses(workdir) == uninterrupted


def test_sigterm_saves_a_checkpoint_and_exits_zero(tmp_path):
  workdir = str(tmp_path)
  cmd = [sys.executable, "-m", "aimjax.train", CONFIG, f"--workdir={workdir}",
         "--config.total_steps=100000", "--config.log_every=1", "--config.eval_every=0",
         "--config.checkpoint_every=100000", "--config.optimizer.warmup_steps=3"]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 240
  while time.time() < deadline and not (os.path.exists(metrics) and len(losses(workdir)) >= 3):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  saved = ckpt.latest_step()
  ckpt.close()
  assert saved is not None and 3 <= saved < 100000
  assert f"Preempted: saved step {saved}" in err


def test_non_finite_gradients_stop_the_run_before_a_checkpoint_is_poisoned(tmp_path):
  # Step 4 is a checkpoint step whose loss is finite but whose gradients are
  # NaN: the state after it is NaN and must not be saved.
  workdir = str(tmp_path)
  proc = run_train(workdir, *FAST, "--config.checkpoint_every=2", "--config.debug.nan_at_step=4",
                   check=False)
  assert proc.returncode == 1
  assert "grad_norm is nan at step 4" in proc.stderr
  assert "last good checkpoint is step 2" in proc.stderr
  assert "Traceback" not in proc.stderr
  ckpt_dir = os.path.join(workdir, "checkpoints")
  ckpt = checkpoint_lib.Checkpointer(ckpt_dir)
  assert ckpt.latest_step() == 2
  ckpt.close()
  import orbax.checkpoint as ocp
  params = ocp.StandardCheckpointer().restore(os.path.join(ckpt_dir, "2", "state"))["params"]
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


@pytest.mark.parametrize("override, code, message", [
    ("--config.model.widht=64", 2, "unknown config key 'model.widht'"),
    ("--config.model.width=banana", 2, "--config.model.width=banana"),
    ("--config.model.width=-4", 1, "config key 'model.width' must be a positive int"),
    ("--config.batch_size=0", 1, "config key 'batch_size' must be a positive int"),
    ("--config.data.train=s3:bucket", 1, "unknown source kind 's3'"),
])
def test_bad_config_fails_at_start_naming_the_key(tmp_path, override, code, message):
  proc = run_train(str(tmp_path), override, check=False, timeout=120)
  assert proc.returncode == code
  assert message in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not os.path.exists(os.path.join(tmp_path, "checkpoints", "1"))
