"""Tests for the data layer: record format, make_scenes shards, sources, pipeline, transforms."""
import importlib.util
import os
import pathlib
import subprocess
import sys

import msgpack
import numpy as np
import pytest
from array_record.python import array_record_module as arm
from PIL import Image

from pretrain_jax.data import make_scenes, pipeline, records, sources, transforms
from pretrain_jax.data.errors import DataError
from pretrain_jax.data.scenes import render_scene

REPO = pathlib.Path(__file__).resolve().parents[1]
RES = 32          # rendered scene size in these tests
SIZE = 16         # crop size the pipeline produces
NUM_SCENES = 24   # scenes in the shared shard set: 6 batches of 4 = one epoch


def data_config(train: str, **overrides):
  """The tiny AIM config's data section, reading `train`, with small images."""
  spec = importlib.util.spec_from_file_location("aim_pretrain_config",
                                                REPO / "configs" / "aim" / "pretrain.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  data = module.get_config("variant=tiny").data
  data.train, data.image_size, data.threads = train, SIZE, 1
  for key, value in overrides.items():
    data[key] = value
  return data


def take(data_cfg, batch_size: int, n: int, seed: int = 0) -> list[dict]:
  it = iter(pipeline.train_dataset(data_cfg, batch_size, seed))
  return [next(it) for _ in range(n)]


def write_shard(path, payloads: list[bytes]) -> str:
  writer = arm.ArrayRecordWriter(str(path), "group_size:1")
  for p in payloads:
    writer.write(p)
  writer.close()
  return str(path)


def small_record(label: int, rng: np.random.Generator, size: int = 8) -> bytes:
  return records.encode_record({"image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
                                "label": label})


def read_all(path: str) -> list[bytes]:
  reader = arm.ArrayRecordReader(path)
  try:
    return list(reader.read_all())
  finally:
    reader.close()


@pytest.fixture(scope="module")
def scene_shards(tmp_path_factory) -> tuple[str, list[str]]:
  """NUM_SCENES scenes at RES px in 3 shards; returns (glob, shard paths)."""
  out = tmp_path_factory.mktemp("scenes")
  paths = make_scenes.write_scenes(str(out), NUM_SCENES, seed=0, resolution=RES, shards=3)
  return os.path.join(str(out), "scenes-*.array_record"), paths


# --- record format -------------------------------------------------------------------------

def test_record_round_trip_keeps_every_scene_field():
  s = render_scene(0, 1, RES)
  sample = {k: s[k] for k in ("depth", "normals", "semantic", "instance", "boxes", "box_classes",
                              "caption", "label")}
  decoded = records.decode_record(records.encode_record({"image": s["rgb"], **sample}))
  assert isinstance(decoded["image"], bytes)   # stays encoded until decode_image
  np.testing.assert_array_equal(records.decode_image(decoded["image"]), s["rgb"])
  for key in ("depth", "normals", "semantic", "instance", "boxes", "box_classes"):
    assert decoded[key].dtype == s[key].dtype and decoded[key].shape == s[key].shape, key
    np.testing.assert_array_equal(decoded[key], s[key], err_msg=key)
  assert decoded["caption"] == s["caption"]
  assert decoded["label"] == int(s["label"]) and isinstance(decoded["label"], int)


# --- make_scenes -------------------------------------------------------------------------------

def test_make_scenes_writes_the_documented_schema_in_render_order(scene_shards):
  pattern, paths = scene_shards
  assert [os.path.basename(p) for p in paths] == [
      f"scenes-{i:05d}-of-00003.array_record" for i in range(3)]
  assert [len(read_all(p)) for p in paths] == [8, 8, 8]
  source = sources.ArrayRecordSource(pattern)
  assert len(source) == NUM_SCENES and source.paths == paths
  labels = [int(source.decode(source[i][1])["label"]) for i in range(NUM_SCENES)]
  assert labels == [int(render_scene(0, i, RES)["label"]) for i in range(NUM_SCENES)]

  record = records.decode_record(read_all(paths[1])[2])   # global index 10
  scene = render_scene(0, 10, RES)
  assert set(record) == {"image", "depth", "normals", "semantic", "instance", "boxes",
                         "box_classes", "caption", "label"}
  np.testing.assert_array_equal(records.decode_image(record["image"]), scene["rgb"])
  assert record["depth"].dtype == np.float16 and record["normals"].dtype == np.float16
  np.testing.assert_allclose(record["depth"], scene["depth"], rtol=1e-3)
  np.testing.assert_allclose(record["normals"], scene["normals"], atol=1e-3)
  np.testing.assert_array_equal(record["instance"], scene["instance"])
  np.testing.assert_array_equal(record["boxes"], scene["boxes"])
  assert record["caption"] == scene["caption"]


def test_locate_maps_a_global_index_to_its_shard_and_local_index(scene_shards):
  pattern, paths = scene_shards
  source = sources.ArrayRecordSource(pattern)
  assert source.locate(0) == (paths[0], 0)
  assert source.locate(7) == (paths[0], 7)
  assert source.locate(8) == (paths[1], 0)
  assert source.locate(23) == (paths[2], 7)
  assert source[13][0] == f"{paths[1]}[5]"


def test_make_scenes_splits_uneven_counts_and_defaults_to_1000_per_shard(tmp_path):
  paths = make_scenes.write_scenes(str(tmp_path / "a"), 10, resolution=8, shards=3)
  assert [len(read_all(p)) for p in paths] == [3, 3, 4]
  assert make_scenes.shard_range(2, 2500, 3) == range(1666, 2500)
  assert len(make_scenes.write_scenes(str(tmp_path / "b"), 3, resolution=8)) == 1
  assert os.path.basename(make_scenes.shard_path("x", 0, 3)) == "scenes-00000-of-00003.array_record"


def test_make_scenes_crash_leaves_no_partial_shard_and_rerun_completes_it(tmp_path, capsys,
                                                                          monkeypatch):
  out = str(tmp_path)
  render = make_scenes.scene_record

  def crash_at_4(seed, index, resolution):   # the process dies half-way through shard 2
    if index == 4:
      raise KeyboardInterrupt
    return render(seed, index, resolution)

  monkeypatch.setattr(make_scenes, "scene_record", crash_at_4)
  with pytest.raises(KeyboardInterrupt):
    make_scenes.write_scenes(out, 6, resolution=8, shards=3)
  paths = [make_scenes.shard_path(out, i, 3) for i in range(3)]
  assert os.path.exists(paths[1]) and not os.path.exists(paths[2])
  assert os.path.exists(paths[2] + ".tmp")   # the partial shard never got its final name
  inodes = [os.stat(p).st_ino for p in paths[:2]]

  monkeypatch.setattr(make_scenes, "scene_record", render)
  capsys.readouterr()
  assert make_scenes.write_scenes(out, 6, resolution=8, shards=3) == paths
  assert "wrote 2 of 6 records (4 already present)" in capsys.readouterr().out
  assert [os.stat(p).st_ino for p in paths[:2]] == inodes   # finished shards were not rewritten
  assert sorted(os.listdir(out)) == sorted(os.path.basename(p) for p in paths)   # no .tmp left
  fresh = make_scenes.write_scenes(str(tmp_path / "fresh"), 6, resolution=8, shards=3)
  assert [read_all(p) for p in paths] == [read_all(p) for p in fresh]


def test_make_scenes_refuses_to_reuse_a_shard_written_with_other_settings(tmp_path):
  make_scenes.write_scenes(str(tmp_path), 6, resolution=8, shards=2)
  with pytest.raises(ValueError, match=r"scenes-00000-of-00002\.array_record.*3 records"):
    make_scenes.write_scenes(str(tmp_path), 6, resolution=16, shards=2)
  with pytest.raises(ValueError, match="--num"):
    make_scenes.write_scenes(str(tmp_path), 0)


def test_make_scenes_cli_with_workers_writes_the_same_records_as_in_process(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "pretrain_jax.data.make_scenes", f"--out={tmp_path / 'cli'}",
       "--num=6", "--resolution=16", "--shards=2", "--workers=2"],
      capture_output=True, text=True, timeout=120, cwd=REPO)
  assert result.returncode == 0, result.stderr
  assert "records/s" in result.stdout
  cli = sorted(str(p) for p in (tmp_path / "cli").iterdir())
  local = make_scenes.write_scenes(str(tmp_path / "local"), 6, resolution=16, shards=2)
  assert [os.path.basename(p) for p in cli] == [os.path.basename(p) for p in local]
  assert [read_all(p) for p in cli] == [read_all(p) for p in local]


