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


class JsonlWriter(interface.MetricWriter):
  """Appends scalars as one JSON line per step."""

  def __init__(self, path: str):
    self._path = path
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    self._file = open(path, "a", encoding="utf-8")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    row = {"step": int(step)}
    row.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    self._file.write(json.dumps(row) + "\n")
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
    self._file.flush()

  def close(self):
    self._file.close()


def create_writer(workdir: str) -> interface.MetricWriter:
  """TensorBoard + logging on process 0 (plus metrics.jsonl); logging elsewhere."""
  if jax.process_index() != 0:
    return metric_writers.create_default_writer(workdir, just_logging=True)
  return metric_writers.MultiWriter([
      metric_writers.create_default_writer(workdir, asynchronous=False),
      JsonlWriter(os.path.join(workdir, "metrics.jsonl")),
  ])


def read_jsonl(path: str) -> dict[int, dict[str, float]]:
  """{step: merged row} from a metrics.jsonl; for a key logged twice at one
  step (a step redone after a resume), the later line wins."""
  rows: dict[int, dict[str, float]] = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      if line.strip():
        row = json.loads(line)
        rows.setdefault(row["step"], {}).update(row)
  return rows
