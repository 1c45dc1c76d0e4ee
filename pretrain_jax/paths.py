"""User paths through etils.epath: local files and object stores (gs://, s3://) alike.

Every path a user passes (workdirs, data globs, shard outputs, exported
files) goes through these helpers, so a `gs://bucket/run` workdir works as a
local one does. URLs (anything with '://') are left as they are; relative
local paths are made absolute where a library needs that (Orbax).

Object stores cannot rename or append. A file that must appear whole
(`write_text`, `publish`) is written beside its final name and renamed
locally (atomic on POSIX), and uploaded in one request to an object store
(an object becomes visible only when its upload completes).
"""
from __future__ import annotations

import contextlib
import glob as glob_lib
import os
import shutil
import tempfile
from typing import Iterator

from etils import epath


def is_remote(path) -> bool:
  """True for URLs (gs://..., s3://...), False for local paths."""
  return "://" in os.fspath(path)


def resolve(path) -> str:
  """An absolute local path, or the URL unchanged."""
  path = os.fspath(path)
  return path if is_remote(path) else os.path.abspath(path)


def glob(pattern: str) -> list[str]:
  """Sorted paths matching `pattern` (shell wildcards). A local pattern is matched by
  glob.glob exactly as before; a URL by its filesystem's glob (through epath)."""
  if not is_remote(pattern):
    return sorted(glob_lib.glob(pattern))
  p = epath.Path(pattern)
  return sorted(os.fspath(m) for m in p.parent.glob(p.name))


def write_text(path, text: str) -> None:
  """Writes `path` whole: PATH.tmp then a rename locally, one upload to an object store."""
  path = os.fspath(path)
  if is_remote(path):
    epath.Path(path).write_text(text)
    return
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def staging_path(path) -> str:
  """A local file to write `path`'s content into before `publish(staging, path)`:
  PATH.tmp beside a local path; a fresh temporary file for a URL."""
  path = os.fspath(path)
  if not is_remote(path):
    return path + ".tmp"
  return os.path.join(tempfile.mkdtemp(prefix="pretrain_jax-"), os.path.basename(path) + ".tmp")


def publish(staging: str, path) -> None:
  """Moves a finished `staging_path(path)` file to `path`: a rename locally (atomic),
  an upload then removal of the temporary file for a URL."""
  path = os.fspath(path)
  if not is_remote(path):
    os.replace(staging, path)
    return
  epath.Path(staging).copy(epath.Path(path), overwrite=True)
  shutil.rmtree(os.path.dirname(staging), ignore_errors=True)


@contextlib.contextmanager
def local_copy(path) -> Iterator[str]:
  """A local file holding `path`'s bytes (the path itself when local), for readers that
  need a real file (safetensors, torch)."""
  path = os.fspath(path)
  if not is_remote(path):
    yield path
    return
  tmp = tempfile.mkdtemp(prefix="pretrain_jax-")
  try:
    local = os.path.join(tmp, os.path.basename(path))
    epath.Path(path).copy(epath.Path(local), overwrite=True)
    yield local
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
