"""ml-4m's webdataset modalities: reading them (pretrain_jax.data.webdataset) and exporting
this repo's shards into that layout (fourm_jax.ml4m_export)."""
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from array_record.python import array_record_module as arm
from PIL import Image

from conftest import ROOT, subprocess_env
from fourm_jax import ml4m_export
from pretrain_jax.data import records, schema as schema_lib, webdataset
from pretrain_jax.data.errors import DataError
from pretrain_jax.data.scenes import SEMANTIC_CLASSES
from pretrain_jax.data.schema import FieldSpec

R = 16


def _write(directory, schema, recs):
  os.makedirs(directory, exist_ok=True)
  schema_lib.write_schema(str(directory), schema)
  writer = arm.ArrayRecordWriter(str(directory / "shard-00000-of-00001.array_record"),
                                 "group_size:1")
  for r in recs:
    writer.write(records.encode_record(r))
  writer.close()
  return str(directory / "*.array_record")


def _palette(rng, k=3):
  p = np.zeros((k, k, 3), np.uint8)
  for i in range(k):
    p[i, :i + 1] = rng.integers(0, 256, (i + 1, 3))
  return p


def _pseudo_labelled(directory, n=5):
  """Records as fourm_jax.pseudo_label writes them (exact scenes fields + labellers)."""
  rng = np.random.default_rng(0)
  schema = {"index": FieldSpec("scalar"), "key": FieldSpec("text"),
            "image": FieldSpec("image", shape=(R, R, 3)), "label": FieldSpec("scalar"),
            "caption": FieldSpec("text"), "boxes": FieldSpec("array", "float32", (None, 4)),
            "box_classes": FieldSpec("array", "int32", (None,)),
            "depth": FieldSpec("array", "float16", (R, R)),
            "color_palette": FieldSpec("array", "uint8", (3, 3, 3)),
            "caption_length": FieldSpec("map", keys=("caption_chars", "caption_words",
                                                     "caption_sentences"))}
  recs = []
  for i in range(n):
    nb = i % 3   # 0, 1 and 2 boxes
    lo = rng.uniform(0, 0.5, (nb, 2)).astype(np.float32)
    recs.append({"index": i, "key": f"scene.{i}", "label": i,
                 "image": rng.integers(0, 256, (R, R, 3), dtype=np.uint8),
                 "caption": f"a red cube number {i}. yes",
                 "boxes": np.concatenate([lo, lo + 0.25], 1).reshape(nb, 4),
                 "box_classes": rng.integers(3, len(SEMANTIC_CLASSES), nb).astype(np.int32),
                 "depth": np.ones((R, R), np.float16), "color_palette": _palette(rng),
                 "caption_length": {"caption_chars": 20.0 + i, "caption_words": 5.0,
                                    "caption_sentences": 2.0}})
  return _write(directory, schema, recs), recs


def _token_shards(directory, n=3):
  """Records as tokenizers_jax.tokenize writes them (image copied, int32 token fields)."""
  rng = np.random.default_rng(1)
  schema = {"index": FieldSpec("scalar"), "key": FieldSpec("text"),
            "image": FieldSpec("image", shape=(R, R, 3)),
            "tok_rgb": FieldSpec("array", "int32", (4, 4)),
            "tok_normals": FieldSpec("array", "int32", (4, 4)),
            "tok_rgb_448": FieldSpec("array", "int32", (2, 2)),
            "tok_aim_global": FieldSpec("array", "int32", (8,)),
            "caption": FieldSpec("array", "int32", (None,)),      # WordPiece ids: not exported
            "color_palette_raw": FieldSpec("array", "uint8", (3, 3, 3)),
            "metadata_raw": FieldSpec("array", "float32", (21,))}
  recs = []
  for i in range(n):
    meta = np.full(21, np.nan, np.float32)
    meta[[0, 1, 9]] = [640, 480, 37.5]
    recs.append({"index": i, "key": str(i),
                 "image": rng.integers(0, 256, (R, R, 3), dtype=np.uint8),
                 "tok_rgb": rng.integers(0, 16384, (4, 4)).astype(np.int32),
                 "tok_normals": rng.integers(0, 8192, (4, 4)).astype(np.int32),
                 "tok_rgb_448": rng.integers(0, 70000, (2, 2)).astype(np.int32),  # > int16
                 "tok_aim_global": rng.integers(0, 512, (8,)).astype(np.int32),
                 "caption": np.arange(5, dtype=np.int32), "color_palette_raw": _palette(rng),
                 "metadata_raw": meta})
  return _write(directory, schema, recs), recs


