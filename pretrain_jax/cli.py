"""Command-line entry shared by every training script.

`--config=path.py:arg` loads `get_config(arg)`; `--config.key=value`
overrides any key (an unknown key or a value of the wrong type fails at
start naming the key); `--workdir` holds checkpoints, metrics and logs, and
a run started on a workdir with checkpoints resumes from the latest one.
Every entry point parses its flags with `parse_flags`: `--help` (or `-h`)
prints the module's docstring and its own flags, these shared ones included,
and exits 0.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file: path.py or path.py:arg (e.g. :variant=tiny).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
flags.DEFINE_bool("verbose_libraries", False, "Keep Orbax/Grain/JAX INFO logs.")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "jax.distributed.initialize(): auto-detect a multi-process job, always, never.")
flags.DEFINE_enum("host_malloc", "auto", ["auto", "keep", "default"],
                  "glibc keeps freed host memory, so that XLA's per-step temporaries on the CPU "
                  "backend do not fault in fresh pages every step: auto (on the CPU backend), "
                  "keep (always), default (leave the allocator alone). See "
                  "pretrain_jax/host_memory.py.")


def config_from_file(path: str, arg: str = ""):
  """`get_config(arg)` of a config file, as --config=path.py:arg loads it (for scripts,
  notebooks and benchmarks)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "config_" + os.path.basename(path).removesuffix(".py"), path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


_QUIET = ("/orbax/", "/grain/", "/jax/", "/absl/", "/tensorflow")


class _LibraryInfoFilter(logging.Filter):
  """Drops the libraries' INFO chatter (Orbax logs ~40 lines per save); keeps warnings."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or not any(q in record.pathname for q in _QUIET)


def run(main: Callable[[object, str], object],
        validate: Callable[[object], None] | None = None, require_workdir: bool = True) -> None:
  """Parses flags, runs `validate(config)`, then `main(config, workdir)`.

  Training scripts pass `loop.validate_config` as `validate`. Tools that
  write elsewhere (pseudo-labelling) pass require_workdir=False and get the
  workdir as None when it is not given.

  Errors a user can fix (bad config values, missing data, non-finite loss)
  are printed as one line naming the problem instead of a traceback.
  """
  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.workdir is None and require_workdir:
      raise app.UsageError("--workdir is required")
    config = _CONFIG.value
    logging.getLogger().setLevel(logging.INFO)
    if not FLAGS.verbose_libraries:
      for handler in logging.getLogger().handlers:
        handler.addFilter(_LibraryInfoFilter())
    from pretrain_jax import host_memory   # before JAX's backend starts: see its docstring
    try:
      host_memory.configure(FLAGS.host_malloc)
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(1)
    from pretrain_jax import mesh as mesh_lib  # after flags: may call jax.distributed
    mesh_lib.maybe_initialize_distributed(FLAGS.distributed)
    workdir = FLAGS.workdir
    if workdir:   # resolved once: absolute when local (Orbax needs that), URLs as given
      from etils import epath
      from pretrain_jax import paths
      workdir = paths.resolve(workdir)
      epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    try:
      if validate is not None:
        validate(config)
      main(config, workdir)
    except (ValueError, FileNotFoundError, KeyError, TypeError, RuntimeError) as e:
      from pretrain_jax.loop import NonFiniteLossError
      from pretrain_jax.data.errors import DataError
      if isinstance(e, (ValueError, FileNotFoundError, NonFiniteLossError, DataError)):
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
      raise

  flags.mark_flags_as_required(["config"])
  show_in_help("config", "workdir", "distributed", "host_malloc", "verbose_libraries")
  app.run(_main, flags_parser=parse_flags)


def show_in_help(*names: str) -> None:
  """Lists these flags (defined here or elsewhere) in the running module's --help.

  absl's --help shows only the main module's key flags; the shared ones defined
  here would otherwise appear only in --helpfull, among every library's.
  """
  for name in names:
    FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS[name])


_HELP = ("--help", "-?", "--helpshort", "--helpfull", "--helpxml")


def parse_flags(argv):
  """absl's parser (app.run's flags_parser), with a few fixes for a command line.

  `--help` and `-h` print the usage and exit 0 (absl exits 1), also into a
  closed pipe (`--help | head`); an override of a key the config lacks is one
  clear line.
  """
  end = argv.index("--") if "--" in argv else len(argv)
  argv = [a if a != "-h" or i >= end else "--help" for i, a in enumerate(argv)]
  asks_help = any(a.split("=", 1)[0] in _HELP for a in argv[1:end])
  try:
    return FLAGS(argv)
  except SystemExit as e:   # absl's help flags print the usage, then exit 1
    if e.code == 1 and asks_help:
      sys.exit(0)
    raise
  except BrokenPipeError:
    if not asks_help:
      raise
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no error at exit
    sys.exit(0)
  except flags.Error as e:   # e.g. --config.model.width=banana
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except (AttributeError, KeyError) as e:
    missing = str(e).strip("\"'")
    overrides = [a.split("=", 1)[0][2:] for a in argv[1:] if a.startswith("--config.")]
    named = [o for o in overrides if missing in o.split(".")[1:]] or overrides
    config_file = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
    print(f"error: unknown config key '{named[0][len('config.'):] if named else missing}' "
          f"(not in {config_file or 'the config'}); check the spelling against the config file",
          file=sys.stderr)
    sys.exit(2)
