"""pretrain_jax.plan: the ahead-of-time memory plan against a real run, the mesh search, the
attention switch, and (slow) compiles of the full-size steps on 8 fake devices."""
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT, load_config, subprocess_env
from pretrain_jax import attention, plan


def _plan(tmp_path, config, *flags, timeout=900):
  out = tmp_path / "plan.json"
  proc = subprocess.run(
      [sys.executable, "-m", "pretrain_jax.plan", f"--config={config}", f"--json={out}", *flags],
      cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(out.read_text()), proc.stdout


# An AIM a little wider than tiny, so the step's memory (about 100 MB per device) stands well
# above the process's own noise in the measured resident memory.
AIM_MID = ("--config.batch_size=256", "--config.model.width=256", "--config.model.depth=4")


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["none", "block"])
def test_the_plan_matches_the_memory_a_real_run_uses(tmp_path, remat):
  p, stdout = _plan(tmp_path, "configs/aim/pretrain.py:variant=tiny", "--devices=8",
                    "--device_kind=cpu", f"--remat={remat}", "--search=false", "--measure=3",
                    *AIM_MID)
  row, measured = p["policies"][remat], p["measured"]
  assert p["mesh"] == [1, 8, 1] and row["per_device_batch"] == 32
  # the state's shards are exact: the real run's live arrays on device 0 (plus the step and rng)
  planned_state = row["params"] + row["opt_state"] + row["batch"]
  assert 0 <= measured["live_state_and_batch"] - planned_state < 64
  # the peak with XLA's temporaries, against the growth of the real process's peak memory
  assert row["peak"] > 50 * 2 ** 20
  assert measured["peak"] == pytest.approx(row["peak"], rel=0.10), (measured, row)
  assert f"| {remat} |" in stdout and "measured" in stdout


def test_block_remat_plans_the_recomputation_and_the_same_state(tmp_path):
  """(At this size the CPU compiler's temporaries barely shrink with remat; the saving shows
  at full size, benchmarks/plans.md.)"""
  p, _ = _plan(tmp_path, "configs/aim/pretrain.py:variant=tiny", "--devices=8",
               "--device_kind=cpu", "--remat=none,block", "--search=false", *AIM_MID)
  none, block = p["policies"]["none"], p["policies"]["block"]
  assert block["xla_flops"] > 1.1 * none["xla_flops"]     # the forward pass again
  assert none["params"] == block["params"]
  # XLA's count over all 8 devices is close to the analytic model FLOPs of the step
  assert none["xla_flops"] == pytest.approx(p["model_flops"], rel=0.15)


@pytest.mark.slow
def test_the_search_finds_the_smallest_mesh_that_fits(tmp_path):
  """4M tiny on up to 8 devices, with the headroom set so that one device cannot hold it:
  one device is ruled out by the estimate (never compiled), and the answer fits as compiled."""
  p, _ = _plan(tmp_path, "configs/fourm/pretrain.py:variant=tiny", "--devices=8",
               "--device_kind=cpu", "--remat=none", "--config.batch_size=64")
  row = p["policies"]["none"]
  one_device_peak = row["smallest"]["peak"]
  assert row["smallest"]["mesh"] == [1, 1, 1]          # 24 GiB holds the tiny model anywhere
  # now with room for only 60% of the single-device plan
  headroom = 0.6 * one_device_peak / p["memory_per_device"]
  p, stdout = _plan(tmp_path, "configs/fourm/pretrain.py:variant=tiny", "--devices=8",
                    "--device_kind=cpu", "--remat=none", "--config.batch_size=64",
                    f"--headroom={headroom}")
  row = p["policies"]["none"]
  small = row["smallest"]
  assert small is not None and small["devices"] > 1
  assert small["peak"] <= headroom * p["memory_per_device"]
  assert [1, 1, 1] not in [t["mesh"] for t in row["tried"]]
  assert "| none |" in stdout


def test_the_configs_dcn_degrees_fold_into_the_planned_mesh(tmp_path):
  p, _ = _plan(tmp_path, "configs/aim/pretrain.py:variant=tiny", "--devices=8",
               "--device_kind=cpu", "--remat=none", "--search=false",
               "--config.mesh.dcn_data=2")
  assert p["mesh"] == [2, 4, 1]      # two slices of data parallelism, fsdp 4 within each
  assert p["policies"]["none"]["per_device_batch"] == 4


def test_candidates_are_ordered_by_device_count_and_divide_the_batch():
  c = plan.candidates(8, 32, max_tensor=4)
  assert c[0] == (1, 1, 1)
  sizes = [f * t for _, f, t in c]
  assert sizes == sorted(sizes) and max(sizes) == 8
  assert (1, 2, 4) in c and (1, 1, 8) not in c
  assert all(32 % f == 0 for _, f, _ in plan.candidates(64, 32, 8))
  assert (1, 6, 1) in plan.candidates(6, 12, 1)      # the full count even if not a power of 2


