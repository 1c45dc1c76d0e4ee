"""Remote workdirs: every user path goes through etils.epath (pretrain_jax/paths.py).

etils.epath (1.15) routes only gs://, s3://, az:// and hf:// URLs to other backends (no
fsspec `memory://`), and sends gs:// to TensorFlow's gfile when TF is installed. So the
`fake_gcs` fixture mocks the remote backend: epath is told TF is absent, which sends gs://
to its fsspec backend, and fsspec's 'gcs' protocol is an in-memory filesystem. The code
under test then sees real `gs://bucket/...` strings.
"""
import json
import os

import numpy as np
import pytest

from pretrain_jax import checkpoint, export, metrics as metrics_lib, paths
from pretrain_jax.data import schema as schema_lib, sources


@pytest.fixture
def fake_gcs(monkeypatch):
  """gs:// backed by an in-memory fsspec filesystem (emptied afterwards); yields its store."""
  import importlib
  from etils.epath import backend, gpath
  from fsspec.implementations.memory import MemoryFileSystem

  class FakeGcs(MemoryFileSystem):
    protocol = ("gs", "gcs")
    store: dict = {}
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path):
      path = str(path)
      return super()._strip_protocol(path[len("gs://"):] if path.startswith("gs://") else path)

  registry = importlib.import_module("fsspec.registry")._registry   # restored by monkeypatch
  monkeypatch.setitem(registry, "gcs", FakeGcs)
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  backend.fsspec_backend._get_filesystem.cache_clear()
  try:
    yield FakeGcs.store
  finally:
    FakeGcs.store.clear()
    backend.fsspec_backend._get_filesystem.cache_clear()


def _text(store, path):
  return store["/" + path[len("gs://"):]].getvalue().decode()


def test_remote_metrics_are_appended_as_segments_never_rewritten(fake_gcs):
  path = "gs://bucket/run/metrics.jsonl"
  w = metrics_lib.JsonlWriter(path, flush_every_s=1e9)
  w.write_scalars(1, {"loss": 3.0})
  w.write_scalars(2, {"loss": 2.0})
  assert not [k for k in fake_gcs if "metrics" in k]          # buffered until a flush
  w.flush()
  first = _text(fake_gcs, "gs://bucket/run/metrics-00000.jsonl")
  assert [json.loads(l)["step"] for l in first.splitlines()] == [1, 2]
  w.write_scalars(3, {"loss": 1.0})
  w.close()
  assert _text(fake_gcs, "gs://bucket/run/metrics-00000.jsonl") == first   # untouched
  # a resumed run redoes step 3: a new segment after the last, whose line wins
  w = metrics_lib.JsonlWriter(path, flush_every_s=0)
  w.write_scalars(3, {"loss": 0.5, "lr": 0.1})
  assert "/bucket/run/metrics-00002.jsonl" in fake_gcs        # flush_every_s=0: at once
  rows = metrics_lib.read_jsonl(path)
  assert rows == {1: {"step": 1, "loss": 3.0}, 2: {"step": 2, "loss": 2.0},
                  3: {"step": 3, "loss": 0.5, "lr": 0.1}}
  assert [n for n, _ in metrics_lib.segments(path)] == [0, 1, 2]


def test_local_metrics_stay_one_appended_file(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  for step, loss in ((1, 2.0), (1, 1.0)):      # a resumed run appends to the same file
    w = metrics_lib.JsonlWriter(path)
    w.write_scalars(step, {"loss": loss})
    w.close()
  assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]
  assert metrics_lib.read_jsonl(path) == {1: {"step": 1, "loss": 1.0}}
  with pytest.raises(FileNotFoundError, match="no metrics log"):
    metrics_lib.read_jsonl(str(tmp_path / "other" / "metrics.jsonl"))


def test_remote_data_globs_and_missing_paths_name_the_key(fake_gcs):
  for name in ("b-1.array_record", "a-0.array_record", "notes.txt"):
    paths.write_text(f"gs://bucket/data/{name}", "x")
  assert sources.expand("gs://bucket/data/*.array_record", "data.train") == [
      "gs://bucket/data/a-0.array_record", "gs://bucket/data/b-1.array_record"]
  assert sources.expand("gs://bucket/data/notes.txt") == ["gs://bucket/data/notes.txt"]
  with pytest.raises(FileNotFoundError, match=r"config key 'data.train': no files match "
                                              r"gs://bucket/data/\*\.tar"):
    sources.expand("gs://bucket/data/*.tar", "data.train")
  with pytest.raises(FileNotFoundError, match="config key 'data.eval': path not found: "
                                              "gs://bucket/nope.array_record"):
    sources.expand("gs://bucket/nope.array_record", "data.eval")


def test_remote_checkpoint_listing_schema_and_exports(fake_gcs, tmp_path):
  for d in ("100", "200", "300.orbax-checkpoint-tmp-1"):
    paths.write_text(f"gs://bucket/run/checkpoints/{d}/state/_METADATA", "{}")
  assert checkpoint.state_dir("gs://bucket/run") == "gs://bucket/run/checkpoints/200/state"
  with pytest.raises(FileNotFoundError, match="available: \\[100, 200\\]"):
    checkpoint.state_dir("gs://bucket/run", 300)
  schema = {"image": schema_lib.FieldSpec("image"),
            "depth": schema_lib.FieldSpec("array", "float16", (8, 8))}
  schema_lib.write_schema("gs://bucket/shards", schema)
  assert schema_lib.read_schema("gs://bucket/shards") == schema
  params = {"a": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}}
  export.save_safetensors(params, "gs://bucket/run/params.safetensors", {"model": {"w": 3}})
  loaded, cfg = export.load_safetensors("gs://bucket/run/params.safetensors")
  np.testing.assert_array_equal(loaded["a"]["w"], params["a"]["w"])
  assert cfg == {"model": {"w": 3}}
  staging = paths.staging_path("gs://bucket/out/shard.array_record")
  assert not paths.is_remote(staging)                         # written locally, then uploaded
  with open(staging, "wb") as f:
    f.write(b"shard")
  paths.publish(staging, "gs://bucket/out/shard.array_record")
  assert not os.path.exists(staging)
  assert fake_gcs["/bucket/out/shard.array_record"].getvalue() == b"shard"


def test_local_paths_resolve_to_absolute_and_publish_atomically(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  os.makedirs("run/checkpoints/5/state")
  assert checkpoint.state_dir("run") == str(tmp_path / "run" / "checkpoints" / "5" / "state")
  assert paths.resolve("gs://b/x") == "gs://b/x" and paths.resolve("x") == str(tmp_path / "x")
  assert paths.staging_path("out.bin") == "out.bin.tmp"
  with open("out.bin.tmp", "wb") as f:
    f.write(b"1")
  paths.publish("out.bin.tmp", "out.bin")
  assert sorted(os.listdir(".")) == ["out.bin", "run"]
