"""Metric writers: clu's TensorBoard + console writers plus WORKDIR/metrics.jsonl.

Each logged step is one JSON object on one line (`{"step": 10, "loss": 0.52,
...}`). Lines are only ever added, never rewritten, so a resumed run continues
the same log (steps redone after a resume appear again; the later line is
the one that counts):

  local workdir     WORKDIR/metrics.jsonl, appended to and flushed per line.
  object store      (gs://..., which cannot append) lines are buffered and
                    written as numbered segments WORKDIR/metrics-00000.jsonl,
                    metrics-00001.jsonl, ... one per flush: at every
                    `flush()` (the loop flushes at each checkpoint and at the
                    end), at `close()`, and when `flush_every_s` seconds have
                    passed since the last segment. A resumed run starts after
                    the highest existing segment.

`read_jsonl(WORKDIR/metrics.jsonl)` reads either layout (the plain file
first, then the segments in number order) and merges rows per step.
"""
from __future__ import annotations

import json
import os
import re
import time
from typing import Any, Mapping

import jax
import numpy as np
from clu import metric_writers
from clu.metric_writers import interface
from etils import epath

from pretrain_jax import paths


class JsonlWriter(interface.MetricWriter):
  """Writes scalars as one JSON line per `write_scalars` call (layouts: module docstring)."""

  def __init__(self, path: str, flush_every_s: float = 300.0):
    self._path = epath.Path(path)
    self._path.parent.mkdir(parents=True, exist_ok=True)
    self._remote = paths.is_remote(path)
    self._flush_every_s = flush_every_s
    self._lines: list[str] = []
    self._file = None
    if self._remote:
      done = segments(path)
      self._next = done[-1][0] + 1 if done else 0
      self._last_flush = time.monotonic()
    else:
      self._file = open(path, "a", encoding="utf-8")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    row = {"step": int(step)}
    row.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    line = json.dumps(row) + "\n"
    if self._remote:
      self._lines.append(line)
      if time.monotonic() - self._last_flush >= self._flush_every_s:
        self.flush()
    else:
      self._file.write(line)
      self._file.flush()

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_pointcloud(self, step, point_clouds, *, point_colors=None, configs=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    if self._file:
      self._file.flush()
    elif self._lines:   # a new segment object; earlier ones are never touched
      segment = self._path.parent / f"{self._path.stem}-{self._next:05d}{self._path.suffix}"
      segment.write_text("".join(self._lines))
      self._next += 1
      self._lines = []
    self._last_flush = time.monotonic()

  def close(self):
    self.flush()
    if self._file:
      self._file.close()
      self._file = None


def create_writer(workdir: str) -> interface.MetricWriter:
  """TensorBoard + logging on process 0 (plus metrics.jsonl); logging elsewhere."""
  if jax.process_index() != 0:
    return metric_writers.create_default_writer(workdir, just_logging=True)
  return metric_writers.MultiWriter([
      metric_writers.create_default_writer(workdir, asynchronous=False),
      JsonlWriter(os.fspath(epath.Path(workdir) / "metrics.jsonl")),
  ])


def segments(path: str) -> list[tuple[int, str]]:
  """[(number, path)] of the segments of a metrics.jsonl on an object store
  (`metrics-00000.jsonl`, ...: see the module docstring), in number order."""
  p = epath.Path(path)
  pattern = re.compile(re.escape(p.stem) + r"-(\d+)" + re.escape(p.suffix) + "$")
  found = []
  for child in p.parent.glob(f"{p.stem}-*{p.suffix}"):
    m = pattern.match(child.name)
    if m:
      found.append((int(m.group(1)), os.fspath(child)))
  return sorted(found)


def read_jsonl(path: str) -> dict[int, dict[str, float]]:
  """{step: merged row} from a metrics.jsonl and/or its segments (module docstring); for a
  key logged twice at one step (a step redone after a resume), the later line wins."""
  files = [path] if epath.Path(path).exists() else []
  files += [f for _, f in segments(path)]
  if not files:
    raise FileNotFoundError(f"no metrics log {path} (nor segments of it)")
  rows: dict[int, dict[str, float]] = {}
  for name in files:
    with epath.Path(name).open() as f:
      for line in f:
        if line.strip():
          row = json.loads(line)
          rows.setdefault(row["step"], {}).update(row)
  return rows
