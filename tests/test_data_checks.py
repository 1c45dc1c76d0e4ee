"""Data sources are checked at start: missing paths, empty globs, empty keys and eval sets
smaller than one global batch fail before the first step, naming the config key."""
import re
import subprocess
import sys
import time

import pytest
from array_record.python import array_record_module as arm

from conftest import ROOT, load_config, subprocess_env
from pretrain_jax.data import pipeline, schema as schema_lib
from pretrain_jax.data.errors import DataError

FULL_SIZE = [("configs/aim/pretrain.py", f"variant={v}") for v in ("0.6B", "1B", "3B", "7B")] + [
    ("configs/tokenizers/vqvae.py", "modality=rgb,variant=B16"),
    ("configs/tokenizers/diffusion.py", "modality=rgb,variant=B16"),
    ("configs/tokenizers/mlp_vae.py", "target=pose,variant=paper"),
    ("configs/tokenizers/mlp_vae.py", "target=global,variant=paper")]


def aim_data(train="scenes:64", **overrides):
  data = load_config("configs/aim/pretrain.py", "variant=tiny").data
  data.train, data.image_size, data.threads = train, 16, 1
  for key, value in overrides.items():
    data[key] = value
  return data


def test_missing_path_names_the_key_and_the_path(tmp_path):
  path = str(tmp_path / "missing.array_record")
  with pytest.raises(FileNotFoundError,
                     match=re.escape(f"config key 'data.train': path not found: {path}")):
    pipeline.train_dataset(aim_data(f"arrayrecord:{path}"), 4, 0)
  with pytest.raises(FileNotFoundError, match=r"config key 'data.eval': image folder not found"):
    pipeline.eval_batches(aim_data(eval=f"folder:{tmp_path}/nope"), 4, 1)


def test_empty_glob_names_the_key_and_the_glob(tmp_path):
  pattern = f"{tmp_path}/x/*.array_record"
  with pytest.raises(FileNotFoundError,
                     match=re.escape(f"config key 'data.train': no files match {pattern}")):
    pipeline.train_dataset(aim_data(f"arrayrecord:{pattern}"), 4, 0)
  with pytest.raises(FileNotFoundError, match=r"config key 'data.train': no files match .*\.tar"):
    pipeline.train_dataset(aim_data(f"webdataset:{tmp_path}"), 4, 0)
  with pytest.raises(ValueError, match=r"config key 'data.train': 'arrayrecord:' names no path"):
    pipeline.train_dataset(aim_data("arrayrecord:"), 4, 0)


def test_aim_eval_set_smaller_than_a_batch_names_the_key():
  with pytest.raises(ValueError, match=r"config key 'data.eval' \('scenes:8'\) has 8 examples, "
                                       r"fewer than one global batch of 16"):
    pipeline.eval_batches(aim_data(eval="scenes:8"), 16, 1)


@pytest.mark.parametrize("path,arg", FULL_SIZE)
def test_full_size_variants_have_no_toy_data(path, arg):
  cfg = load_config(path, arg)
  assert cfg.data.train == "" and cfg.data.eval == ""


def test_full_size_variants_stop_at_start_saying_what_to_set():
  from aimjax import train as aim_train
  from fourm_jax import train as fourm_train
  from tokenizers_jax import train as tok_train
  with pytest.raises(ValueError, match=r"config key 'data.train' is empty: the 1B variant"):
    aim_train.check_data(load_config("configs/aim/pretrain.py", "variant=1B"))
  aim_train.check_data(load_config("configs/aim/pretrain.py", "variant=tiny"))
  for variant in ("4m7_B", "sr_L"):
    with pytest.raises(ValueError, match=r"config key 'data.datasets.cc12m.train' is empty: "
                                         rf"the {variant} variant"):
      fourm_train.check_data(load_config("configs/fourm/pretrain.py", f"variant={variant}"))
  with pytest.raises(ValueError, match=r"config keys .*'data.datasets.c4.train'.*"
                                       r"'data.datasets.coyo.train' are empty"):
    fourm_train.check_data(load_config("configs/fourm/pretrain.py", "variant=4m21_XL"))
  with pytest.raises(ValueError, match=r"config key 'data.train' is empty: the B16 variant"):
    tok_train.check_data(load_config("configs/tokenizers/vqvae.py", "modality=depth,variant=B16"))


def test_aim_full_size_cli_exits_at_once_naming_data_train(tmp_path):
  t0 = time.perf_counter()
  proc = subprocess.run(
      [sys.executable, "-m", "aimjax.train", "--config=configs/aim/pretrain.py:variant=0.6B",
       f"--workdir={tmp_path}/w"], cwd=ROOT, env=subprocess_env(JAX_PLATFORMS="cpu"),
      capture_output=True, text=True, timeout=60)
  assert proc.returncode != 0, proc.stdout + proc.stderr
  assert "config key 'data.train' is empty: the 0.6B variant" in proc.stderr, proc.stderr[-2000:]
  assert "--config.data.train=" in proc.stderr
  assert time.perf_counter() - t0 < 60


def test_tokenizer_eval_set_smaller_than_a_batch_names_the_key():
  from tokenizers_jax import train as tok_train
  cfg = load_config("configs/tokenizers/vqvae.py", "modality=depth,variant=tiny")
  cfg.data.eval = "scenes:8"
  task = tok_train.build_task(cfg)
  with pytest.raises(ValueError, match=r"config key 'data.eval' \('scenes:8'\) has 8 examples, "
                                       r"fewer than one global batch of 32"):
    task.eval_data(tuple(range(cfg.batch_size)))
  cfg.data.eval = ""
  assert tok_train.build_task(cfg).eval_data is None      # no eval set: no evaluation