def _tar(path, files):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with tarfile.open(path, "w") as tar:
    for name, data in files.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def _png(size=8):
  buf = io.BytesIO()
  Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(buf, "PNG")
  return buf.getvalue()


def _npy(x, allow_pickle=False):
  buf = io.BytesIO()
  np.save(buf, x, allow_pickle=allow_pickle)
  return buf.getvalue()


def test_pseudo_labelled_shards_round_trip_through_the_ml4m_layout(tmp_path):
  from tokenizers_jax import sequences
  pattern, recs = _pseudo_labelled(tmp_path / "pl")
  out = str(tmp_path / "wds")
  result = ml4m_export.export(pattern, out, shard_size=2)
  assert result["records"] == 5 and result["shards"] == 3 and result["written"] == 15
  assert result["modalities"] == ["caption", "color_palette", "det", "metadata", "rgb"]
  assert result["skipped_fields"] == ["depth"]
  for m in result["modalities"]:
    assert sorted(os.listdir(os.path.join(out, m))) == [f"shard-0000{s}.tar" for s in range(3)]
  with tarfile.open(os.path.join(out, "det", "shard-00001.tar")) as tar:
    assert tar.getnames() == ["000002.json", "000003.json"]
    det = json.load(tar.extractfile("000002.json"))
  assert set(det) == {"instances"}
  assert set(det["instances"][0]) == {"boxes", "class_name", "score"}

  source = webdataset.WebDatasetSource(out, modalities="all", class_names=SEMANTIC_CLASSES)
  assert len(source) == 5 and source.modalities == ["color_palette", "det", "metadata"]
  for i, rec in enumerate(recs):
    where, payload = source[i]
    assert where.endswith(f"shard-{i // 2:05d}.tar:{i:06d}")
    got = source.decode(payload)
    np.testing.assert_array_equal(got["image"], rec["image"])   # PNG bytes kept as stored
    assert got["caption"] == rec["caption"]
    np.testing.assert_array_equal(got["boxes"], rec["boxes"])
    assert got["boxes"].dtype == np.float32 and got["boxes"].shape == (len(rec["boxes"]), 4)
    np.testing.assert_array_equal(got["box_classes"], rec["box_classes"])
    assert got["box_classes"].dtype == np.int32
    assert got["box_names"] == [SEMANTIC_CLASSES[c] for c in rec["box_classes"]]
    np.testing.assert_array_equal(got["box_scores"], np.ones(len(rec["boxes"]), np.float32))
    np.testing.assert_array_equal(got["color_palette"], rec["color_palette"])
    assert got["color_palette"].dtype == np.uint8
    assert got["metadata"] == sequences.metadata_from_labellers(rec["caption_length"])

  # a rerun keeps every finished tar byte for byte; a missing one is rewritten alone
  before = open(os.path.join(out, "rgb", "shard-00002.tar"), "rb").read()
  assert ml4m_export.export(pattern, out, shard_size=2)["written"] == 0
  os.remove(os.path.join(out, "rgb", "shard-00002.tar"))
  again = ml4m_export.export(pattern, out, shard_size=2)
  assert again["written"] == 1 and again["kept"] == 14
  assert open(os.path.join(out, "rgb", "shard-00002.tar"), "rb").read() == before
  assert not [f for _, _, fs in os.walk(out) for f in fs if f.endswith(".tmp")]
  with pytest.raises(ValueError, match="other shard_size"):
    ml4m_export.export(pattern, out, shard_size=3)