# --- pipeline over ArrayRecord -------------------------------------------------------------------

def test_train_batches_have_documented_shapes_and_one_epoch_holds_every_record(scene_shards):
  pattern, _ = scene_shards
  batches = take(data_config(f"arrayrecord:{pattern}"), 4, NUM_SCENES // 4)
  for b in batches:
    assert b["image"].dtype == np.uint8 and b["image"].shape == (4, SIZE, SIZE, 3)
    assert b["label"].dtype == np.int32 and b["label"].shape == (4,)
    assert b["valid"].dtype == np.float32 and b["valid"].shape == (4,)
    np.testing.assert_array_equal(b["valid"], 1.0)
  seen = sorted(int(x) for b in batches for x in b["label"])
  assert seen == sorted(int(render_scene(0, i, RES)["label"]) for i in range(NUM_SCENES))


def test_train_batches_are_a_function_of_the_seed(scene_shards):
  cfg = data_config(f"arrayrecord:{scene_shards[0]}")
  a, b, c = take(cfg, 4, 3, seed=0), take(cfg, 4, 3, seed=0), take(cfg, 4, 3, seed=1)
  for x, y in zip(a, b):
    for key in ("image", "label", "valid"):
      np.testing.assert_array_equal(x[key], y[key])
  assert not all(np.array_equal(x["image"], z["image"]) for x, z in zip(a, c))


def test_restored_iterator_state_resumes_with_the_same_batches(scene_shards):
  cfg = data_config(f"arrayrecord:{scene_shards[0]}", threads=2)
  ds = pipeline.train_dataset(cfg, 4, 5)
  it = iter(ds)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it), next(it)]
  fresh = iter(pipeline.train_dataset(cfg, 4, 5))
  fresh.set_state(state)
  for want in expected:
    got = next(fresh)
    for key in ("image", "label", "valid"):
      np.testing.assert_array_equal(got[key], want[key])


