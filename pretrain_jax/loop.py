"""The training loop: sharded state, compiled donated step, metrics, progress,
evaluation, checkpoints, preemption and non-finite-loss handling.

A project hands the loop a `Task` (how to init params, the loss, the data);
the loop knows nothing else about the model.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import periodic_actions
from etils import epath

from pretrain_jax import checkpoint as checkpoint_lib
from pretrain_jax import flops as flops_lib
from pretrain_jax import mesh as mesh_lib
from pretrain_jax import metrics as metrics_lib
from pretrain_jax import optim
from pretrain_jax import partitioning
from pretrain_jax import train_state as ts

PyTree = Any
Batch = dict[str, np.ndarray]


@dataclasses.dataclass
class Task:
  """What a project gives the loop.

  init_params: rng -> boxed params (`model.init(...)["params"]`).
  loss_fn: (params, batch, rng) -> (scalar loss, dict of scalar metrics);
    traced under the mesh and logical-axis rules.
  train_data: rows -> a Grain dataset whose iterator yields this process's rows of
    each global batch (`rows`: sorted global row indices from
    `partitioning.process_rows`, not always contiguous; dicts of numpy arrays with
    leading dim len(rows), in the order of `rows`); the iterator's state is checkpointed.
  eval_data: optional rows -> re-iterable collection of batches (same rows), built once
    at start (so a bad eval source fails before step 1; build it lazily, reading no
    records) and evaluated with loss_fn every `config.eval_every` steps (metrics
    averaged, 'eval/').
  flops_per_step: analytic FLOPs of one training step (for MFU); when None
    XLA's cost analysis of the compiled step is used.
  batch_spec: optional global batch size -> dict of jax.ShapeDtypeStruct, the
    shapes and dtypes `train_data` yields (for ahead-of-time planning,
    `pretrain_jax.plan`, without reading data).
  num_layers / layer_id: for layer-wise learning-rate decay.
  on_eval: optional (params, extra, step, workdir) -> None, called on every
    process after each evaluation (e.g. to write reconstruction images).
  init_extra: optional rng -> non-trainable state the step updates (EMA
    codebooks, ...), kept in TrainState.extra and checkpointed. With it,
    loss_fn is (params, batch, rng, extra) -> (loss, (metrics, new_extra)).
  """
  init_params: Callable[[jax.Array], PyTree]
  loss_fn: Callable[[PyTree, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
  train_data: Callable[[tuple[int, int]], Any]
  eval_data: Callable[[tuple[int, int]], Any] | None = None
  flops_per_step: float | None = None
  num_layers: int = 0
  layer_id: Callable[[str, int], int] = optim.default_layer_id
  init_extra: Callable[[jax.Array], PyTree] | None = None
  on_eval: Callable[[PyTree, PyTree, int, str], None] | None = None
  batch_spec: Callable[[int], dict[str, jax.ShapeDtypeStruct]] | None = None

  def loss_and_extra(self, params, batch, rng, extra):
    """(loss, metrics, new_extra) for either form of loss_fn."""
    if self.init_extra is None:
      loss, metrics = self.loss_fn(params, batch, rng)
      return loss, metrics, extra
    loss, (metrics, new_extra) = self.loss_fn(params, batch, rng, extra)
    return loss, metrics, new_extra


class NonFiniteLossError(RuntimeError):
  pass


class _Preemption:
  """Turns SIGTERM into a flag checked once per step (single-process runs).

  With several processes the flag would differ between hosts, which would
  stop at different steps; there Orbax's `reached_preemption` (JAX's
  preemption sync service) decides, identically on all hosts.
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if jax.process_count() > 1:
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. some notebook runners)
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and exiting")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def make_train_step(task: Task, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    nan_at_step: int = 0):
  """The jitted update. nan_at_step > 0 poisons that step's gradients while its
  loss stays finite, as a bf16 overflow in the backward pass would (fault
  injection for tests of the divergence handling)."""
  def train_step(state: ts.TrainState, batch: Batch):
    rng = jax.random.fold_in(state.rng, state.step)

    def loss(params):
      value, metrics, extra = task.loss_and_extra(params, batch, rng, state.extra)
      return value, (metrics, extra)

    (loss_value, (aux, extra)), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
    if nan_at_step:
      poison = jnp.where(state.step + 1 == nan_at_step, jnp.nan, 1.0)
      grads = jax.tree.map(lambda g: g * poison.astype(g.dtype), grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss_value, "grad_norm": optax.global_norm(grads),
               "param_norm": optax.global_norm(params), "lr": schedule(state.step), **aux}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         extra=extra), metrics
  return train_step


def jit_train_step(task: Task, tx, schedule, shardings, mesh, nan_at_step: int = 0):
  """The train step jitted with the state's shardings, batch rows over ('data', 'fsdp') and
  the state donated (updated in place). Lower it under `jax.set_mesh(mesh)` and the rules."""
  step_fn = make_train_step(task, tx, schedule, nan_at_step)
  return jax.jit(step_fn, in_shardings=(shardings, partitioning.batch_sharding(mesh)),
                 out_shardings=(shardings, None), donate_argnums=0)


