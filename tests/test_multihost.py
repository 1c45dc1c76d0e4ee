"""Multi-host: the host layouts of real TPU slices (mock devices with libtpu's coordinates
and host ids), the DCN split by hosts, and real multi-process runs on this machine
(`launch/local.sh --processes=2 --fake-devices=4`, jax.distributed on localhost)."""
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, load_config, subprocess_env
from pretrain_jax import mesh as mesh_lib, metrics as metrics_lib, partitioning, topology
from pretrain_jax.data import pipeline

# jax's names of the five slices: v4-32, v5litepod-16, v5p-32, v5p-256, v6e-256
TOPOLOGIES = ["v4:2x2x4", "v5e:4x4", "v5p:2x2x4", "v5p:4x4x8", "v6e:16x16"]


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="checks the mocks against libtpu's topologies: pip install -e '.[tpu]'")
def test_mock_tpu_devices_are_libtpus_layouts():
  script = f"""
from jax.experimental import mesh_utils, topologies
from pretrain_jax import topology
for name in {TOPOLOGIES!r}:
  kw = {{"chip_config_name": "megacore"}} if name.startswith(("v4", "v5p")) else {{}}
  real = topologies.get_topology_desc(platform="tpu", topology_name=name, **kw).devices
  mock = topology.mock_tpu_devices(name)
  key = lambda d: (d.id, tuple(d.coords), d.process_index)
  assert [key(d) for d in real] == [key(d) for d in mock], name
  n = len(real)
  ids = lambda ds: [d.id for d in mesh_utils.create_device_mesh((1, n, 1), ds).flat]
  assert ids(real) == ids(mock), name
print("match")
"""
  proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                        env=subprocess_env(JAX_PLATFORMS="cpu"), timeout=300)
  assert proc.returncode == 0 and "match" in proc.stdout, proc.stderr[-3000:]


def test_tpu_hosts_hold_scattered_rows():
  """What the issue found with jax's own mesh utilities: on a v5p-256 (4x4x8, fsdp 128),
  host 0's chips sit at batch positions 0, 8, 32, 40."""
  devices = topology.mock_tpu_devices("v5p:4x4x8")
  array, ici, dcn = mesh_lib.device_array({"data": 1, "fsdp": -1, "tensor": 1}, devices)
  assert ici == (1, 128, 1) and dcn == (1, 1, 1)
  assert partitioning.batch_rows(array, 128, 0) == (0, 8, 32, 40)
  assert topology.num_hosts("v5p:4x4x8") == 32 and len(devices) == 128


def _small_data():
  cfg = load_config("configs/aim/pretrain.py", "variant=tiny").data
  cfg.image_size, cfg.scenes_resolution, cfg.threads = 16, 24, 1
  return cfg


@pytest.mark.parametrize("name", TOPOLOGIES)
@pytest.mark.parametrize("degrees", [(1, -1, 1), (2, -1, 2)], ids=["fsdp", "data2-tensor2"])
def test_each_host_loads_its_rows_and_all_hosts_make_the_global_batch(name, degrees):
  """For every host of the slice: the rows it feeds, loaded through the real AIM pipeline
  with only those rows, put together over all hosts, are the one-process global batch
  (augmentation included); hosts whose chips differ only along 'tensor' load the same rows."""
  devices = topology.mock_tpu_devices(name)
  mesh_cfg = dict(zip(("data", "fsdp", "tensor"), degrees))
  array, ici, _ = mesh_lib.device_array(mesh_cfg, devices)
  batch = 2 * ici[0] * ici[1]            # two rows per data-parallel shard
  data = _small_data()
  full = next(iter(pipeline.train_dataset(data, batch, seed=3)))
  hosts = sorted({d.process_index for d in devices})
  assembled = np.zeros_like(full["image"])
  seen = np.zeros(batch, int)
  for host in hosts:
    rows = partitioning.batch_rows(array, batch, host)
    assert list(rows) == sorted(set(rows))
    part = next(iter(pipeline.train_dataset(data, batch, seed=3, rows=rows)))
    assert part["image"].shape[0] == len(rows)
    if seen[list(rows)].any():       # shared with another host: must be the same examples
      np.testing.assert_array_equal(assembled[list(rows)], part["image"])
    assembled[list(rows)] = part["image"]
    seen[list(rows)] += 1
  np.testing.assert_array_equal(assembled, full["image"])
  # every row is loaded by as many hosts as hold its devices along 'tensor' (and no more)
  per_row = {r: set() for r in range(batch)}
  for (i, j, _), d in np.ndenumerate(array):
    block = i * array.shape[1] + j
    for r in range(block * 2, block * 2 + 2):
      per_row[r].add(d.process_index)
  assert [len(per_row[r]) for r in range(batch)] == list(seen)
  if degrees[2] == 1:
    assert set(seen) == {1}