# --- bad records -------------------------------------------------------------------------------

def test_corrupt_record_raises_data_error_naming_shard_and_index(tmp_path):
  rng = np.random.default_rng(0)
  shard = write_shard(tmp_path / "bad.array_record",
                      [b"not a record" if i == 3 else small_record(i, rng) for i in range(8)])
  with pytest.raises(DataError) as info:
    take(data_config(f"arrayrecord:{shard}"), 4, 2)   # 2 batches of 4 = the whole shard
  assert f"{shard}[3]" in str(info.value)


def test_skip_corrupt_turns_the_bad_record_into_one_invalid_example(tmp_path):
  rng = np.random.default_rng(0)
  shard = write_shard(tmp_path / "bad.array_record",
                      [b"not a record" if i == 3 else small_record(i, rng) for i in range(8)])
  batches = take(data_config(f"arrayrecord:{shard}", skip_corrupt=True), 4, 2)
  valid = np.concatenate([b["valid"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  assert valid.sum() == 7 and (valid == 0).sum() == 1
  assert labels[valid == 0].tolist() == [-1]
  assert sorted(labels[valid == 1].tolist()) == [0, 1, 2, 4, 5, 6, 7]


def test_image_of_wrong_shape_raises_data_error_naming_shard_and_index(tmp_path):
  rng = np.random.default_rng(0)
  flat = msgpack.packb({"image": records.encode_array(np.zeros((8, 8), np.uint8)), "label": 2},
                       use_bin_type=True)
  shard = write_shard(tmp_path / "flat.array_record",
                      [flat if i == 2 else small_record(i, rng) for i in range(4)])
  with pytest.raises(DataError) as info:
    take(data_config(f"arrayrecord:{shard}"), 4, 1)
  assert f"{shard}[2]" in str(info.value) and "[8, 8]" in str(info.value)


# --- specs and mixtures ----------------------------------------------------------------------

def test_unknown_source_kind_is_a_value_error_naming_the_kind():
  with pytest.raises(ValueError, match="unknown source kind 's3'"):
    pipeline.parse_spec("s3:foo")
  with pytest.raises(ValueError, match="'s3'"):
    take(data_config("s3:foo"), 4, 1)


def test_glob_matching_no_shard_is_a_file_not_found_error_naming_the_pattern(tmp_path):
  pattern = str(tmp_path / "nothing-*.array_record")
  with pytest.raises(FileNotFoundError, match=pattern.replace("*", r"\*")):
    take(data_config(f"arrayrecord:{pattern}"), 4, 1)


def test_parse_spec_normalises_mixture_weights():
  assert pipeline.parse_spec("arrayrecord:A@0.8,arrayrecord:B@0.2") == [
      ("arrayrecord", "A", pytest.approx(0.8)), ("arrayrecord", "B", pytest.approx(0.2))]
  assert pipeline.parse_spec("arrayrecord:A@4, folder:B@1") == [
      ("arrayrecord", "A", pytest.approx(0.8)), ("folder", "B", pytest.approx(0.2))]
  assert pipeline.parse_spec("scenes:10") == [("scenes", "10", 1.0)]


def test_mixture_draws_each_source_in_proportion_to_its_weight(tmp_path):
  rng = np.random.default_rng(0)
  a = write_shard(tmp_path / "a.array_record", [small_record(0, rng) for _ in range(20)])
  b = write_shard(tmp_path / "b.array_record", [small_record(1, rng) for _ in range(20)])
  batches = take(data_config(f"arrayrecord:{a}@0.8,arrayrecord:{b}@0.2", image_size=8), 10, 50)
  labels = np.concatenate([x["label"] for x in batches])
  assert labels.shape == (500,) and set(labels.tolist()) == {0, 1}
  assert abs(labels.mean() - 0.2) < 0.07


# --- image folders -------------------------------------------------------------------------------

def test_image_folder_source_labels_sorted_class_folders_and_feeds_the_pipeline(tmp_path):
  colours = {"cat": (255, 0, 0), "dog": (0, 0, 255)}
  for cls, n in (("dog", 2), ("cat", 3)):
    (tmp_path / cls).mkdir()
    for i in range(n):
      Image.new("RGB", (20 + 10 * i, 24), colours[cls]).save(tmp_path / cls / f"{i}.png")
  source = sources.ImageFolderSource(str(tmp_path))
  assert source.classes == ["cat", "dog"] and source.labels == [0, 0, 0, 1, 1]
  example = source.decode(source[4][1])
  assert example["label"] == 1 and example["image"].shape == (24, 30, 3)   # dog/1.png

  (batch,) = take(data_config(f"folder:{tmp_path}", flip=False), 5, 1)
  assert sorted(batch["label"].tolist()) == [0, 0, 0, 1, 1]
  for image, label in zip(batch["image"], batch["label"]):   # each image is its class colour
    want = np.full((1, 1, 3), colours[source.classes[label]], np.uint8)
    np.testing.assert_array_equal(image, np.broadcast_to(want, image.shape))


# --- TFDS ----------------------------------------------------------------------------------------

def test_tfds_array_record_dataset_reads_through_source_and_pipeline(tmp_path):
  import tensorflow_datasets as tfds
  rng = np.random.default_rng(0)
  examples = [{"image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "label": i % 2}
              for i in range(6)]
  tfds.dataset_builders.store_as_tfds_dataset(
      name="pretrain_jax_tiny", version="1.0.0",
      features=tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(32, 32, 3)),
                                           "label": tfds.features.ClassLabel(num_classes=2)}),
      split_datasets={"train": list(enumerate(examples))}, data_dir=str(tmp_path),
      description="six random images for tests", file_format="array_record",
      disable_shuffling=True)
  source = sources.TfdsSource("pretrain_jax_tiny", "train", str(tmp_path))
  assert len(source) == 6
  where, payload = source[3]
  assert where == "tfds:pretrain_jax_tiny/train[3]"
  example = source.decode(payload)
  np.testing.assert_array_equal(example["image"], examples[3]["image"])
  assert example["label"] == 1

  cfg = data_config("tfds:pretrain_jax_tiny/train", tfds_data_dir=str(tmp_path))
  (batch,) = take(cfg, 6, 1)
  assert batch["image"].shape == (6, SIZE, SIZE, 3)
  assert sorted(batch["label"].tolist()) == [0, 0, 0, 1, 1, 1]


def test_missing_tfds_dataset_is_a_file_not_found_error_naming_it(tmp_path):
  with pytest.raises(FileNotFoundError, match="'no_such_dataset_xyz' split 'train'"):
    sources.TfdsSource("no_such_dataset_xyz", "train", str(tmp_path))


# --- transforms ----------------------------------------------------------------------------------

def test_random_resized_crop_has_the_requested_size_and_depends_only_on_the_rng():
  image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
  a = transforms.random_resized_crop(image, np.random.default_rng(7), 24)
  b = transforms.random_resized_crop(image, np.random.default_rng(7), 24)
  c = transforms.random_resized_crop(image, np.random.default_rng(8), 24)
  assert a.shape == (24, 24, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_resize_center_crop_gives_a_square_of_the_requested_size():
  image = np.zeros((40, 60, 3), np.uint8)
  image[:, 20:40] = 255   # a bright centre band, which a centre crop must keep in the middle
  out = transforms.resize_center_crop(image, 32)
  assert out.shape == (32, 32, 3)
  assert out[16, 16, 0] == 255 and out[16, 0, 0] < 128 and out[16, 31, 0] < 128


def test_normalize_of_a_constant_image_gives_per_channel_standard_scores():
  out = transforms.normalize(np.full((4, 4, 3), 255, np.uint8))
  want = [(1 - m) / s for m, s in zip(transforms.IMAGENET_MEAN, transforms.IMAGENET_STD)]
  assert out.dtype == np.float32 and out.shape == (4, 4, 3)
  np.testing.assert_allclose(out, np.broadcast_to(np.float32(want), (4, 4, 3)), rtol=1e-6)
  np.testing.assert_allclose(transforms.normalize(np.zeros((1, 1, 3), np.uint8))[0, 0],
                             [-m / s for m, s in zip(transforms.IMAGENET_MEAN,
                                                     transforms.IMAGENET_STD)], rtol=1e-6)


def test_processes_read_their_rows_of_the_same_global_batches():
  """Two processes owning scattered rows ((0, 1, 4, 5) and (2, 3, 6, 7), as TPU hosts do):
  each loads exactly its rows, in order, and together they are the global batches."""
  from conftest import load_config
  data = load_config("configs/aim/pretrain.py", "variant=tiny").data
  data.train, data.image_size, data.scenes_resolution, data.threads = "scenes:64", 28, 32, 1
  it = iter(pipeline.train_dataset(data, 8, seed=3))
  whole = [next(it) for _ in range(2)]
  owned = [(0, 1, 4, 5), (2, 3, 6, 7)]
  its = [iter(pipeline.train_dataset(data, 8, seed=3, rows=rows)) for rows in owned]
  for b in range(2):
    parts = [next(i) for i in its]
    assert parts[0]["image"].shape[0] == 4
    assembled = np.zeros_like(whole[b]["image"])
    for rows, part in zip(owned, parts):
      assembled[list(rows)] = part["image"]
    np.testing.assert_array_equal(assembled, whole[b]["image"])
  with pytest.raises(ValueError, match="sorted distinct rows"):
    pipeline.train_dataset(data, 8, seed=3, rows=(4, 0))
