"""Shared test fixtures: configs loaded from the repository's config files."""
import importlib.util
import os
import pathlib

import pytest

# The tests run on the CPU. With libtpu installed (the `.[tpu]` extra, for the TPU compiler's
# plans) JAX would otherwise probe for a TPU in every process, for seconds each.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def config_module(rel_path: str):
  """A config file as a module (for its helper functions)."""
  spec = importlib.util.spec_from_file_location("cfg_" + rel_path.replace("/", "_")[:-3],
                                                ROOT / rel_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(rel_path: str, arg: str = ""):
  module = config_module(rel_path)
  return module.get_config(arg) if arg else module.get_config()


@pytest.fixture
def tiny_aim_config():
  return load_config("configs/aim/pretrain.py", "variant=tiny")


def subprocess_env(**extra):
  """Environment for child Python processes: quiet TF, repository on the path."""
  env = dict(os.environ)
  env.update({"TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}, **extra)
  return env
