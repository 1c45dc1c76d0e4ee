"""Tests for the procedural scene renderer (pretrain_jax.data.scenes)."""

import functools

import numpy as np
import pytest

from pretrain_jax.data.scenes import (
    COLOURS,
    MAX_OBJECTS,
    NUM_LABELS,
    OBJECT_SHAPES,
    SEMANTIC_CLASSES,
    SKY_DEPTH,
    render_scene,
)

SKY, GROUND = SEMANTIC_CLASSES.index("sky"), SEMANTIC_CLASSES.index("ground")
SCENES = [(seed, index) for seed in (0, 7) for index in range(12)]


@functools.lru_cache(maxsize=None)
def scene(seed: int, index: int, resolution: int = 64) -> dict:
    return render_scene(seed, index, resolution)


def all_scenes(resolution: int = 64):
    return [scene(s, i, resolution) for s, i in SCENES]


def test_class_tables_follow_the_documented_layout():
    assert SEMANTIC_CLASSES[:3] == ("background", "sky", "ground")
    assert SEMANTIC_CLASSES[3:] == OBJECT_SHAPES
    assert NUM_LABELS == len(COLOURS)
    assert len(COLOURS) >= 6 and MAX_OBJECTS >= 1


def test_same_seed_and_index_render_identically():
    a, b = render_scene(3, 5, 48), render_scene(3, 5, 48)
    for key in ("rgb", "depth", "normals", "semantic", "instance", "boxes", "box_classes", "label"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert a["caption"] == b["caption"] and a["objects"] == b["objects"]


def test_different_index_or_seed_renders_a_different_scene():
    base = scene(0, 0)
    assert not np.array_equal(base["rgb"], scene(0, 1)["rgb"])
    assert not np.array_equal(base["rgb"], scene(7, 0)["rgb"])
    assert len({s["caption"] for s in all_scenes()}) > len(SCENES) // 2


@pytest.mark.parametrize("resolution", [32, 224])
def test_outputs_have_the_documented_shapes_and_dtypes(resolution):
    out = render_scene(1, 2, resolution)
    n = len(out["boxes"])
    expected = {
        "rgb": ((resolution, resolution, 3), np.uint8),
        "depth": ((resolution, resolution), np.float32),
        "normals": ((resolution, resolution, 3), np.float32),
        "semantic": ((resolution, resolution), np.uint8),
        "instance": ((resolution, resolution), np.uint8),
        "boxes": ((n, 4), np.float32),
        "box_classes": ((n,), np.int32),
        "label": ((), np.int32),
    }
    for key, (shape, dtype) in expected.items():
        assert np.shape(out[key]) == shape and np.asarray(out[key]).dtype == dtype, key
    assert isinstance(out["caption"], str) and len(out["objects"]) == n


def test_scene_is_the_same_at_every_resolution():
    # pixel (i, j) at R and pixel (3i+1, 3j+1) at 3R look through the same point
    for seed, index in SCENES[:6]:
        small, large = render_scene(seed, index, 40), render_scene(seed, index, 120)
        assert np.mean(large["semantic"][1::3, 1::3] == small["semantic"]) > 0.995
        np.testing.assert_allclose(large["depth"][1::3, 1::3], small["depth"], rtol=1e-3, atol=1e-3)
        assert [o["centre"] for o in small["objects"]] == [o["centre"] for o in large["objects"]]


def test_normals_are_unit_length_and_sky_points_at_the_camera():
    for out in all_scenes():
        np.testing.assert_allclose(np.linalg.norm(out["normals"], axis=-1), 1.0, atol=1e-5)
        sky = out["semantic"] == SKY
        assert np.all(out["normals"][sky] == (0, 0, -1))
        # the ground is one flat plane whose normal (world up) points up in the image (-y)
        # and back toward the downward-looking camera (-z)
        ground = out["normals"][out["semantic"] == GROUND]
        np.testing.assert_allclose(ground, np.broadcast_to(ground[0], ground.shape), atol=1e-5)
        assert ground[0][1] < 0 and ground[0][2] < 0


def test_instance_ids_match_boxes_and_boxes_are_tight():
    for out in all_scenes():
        inst, boxes = out["instance"], out["boxes"]
        r = inst.shape[0]
        assert sorted(np.unique(inst[inst > 0])) == list(range(1, len(boxes) + 1))
        for i, box in enumerate(boxes, start=1):
            rows, cols = np.nonzero(inst == i)
            from_mask = np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]) / r
            np.testing.assert_allclose(box, from_mask, atol=1 / r + 1e-6)
            assert np.all((box >= 0) & (box <= 1)) and box[0] < box[2] and box[1] < box[3]


def test_every_scene_has_between_one_and_max_objects_visible():
    for out in all_scenes():
        assert 1 <= len(out["boxes"]) <= MAX_OBJECTS


def test_boxes_are_sorted_by_distance_of_object_centre_to_origin():
    for out in all_scenes():
        dist = [np.linalg.norm(o["centre"]) for o in out["objects"]]
        assert dist == sorted(dist)


