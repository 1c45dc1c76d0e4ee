"""The labelled generations figure of fourm_jax.generate (fourm_jax.figure), without a model."""
import numpy as np
import pytest

from fourm_jax import figure

G, HEADER, LABEL, TEXT_TILES = figure.GAP, figure.HEADER, figure.LABEL_WIDTH, figure.TEXT_TILES
TOP = G + HEADER + G   # the first row's y


def _checker(n, size=32):
  """n distinct uint8 [size, size, 3] patterns: one colour per pixel, sample i shifted by i."""
  y, x = np.mgrid[:size, :size]
  return np.stack([np.stack([(x * 8 + i) % 256, (y * 8) % 256, ((x ^ y) * 16) % 256], -1)
                   for i in range(n)]).astype(np.uint8)


def _columns(n=2):
  return [("condition: rgb@32", "image", _checker(n)),
          ("condition: caption", "text", ["a red sphere"] * n),
          ("-> tok_depth@32", "image", _checker(n)[:, ::-1]),
          ("-> caption", "text", ["a blue cube left of a green cone", ""][:n] + ["x"] * (n - 2))]


def _x(columns, j, tile, row_labels=True):
  """The left edge of column j."""
  x = G + (LABEL + G if row_labels else 0)
  for _, kind, _ in columns[:j]:
    x += (tile if kind == "image" else TEXT_TILES * tile) + G
  return x


def _dark(region):
  return (region.max(-1) < 128).sum()


def test_figure_size_follows_from_columns_rows_and_tile():
  cols = _columns(3)
  im = figure.draw(cols)
  assert figure.tile_size(cols) == 128 and im.dtype == np.uint8
  assert im.shape == (G + HEADER + G + 3 * (128 + G), G + LABEL + G + 4 * G + 6 * 128, 3)
  im = figure.draw(cols, tile=64, row_labels=False)
  assert im.shape == (G + HEADER + G + 3 * (64 + G), G + 4 * G + 6 * 64, 3)
  big = [("-> rgb@224", "image", np.zeros((1, 224, 224, 3), np.uint8))]
  assert figure.draw(big).shape == (G + HEADER + G + 224 + G, G + LABEL + G + 224 + G, 3)


def test_header_has_a_drawn_title_over_every_column():
  cols = _columns()
  im = figure.draw(cols)
  for j, (_, kind, _) in enumerate(cols):
    w = 128 if kind == "image" else TEXT_TILES * 128
    band = im[G:G + HEADER, _x(cols, j, 128):_x(cols, j, 128) + w]
    assert _dark(band) > 20, cols[j][0]
  untitled = figure.draw([("", kind, data) for _, kind, data in cols])
  assert _dark(untitled[G:G + HEADER, G + LABEL + G:]) == 0


def test_text_cells_hold_dark_text_and_an_empty_string_leaves_a_blank_cell():
  cols = _columns()
  im = figure.draw(cols)
  for j in (1, 3):
    x = _x(cols, j, 128)
    for i in range(2):
      y = TOP + i * (128 + G)
      cell = im[y:y + 128, x:x + TEXT_TILES * 128]
      if cols[j][2][i]:
        assert _dark(cell) > 20, (j, i)
      else:
        assert (cell == cell[0, 0]).all() and cell[0, 0].min() > 200   # one light fill
  # the row labels: "sample 0" and "sample 1" in the left column
  for i in range(2):
    assert _dark(im[TOP + i * (128 + G):TOP + i * (128 + G) + 128, G:G + LABEL]) > 20


def test_image_tiles_are_nearest_neighbour_upscaled_in_place():
  cols = _columns()
  im = figure.draw(cols, tile=128)
  for j, i in [(0, 0), (0, 1), (2, 1)]:
    x, y = _x(cols, j, 128), TOP + i * (128 + G)
    want = np.repeat(np.repeat(cols[j][2][i], 4, 0), 4, 1)
    np.testing.assert_array_equal(im[y:y + 128, x:x + 128], want)
  # a tile that is not a whole multiple: still only the image's own colours
  odd = figure.upscale(_checker(1, 48)[0], 128)
  assert odd.shape == (128, 128, 3)
  colours = {tuple(c) for c in _checker(1, 48)[0].reshape(-1, 3)}
  assert {tuple(c) for c in odd.reshape(-1, 3)} <= colours


def test_long_text_is_cut_with_an_ellipsis():
  fnt = figure.font()
  lines = figure.wrap("word " * 5000, 200, 3, fnt)
  assert len(lines) == 3 and lines[-1].endswith(figure.ELLIPSIS)
  assert figure.wrap("short caption", 200, 3, fnt) == ["short caption"]
  unbroken = figure.wrap("x" * 10000, 100, 2, fnt)   # one huge word: broken, then cut
  assert len(unbroken) == 2 and unbroken[-1].endswith(figure.ELLIPSIS)
  boxes = " ".join(f"[xmin={i} ymin={i} xmax={i + 9} ymax={i + 9} sphere]" for i in range(500))
  im = figure.draw([("-> det", "text", [boxes, "x" * 5000]), ("", "text", ["\n\n\n", "a\nb"])])
  assert im.shape == figure.figure_size([(0, "text", 0)] * 2, 2, 128) + (3,)


def test_malformed_columns_say_what_is_wrong():
  with pytest.raises(ValueError, match="one entry per sample"):
    figure.draw([("a", "text", ["x", "y"]), ("b", "text", ["x"])])
  with pytest.raises(ValueError, match="must be uint8 \\[N, H, W, 3\\]"):
    figure.draw([("a", "image", np.zeros((2, 8, 8), np.uint8))])
  with pytest.raises(ValueError, match="kind 'video'"):
    figure.draw([("a", "video", [])])


def test_conditions_become_columns_in_the_order_given_with_a_caption_as_its_text():
  from types import SimpleNamespace
  from fourm_jax import generate
  model = SimpleNamespace(inputs=[SimpleNamespace(name="rgb@32", kind="pixels"),
                                  SimpleNamespace(name="caption", kind="seq"),
                                  SimpleNamespace(name="tok_depth@32", kind="image")])
  rgb = _checker(1)[0]
  cols = generate.condition_columns(["caption:a red sphere left of a blue cube", "rgb:x.png",
                                     "depth:d.npy"], model, {"rgb@32": rgb}, 3)
  assert [name for name, _ in cols] == ["caption", "rgb@32", "tok_depth@32"]
  assert [c[:2] for _, c in cols] == [("condition: caption", "text"),
                                      ("condition: rgb@32", "image"),
                                      ("condition: tok_depth@32", "text")]
  assert cols[0][1][2] == ["a red sphere left of a blue cube"] * 3
  assert cols[2][1][2] == ["d.npy"] * 3
  np.testing.assert_array_equal(cols[1][1][2], np.repeat(rgb[None], 3, 0))
  im = figure.draw([c for _, c in cols])     # the caption is drawn in every row
  x = G + LABEL + G
  for i in range(3):
    y = TOP + i * (128 + G)
    assert _dark(im[y:y + 128, x:x + TEXT_TILES * 128]) > 20
