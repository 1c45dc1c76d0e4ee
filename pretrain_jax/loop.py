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


GRAD_ACCUM_KEY = "optimizer.grad_accum_steps"
# A metric a loss_fn may return (the train step pops it): the count its loss is a mean over
# (the denominator of a ratio-of-sums loss, before any max(., 1) clamp; it must not depend on
# the params). Micro-batch i's loss and gradient are then weighted by w_i / sum(w), which makes
# an accumulated ratio-of-sums loss equal to the big-batch one; without it they weigh 1 / k.
LOSS_WEIGHT = "loss_weight"
# Metrics that are counts over the batch: summed over micro-batches (the rest are averaged).
SUMMED_METRICS = frozenset({"data/invalid"})


def check_grad_accum_steps(k) -> int:
  """`optimizer.grad_accum_steps` as a positive int (ValueError naming the key otherwise)."""
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"config key '{GRAD_ACCUM_KEY}' must be a positive int, got {k!r}")
  return int(k)


def _micro_batches(batch: Batch, k: int) -> Batch:
  """Every leaf [B, ...] -> [k, B/k, ...]; micro-batch i is rows i, i + k, i + 2k, ...

  The strided split keeps rows where they are: the batch is sharded contiguously over
  ('data', 'fsdp') (device d holds rows [d*b, (d+1)*b), b = B/dp), so when k divides b
  micro-batch i takes the i-th row of every k-row group of every device's shard, and its
  rows stay evenly split over all dp devices, each on the device that already holds it.
  (Contiguous blocks, rows [i*B/k, (i+1)*B/k), would live on dp/k devices only: the others
  would idle or XLA would move rows between devices.)
  """
  leaves = jax.tree.leaves(batch)
  if not leaves:
    return batch
  b = leaves[0].shape[0]
  if any(x.ndim == 0 or x.shape[0] != b for x in leaves):
    raise ValueError(f"'{GRAD_ACCUM_KEY}' > 1 needs every batch leaf to have the batch "
                     f"size as its leading dimension: {jax.tree.map(jnp.shape, batch)}")
  if b % k:
    raise ValueError(f"config key '{GRAD_ACCUM_KEY}' ({k}) must divide the global batch "
                     f"size ({b})")
  mesh = jax.sharding.get_abstract_mesh()
  axes = () if mesh.empty else tuple(a for a in partitioning.BATCH_AXES
                                     if a in mesh.axis_names)
  dp = math.prod(mesh.shape[a] for a in axes)
  if (b // k) % dp:
    raise ValueError(f"config key '{GRAD_ACCUM_KEY}' ({k}): the micro-batch of {b // k} rows "
                     f"must split evenly over the data-parallel size mesh.data*mesh.fsdp = "
                     f"{dp} (global batch {b} = {b // dp} rows per device, which k must "
                     "divide)")

  def split(x):
    x = jnp.moveaxis(x.reshape(b // k, k, *x.shape[1:]), 1, 0)
    if axes:   # [k, B/k, ...]: the micro-batch rows over ('data', 'fsdp'), as the batch
      x = jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(None, axes))
    return x
  return jax.tree.map(split, batch)


def make_train_step(task: Task, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    nan_at_step: int = 0, grad_accum_steps: int = 1):
  """The jitted update. nan_at_step > 0 poisons that step's gradients while its
  loss stays finite, as a bf16 overflow in the backward pass would (fault
  injection for tests of the divergence handling).

  grad_accum_steps = k > 1 (`optimizer.grad_accum_steps`): the global batch [B, ...] is
  split into k micro-batches of B/k rows (rows i::k, see `_micro_batches`; k must divide
  the rows per data-parallel device, B / (mesh.data * mesh.fsdp)), and a `lax.scan`
  computes their gradients one after the other (activation memory of B/k rows), summed in
  float32; one optimizer update follows. Micro-batch i gets the rng fold_in(rng, i), so
  random draws (AIM's prefix lengths, diffusion noise, codebook restarts) differ from a
  one-shot step's. The update equals the one-shot big-batch update (to float rounding) when
  the loss is deterministic and either a mean with equal weight per row (tokenizers'
  reconstruction and commitment losses) or a ratio of sums whose loss_fn reports its
  denominator as the metric `LOSS_WEIGHT` (AIM: non-prefix patches of valid rows; 4M
  'token'). Not exact: a sum of ratios with different denominators (4M's default 'mod'
  loss, each target modality's mean over its tokens, then their mean) is the 1/k-weighted
  mean of the micro-batches' 'mod' losses; a modality's token count differs between
  micro-batches, and one without tokens in a micro-batch counts 0 there. Non-trainable
  `extra` (VQ codebook EMAs) threads through the scan: the codebook gets k EMA updates of
  B/k latents each (and later micro-batches quantize with the updated codebook), not one
  of B. Metrics: loss as weighted above, `SUMMED_METRICS` summed, the rest averaged over
  micro-batches (nonlinear batch statistics such as codebook perplexity are the
  micro-batches' mean); grad_norm is that of the accumulated (averaged) gradient.
  """
  k = check_grad_accum_steps(grad_accum_steps)

  def grad_fn(params, batch, rng, extra):
    def loss(params):
      value, metrics, new_extra = task.loss_and_extra(params, batch, rng, extra)
      metrics = dict(metrics)
      weight = metrics.pop(LOSS_WEIGHT, None)
      return value, (metrics, new_extra, weight)
    return jax.value_and_grad(loss, has_aux=True)(params)

  def accumulate(params, batch, rng, extra):
    """(loss, metrics, new extra, gradient) of the batch, from k micro-batches."""
    def body(carry, xs):
      grad_sum, extra = carry
      i, mb = xs
      (value, (aux, extra, weight)), grads = grad_fn(params, mb, jax.random.fold_in(rng, i),
                                                     extra)
      w = jnp.float32(1.0) if weight is None else jnp.asarray(weight, jnp.float32)
      grad_sum = jax.tree.map(lambda s, g: s + w * g.astype(jnp.float32), grad_sum, grads)
      aux = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), aux)
      return (grad_sum, extra), (w * value.astype(jnp.float32), w, aux)

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (grad_sum, extra), (losses, weights, aux) = jax.lax.scan(
        body, (zeros, extra), (jnp.arange(k), _micro_batches(batch, k)))
    # weights are counts, so a positive sum is >= 1, as under the losses' max(sum(w), 1)
    norm = jnp.where(jnp.sum(weights) > 0, jnp.sum(weights), 1.0)
    grads = jax.tree.map(lambda s, p: (s / norm).astype(p.dtype), grad_sum, params)
    aux = {name: jnp.sum(v, 0) if name in SUMMED_METRICS else jnp.mean(v, 0)
           for name, v in aux.items()}
    return jnp.sum(losses) / norm, aux, extra, grads

  def train_step(state: ts.TrainState, batch: Batch):
    rng = jax.random.fold_in(state.rng, state.step)
    if k == 1:
      (loss_value, (aux, extra, _)), grads = grad_fn(state.params, batch, rng, state.extra)
    else:
      loss_value, aux, extra, grads = accumulate(state.params, batch, rng, state.extra)
    if nan_at_step:
      poison = jnp.where(state.step + 1 == nan_at_step, jnp.nan, 1.0)
      grads = jax.tree.map(lambda g: g * poison.astype(g.dtype), grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss_value, "grad_norm": optim.global_norm(grads),
               "param_norm": optim.global_norm(params), "lr": schedule(state.step), **aux}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         extra=extra), metrics
  return train_step


