"""The pseudo-labelling pipeline (fourm_jax.pseudo_label) and reading its shards back."""
import glob
import io
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, load_config, subprocess_env
from fourm_jax import pseudo_label as pl
from pretrain_jax.data import multimodal, records, schema as schema_lib
from pretrain_jax.data.errors import DataError
from pretrain_jax.data.scenes import render_scene

RES = 32


def _config(variant="scenes", **overrides):
  cfg = load_config("configs/fourm/pseudo_label.py", variant)
  cfg.resolution, cfg.batch_size = RES, 4
  cfg.labeller_options.aim_features.init_from = "random:tiny"   # labels' values untested here
  for k, v in overrides.items():
    setattr(cfg, k, v)
  return cfg


def _files(directory):
  return {os.path.basename(p): open(p, "rb").read() for p in sorted(glob.glob(f"{directory}/*"))}


def test_scenes_records_hold_exact_labels_and_every_computed_modality(tmp_path):
  out = str(tmp_path / "out")
  result = pl.pseudo_label(_config(shards=2), "scenes:10", out)
  assert result == {"records": 10, "skipped": 0, "skipped_examples": [], "shards": 2,
                    "reused_shards": 0, "out": out}
  ds = multimodal.dataset(f"{out}/*.array_record")
  assert len(ds) == 10
  schema = schema_lib.read_schema(out)
  for i in (0, 7):
    rec, truth = ds[i], render_scene(0, i, RES)
    assert not schema_lib.problems(rec, schema) and rec["valid"] == 1
    assert rec["index"] == i and rec["key"] == f"scenes(seed=0)[{i}]"
    np.testing.assert_array_equal(rec["image"], truth["rgb"])
    np.testing.assert_array_equal(rec["depth"], truth["depth"].astype(np.float16))
    np.testing.assert_array_equal(rec["instance"], truth["instance"])
    np.testing.assert_array_equal(rec["boxes"], truth["boxes"])
    assert rec["caption"] == truth["caption"] and rec["label"] == int(truth["label"])
    sem = rec["semantic_metadata"]
    assert sem["sam_clutter"] == sem["coco_clutter"] == len(truth["boxes"])
    assert sem["crowdedness"] == 0 and 0 < sem["walkability"] < 100
    assert rec["caption_length"]["caption_chars"] == len(truth["caption"])
    assert rec["color_palette"].shape == (7, 7, 3) and rec["sam_edges"].any()


def test_resume_after_an_interruption_gives_byte_identical_shards(tmp_path):
  whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
  pl.pseudo_label(_config(shards=3), "scenes:12", whole)
  with pytest.raises(pl._Interrupted):
    pl.pseudo_label(_config(shards=3, debug={"stop_after_records": 6}), "scenes:12", resumed)
  names = sorted(os.listdir(resumed))
  assert "shard-00001-of-00003.array_record.tmp" in names              # half-written
  assert "shard-00001-of-00003.array_record" not in names
  again = pl.pseudo_label(_config(shards=3), "scenes:12", resumed)
  assert again["reused_shards"] == 1 and again["records"] == 12
  assert _files(resumed) == _files(whole)


def test_worker_processes_write_the_same_bytes(tmp_path):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  pl.pseudo_label(_config(shards=2), "scenes:6", one)
  result = pl.pseudo_label(_config(shards=2, workers=2), "scenes:6", two)
  assert result["records"] == 6 and _files(one) == _files(two)


def test_changed_configuration_on_the_same_output_is_refused(tmp_path):
  out = str(tmp_path / "out")
  pl.pseudo_label(_config(shards=1), "scenes:4", out)
  with pytest.raises(ValueError, match=r"another pseudo-labelling run \(differs in \['resolution'\]\)"):
    pl.pseudo_label(_config(shards=1, resolution=48), "scenes:4", out)


def _write_images(folder, n, corrupt=()):
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(0)
  for i in range(n):
    path = os.path.join(folder, f"img{i:02d}.png")
    if i in corrupt:
      with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n this is not an image")
    else:
      Image.fromarray(rng.integers(0, 256, (40 + i, 56, 3), dtype=np.uint8)).save(path)


def test_corrupt_image_is_skipped_and_counted_not_fatal(tmp_path):
  images = str(tmp_path / "images")
  _write_images(images, 7, corrupt=(3,))
  cfg = _config("images", labellers=("canny_edges", "color_palette", "image_metadata"), shards=2)
  result = pl.pseudo_label(cfg, f"folder:{images}", str(tmp_path / "out"))
  assert result["records"] == 6 and result["skipped"] == 1
  (where, reason), = result["skipped_examples"]
  assert where.endswith("img03.png") and reason
  recs = [multimodal.dataset(f"{tmp_path}/out/*.array_record")[i] for i in range(6)]
  assert [r["index"] for r in recs] == [0, 1, 2, 4, 5, 6]
  assert recs[1]["original_size"].tolist() == [41, 56] and recs[1]["image"].shape == (RES, RES, 3)
  assert recs[1]["image_metadata"]["original_height"] == 41


def test_labeller_whose_inputs_are_missing_is_a_clear_error(tmp_path):
  images = str(tmp_path / "images")
  _write_images(images, 2)
  cfg = _config("images", labellers=("canny_edges", "geometric_metadata"))
  with pytest.raises(ValueError, match=r"labeller 'geometric_metadata' needs \['depth', 'normals'\]"):
    pl.pseudo_label(cfg, f"folder:{images}", str(tmp_path / "out"))