def test_dcn_degrees_count_hosts_not_processes():
  """One process per GPU, 2 hosts of 4 GPUs: dcn_data=2 splits the 2 hosts (not 8
  processes), each data-parallel half lies on one host; without DCN degrees the hosts
  form one mesh. On TPU, the granule is the slice, not the host."""
  class Gpu:
    platform, device_kind = "gpu", "NVIDIA H100 80GB HBM3"

    def __init__(self, i):
      self.id = self.process_index = i

    def __repr__(self):
      return f"gpu{self.id}"

  gpus = [Gpu(i) for i in range(8)]
  hosts = [0, 0, 0, 0, 1, 1, 1, 1]
  array, ici, dcn = mesh_lib.device_array({"data": 1, "fsdp": -1, "tensor": 1, "dcn_data": 2},
                                          gpus, hosts)
  assert (ici, dcn) == ((1, 4, 1), (2, 1, 1))
  assert [{hosts[d.id] for d in array[i].flat} for i in range(2)] == [{0}, {1}]
  array, ici, dcn = mesh_lib.device_array({"data": 1, "fsdp": -1, "tensor": 1}, gpus, hosts)
  assert (ici, dcn) == ((1, 8, 1), (1, 1, 1))
  with pytest.raises(ValueError, match="dcn_"):
    mesh_lib.device_array({"data": 1, "fsdp": -1, "tensor": 1, "dcn_data": 8}, gpus, hosts)
  two_slices = topology.mock_tpu_devices("v5p:2x2x4", num_slices=2)   # 8 hosts, 2 slices
  array, ici, dcn = mesh_lib.device_array(
      {"data": 1, "fsdp": -1, "tensor": 1, "dcn_data": 2}, two_slices)
  assert (ici, dcn) == ((1, 16, 1), (2, 1, 1))
  assert [{d.slice_index for d in array[i].flat} for i in range(2)] == [{0}, {1}]


def test_job_description_comes_from_the_environment(monkeypatch):
  calls = []
  monkeypatch.setattr(mesh_lib.jax.distributed, "initialize", lambda **kw: calls.append(kw))
  for key in ("SLURM_STEP_NUM_TASKS", "COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES",
              "MEGASCALE_COORDINATOR_ADDRESS", "JAX_HEARTBEAT_TIMEOUT_SECONDS"):
    monkeypatch.delenv(key, raising=False)
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "3")
  mesh_lib.maybe_initialize_distributed("auto")
  assert calls == [{"num_processes": 4, "process_id": 3}]
  monkeypatch.setenv("JAX_PROCESS_ID", "4")
  with pytest.raises(ValueError, match="JAX_PROCESS_ID=4"):
    mesh_lib.maybe_initialize_distributed("auto")
  monkeypatch.delenv("JAX_PROCESS_ID")
  with pytest.raises(ValueError, match="both JAX_NUM_PROCESSES and JAX_PROCESS_ID"):
    mesh_lib.maybe_initialize_distributed("auto")


# ---- real processes -------------------------------------------------------------------

AIM_ARGS = ["aimjax.train", "--config=configs/aim/pretrain.py:variant=tiny",
            "--config.total_steps=30", "--config.log_every=10", "--config.mesh.fsdp=8"]


def _launch(*args, timeout=600):
  """launch/local.sh with the README's relative paths, from the checkout."""
  return subprocess.run(["bash", "launch/local.sh", *args], cwd=ROOT, env=subprocess_env(),
                        capture_output=True, text=True, timeout=timeout)


def _losses(workdir):
  rows = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  return {s: r["loss"] for s, r in rows.items() if "loss" in r}


