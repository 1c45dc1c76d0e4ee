"""The labelled figure of fourm_jax.generate: titled columns, one row per sample.

A column is `(title, kind, data)`: kind "image" with data uint8 [N, H, W, 3], or kind
"text" with data a list of N strings (a caption, det's box string, a given condition's
text). Image tiles are upscaled by nearest neighbour to one square tile size, text is
wrapped into a cell of the same height and cut with an ellipsis when it does not fit.
"""
from __future__ import annotations

import numpy as np

TILE_MIN = 128         # px: the smallest tile side; smaller images are upscaled to it
GAP = 4                # px: between tiles, and around the figure
FONT_SIZE = 14         # px
LINE = FONT_SIZE + 4   # px: the height of one line of text
PAD = 4                # px: inside a text cell and the header, around the text
HEADER = 2 * LINE + 2 * PAD   # px: the title band, two lines of title
LABEL_WIDTH = 72       # px: the left "sample i" column
TEXT_TILES = 2         # a text column is this many tiles wide
BACKGROUND = (255, 255, 255)
TEXT_CELL = (244, 244, 244)   # a text cell's fill, so its extent shows
INK = (20, 20, 20)
ELLIPSIS = "…"


def font(size: int = FONT_SIZE):
  """Pillow's bundled font at `size` px (Pillow >= 10.1), else its fixed bitmap font."""
  from PIL import ImageFont
  try:
    return ImageFont.load_default(size=size)
  except (TypeError, ImportError, OSError):   # older Pillow, or no FreeType
    return ImageFont.load_default()


def tile_size(columns) -> int:
  """The square tile side: the largest image side, at least TILE_MIN px."""
  sides = [max(np.shape(data)[1:3]) for _, kind, data in columns if kind == "image"]
  return max([TILE_MIN, *sides])


def column_width(kind: str, tile: int) -> int:
  return tile if kind == "image" else TEXT_TILES * tile


def figure_size(columns, num_rows: int, tile: int, row_labels: bool = True) -> tuple[int, int]:
  """(height, width) in px of the figure of `columns` with `num_rows` samples."""
  width = GAP + (LABEL_WIDTH + GAP if row_labels else 0)
  width += sum(column_width(kind, tile) + GAP for _, kind, _ in columns)
  return GAP + HEADER + GAP + num_rows * (tile + GAP), width


def upscale(image: np.ndarray, tile: int) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [tile, tile, 3]: nearest neighbour, aspect kept, centred."""
  h, w = image.shape[:2]
  if h == w and tile % h == 0:   # exact blocks, no resampling rule to depend on
    return np.repeat(np.repeat(image, tile // h, 0), tile // h, 1)
  from PIL import Image
  scale = tile / max(h, w)
  sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
  small = np.asarray(Image.fromarray(image).resize((sw, sh), Image.NEAREST))
  out = np.full((tile, tile, 3), BACKGROUND, np.uint8)
  y, x = (tile - sh) // 2, (tile - sw) // 2
  out[y:y + sh, x:x + sw] = small
  return out


def wrap(text: str, width: int, max_lines: int, fnt) -> list[str]:
  """`text` -> at most `max_lines` lines of at most `width` px; an ellipsis ends cut text."""
  from PIL import Image, ImageDraw
  measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
  fits = lambda s: measure(s, font=fnt) <= width
  lines = []
  for paragraph in str(text).splitlines() or [""]:
    line = ""
    for word in paragraph.split():
      if fits(f"{line} {word}".strip()):
        line = f"{line} {word}".strip()
        continue
      if line:
        lines.append(line)
      while not fits(word) and len(lines) <= max_lines:   # a word wider than the cell
        lo, hi = 1, len(word) - 1          # breaks at the longest prefix that fits
        while lo < hi:
          mid = (lo + hi + 1) // 2
          lo, hi = (mid, hi) if fits(word[:mid]) else (lo, mid - 1)
        lines.append(word[:lo])
        word = word[lo:]
      line = word
      if len(lines) > max_lines:   # enough to know it is cut: stop measuring
        break
    lines.append(line)
    if len(lines) > max_lines:
      break
  if len(lines) <= max_lines:
    return lines
  last = lines[max_lines - 1]
  while last and not fits(last + ELLIPSIS):
    last = last[:-1]
  return lines[:max_lines - 1] + [last.rstrip() + ELLIPSIS]


def _check(columns) -> int:
  """The number of rows of `columns`, after checking their kinds and shapes."""
  if not columns:
    raise ValueError("a figure needs at least one column; got none")
  rows = set()
  for title, kind, data in columns:
    if kind == "image":
      shape = np.shape(data)
      if len(shape) != 4 or shape[-1] != 3 or np.asarray(data).dtype != np.uint8:
        raise ValueError(f"image column {title!r} must be uint8 [N, H, W, 3], got "
                         f"{np.asarray(data).dtype} {shape}")
      rows.add(shape[0])
    elif kind == "text":
      rows.add(len(data))
    else:
      raise ValueError(f"column {title!r} has kind {kind!r}; expected 'image' or 'text'")
  if len(rows) != 1:
    counts = {title: len(data) for title, _, data in columns}
    raise ValueError(f"every column needs one entry per sample; got these counts: {counts}")
  return rows.pop()


def draw(columns, tile: int | None = None, row_labels: bool = True) -> np.ndarray:
  """Titled columns -> the figure, uint8 [H, W, 3].

  Args:
    columns: [(title, kind, data)]: kind "image" with data uint8 [N, h, w, 3], or "text"
      with data N strings; drawn left to right under their titles.
    tile: the square tile side in px; None: tile_size(columns).
    row_labels: whether a left column says "sample i".

  Returns:
    uint8 [H, W, 3], (H, W) = figure_size(columns, N, tile, row_labels).
  """
  from PIL import Image, ImageDraw
  n = _check(columns)
  tile = tile or tile_size(columns)
  height, width = figure_size(columns, n, tile, row_labels)
  canvas = Image.new("RGB", (width, height), BACKGROUND)
  pen = ImageDraw.Draw(canvas)
  fnt = font()
  top = GAP + HEADER + GAP
  row_y = [top + i * (tile + GAP) for i in range(n)]
  x = GAP
  if row_labels:
    for i, y in enumerate(row_y):
      pen.text((x + PAD, y + (tile - LINE) // 2), f"sample {i}", font=fnt, fill=INK)
    x += LABEL_WIDTH + GAP
  for title, kind, data in columns:
    w = column_width(kind, tile)
    for k, line in enumerate(wrap(title, w - 2 * PAD, 2, fnt)):
      pen.text((x + PAD, GAP + PAD + k * LINE), line, font=fnt, fill=INK)
    for i, y in enumerate(row_y):
      if kind == "image":
        canvas.paste(Image.fromarray(upscale(np.asarray(data[i]), tile)), (x, y))
      else:
        pen.rectangle((x, y, x + w - 1, y + tile - 1), fill=TEXT_CELL)
        lines = wrap(data[i], w - 2 * PAD, max(1, (tile - 2 * PAD) // LINE), fnt)
        for k, line in enumerate(lines):
          pen.text((x + PAD, y + PAD + k * LINE), line, font=fnt, fill=INK)
    x += w + GAP
  return np.asarray(canvas)
