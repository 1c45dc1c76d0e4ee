"""pretrain_jax.host_memory: on the CPU backend the training command line has glibc keep freed
memory, so that a block allocated again after a free (XLA's per-step temporaries) faults in
no fresh pages. The settings last for a process's life, so each check that applies them runs
in a process of its own."""
import subprocess
import sys

import pytest

from conftest import ROOT, subprocess_env
from pretrain_jax import host_memory

FAULTS_AFTER_FREE = """
import resource, sys
import numpy as np
sys.path.insert(0, {root!r})
from pretrain_jax import host_memory
print(host_memory.configure(sys.argv[1], sys.argv[2]), file=sys.stderr)
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
a = np.ones(64 << 20, np.float32); del a          # 256 MiB, touched, freed
before = faults()
b = np.ones(64 << 20, np.float32)                 # the same size again, touched
print(faults() - before)
"""


def _faults(mode, backend):
  proc = subprocess.run([sys.executable, "-c", FAULTS_AFTER_FREE.format(root=str(ROOT)), mode,
                         backend], capture_output=True, text=True, env=subprocess_env(),
                        timeout=120)
  assert proc.returncode == 0, proc.stderr
  return int(proc.stdout.split()[-1]), proc.stderr


def test_on_the_cpu_backend_a_freed_block_does_not_fault_again():
  """A 256 MiB block allocated again after a free touches no fresh page under 'auto' on the
  CPU backend (as the command line configures it); by default glibc maps such a block afresh
  and faults every page in again (65,536 of 4 KiB; 640 where numpy gets 2 MiB transparent
  huge pages; never fewer than 128). 'auto' on a GPU backend leaves the allocator alone."""
  default, _ = _faults("default", "cpu")
  keep, applied = _faults("auto", "cpu")
  gpu, untouched = _faults("auto", "gpu")
  assert "'M_MMAP_MAX': 0" in applied and "'M_TRIM_THRESHOLD': -1" in applied
  assert untouched.strip().endswith("None")
  assert default > 100 and gpu > 100 and keep < 10, (default, gpu, keep)


XLA_FAULTS = """
import logging, resource, sys
sys.path.insert(0, {root!r})
logging.basicConfig(level=logging.INFO)
mode, when = sys.argv[1:]
from pretrain_jax import host_memory
if when == "late":
  import jax
  jax.numpy.zeros(1).block_until_ready()         # the backend starts here
host_memory.configure(mode, "cpu")
import jax, jax.numpy as jnp
x = jnp.linspace(0.0, 1.0, 16 << 20)               # 64 MiB
f = jax.jit(lambda x: jnp.sum(jnp.cumsum(x)[::-1] * jnp.cumsum(x[::-1])))
temp = f.lower(x).compile().memory_analysis().temp_size_in_bytes
f(x).block_until_ready()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
before = faults()
for _ in range(3):
  f(x).block_until_ready()
print(temp, (faults() - before) // 3)
"""


def _xla_faults(mode, when="early"):
  proc = subprocess.run([sys.executable, "-c", XLA_FAULTS.format(root=str(ROOT)), mode, when],
                        capture_output=True, text=True, timeout=300,
                        env=subprocess_env(JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  temp, faults = proc.stdout.split()[-2:]
  return int(temp), int(faults), proc.stderr


def test_xla_temporaries_fault_less_when_configured_before_the_backend_starts():
  """The case it is for: a jitted call with 200 MiB of temporaries, called again and again.
  By default each call faults its temporaries in afresh (about 68,000 pages here); configured
  before JAX's backend starts, far fewer (about 29,000 here, where the machine's memory
  manager reclaims some idle pages; none on a plain kernel). Configured after, XLA's threads
  already have arenas of their own; that is logged as a warning."""
  temp, default, _ = _xla_faults("default")
  assert temp > 64 << 20              # past glibc's largest mmap threshold (32 MiB)
  _, keep, _ = _xla_faults("auto")
  assert keep < 0.7 * default, (keep, default)
  _, _, late = _xla_faults("auto", "late")
  assert "backend has started already" in late


def test_the_backend_is_told_from_jax_platforms_or_device_nodes(tmp_path):
  assert host_memory.expected_backend("cpu") == "cpu"
  assert host_memory.expected_backend("cuda,cpu") == "accelerator"
  assert host_memory.expected_backend("tpu") == "accelerator"
  nodes = (str(tmp_path / "accel[0-9]*"),)
  assert host_memory.expected_backend("", nodes) == "cpu"
  (tmp_path / "accel0").touch()
  assert host_memory.expected_backend("", nodes) == "accelerator"


def test_modes_that_change_nothing_and_a_bad_mode():
  assert host_memory.configure("default", "cpu") is None
  assert host_memory.configure("auto", "accelerator") is None
  with pytest.raises(ValueError, match="host memory mode must be one of"):
    host_memory.configure("always", "cpu")


def test_the_training_command_line_keeps_freed_memory_on_cpu(tmp_path):
  cmd = [sys.executable, "-m", "aimjax.train", "--config=configs/aim/pretrain.py:variant=tiny",
         f"--workdir={tmp_path}", "--config.total_steps=1", "--config.eval_every=0"]
  proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(JAX_PLATFORMS="cpu"),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "host memory: glibc keeps freed memory" in proc.stderr
  assert "--host_malloc=auto" in proc.stderr
  bad = subprocess.run(cmd + ["--host_malloc=always"], cwd=ROOT, capture_output=True,
                       text=True, env=subprocess_env(JAX_PLATFORMS="cpu"), timeout=120)
  assert bad.returncode != 0 and "host_malloc" in bad.stderr, bad.stderr[-2000:]