def xla_flops(compiled, num_devices: int) -> float:
  """FLOPs of one call of a compiled SPMD program over all its devices. XLA's cost analysis
  counts one device's share (every device runs the same partitioned program)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)) * num_devices if cost else 0.0


REQUIRED_KEYS = ("seed", "batch_size", "total_steps", "log_every", "checkpoint_every",
                 "keep_checkpoints", "mesh", "data", "model", "optimizer")


def validate_config(config) -> None:
  """The keys every training config has; called before anything is built."""
  missing = [k for k in REQUIRED_KEYS if k not in config]
  if missing:
    raise ValueError(f"config lacks required keys {missing}")
  for key in ("batch_size", "total_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
    value = config[key]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      raise ValueError(f"config key '{key}' must be a positive int, got {value!r}")


def check_config(config, num_processes: int, mesh: jax.sharding.Mesh) -> None:
  """Values the loop relies on, with messages that name the key."""
  validate_config(config)
  dp = partitioning.data_parallel_size(mesh)
  if config.batch_size % dp:
    raise ValueError(
        f"config key 'batch_size' ({config.batch_size}) must be divisible by the data-parallel "
        f"size mesh.data*mesh.fsdp = {dp}")
  if config.batch_size % num_processes:
    raise ValueError(f"config key 'batch_size' ({config.batch_size}) must be divisible by the "
                     f"number of processes ({num_processes})")


def _readable(n: float) -> str:
  """483136 -> '483.1K', 6.1e8 -> '610.0M'."""
  for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if n >= size:
      return f"{n / size:.1f}{unit}"
  return str(int(n))


def _to_host(metrics) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def train(config, workdir: str, task: Task, devices=None) -> dict[str, float]:
  """Trains until `config.total_steps`, resuming from `workdir` if it holds a checkpoint.

  Returns the last logged metrics. Raises NonFiniteLossError if the loss or
  the gradient norm becomes NaN/Inf (the last good checkpoint is kept).
  """
  with _Preemption() as preemption:
    return _train(config, workdir, task, devices, preemption)


def _train(config, workdir, task, devices, preemption) -> dict[str, float]:
  workdir_path = epath.Path(workdir)
  workdir_path.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:   # what this run was, next to its checkpoints
    (workdir_path / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
  mesh = mesh_lib.create_mesh(config.mesh, devices)
  check_config(config, jax.process_count(), mesh)
  rules = partitioning.RULES
  rows = partitioning.process_rows(mesh, config.batch_size)

  # ---- model, optimizer, sharding ----
  rng = jax.random.key(config.seed)
  boxed = ts.abstract_params(task.init_params, jax.random.split(rng)[0])
  tx, schedule = optim.create_optimizer(
      config.optimizer, config.total_steps, nn.unbox(boxed), task.num_layers, task.layer_id)
  target, shardings = ts.abstract_train_state(task.init_params, tx, rng, mesh, rules,
                                              task.init_extra)
  n_params = ts.count_params(target.params)
  logging.info("Parameters: %s (%s); process %d of %d feeds batch rows %s",
               f"{n_params:,}", _readable(n_params), jax.process_index(), jax.process_count(),
               partitioning.describe_rows(rows))
  replicated = partitioning.unsharded_fraction(shardings.params, target.params)
  logging.info("Replicated share of parameter bytes: %.1f%%", 100 * replicated)

  # ---- restore, or initialise (never both: no second copy of the state) ----
  ckpt = checkpoint_lib.Checkpointer(
      os.fspath(workdir_path / "checkpoints"), keep=config.keep_checkpoints,
      async_save=config.get("async_checkpoint", True))
  data_iter = iter(task.train_data(rows))
  eval_batches = None   # built now: a missing or too small eval set stops the run here
  if task.eval_data is not None and config.get("eval_every", 0):
    eval_batches = task.eval_data(rows)
  if ckpt.latest_step() is not None:
    state = ckpt.restore(target, data_iter)
    logging.info("Resuming from step %d", int(state.step))
  else:
    state, _ = ts.create_train_state(task.init_params, tx, rng, mesh, rules, task.init_extra)
    if config.get("init_from"):
      params, report = checkpoint_lib.warm_start(state.params, config.init_from,
                                                 shardings.params)
      state = state.replace(params=params)
      logging.info("Initialised %d parameter arrays from %s (%d new, %d of another shape%s)",
                   len(report["copied"]), config.init_from, len(report["new"]),
                   len(report["mismatched"]),
                   f": {report['mismatched'][:3]}" if report["mismatched"] else "")
  start_step = int(state.step)
  if start_step >= config.total_steps:
    logging.info("Already at step %d >= total_steps %d: nothing to do", start_step,
                 config.total_steps)
    ckpt.close()
    return {}

  # ---- compile the step ----
  debug = config.get("debug", {})
  jitted = jit_train_step(task, tx, schedule, shardings, mesh,
                          int(debug.get("nan_at_step", 0) or 0))
  batch_sharding = partitioning.batch_sharding(mesh)
  shard = lambda b: partitioning.shard_batch(b, mesh, config.batch_size)
  first_batch = next(data_iter)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    t0 = time.perf_counter()
    compiled = jitted.lower(state, shard(first_batch)).compile()
    compile_s = time.perf_counter() - t0
  step_flops = task.flops_per_step or xla_flops(compiled, mesh.size)
  flops_lib.peak_flops_per_device(mesh.devices.flat[0])   # measure (CPU) before timing steps
  logging.info("Compiled train step in %.1fs; %.3g FLOPs/step", compile_s, step_flops)
  writer = metrics_lib.create_writer(workdir)

  eval_step = None
  if eval_batches is not None:
    eval_step = jax.jit(lambda p, e, b: task.loss_and_extra(p, b, jax.random.key(0), e)[:2],
                        in_shardings=(shardings.params, shardings.extra, batch_sharding))

  def evaluate():
    sums, n = {}, 0
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      for batch in eval_batches:
        loss, aux = eval_step(state.params, state.extra, shard(batch))
        for k, v in {"loss": loss, **aux}.items():
          sums[k] = sums.get(k, 0.0) + float(v)
        n += 1
    return {f"eval/{k}": v / max(n, 1) for k, v in sums.items()}

  # ---- the loop ----
  progress = periodic_actions.ReportProgress(   # logs steps/s and ETA
      num_train_steps=config.total_steps, every_steps=config.log_every)
  last: dict[str, float] = {}
  pending = None   # (step, device metrics): fetched one step late, never stalling dispatch
  window = {"step": start_step, "time": time.perf_counter(), "invalid": 0.0}
  extra_row = {"perf/compile_s": compile_s}
  crash_at = int(debug.get("crash_at_step", 0) or 0)
  if debug.get("crash_process", -1) not in (-1, jax.process_index()):
    crash_at = 0

  def finish(item) -> dict[str, float] | None:
    """Fetches a step's metrics; raises on non-finite values; returns the
    row to log at this step (None between logging steps)."""
    step, dev_metrics = item
    host = _to_host(dev_metrics)
    window["invalid"] += host.get("data/invalid", 0.0)
    for key in ("loss", "grad_norm"):
      if not math.isfinite(host[key]):
        ckpt.wait_until_finished()
        raise NonFiniteLossError(
            f"{key} is {host[key]} at step {step} (loss {host['loss']}); stopping. The last good "
            f"checkpoint is step {ckpt.latest_step()} in {ckpt.directory} (lower optimizer.lr "
            "or raise optimizer.warmup_steps, then restart from it).")
    if step % config.log_every and step != config.total_steps:
      return None
    now = time.perf_counter()
    steps = step - window["step"]
    if steps > 0:
      dt = (now - window["time"]) / steps
      host["perf/step_time_s"] = dt
      host["perf/examples_per_s"] = config.batch_size / dt
      host["perf/tflops_per_s"] = step_flops / dt / 1e12
      if step_flops:
        host["perf/mfu"] = flops_lib.mfu(step_flops, dt, list(mesh.devices.flat))
    host["data/invalid_total"] = window["invalid"]
    window.update(step=step, time=now)
    host.update(extra_row)
    extra_row.clear()
    return host

  def log(step, row):
    nonlocal last
    if row:
      writer.write_scalars(step, row)
      last = row

  batch = first_batch
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    for step in range(start_step + 1, config.total_steps + 1):
      if batch is None:
        batch = next(data_iter)
      state, dev_metrics = compiled(state, shard(batch))
      batch = None
      if pending is not None:
        log(pending[0], finish(pending))
      pending = (step, dev_metrics)
      progress(step)
      do_eval = eval_step is not None and step % config.eval_every == 0
      stop = preemption.requested or ckpt.reached_preemption(step)
      do_save = step % config.checkpoint_every == 0 or step == config.total_steps or stop
      if do_eval or do_save:
        # Never checkpoint a state produced from a non-finite loss or gradient.
        row = finish(pending)
        pending = None
        if do_eval:
          row = {**(row or {}), **evaluate()}
          if task.on_eval is not None:
            with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
              task.on_eval(state.params, state.extra, step, os.fspath(workdir))
          window["time"] = time.perf_counter()   # keep evaluation out of the step time
        log(step, row)
        if do_save:
          writer.flush()
          ckpt.save(step, state, data_iter, force=stop)
      if step == crash_at:   # fault injection for the resume tests: a kill -9, no cleanup
        os.kill(os.getpid(), signal.SIGKILL)
      if stop:
        ckpt.wait_until_finished()
        logging.warning("Preempted: saved step %d to %s; exiting cleanly", step, ckpt.directory)
        break
    if pending is not None:
      log(pending[0], finish(pending))
  ckpt.wait_until_finished()
  ckpt.close()
  writer.flush()
  logging.info("Finished at step %d; final loss %.6f", int(state.step), last.get("loss", float("nan")))
  return last
