"""aimjax.classify: a converted official head reproduces the official logits, at the
released size and at a non-square one, from Python and from the command line."""
import json
import subprocess
import sys

import numpy as np
import pytest

from aimjax import classify, convert
from conftest import ROOT, SHARED, subprocess_env

FIXTURE = SHARED / "fixtures" / "aim_v1_small.safetensors"
pytestmark = pytest.mark.skipif(not FIXTURE.exists(),
                                reason=f"{FIXTURE} absent: ../shared/ is not beside the checkout")


@pytest.fixture(scope="module")
def fixture():
  from safetensors import safe_open
  with safe_open(str(FIXTURE), "np") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  return ({k: v for k, v in tensors.items() if not k.startswith("__")},
          {k: v for k, v in tensors.items() if k.startswith("__")})


def test_classify_reproduces_the_official_logits_and_ranks_them(fixture, tmp_path):
  sd, inputs = fixture
  convert.convert(str(FIXTURE), str(tmp_path / "aim"), num_heads=4, image_size=56,
                  layers_spec="2,3")
  x = inputs["__input__"].transpose(0, 2, 3, 1)             # preprocessed float NHWC
  out = classify.classify(str(tmp_path / "aim"), x)
  np.testing.assert_allclose(out["logits"], inputs["__logits__"], atol=1e-4, rtol=1e-4)
  want = np.argsort(-inputs["__logits__"], axis=-1)[:, :5]
  np.testing.assert_array_equal(out["classes"], want)
  assert out["synsets"] is None                             # 10 classes: not ImageNet
  assert np.all(np.diff(out["scores"], axis=-1) <= 0) and np.all(out["scores"] > 0)


def test_classify_at_a_non_square_size_matches_the_official_head(fixture, tmp_path):
  """The official classifier (AverageLayers over blocks 2, 3; BatchNorm1d with running
  statistics, eps 1e-6, affine=False; one learned query split into heads attending over
  k(x), v(x); linear without bias) applied in numpy to the 56 x 42 block features of
  test_aim_official's step-by-step official forward."""
  from test_aim_official import _official_features
  sd, inputs = fixture
  sd64 = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  x = inputs["__input__"][:, :, :, 7:49].astype(np.float64)
  blocks = _official_features(sd64, x, 14, 4)
  f = (blocks[2] + blocks[3]) / 2
  f = (f - sd64["head.bn.running_mean"]) / np.sqrt(sd64["head.bn.running_var"] + 1e-6)
  b, n, d = f.shape
  q = sd64["head.cls_token"].reshape(1, 4, 1, 16)
  k = (f @ sd64["head.k.weight"].T).reshape(b, n, 4, 16).transpose(0, 2, 1, 3)
  v = (f @ sd64["head.v.weight"].T).reshape(b, n, 4, 16).transpose(0, 2, 1, 3)
  a = q @ k.transpose(0, 1, 3, 2) / 4.0
  a = np.exp(a - a.max(-1, keepdims=True))
  pooled = ((a / a.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3).reshape(b, d)
  want = pooled @ sd64["head.linear.weight"].T
  convert.convert(str(FIXTURE), str(tmp_path / "wide"), num_heads=4, image_size="56,42",
                  layers_spec="2,3")
  clf = classify.load(str(tmp_path / "wide"))
  assert clf.image_size == (56, 42) and clf.layers == (2, 3)
  got = classify.classify(clf, x.transpose(0, 2, 3, 1).astype(np.float32))["logits"]
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  # uint8 images of any size go through the evaluation transform to 56 x 42
  any_size = (np.random.default_rng(0).random((3, 90, 70, 3)) * 255).astype(np.uint8)
  assert classify.classify(clf, list(any_size))["classes"].shape == (3, 5)


def test_a_1000_class_head_names_imagenet_synsets(fixture, tmp_path):
  synsets = classify.imagenet_synsets()
  if synsets is None:
    pytest.skip("tensorflow-datasets' imagenet2012/labels.txt is not installed")
  assert len(synsets) == 1000 and synsets[0] == "n01440764" and synsets == sorted(synsets)
  sd, inputs = fixture
  sd = dict(sd, **{"head.linear.weight": np.random.default_rng(0).normal(
      size=(1000, 64)).astype(np.float32)})
  from safetensors.numpy import save_file
  save_file(sd, str(tmp_path / "imagenet_head.safetensors"))
  convert.convert(str(tmp_path / "imagenet_head.safetensors"), str(tmp_path / "aim"),
                  num_heads=4, image_size=56, layers_spec="2,3")
  out = classify.classify(str(tmp_path / "aim"), inputs["__input__"].transpose(0, 2, 3, 1))
  assert out["synsets"] == [[synsets[c] for c in row] for row in out["classes"]]


def test_the_cli_prints_the_top5_class_ids_of_each_image(tmp_path):
  from PIL import Image
  convert.convert(str(FIXTURE), str(tmp_path / "aim"), num_heads=4, image_size=56,
                  layers_spec="2,3")
  rng = np.random.default_rng(0)
  paths = []
  for i, size in enumerate([(64, 64), (80, 120)]):
    paths.append(tmp_path / f"img{i}.png")
    Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).save(paths[-1])
  proc = subprocess.run([sys.executable, "-m", "aimjax.classify", f"--workdir={tmp_path / 'aim'}",
                         *map(str, paths)], cwd=ROOT, env=subprocess_env(JAX_PLATFORMS="cpu"),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "10 classes, not ImageNet-1k's 1000; printing class ids only" in proc.stdout
  want = classify.classify(str(tmp_path / "aim"), [str(p) for p in paths])["classes"]
  for i, p in enumerate(paths):
    block = proc.stdout.split(str(p))[1].splitlines()[1:6]
    assert [int(line.split("class")[1].split()[0]) for line in block] == list(want[i])
  proc = subprocess.run([sys.executable, "-m", "aimjax.classify", f"--workdir={tmp_path}",
                         str(paths[0])], cwd=ROOT, env=subprocess_env(JAX_PLATFORMS="cpu"),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and "has no classifier head" in proc.stderr