def jit_train_step(task: Task, tx, schedule, shardings, mesh, nan_at_step: int = 0,
                   grad_accum_steps: int = 1):
  """The train step jitted with the state's shardings, batch rows over ('data', 'fsdp') and
  the state donated (updated in place). Lower it under `jax.set_mesh(mesh)` and the rules."""
  step_fn = make_train_step(task, tx, schedule, nan_at_step, grad_accum_steps)
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


# Steps the host may dispatch ahead of the device (each holds its batch on the device).
STEPS_AHEAD = 2


def fetch_metrics(steps: list[dict]) -> list[dict[str, float]]:
  """Device metrics of several steps -> host floats, in one `jax.device_get` (the loop's only
  device-to-host transfer of training metrics; tests count its calls)."""
  return [{k: float(v) for k, v in row.items()} for row in jax.device_get(steps)]


class Profile:
  """`config.profile_steps = (start, count)`: a jax.profiler trace of steps start ..
  start + count - 1 in WORKDIR/plugins/profile/<run>/ (TensorBoard's profile plugin reads it:
  `tensorboard --logdir WORKDIR`). (0, 0) or count 0: off. Every process writes its own
  host's trace."""

  def __init__(self, steps, workdir: str):
    try:
      start, count = (int(x) for x in steps)
    except (TypeError, ValueError):
      raise ValueError(f"config key 'profile_steps' must be (start, count), got {steps!r}") from None
    if count < 0 or (count and start < 1):
      raise ValueError(f"config key 'profile_steps' = {steps!r}: start must be >= 1 (steps "
                       "count from 1) and count >= 0")
    self.start, self.stop, self.workdir, self.active = start, start + count, workdir, False

  def before(self, step: int) -> None:
    if step == self.start and self.stop > self.start:
      jax.profiler.start_trace(os.fspath(self.workdir))
      self.active = True
      logging.info("Profiling steps %d-%d into %s/plugins/profile", self.start, self.stop - 1,
                   self.workdir)

  def after(self, step: int, state) -> None:
    if self.active and step == self.stop - 1:
      self.close(state)

  def close(self, state=None) -> None:
    if self.active:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.active = False