def test_token_shards_export_tok_npy_with_one_augmentation(tmp_path):
  pattern, recs = _token_shards(tmp_path / "tok")
  out = str(tmp_path / "wds")
  result = ml4m_export.export(pattern, out, shard_size=10)
  assert result["modalities"] == ["color_palette", "metadata", "rgb", "tok_aim_global",
                                  "tok_normal@16", "tok_rgb@16", "tok_rgb@448"]
  assert result["skipped_fields"] == ["caption"]
  with tarfile.open(os.path.join(out, "tok_rgb@16", "shard-00000.tar")) as tar:
    arr = np.load(io.BytesIO(tar.extractfile("000001.npy").read()))
  assert arr.shape == (1, 16) and arr.dtype == np.int16   # save_vq_tokens.py's layout
  np.testing.assert_array_equal(arr[0], recs[1]["tok_rgb"].reshape(-1))
  with tarfile.open(os.path.join(out, "tok_rgb@448", "shard-00000.tar")) as tar:
    assert np.load(io.BytesIO(tar.extractfile("000000.npy").read())).dtype == np.int32

  source = webdataset.WebDatasetSource(out, modalities="all")
  for i, rec in enumerate(recs):
    got = source.decode(source[i][1])
    np.testing.assert_array_equal(got["image"], rec["image"])
    for field in ("tok_rgb", "tok_normals", "tok_rgb_448", "tok_aim_global"):
      assert got[field].dtype == np.int32 and got[field].shape == rec[field].shape, field
      np.testing.assert_array_equal(got[field], rec[field])
    np.testing.assert_array_equal(got["color_palette"], rec["color_palette_raw"])
    assert got["metadata"] == {"original_width": 640.0, "original_height": 480.0,
                               "colorfulness": 37.5}
    assert "caption" not in got


def test_official_det_json_tokens_and_crop_index(tmp_path):
  """A det JSON in ml-4m's format: DetectionTransform.preprocess reads sample['instances'] and
  convert_detection_instance keeps inst['boxes'] + [inst['class_name'], inst['score']] for
  score >= det_threshold (0.6 in modality_info.py); boxes are albumentations-normalised
  [xmin, ymin, xmax, ymax]. Tokens: save_vq_tokens.py writes int16 [n_crops, h*w] and
  TokTransform takes v[rand_aug_idx]."""
  root = tmp_path / "wds"
  det = {"instances": [
      {"boxes": [0.1, 0.2, 0.5, 0.6], "class_name": "person", "score": 0.99, "segmentation": []},
      {"boxes": [0.0, 0.0, 1.0, 1.0], "class_name": "dining table", "score": 0.59},
      {"boxes": [0.3, 0.3, 0.4, 0.9], "class_name": "dog", "score": 0.6}]}
  tokens = np.arange(3 * 196, dtype=np.int16).reshape(3, 196)
  crops = np.array([[0, 0, 224, 224, 0], [10, 5, 200, 200, 1], [3, 3, 100, 100, 0]])
  _tar(root / "rgb" / "shard-00000.tar", {"a.jpg": _png(), "b.jpg": _png()})
  _tar(root / "det" / "shard-00000.tar", {"a.json": json.dumps(det).encode()})
  _tar(root / "tok_depth@224" / "shard-00000.tar", {"a.npy": _npy(tokens),
                                                    "b.npy": _npy(tokens[:1])})
  _tar(root / "crop_settings" / "shard-00000.tar", {"a.npy": _npy(crops)})
  source = webdataset.WebDatasetSource(str(root), modalities=["det", "tok_depth@224",
                                                              "crop_settings"],
                                       class_names=("person", "dog"), crop_index=2)
  got = source.decode(source[0][1])
  np.testing.assert_allclose(got["boxes"], [[0.1, 0.2, 0.5, 0.6], [0.3, 0.3, 0.4, 0.9]],
                             rtol=1e-6)
  assert got["box_names"] == ["person", "dog"]
  np.testing.assert_array_equal(got["box_classes"], [0, 1])
  np.testing.assert_allclose(got["box_scores"], [0.99, 0.6], rtol=1e-6)
  assert got["tok_depth"].shape == (14, 14) and got["tok_depth"].dtype == np.int32
  np.testing.assert_array_equal(got["tok_depth"].reshape(-1), tokens[2])
  np.testing.assert_array_equal(got["crop_settings"], crops[2])
  with pytest.raises(DataError, match="key 'b', modality 'tok_depth@224'.*crop_index 2 out"):
    source.decode(source[1][1])
  default = webdataset.WebDatasetSource(str(root), modalities=["det", "tok_depth@224"])
  got = default.decode(default[1][1])   # crop 0; b has no det file
  np.testing.assert_array_equal(got["tok_depth"].reshape(-1), tokens[0])
  assert "boxes" not in got and "box_classes" not in default.decode(default[0][1])


