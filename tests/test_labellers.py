"""Computed labellers against hand-made inputs with known answers (fourm_jax.labellers)."""
import numpy as np
import pytest

from conftest import load_config
from fourm_jax import labellers, metadata, palette
from pretrain_jax.data import edges
from pretrain_jax.data.schema import FieldSpec


def test_flat_grey_image_has_zero_contrast_entropy_saturation_and_colorfulness():
  grey = np.full((32, 48, 3), 128, np.uint8)
  m = metadata.image_metadata(grey, (300, 400))
  assert m["contrast"] == 0 and m["entropy"] == 0 and m["saturation"] == 0
  assert m["colorfulness"] == 0
  assert m["brightness"] == pytest.approx(128, abs=1e-9)
  assert (m["original_height"], m["original_width"]) == (300, 400)


def test_image_statistics_on_known_images():
  half = np.zeros((16, 16, 3), np.uint8)
  half[:, 8:] = 255                                  # black | white: two equal luma levels
  m = metadata.image_metadata(half, (16, 16))
  assert m["entropy"] == pytest.approx(1.0)          # one bit
  assert m["contrast"] == pytest.approx(127.5)       # RMS contrast of {0, 255}
  assert m["brightness"] == pytest.approx(127.5)
  red = np.zeros((8, 8, 3), np.uint8)
  red[..., 0] = 255
  r = metadata.image_metadata(red, (8, 8))
  # rg = 255, yb = 127.5 everywhere: no spread, colourfulness = 0.3 * |mean|
  assert r["colorfulness"] == pytest.approx(0.3 * np.hypot(255, 127.5))
  assert r["saturation"] == pytest.approx(255)


def test_two_colour_image_yields_those_two_colours():
  img = np.zeros((20, 30, 3), np.uint8)
  img[:, :10] = (200, 30, 40)
  img[:, 10:] = (10, 120, 250)
  for space in ("lab", "rgb"):
    p = palette.palettes(img, space=space)
    assert p.shape == (7, 7, 3)
    assert p[1, :2].tolist() == [[10, 120, 250], [200, 30, 40]]   # larger share first
    assert not p[1, 2:].any()
    assert p[0, 0].tolist() == np.rint(img.reshape(-1, 3).mean(0)).tolist()   # 1 colour: the mean
    assert {tuple(c) for c in p[6, :7]} == {(10, 120, 250), (200, 30, 40)}


def test_palette_is_deterministic_and_rejects_unknown_colour_spaces():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
  np.testing.assert_array_equal(palette.palettes(img, seed=3), palette.palettes(img, seed=3))
  with pytest.raises(ValueError, match="colour space"):
    labellers.create("color_palette", 24, space="hsv")


def test_depth_step_gives_the_expected_occlusion_share():
  depth = np.ones((32, 40))
  depth[:, 25:] = 3.0                                # a step: Sobel fires on columns 24 and 25
  geo = metadata.geometric_metadata(depth, np.tile([0.0, 0.0, -1.0], (32, 40, 1)))
  assert geo["occlusion"] == pytest.approx(100 * 2 / 40)
  edge = metadata.occlusion_edges(depth)
  assert edge[:, 24].all() and edge[:, 25].all() and edge.sum() == 64
  ramp = np.tile(np.linspace(1, 2, 40), (32, 1))     # a smooth slope is not an occlusion
  assert metadata.geometric_metadata(ramp, np.ones((32, 40, 3)))["occlusion"] == 0
  small = np.ones((32, 40))
  small[:, 20:] = 1.05                               # unnormalised: Sobel 4 * 0.05 = 0.2 < 0.3
  assert metadata.occlusion_edges(small, normalize=False).sum() == 0
  assert metadata.occlusion_edges(small).sum() == 64   # relative depth: the step is the range


def test_plane_has_zero_geometric_complexity_and_opposite_normals_the_most():
  plane = np.tile([0.0, -0.6, 0.8], (16, 16, 1))
  assert metadata.geometric_metadata(np.ones((16, 16)), plane)["geometric_complexity"] == \
      pytest.approx(0, abs=1e-12)
  box = np.zeros((16, 16, 3))
  box[:8, :, 0], box[8:, :, 0] = 1, -1               # two opposite faces: mean normal 0
  assert metadata.geometric_metadata(np.ones((16, 16)), box)["geometric_complexity"] == \
      pytest.approx(1)