def train(config, workdir: str, task: Task, devices=None) -> dict[str, float]:
  """Trains until `config.total_steps`, resuming from `workdir` if it holds a checkpoint.

  Returns the last logged metrics. Raises NonFiniteLossError if the loss or
  the gradient norm becomes NaN/Inf (the last good checkpoint is kept).
  """
  with _Preemption() as preemption:
    return _train(config, workdir, task, devices, preemption)


def _train(config, workdir, task, devices, preemption) -> dict[str, float]:
  logging.info("Config:\n%s", config)
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
  elif task.eval_data is None:
    logging.info("No validation: the config names no eval data (data.eval, or "
                 "data.datasets.NAME.eval for 4M)")
  else:
    logging.info("No validation: eval_every is 0")
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
                          int(debug.get("nan_at_step", 0) or 0),
                          config.optimizer.get("grad_accum_steps", 1))
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
      weights = 0.0
      for batch in eval_batches:
        loss, aux = eval_step(state.params, state.extra, shard(batch))
        aux = dict(aux)
        # a loss that is a ratio of sums (LOSS_WEIGHT = its denominator) is averaged as one
        weight = float(aux.pop(LOSS_WEIGHT, 1.0))
        sums["loss"] = sums.get("loss", 0.0) + float(loss) * weight
        weights += weight
        for k, v in aux.items():
          sums[k] = sums.get(k, 0.0) + float(v)
        n += 1
    out = {f"eval/{k}": v / max(n, 1) for k, v in sums.items() if k != "loss"}
    return {"eval/loss": sums.get("loss", 0.0) / max(weights, 1e-12), **out}

  # ---- the loop ----
  progress = periodic_actions.ReportProgress(   # logs steps/s and ETA
      num_train_steps=config.total_steps, every_steps=config.log_every)
  last: dict[str, float] = {}
  # (step, device metrics) of the steps dispatched since the last fetch: fetched together
  # (one device-to-host transfer) at log, eval and checkpoint steps only, so the host
  # dispatches ahead of the device instead of waiting for every step's loss.
  queued: list[tuple[int, dict]] = []
  window = {"step": start_step, "time": time.perf_counter(), "invalid": 0.0}
  extra_row = {"perf/compile_s": compile_s}
  crash_at = int(debug.get("crash_at_step", 0) or 0)
  if debug.get("crash_process", -1) not in (-1, jax.process_index()):
    crash_at = 0
  profile = Profile(config.get("profile_steps", (0, 0)), workdir)

  def fetch(log_now: bool) -> dict[str, float] | None:
    """Fetches the queued steps' metrics, raises on a non-finite loss or gradient norm at
    any of them, and returns the last step's row to log (None unless log_now)."""
    rows = fetch_metrics([m for _, m in queued])
    steps = [s for s, _ in queued]
    queued.clear()
    for step, host in zip(steps, rows):
      window["invalid"] += host.get("data/invalid", 0.0)
      for key in ("loss", "grad_norm"):
        if not math.isfinite(host[key]):
          ckpt.wait_until_finished()
          raise NonFiniteLossError(
              f"{key} is {host[key]} at step {step} (loss {host['loss']}); stopping. The last "
              f"good checkpoint is step {ckpt.latest_step()} in {ckpt.directory} (lower "
              "optimizer.lr or raise optimizer.warmup_steps, then restart from it).")
    if not log_now or not rows:
      return None
    step, host = steps[-1], rows[-1]
    now = time.perf_counter()
    n = step - window["step"]
    if n > 0:
      dt = (now - window["time"]) / n
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
      profile.before(step)
      state, dev_metrics = compiled(state, shard(batch))
      batch = None
      queued.append((step, dev_metrics))
      if len(queued) > STEPS_AHEAD:   # bounded run-ahead: wait (no transfer) for an old step
        jax.block_until_ready(queued[-1 - STEPS_AHEAD][1]["loss"])
      profile.after(step, state)
      progress(step)
      log_now = step % config.log_every == 0 or step == config.total_steps
      do_eval = eval_step is not None and step % config.eval_every == 0
      stop = preemption.requested or ckpt.reached_preemption(step)
      do_save = step % config.checkpoint_every == 0 or step == config.total_steps or stop
      if log_now or do_eval or do_save:
        # Never checkpoint a state produced from a non-finite loss or gradient.
        row = fetch(log_now)
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
    if queued:
      log(queued[-1][0], fetch(True))
    profile.close(state)
  ckpt.wait_until_finished()
  ckpt.close()
  writer.flush()
  logging.info("Finished at step %d; final loss %.6f", int(state.step), last.get("loss", float("nan")))
  return last