def test_device_kinds_and_tasks_are_checked():
  memory, peak = plan.device_kind("tpu-v5p")
  assert memory == 95e9 and peak == 459e12
  with pytest.raises(ValueError, match="device_kind"):
    plan.device_kind("tpu-v9")
  assert plan.task_module("configs/aim/pretrain.py:variant=7B").__name__ == "aimjax.train"
  assert plan.task_module("configs/fourm/pretrain.py").__name__ == "fourm_jax.train"
  with pytest.raises(ValueError, match="--task"):
    plan.task_module("/tmp/elsewhere/my.py")


def test_a_bad_device_kind_is_one_clear_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "pretrain_jax.plan", "--config=configs/aim/pretrain.py:variant=tiny",
       "--device_kind=tpu-v9"], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True)
  assert proc.returncode == 1
  assert "error: --device_kind must be one of" in proc.stderr and "Traceback" not in proc.stderr


def test_every_task_gives_the_batch_shapes_its_data_yields():
  from aimjax import train as aim_train
  from fourm_jax import train as fourm_train
  cfg = load_config("configs/aim/pretrain.py", "variant=tiny")
  with cfg.unlocked():
    cfg.batch_size, cfg.data.scenes_num = 4, 8
  aim = aim_train.build_task(cfg)
  real = next(iter(aim.train_data(tuple(range(4)))))     # a batch the pipeline really yields
  spec = aim.batch_spec(4)
  assert sorted(spec) == sorted(real)
  for k, v in real.items():
    assert (spec[k].shape, spec[k].dtype) == (v.shape, v.dtype), k
  from test_fourm_configs import _sample
  cfg = load_config("configs/fourm/pretrain.py", "variant=tiny")
  spec = fourm_train.build_task(cfg).batch_spec(4)
  model = fourm_train.build_model(cfg)
  name = next(iter(fourm_train.datasets(cfg)))
  masker = fourm_train.build_masker(cfg, model, name)
  mods = list({m.name: m for m in (*model.inputs, *model.targets)}.values())
  fields = dict(fourm_train.datasets(cfg)[name].fields)
  rng = np.random.default_rng(0)
  record = {fields[m]: v for m, v in _sample(masker, rng).items()}
  real = fourm_train._Mask(masker, fields, mods, 0).random_map(record, rng)   # one pipeline row
  flat = lambda t: {jax.tree_util.keystr(k): v for k, v in
                    jax.tree_util.tree_flatten_with_path(t)[0]}
  real, spec = flat(real), flat(spec)
  assert sorted(spec) == sorted(real)
  for k, v in real.items():
    v = np.asarray(v)
    assert (spec[k].shape, spec[k].dtype) == ((4, *v.shape), v.dtype), k


def test_the_attention_switch():
  assert attention.implementation("", "bfloat16", "cpu") is None
  assert attention.implementation("xla", "bfloat16", "gpu") is None
  assert attention.implementation("auto", "bfloat16", "gpu") == "cudnn"
  assert attention.implementation("auto", "float32", "gpu") is None
  assert attention.implementation("auto", "bfloat16", "cpu") is None
  assert attention.implementation("cudnn", "bfloat16", "gpu") == "cudnn"
  with pytest.raises(ValueError, match="needs a GPU"):
    attention.implementation("cudnn", "bfloat16", "cpu")
  with pytest.raises(ValueError, match="bfloat16 or float16"):
    attention.implementation("cudnn", "float32", "gpu")
  with pytest.raises(ValueError, match="model.attention_impl"):
    attention.implementation("flash", "bfloat16", "gpu")


def test_the_models_take_the_attention_switch_from_their_configs():
  from aimjax import model as aim_model
  from fourm_jax import train as fourm_train
  cfg = load_config("configs/aim/pretrain.py", "variant=tiny")
  with cfg.unlocked():
    cfg.model.attention_impl = "auto"
  assert aim_model.from_config(cfg.model, cfg.objective).attention_impl is None   # CPU
  cfg = load_config("configs/fourm/pretrain.py", "variant=tiny")
  with cfg.unlocked():
    cfg.model.attention_impl = "cudnn"
  with pytest.raises(ValueError, match="needs a GPU"):
    fourm_train.build_model(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["configs/aim/pretrain.py:variant=7B",
                                    "configs/fourm/pretrain.py:variant=4m7_XL",
                                    "configs/fourm/pretrain.py:variant=4m21_XL"])
def test_the_full_size_steps_compile_on_8_fake_devices(tmp_path, config):
  p, stdout = _plan(tmp_path, config, "--devices=8", "--device_kind=tpu-v5p", "--remat=block",
                    "--search=false", "--config.batch_size=64", timeout=1800)
  row = p["policies"]["block"]
  # all parameters (4M: with its modality embeddings), f32, about one eighth on each device
  assert row["num_params"] > (6.5e9 if "aim" in config else 2.7e9)
  assert 4 * row["num_params"] <= row["params"] * 8 < 1.02 * 4 * row["num_params"]
  assert row["opt_state"] == pytest.approx(2 * row["params"], rel=0.01)
  assert row["peak"] > row["params"] + row["opt_state"]
  assert row["xla_flops"] > 0 and "| block |" in stdout