def test_semantic_metadata_counts_on_a_constructed_map():
  sem = np.zeros((10, 10), np.uint8)                 # 0 background (ignored)
  sem[5:] = 2                                        # ground: walkable
  sem[1:3, 1:3] = 3                                  # an object: countable
  sem[6:8, 6:9] = 4
  inst = np.zeros((10, 10), np.uint8)
  inst[1:3, 1:3], inst[6:8, 6:9] = 1, 2
  m = metadata.semantic_metadata(sem, inst, np.array([3, 4, 4]), countable=(3, 4),
                                 walkable=(2,), person=(4,), ignore=(0,))
  assert m == {"crowdedness": 2.0, "sam_clutter": 2.0, "coco_clutter": 3.0,
               "instance_diversity": 2.0, "semantic_diversity": 3.0,
               "objectness": 10.0, "walkability": 44.0}


def test_caption_length():
  assert metadata.caption_length("A red cube. Two spheres!  ") == {
      "caption_chars": 26.0, "caption_words": 5.0, "caption_sentences": 2.0}
  assert metadata.caption_length("") == {"caption_chars": 0.0, "caption_words": 0.0,
                                         "caption_sentences": 0.0}


def test_canny_finds_the_border_of_a_square_and_nothing_on_flat_images():
  img = np.zeros((40, 40, 3), np.uint8)
  img[10:30, 10:30] = 255
  e = edges.canny_edges(img)
  assert e.dtype == np.uint8 and set(np.unique(e)) == {0, 255}
  ys, xs = np.nonzero(e)
  assert ys.min() >= 8 and ys.max() <= 31 and xs.min() >= 8 and xs.max() <= 31
  assert not e[13:27, 13:27].any()                   # nothing inside
  assert not edges.canny_edges(np.full((40, 40, 3), 90, np.uint8)).any()


def test_instance_edges_mark_both_sides_of_every_boundary():
  inst = np.zeros((6, 6), np.uint8)
  inst[:, 3:] = 1
  e = edges.instance_edges(inst)
  assert (e[:, 2] == 255).all() and (e[:, 3] == 255).all() and e.sum() == 255 * 12


def test_registry_creates_labellers_and_checks_their_outputs():
  assert {"canny_edges", "sam_edges", "color_palette", "image_metadata", "semantic_metadata",
          "geometric_metadata", "caption_length", "aim_features"} <= set(labellers.names())
  with pytest.raises(ValueError, match="unknown labeller 'nope'"):
    labellers.create("nope", 32)
  with pytest.raises(ValueError, match="bad options"):
    labellers.create("canny_edges", 32, sigma=2)

  def depth_model(image):                            # a user's model: batched, numpy
    return {"depth": image.mean(-1).astype(np.float16)}
  labellers.register_model("test_mean_depth", depth_model,
                           lambda r: {"depth": FieldSpec("array", "float16", (r, r))})
  lab = labellers.create("test_mean_depth", 8)
  out = lab({"image": [np.full((8, 8, 3), 6, np.uint8)] * 3})
  assert len(out["depth"]) == 3 and out["depth"][0].dtype == np.float16
  with pytest.raises(ValueError, match="already registered"):
    labellers.register_model("test_mean_depth", depth_model, {})
  broken = labellers.Labeller("broken", ("image",), {"x": FieldSpec("scalar")},
                              lambda b: {"x": [1]})
  with pytest.raises(ValueError, match="returned 1 values of 'x' for a batch of 2"):
    broken({"image": [np.zeros((2, 2, 3), np.uint8)] * 2})


def test_aim_features_labeller_gives_feature_maps_and_global_embeddings():
  lab = labellers.create("aim_features", 64, init_from="random:tiny", image_size=56)
  images = [np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8) for i in range(3)]
  out = lab({"image": images})
  assert lab.outputs["aim_features"].shape == (16, 64)
  assert out["aim_features"][0].shape == (16, 64) and out["aim_global"][0].shape == (64,)
  np.testing.assert_allclose(out["aim_global"][1], out["aim_features"][1].astype(np.float32).mean(0),
                             atol=2e-2)
  assert not np.allclose(out["aim_global"][0], out["aim_global"][1])


def test_model_labellers_refuse_random_weights_unless_asked(tmp_path):
  """A bare variant name would build a randomly initialised model: its 'features' are noise
  that tokenizers and 4M would then learn from (issue 21). Only 'random:NAME' asks for it."""
  with pytest.raises(ValueError, match="needs the option 'init_from'"):
    labellers.create("aim_features", 64)
  with pytest.raises(ValueError, match="'random:tiny' if that is what you want"):
    labellers.create("aim_features", 64, init_from="tiny")
  with pytest.raises(ValueError, match="no workdir or checkpoint on disk"):
    labellers.create("backbone_features", 64, backbone="aim", init_from=str(tmp_path / "none"))
  cfg = load_config("configs/fourm/pseudo_label.py", "images")
  with pytest.raises(ValueError, match="needs the option 'init_from'"):
    labellers.create("aim_features", 64, **cfg.labeller_options.aim_features)