def test_sam_instance_npy_of_dicts(tmp_path):
  """SAMInstanceTokTransform: v[rand_aug_idx] is a dict of 'points' (contours, coords[0]),
  'bbox' (ymin, xmin, ymax, xmax pixels) and 'token_ids'."""
  root = tmp_path / "wds"
  contour = np.array([[[1, 2]], [[5, 2]], [[5, 7]]], np.int32)
  crop = {"points": [[contour]], "bbox": np.array([[2, 1, 7, 5]]),
          "token_ids": np.arange(16, dtype=np.int16).reshape(1, 16)}
  _tar(root / "rgb" / "shard-00000.tar", {"a.png": _png()})
  _tar(root / "sam_instance" / "shard-00000.tar",
       {"a.npy": _npy(np.array([crop], dtype=object), allow_pickle=True)})
  source = webdataset.WebDatasetSource(str(root), modalities="all")
  got = source.decode(source[0][1])
  np.testing.assert_array_equal(got["sam_instance_boxes"], [[1, 2, 5, 7]])
  np.testing.assert_array_equal(got["sam_instance_ids"], np.arange(16).reshape(1, 16))
  np.testing.assert_array_equal(got["sam_instance_points"][0], contour.reshape(-1, 2))


def test_corrupt_members_and_unknown_folders_name_shard_key_and_modality(tmp_path):
  root = tmp_path / "wds"
  _tar(root / "rgb" / "shard-00000.tar", {"k1.png": _png(), "k2.png": _png(), "k3.png": _png(),
                                          "k4.png": _png()})
  _tar(root / "tok_rgb@224" / "shard-00000.tar",
       {"k1.npy": b"not an npy", "k2.npy": _npy(np.zeros((1, 15), np.int16)),
        "k3.json": b"{}"})
  _tar(root / "det" / "shard-00000.tar", {"k1.json": b"{\"instances\": [{\"boxes\": [1]",
                                          "k2.json": json.dumps({"boxes": []}).encode()})
  tok = webdataset.WebDatasetSource(str(root), modalities=["tok_rgb@224"])
  shard = str(root / "tok_rgb@224" / "shard-00000.tar")
  with pytest.raises(DataError, match=rf"{shard}, key 'k1', modality 'tok_rgb@224'.*not a \.npy"):
    tok.decode(tok[0][1])
  with pytest.raises(DataError, match="key 'k2'.*15 image tokens are no square grid"):
    tok.decode(tok[1][1])
  with pytest.raises(DataError, match="key 'k3'.*a .json file where ml-4m stores tok as .npy"):
    tok.decode(tok[2][1])
  det = webdataset.WebDatasetSource(str(root), modalities=["det"])
  with pytest.raises(DataError, match="key 'k1', modality 'det'.*not valid JSON"):
    det.decode(det[0][1])
  with pytest.raises(DataError, match=r"key 'k2', modality 'det'.*expected \{'instances'"):
    det.decode(det[1][1])
  assert "boxes" not in det.decode(det[3][1])
  _tar(root / "depth_blah" / "shard-00000.tar", {"k1.png": _png()})
  with pytest.raises(ValueError, match="depth_blah: unknown ml-4m modality folder 'depth_blah'"):
    webdataset.WebDatasetSource(str(root), modalities="all")
  with pytest.raises(FileNotFoundError, match="modality 'metadata': no files match"):
    webdataset.WebDatasetSource(str(root), modalities=["metadata"])
  # the default reads rgb and captions only, as before
  assert set(webdataset.WebDatasetSource(str(root)).decode(tok[0][1])) == {"image", "label"}


def test_export_cli(tmp_path):
  pattern, _ = _pseudo_labelled(tmp_path / "pl", n=3)
  cmd = [sys.executable, "-m", "fourm_jax.ml4m_export", f"--input={pattern}",
         f"--out={tmp_path / 'wds'}", "--shard_size=2", "--image_format=jpg"]
  proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert "wrote 3 records in 2 shards x 5 modalities" in proc.stdout
  assert "not exported: depth" in proc.stdout
  with tarfile.open(tmp_path / "wds" / "rgb" / "shard-00001.tar") as tar:
    assert tar.getnames() == ["000002.jpg"]
  bad = subprocess.run(cmd[:4] + [f"--out={tmp_path / 'wds'}", "--shard_size=0"], cwd=ROOT,
                       env=subprocess_env(), capture_output=True, text=True, timeout=120)
  assert bad.returncode == 1 and "error: shard_size must be positive" in bad.stderr