def test_tpu_slices_are_named_by_chips_devices_and_accelerator_type():
  assert plan.slice_name("v5p:4x4x8") == "v5p-256"        # 128 chips, two TensorCores each
  assert plan.slice_name("v4:2x2x4") == "v4-32"
  assert plan.slice_name("v5e:4x4") == "v5litepod-16"     # v5e and v6e count chips
  assert plan.slice_name("v6e:16x16") == "v6e-256"
  with pytest.raises(ValueError, match="topology"):
    plan.slice_name("v9:2x2")


def test_the_search_on_a_slice_uses_all_its_chips_smallest_model_parallel_group_first():
  c = plan.candidates_on(16, 64, max_tensor=4)
  assert all(d * f * t == 16 for d, f, t in c)
  assert c[0] == (16, 1, 1) and c[1] == (8, 2, 1) and (4, 2, 2) in c
  groups = [f * t for _, f, t in c]
  assert groups == sorted(groups)
  assert all(64 % (d * f) == 0 for d, f, _ in plan.candidates_on(128, 64, 8))


def test_when_nothing_fits_the_plan_says_what_would():
  gib = 2 ** 30
  row = {"params": 4 * gib, "opt_state": 8 * gib, "batch": 0, "gradients": 4 * gib,
         "activations": 40 * gib, "peak": 56 * gib, "fits": False, "mesh": [1, 8, 1],
         "smallest": None}
  p = {"policies": {"block": row}, "batch_size": 256, "devices": 8}
  hints = plan.suggestions(p, capacity=30 * gib)
  assert any("--config.optimizer.grad_accum_steps=4" in h for h in hints)   # 16 + 40/4 <= 30
  assert any("--config.batch_size=" in h for h in hints)
  assert any(h.startswith("more chips: about 16") for h in hints)            # 8 * 56 / 30
  assert any("remat dots" in h for h in hints)
  assert plan.suggestions({**p, "policies": {"block": {**row, "fits": True}}}, 30 * gib) == []


def test_a_step_the_compiler_refuses_for_memory_is_planned_as_not_fitting(monkeypatch):
  """The TPU compiler does not compile a step whose temporaries exceed the chip's HBM; it
  raises RESOURCE_EXHAUSTED (seen for 4M-21 L on a v4-32). The plan records that as a row
  that does not fit, with the temporaries from the message, instead of failing. Here the
  CPU compile of a tiny AIM is made to raise the TPU compiler's message."""
  from pretrain_jax import mesh as mesh_lib
  message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
             "HLO temporaries (35.15G) exceeds available HBM (30.75G).")

  def refuse(self, *a, **k):
    raise jax.errors.JaxRuntimeError(message)

  monkeypatch.setattr(jax.stages.Lowered, "compile", refuse)
  cfg = load_config("configs/aim/pretrain.py", "variant=tiny")
  task = plan.task_module("configs/aim/pretrain.py").build_task(cfg)
  mesh = mesh_lib.create_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  c = plan.compile_step(cfg, task, mesh)
  assert c.refused.startswith("RESOURCE_EXHAUSTED") and c.temp == int(35.15 * 2 ** 30)
  assert c.peak == c.params + c.opt_state + c.batch + c.temp and c.xla_flops == 0
  # other compile errors still raise
  message = "INTERNAL: something else"
  with pytest.raises(jax.errors.JaxRuntimeError, match="something else"):
    plan.compile_step(cfg, task, mesh)


@pytest.mark.skipif(__import__("importlib").util.find_spec("libtpu") is not None,
                    reason="libtpu is installed: the message is for machines without it")
def test_a_topology_without_libtpu_says_how_to_get_it(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "pretrain_jax.plan", "--config=configs/aim/pretrain.py:variant=tiny",
       "--topology=v5p:2x2x2"], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 1 and "pip install -e '.[tpu]'" in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(__import__("importlib").util.find_spec("libtpu") is None,
                    reason="the TPU compiler needs libtpu: pip install -e '.[tpu]'")
def test_the_tpu_compiler_plans_aim_0_6b_on_a_v5p_slice(tmp_path):
  # Scanned layers: unrolled, the TPU compiler's schedule keeps most activations alive
  # under block remat too (measured: 6.86 GiB none, 5.90 GiB block per device).
  p, stdout = _plan(tmp_path, "configs/aim/pretrain.py:variant=0.6B", "--topology=v5p:2x2x2",
                    "--config.batch_size=64", "--config.model.scan_layers=True",
                    "--search=false", timeout=3600)
  assert p["compiler"] == "tpu" and p["chips"] == p["devices"] == 8 and p["hosts"] == 2
  pol = p["policies"]
  assert sorted(pol) == ["block", "dots", "none"]
  assert all(pol[k]["bytes_per_device"] > pol[k]["params"] for k in pol)
  assert pol["block"]["bytes_per_device"] < 0.6 * pol["none"]["bytes_per_device"]
  assert "v5p-16 (topology v5p:2x2x2: 8 chips = 8 JAX devices, 2 hosts)" in stdout
