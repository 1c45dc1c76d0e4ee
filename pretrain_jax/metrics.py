"""Metric writers: clu's TensorBoard + console writers plus WORKDIR/metrics.jsonl.

metrics.jsonl holds one JSON object per logged step (`{"step": 10, "loss":
0.52, ...}`); it is appended to, so a resumed run continues the same file
(steps redone after a resume appear again, the later line is the one that
counts).
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np
from clu import metric_writers
from clu.metric_writers import interface
from etils import epath


class JsonlWriter(interface.MetricWriter):
  """Writes scalars as one JSON line per `write_scalars` call.

  Local files are appended to and flushed at once; object-store paths
  (gs://...), which cannot be appended to, are rewritten whole each time.
  """

  def __init__(self, path: str):
    self._path = epath.Path(path)
    self._path.parent.mkdir(parents=True, exist_ok=True)
    self._remote = "://" in str(path)
    self._lines: list[str] = []
    if self._remote:
      self._lines = self._path.read_text().splitlines(keepends=True) if self._path.exists() else []
      self._file = None
    else:
      self._file = open(path, "a", encoding="utf-8")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    row = {"step": int(step)}
    row.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    line = json.dumps(row) + "\n"
    if self._remote:
      self._lines.append(line)
      self._path.write_text("".join(self._lines))
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

  def close(self):
    if self._file:
      self._file.close()


def create_writer(workdir: str) -> interface.MetricWriter:
  """TensorBoard + logging on process 0 (plus metrics.jsonl); logging elsewhere."""
  if jax.process_index() != 0:
    return metric_writers.create_default_writer(workdir, just_logging=True)
  return metric_writers.MultiWriter([
      metric_writers.create_default_writer(workdir, asynchronous=False),
      JsonlWriter(os.fspath(epath.Path(workdir) / "metrics.jsonl")),
  ])


def read_jsonl(path: str) -> dict[int, dict[str, float]]:
  """{step: merged row} from a metrics.jsonl; for a key logged twice at one
  step (a step redone after a resume), the later line wins."""
  rows: dict[int, dict[str, float]] = {}
  with epath.Path(path).open() as f:
    for line in f:
      if line.strip():
        row = json.loads(line)
        rows.setdefault(row["step"], {}).update(row)
  return rows
