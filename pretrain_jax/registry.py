"""Named plug-ins the core finds without naming them: backbones, training tasks.

A project registers its plug-ins as Python entry points in pyproject.toml,

  [project.entry-points."pretrain_jax.backbones"]
  mae = "maejax.backbone:load"

and the core looks them up by group and name; the target ("module" or
"module:attribute") is imported only when it is loaded, so listing names
imports no project. `register` adds one in-process (a notebook, a test, a
project not installed with pip); it shadows an entry point of the same name.
Entry points are read from the installed package metadata: after adding one,
reinstall (`pip install --no-deps -e .`).
"""
from __future__ import annotations

import importlib
from importlib import metadata
from typing import Any

BACKBONES = "pretrain_jax.backbones"   # name -> load(init_from, image_size=0, step=None, **options)
TASKS = "pretrain_jax.tasks"           # config family (configs/<name>/) -> module with build_task

_LOCAL: dict[str, dict[str, Any]] = {}


def register(group: str, name: str, target: Any) -> None:
  """Registers `target` ("module:attribute", "module", or the object itself) as `name`."""
  _LOCAL.setdefault(group, {})[name] = target


def _entry_points(group: str) -> dict[str, metadata.EntryPoint]:
  return {ep.name: ep for ep in metadata.entry_points(group=group)}


def names(group: str) -> list[str]:
  """The registered names of `group`, sorted (nothing is imported)."""
  return sorted(set(_entry_points(group)) | set(_LOCAL.get(group, {})))


def _resolve(target: str) -> Any:
  module, _, attr = target.partition(":")
  obj = importlib.import_module(module.strip())
  for part in filter(None, attr.strip().split(".")):
    obj = getattr(obj, part)
  return obj


def load(group: str, name: str, key: str = "") -> Any:
  """The object registered as `name` in `group` (imported now).

  key: the config key or flag that named it, for the error. Raises ValueError
  listing the registered names when `name` is not one of them.
  """
  local = _LOCAL.get(group, {})
  if name in local:
    target = local[name]
    return _resolve(target) if isinstance(target, str) else target
  eps = _entry_points(group)
  if name in eps:
    return eps[name].load()
  known = names(group)
  where = f"{key} " if key else ""
  hint = (f"; registered: {known}" if known else
          f"; nothing is registered in entry point group {group!r}: install the packages that "
          "provide them (pip install -e . from the repository root)")
  raise ValueError(f"{where}{name!r} is not a registered {group.rsplit('.', 1)[-1][:-1]}{hint}")