def test_semantic_ids_of_instance_pixels_equal_box_classes():
    for out in all_scenes():
        sem, inst = out["semantic"], out["instance"]
        for i, cls in enumerate(out["box_classes"], start=1):
            assert np.all(sem[inst == i] == cls)
            assert SEMANTIC_CLASSES[cls] == out["objects"][i - 1]["shape"]
        assert np.all(np.isin(sem[inst == 0], (SKY, GROUND)))


def test_depth_is_positive_and_sky_gets_the_sky_constant():
    for out in all_scenes():
        depth, sky = out["depth"], out["semantic"] == SKY
        assert np.all(np.isfinite(depth)) and np.all(depth > 0)
        assert np.all(depth[sky] == SKY_DEPTH) and np.all(depth[~sky] < SKY_DEPTH)


def test_ground_depth_grows_toward_the_horizon():
    # the camera never rolls, so the ground's depth depends on the image row alone
    # and must shrink from the horizon down to the bottom of the image
    for out in all_scenes():
        ground = out["semantic"] == GROUND
        rows = [r for r in range(ground.shape[0]) if ground[r].any()]
        per_row = [out["depth"][r][ground[r]] for r in rows]
        for d in per_row:
            np.testing.assert_allclose(d, d[0], rtol=1e-4)
        assert np.all(np.diff([d[0] for d in per_row]) < 0)


def test_label_is_the_colour_of_the_largest_visible_object():
    labels = set()
    for out in all_scenes():
        label = int(out["label"])
        assert 0 <= label < NUM_LABELS
        sizes = [np.sum(out["instance"] == i) for i in range(1, len(out["boxes"]) + 1)]
        assert list(COLOURS)[label] == out["objects"][int(np.argmax(sizes))]["colour"]
        labels.add(label)
    assert len(labels) > 1


def test_caption_mentions_every_visible_object_and_a_relation():
    relations = ("left of", "right of", "in front of", "behind")
    for out in all_scenes():
        caption = out["caption"]
        for obj in out["objects"]:
            assert f"{obj['size']} {obj['colour']} {obj['shape']}" in caption
            assert obj["colour"] in COLOURS and obj["shape"] in OBJECT_SHAPES
        if len(out["objects"]) >= 2:
            assert any(rel in caption for rel in relations), caption


def test_rgb_shows_object_colours_and_is_not_flat():
    for out in all_scenes():
        rgb = out["rgb"].astype(np.float32)
        assert rgb.std() > 5
        # an object's pixels keep its hue: its strongest colour channel beats its weakest
        for i, obj in enumerate(out["objects"], start=1):
            colour = np.array(COLOURS[obj["colour"]])
            if colour.max() - colour.min() < 0.3:
                continue  # greys carry no hue
            mean = rgb[out["instance"] == i].mean(axis=0)
            assert mean[np.argmax(colour)] > mean[np.argmin(colour)], obj


@pytest.mark.parametrize("seed,index", [(0, 1), (0, 4), (7, 2)])
def test_normals_from_depth_gradients_agree_with_rendered_normals_on_planes(seed, index):
    """Back-project depth with the intrinsics, take the cross product of the 3D
    differences to the right and downward neighbours, and compare with the
    rendered normals wherever the 3x3 neighbourhood lies on one plane (ground
    pixels away from anything else, and cube faces)."""
    out = render_scene(seed, index, 128)
    R = 128
    v, u = np.mgrid[0:R, 0:R] + 0.5
    rays = np.stack([u, v, np.ones_like(u)], -1) @ np.linalg.inv(out["intrinsics"]).T
    points = out["depth"][..., None].astype(np.float64) * rays          # [R, R, 3] camera frame
    du = points[1:-1, 2:] - points[1:-1, :-2]
    dv = points[2:, 1:-1] - points[:-2, 1:-1]
    n = np.cross(dv, du)
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    rendered = out["normals"][1:-1, 1:-1]
    n *= np.sign((n * rendered).sum(-1, keepdims=True))   # orientation is the renderer's to pick
    inst, sem = out["instance"], out["semantic"]
    same = np.ones((R - 2, R - 2), bool)
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            same &= inst[1 + di:R - 1 + di, 1 + dj:R - 1 + dj] == inst[1:-1, 1:-1]
            same &= np.all(out["normals"][1 + di:R - 1 + di, 1 + dj:R - 1 + dj] == rendered, -1) | (
                sem[1:-1, 1:-1] == GROUND)
    planar = same & (sem[1:-1, 1:-1] != SKY) & ((sem[1:-1, 1:-1] == GROUND) | (
        sem[1:-1, 1:-1] == SEMANTIC_CLASSES.index("cube")))
    assert planar.sum() > 1000
    cos = np.clip((n * rendered).sum(-1)[planar], -1, 1)
    angle = np.degrees(np.arccos(cos))
    assert np.median(angle) < 0.5 and np.percentile(angle, 99) < 3.0, (np.median(angle), angle.max())
