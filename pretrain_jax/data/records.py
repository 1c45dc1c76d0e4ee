"""The record format of the framework's ArrayRecord shards.

A record is a msgpack map from field name to value. Images are stored
encoded (PNG/JPEG bytes) under `image`; other arrays as
`{"dtype", "shape", "zdata"}` (zlib-compressed raw bytes); strings and
numbers as themselves. The scenes dataset and the pseudo-labelling pipeline
write the same format, one field per modality:

  image        bytes  PNG of uint8 [H, W, 3]
  depth        float16 [H, W]        distance along the camera axis
  normals      float16 [H, W, 3]     unit normals, camera frame
  semantic     uint8 [H, W]          class ids
  instance     uint8 [H, W]          0 = none, i = object i (row i-1 of boxes)
  boxes        float32 [N, 4]        xmin, ymin, xmax, ymax in [0, 1]
  box_classes  int32 [N]
  caption      str
  label        int                   scene-level class
"""
from __future__ import annotations

import io
import zlib
from typing import Any

import msgpack
import numpy as np
from PIL import Image


def encode_array(x: np.ndarray) -> dict[str, Any]:
  x = np.ascontiguousarray(x)
  return {"dtype": x.dtype.str, "shape": list(x.shape), "zdata": zlib.compress(x.tobytes(), 3)}


def decode_array(value: dict[str, Any]) -> np.ndarray:
  raw = zlib.decompress(value["zdata"])
  return np.frombuffer(raw, dtype=np.dtype(value["dtype"])).reshape(value["shape"])


def encode_png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


def encode_record(sample: dict[str, Any]) -> bytes:
  """Serialises a sample; `image` (uint8 [H, W, 3]) is PNG-encoded."""
  out = {}
  for key, value in sample.items():
    if key == "image" and isinstance(value, np.ndarray):
      out[key] = encode_png(value)
    elif isinstance(value, np.ndarray) and value.ndim > 0:
      out[key] = encode_array(value)
    elif isinstance(value, (np.generic, np.ndarray)):
      out[key] = value.item()
    else:
      out[key] = value
  return msgpack.packb(out, use_bin_type=True)


def decode_record(data: bytes) -> dict[str, Any]:
  """Inverse of `encode_record`, except `image` stays encoded (see decode_image)."""
  record = msgpack.unpackb(data, raw=False)
  if not isinstance(record, dict):
    raise ValueError(f"record is a {type(record).__name__}, expected a map of fields")
  return {k: decode_array(v) if isinstance(v, dict) and "zdata" in v else v
          for k, v in record.items()}


def decode_image(value: Any) -> np.ndarray:
  """Encoded bytes or an array -> uint8 [H, W, 3].

  Encoded images of any mode (grayscale, CMYK, palette) are converted to
  RGB; a raw array must already be [H, W, 3] uint8. Bytes that are no image
  raise ValueError saying what they start with (PIL's own message names only
  its in-memory buffer's address; the caller names the record).
  """
  if isinstance(value, (bytes, bytearray)):
    try:
      img = Image.open(io.BytesIO(value))
    except Image.UnidentifiedImageError:
      raise ValueError(f"image bytes are in no format PIL reads ({len(value)} bytes, "
                       f"starting {bytes(value[:8])!r})") from None
    with img:
      return np.asarray(img.convert("RGB"))
  image = np.asarray(value)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
  return image