def _unreadable_token_shard(directory, n: int) -> str:
  """n records that fail to decode, beside a schema with the tiny 4M config's fields."""
  directory.mkdir()
  schema_lib.write_schema(str(directory), {
      "image": schema_lib.FieldSpec("image"),
      "tok_rgb": schema_lib.FieldSpec("array", "int32", (4, 4)),
      "tok_depth": schema_lib.FieldSpec("array", "int32", (4, 4)),
      "tok_aim_global": schema_lib.FieldSpec("array", "int32", (16,)),
      "caption": schema_lib.FieldSpec("array", "int32", (None,))})
  writer = arm.ArrayRecordWriter(str(directory / "shard.array_record"), "group_size:1")
  for _ in range(n):
    writer.write(b"not a record")
  writer.close()
  return f"{directory}/*.array_record"


def test_fourm_eval_is_checked_at_construction_and_read_lazily(tmp_path):
  from fourm_jax import train as fourm_train
  cfg = load_config("configs/fourm/pretrain.py", "variant=tiny")
  cfg.data.datasets.scenes.train = _unreadable_token_shard(tmp_path / "train", 40)
  rows = tuple(range(cfg.batch_size))
  cfg.data.datasets.scenes.eval = _unreadable_token_shard(tmp_path / "small", 8)
  with pytest.raises(ValueError, match=r"config key 'data.datasets.scenes.eval' \('.*small/\*"
                                       r"\.array_record'\) has 8 examples, fewer than one "
                                       r"global batch of 32"):
    fourm_train.build_task(cfg).eval_data(rows)
  cfg.data.datasets.scenes.eval = f"{tmp_path}/none/*.array_record"
  with pytest.raises(FileNotFoundError,
                     match=r"config key 'data.datasets.scenes.eval': no files match .*none"):
    fourm_train.build_task(cfg).eval_data(rows)
  # big enough: building reads no record (these would fail to decode), iterating does
  cfg.data.datasets.scenes.eval = cfg.data.datasets.scenes.train
  batches = fourm_train.build_task(cfg).eval_data(rows)
  assert len(batches) == 1
  with pytest.raises(DataError, match=r"shard\.array_record\[\d+\]"):
    next(iter(batches))


def test_chain_is_lazy_and_iterates_its_parts_in_order():
  reads = []

  class Part:
    def __init__(self, name, n):
      self.name, self.n = name, n

    def __len__(self):
      return self.n

    def __getitem__(self, i):
      if not 0 <= i < self.n:
        raise IndexError(i)
      reads.append((self.name, i))
      return (self.name, i)

  chain = pipeline.Chain([Part("a", 2), Part("b", 3)])
  assert reads == [] and len(chain) == 5
  assert list(chain) == [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("b", 2)]
  assert list(chain) == list(chain)             # iterable again (one per evaluation)
  assert chain[2] == ("b", 0) and chain[-1] == ("b", 2)


def _records_with_a_bad_image(path, n: int, bad: int) -> str:
  """n AIM records whose record `bad` holds bytes that are no image under `image`."""
  import numpy as np
  from pretrain_jax.data import records
  writer = arm.ArrayRecordWriter(str(path), "group_size:1")
  for i in range(n):
    image = (b"\x89PNG not really" if i == bad
             else np.full((8, 8, 3), i, np.uint8))
    writer.write(records.encode_record({"image": image, "label": i}))
  writer.close()
  return str(path)


def test_an_undecodable_image_is_named_by_shard_and_index_not_by_a_buffer_address(tmp_path):
  shard = _records_with_a_bad_image(tmp_path / "bad.array_record", 8, bad=3)
  with pytest.raises(DataError) as info:
    it = iter(pipeline.train_dataset(aim_data(f"arrayrecord:{shard}"), 4, 0))
    next(it), next(it)
  message = str(info.value)
  assert f"{shard}[3]" in message and "object at 0x" not in message, message
  assert "no format PIL reads" in message and "starting b'\\x89PNG not'" in message


def test_an_undecodable_image_file_is_named_by_its_path(tmp_path):
  folder = tmp_path / "images"
  folder.mkdir()
  (folder / "broken.png").write_bytes(b"not a png")
  with pytest.raises(DataError) as info:
    next(iter(pipeline.train_dataset(aim_data(f"folder:{folder}"), 1, 0)))
  message = str(info.value)
  assert f"{folder / 'broken.png'}" in message and "object at 0x" not in message, message


def test_an_undecodable_image_field_of_a_multimodal_shard_is_named_too(tmp_path):
  from pretrain_jax.data import multimodal
  shard = _records_with_a_bad_image(tmp_path / "mm.array_record", 2, bad=1)
  decode = multimodal.DecodeModalities({"image": schema_lib.FieldSpec("image")}, ["image"])
  reader = arm.ArrayRecordReader(shard)
  payload = reader.read([1])[0]
  reader.close()
  with pytest.raises(DataError) as info:
    decode.map((f"{shard}[1]", payload))
  message = str(info.value)
  assert f"{shard}[1]" in message and "object at 0x" not in message, message