def _tar(path, files):
  with tarfile.open(path, "w") as tar:
    for name, data in files.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards_in_the_ml4m_layout_with_aligned_captions(tmp_path):
  root = tmp_path / "wds"
  os.makedirs(root / "rgb")
  os.makedirs(root / "caption")
  rng = np.random.default_rng(1)
  for shard in range(2):
    rgb, cap = {}, {}
    for j in range(3):
      key = f"{shard:02d}{j:04d}"
      buf = io.BytesIO()
      Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buf, "JPEG")
      rgb[f"{key}.jpg"] = buf.getvalue()
      cap[f"{key}.txt"] = f"picture {key}. Random noise!".encode()
    _tar(root / "rgb" / f"shard-{shard:05d}.tar", rgb)
    _tar(root / "caption" / f"shard-{shard:05d}.tar", cap)
  cfg = _config("images", labellers=("image_metadata", "caption_length"), captions=True)
  result = pl.pseudo_label(cfg, f"webdataset:{root}", str(tmp_path / "out"))
  assert result["records"] == 6
  rec = multimodal.dataset(f"{tmp_path}/out/*.array_record")[4]
  assert rec["caption"] == "picture 010001. Random noise!"
  assert rec["key"].endswith("shard-00001.tar:010001")
  assert rec["caption_length"] == {"caption_chars": 29.0, "caption_words": 4.0,
                                   "caption_sentences": 2.0}


def _bad_shards(tmp_path):
  from array_record.python import array_record_module as arm
  out = str(tmp_path / "bad")
  os.makedirs(out)
  schema = {"image": schema_lib.FieldSpec("image", shape=(8, 8, 3)),
            "depth": schema_lib.FieldSpec("array", "float16", (8, 8))}
  schema_lib.write_schema(out, schema)
  writer = arm.ArrayRecordWriter(os.path.join(out, "part-0.array_record"), "group_size:1")
  img = np.zeros((8, 8, 3), np.uint8)
  writer.write(records.encode_record({"image": img, "depth": np.ones((8, 8), np.float16)}))
  writer.write(records.encode_record({"image": img, "depth": np.ones((8, 7), np.float16)}))
  writer.write(records.encode_record({"image": img}))
  writer.close()
  return out


def test_reader_names_shard_index_and_field_of_a_bad_record(tmp_path):
  out = _bad_shards(tmp_path)
  ds = multimodal.dataset(f"{out}/*.array_record")
  assert ds[0]["depth"].shape == (8, 8)
  with pytest.raises(DataError, match=r"part-0.array_record\[1\]: field 'depth': shape \[8, 7\], "
                                      r"expected \[8, 8\]"):
    ds[1]
  with pytest.raises(DataError, match=r"part-0.array_record\[2\]: field 'depth' is missing"):
    ds[2]
  only_image = multimodal.dataset(f"{out}/*.array_record", fields=("image",))
  assert only_image[2]["valid"] == 1                  # fields not asked for are not checked
  with pytest.raises(ValueError, match=r"fields \['normals'\] are not in the shards' schema"):
    multimodal.dataset(f"{out}/*.array_record", fields=("normals",))


def test_reader_skips_and_counts_bad_records_when_asked(tmp_path):
  out = _bad_shards(tmp_path)
  ds = multimodal.dataset(f"{out}/*.array_record", skip_corrupt=True)
  recs = [ds[i] for i in range(3)]
  assert [float(r["valid"]) for r in recs] == [1.0, 0.0, 0.0]
  assert recs[1]["depth"].shape == (8, 8) and not recs[1]["depth"].any()


def test_cli_writes_shards_and_reports_bad_values_in_one_line(tmp_path):
  env = subprocess_env()
  cmd = [sys.executable, "-m", "fourm_jax.pseudo_label", "--config=configs/fourm/pseudo_label.py",
         "--input=scenes:3", f"--out={tmp_path}/out",
         "--config.labeller_options.aim_features.init_from=random:tiny",
         "--config.resolution=24"]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "wrote 3 records in 1 shards" in proc.stdout
  assert os.path.exists(f"{tmp_path}/out/shard-00000-of-00001.array_record")
  bad = subprocess.run(cmd[:-1] + ["--config.labellers=('nope',)"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode == 1 and "error: unknown labeller 'nope'" in bad.stderr


def test_webdataset_captions_in_every_ml4m_format(tmp_path):
  """ml-4m's CaptionTransform reads .txt, .json and .json.gz; a JSON value is a string, a
  dict with 'caption', or a list of those, of which it takes the first without
  augmentation (aligned captions, no augmentation index)."""
  import gzip
  import json
  from pretrain_jax.data import webdataset
  root = tmp_path / "wds"
  os.makedirs(root / "rgb")
  os.makedirs(root / "caption")
  buf = io.BytesIO()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, "PNG")
  captions = {"0.txt": b" plain text \n",
              "1.json": json.dumps("a json string").encode(),
              "2.json": json.dumps({"caption": "a dict", "score": 0.3}).encode(),
              "3.json.gz": gzip.compress(json.dumps([{"caption": "first of a list"},
                                                     {"caption": "second"}]).encode()),
              "4.json.gz": gzip.compress(json.dumps(["first string", "other"]).encode())}
  _tar(root / "rgb" / "shard-00000.tar", {f"{i}.png": buf.getvalue() for i in range(6)})
  _tar(root / "caption" / "shard-00000.tar", captions)
  source = webdataset.WebDatasetSource(str(root))
  got = [source.decode(source[i][1]).get("caption") for i in range(6)]
  assert got == ["plain text", "a json string", "a dict", "first of a list", "first string",
                 None]
  with pytest.raises(ValueError, match="a dict without a 'caption' field"):
    webdataset.caption_text(json.dumps({"text": "x"}).encode(), "shard:9")
