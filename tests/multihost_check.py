"""One process of a multi-process AIM tiny run whose device order interleaves the
processes (tests/test_multihost.py starts 2 of these, 4 fake CPU devices each).

The mesh is fsdp=8 over [p0d0, p1d0, p0d1, p1d1, ...], so each process holds every other
block of batch rows: its rows are not contiguous, as on TPU slices. Usage:

  JAX_COORDINATOR_ADDRESS=localhost:P JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=K \
  XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \
  python tests/multihost_check.py WORKDIR STEPS
"""
import json
import sys

import jax

from pretrain_jax import mesh as mesh_lib

mesh_lib.maybe_initialize_distributed("on")

from aimjax import train as aim_train  # noqa: E402  (after jax.distributed)
from conftest import load_config  # noqa: E402
from pretrain_jax import loop, partitioning  # noqa: E402


def main(workdir: str, steps: int):
  cfg = load_config("configs/aim/pretrain.py", "variant=tiny")
  cfg.total_steps, cfg.log_every, cfg.checkpoint_every = steps, steps, steps
  cfg.mesh.fsdp = 8
  by_process = [[d for d in jax.devices() if d.process_index == p] for p in range(2)]
  devices = [d for pair in zip(*by_process) for d in pair]
  mesh = mesh_lib.create_mesh(cfg.mesh, devices)
  rows = partitioning.process_rows(mesh, cfg.batch_size)
  last = loop.train(cfg, workdir, aim_train.build_task(cfg), devices=devices)
  print("RESULT " + json.dumps({"process": jax.process_index(), "rows": list(rows),
                                "loss": last.get("loss")}), flush=True)


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]))