@pytest.fixture(scope="module")
def aim_runs(tmp_path_factory):
  """The issue's command on 2 processes x 4 fake devices and on 1 process x 8."""
  root = tmp_path_factory.mktemp("multihost")
  out = {}
  for name, launch_args in (("one", ["--fake-devices=8"]),
                            ("two", ["--processes=2", "--fake-devices=4"])):
    workdir = root / name
    proc = _launch(*launch_args, *AIM_ARGS, f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    out[name] = (workdir, proc)
  return out


@pytest.mark.slow
def test_two_processes_train_like_one(aim_runs):
  one, two = _losses(aim_runs["one"][0]), _losses(aim_runs["two"][0])
  assert sorted(one) == sorted(two) == [10, 20, 30]
  for step in one:
    assert abs(one[step] - two[step]) <= 1e-5, (step, one[step], two[step])
  workdir, proc = aim_runs["two"]
  # metrics written once (process 0), checkpoints once, each process's log in WORKDIR/logs
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["step"] for l in lines] == [10, 20, 30]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["30"]
  for k in (0, 1):
    log = (workdir / "logs" / f"process_{k}.log").read_text()
    assert f"process {k} of 2 feeds batch rows" in log
    assert f"[p{k}] " in proc.stdout + proc.stderr
  assert "process 0 of 2 feeds batch rows [0, 16)" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_a_killed_process_stops_the_job_and_the_rerun_resumes_exactly(aim_runs, tmp_path):
  """SIGKILL of process 1 after step 15 (checkpoints every 10): the launcher stops
  process 0 within 60 s and exits non-zero; the same command again resumes from step 10
  and logs the uninterrupted run's losses at 20 and 30."""
  args = ["--processes=2", "--fake-devices=4", *AIM_ARGS, f"--workdir={tmp_path}",
          "--config.checkpoint_every=10"]
  proc = _launch(*args, "--config.debug.crash_at_step=15", "--config.debug.crash_process=1")
  done = time.time()
  assert proc.returncode != 0
  assert "process 1 exited with status 137" in proc.stderr, proc.stderr[-2000:]
  # metrics.jsonl was last written at step 10, a few steps before the kill
  assert done - os.path.getmtime(tmp_path / "metrics.jsonl") < 60
  assert os.listdir(tmp_path / "checkpoints") == ["10"]
  proc = _launch(*args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Resuming from step 10" in proc.stdout + proc.stderr
  resumed, straight = _losses(tmp_path), _losses(aim_runs["one"][0])
  assert {s: resumed[s] for s in (20, 30)} == pytest.approx(
      {s: straight[s] for s in (20, 30)}, abs=1e-5)


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_interleaved_device_order_gives_scattered_rows_and_trains(aim_runs, tmp_path):
  """2 processes whose devices alternate along fsdp: each loads every other block of 4 rows
  ([0, 4) [8, 12) ... for process 0), and the first 10 steps match the one-process run."""
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "tests/multihost_check.py", str(tmp_path), "10"], cwd=ROOT,
      env=subprocess_env(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                         JAX_PROCESS_ID=str(k), JAX_PLATFORMS="cpu",
                         XLA_FLAGS="--xla_force_host_platform_device_count=4",
                         PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}"),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(2)]
  try:
    outs = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGKILL)
  results = {}
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
    r = json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])
    results[r["process"]] = r
  assert results[0]["rows"] == [r for b in range(0, 8, 2) for r in range(4 * b, 4 * b + 4)]
  assert results[1]["rows"] == [r for b in range(1, 8, 2) for r in range(4 * b, 4 * b + 4)]
  assert results[0]["loss"] == pytest.approx(_losses(aim_runs["one"][0])[10], abs=1e-5)


def test_dry_run_prints_one_command_per_process():
  proc = _launch("--dry-run", "--processes=2", "--fake-devices=4", "--port=5555", "--hosts=2",
                 *AIM_ARGS, "--workdir=workdir/two")
  lines = proc.stdout.splitlines()
  assert proc.returncode == 0 and len(lines) == 2
  for k, line in enumerate(lines):
    assert line.startswith(f"env JAX_COORDINATOR_ADDRESS=localhost:5555 JAX_NUM_PROCESSES=2 "
                           f"JAX_PROCESS_ID={k} ")
    assert f"PRETRAIN_JAX_HOST=host{k}" in line and "--distributed=on" in line
    assert line.endswith(f"> workdir/two/logs/process_{k}.log")
