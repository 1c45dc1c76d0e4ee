"""Multi-resolution tokenizer fine-tuning (data.resolutions), as the official 4M tokenizers:
torch-compatible resizing, the per-step resolution draw, resume, and tokenizing at each size."""
import os

import jax
import numpy as np
import pytest

from conftest import load_config
from pretrain_jax import loop, metrics as metrics_lib, positions
from tokenizers_jax import train as tok_train, vqvae

# x[i, j] = (4 i + j) ** 1.5 on a 3 x 4 grid; the expected values below were generated once
# with torch 2.13 (F.interpolate(x[None, None], size, mode, align_corners=False); nearest
# without align_corners), printed to 6 decimals. The test itself needs no torch.
_X = np.arange(12, dtype=np.float32).reshape(3, 4) ** 1.5
TORCH = {
    ("bicubic", (5, 2)): [[-0.528877, 2.959267], [2.705541, 7.869036], [9.260489, 16.938280],
                          [19.156925, 28.595945], [25.831833, 36.170818]],
    ("bicubic", (2, 6)): [[1.172208, 1.820663, 3.141896, 4.404829, 6.456494, 7.814393],
                          [19.231876, 21.268749, 24.691351, 27.235888, 30.958910, 33.287582]],
    ("bilinear", (2, 6)): [[2.000000, 2.772542, 3.920163, 5.420477, 7.161367, 8.527179],
                           [18.970562, 21.007824, 23.769457, 26.666945, 29.691769, 31.992220]],
    ("nearest", (5, 3)): [[0.000000, 1.000000, 2.828427], [0.000000, 1.000000, 2.828427],
                          [8.000000, 11.180340, 14.696939], [8.000000, 11.180340, 14.696939],
                          [22.627417, 27.000000, 31.622776]],
}


@pytest.mark.parametrize("mode,size", list(TORCH), ids=[f"{m}-{s[0]}x{s[1]}" for m, s in TORCH])
def test_resize_matches_torch_interpolate(mode, size):
  expected = np.array(TORCH[(mode, size)], np.float32)
  np.testing.assert_allclose(vqvae.resize(_X[None], size, mode)[0], expected, atol=2e-5)
  # the same under jit, with channels
  out = jax.jit(lambda x: vqvae.resize(x, size, mode))(np.stack([_X, -_X], -1)[None])
  np.testing.assert_allclose(np.asarray(out)[0, ..., 1], -expected, atol=2e-5)


def test_bicubic_weights_by_hand_and_the_position_table():
  # 2 -> 4 samples: s = (i + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25; Keys a = -0.75 on the
  # four neighbours floor(s) - 1 .. floor(s) + 2, clamped to the border (0 or 1)
  a = -0.75
  near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1
  far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  t = 0.75                     # s = -0.25: floor -1, neighbours -2, -1, 0, 1 -> 0, 0, 0, 1
  first = [far(t + 1) + near(t) + near(1 - t), far(2 - t)]
  w = vqvae.resize_weights(2, 4, "bicubic")
  np.testing.assert_allclose(w[0], first, atol=1e-7)
  np.testing.assert_allclose(w[3], first[::-1], atol=1e-7)     # symmetric
  np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-7)
  assert (vqvae.resize_weights(5, 5, "bicubic") == np.eye(5)).all()
  # at the table's own grid: exactly the sin-cos positions (official checkpoints' parity)
  np.testing.assert_array_equal(vqvae.position_table(4, 4, 32, grid=4),
                                positions.sincos_2d(4, 4, 32, rows_first=True))
  np.testing.assert_array_equal(vqvae.position_table(3, 5, 32, grid=0),
                                positions.sincos_2d(3, 5, 32, rows_first=True))
  table = vqvae.position_table(2, 2, 32, grid=4)      # 4 x 4 table bicubic-resized to 2 x 2
  full = positions.sincos_2d(4, 4, 32, rows_first=True).reshape(4, 4, 32)
  wd = vqvae.resize_weights(4, 2, "bicubic")
  np.testing.assert_allclose(table.reshape(2, 2, 32),
                             np.einsum("oh,hwd,pw->opd", wd, full, wd), atol=1e-6)


def _tiny():
  cfg = load_config("configs/tokenizers/vqvae.py", "modality=depth,variant=tiny")
  cfg.data.resolutions = (16, 32, 16)
  cfg.batch_size, cfg.data.train, cfg.data.eval = 8, "scenes:64", ""
  cfg.model.update(width=32, enc_depth=1, dec_depth=1, heads=2, num_codes=64)
  cfg.log_every, cfg.checkpoint_every, cfg.eval_every = 1, 2, 0
  cfg.optimizer.warmup_steps = 1
  return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny depth tokenizer trained 2 steps at (16, 32, 16), then resumed to step 4 (about
  30 s on 2 loaded CPU cores: each run compiles the two-branch step once)."""
  cfg = _tiny()
  workdir = os.fspath(tmp_path_factory.mktemp("multires") / "tok")
  cfg.total_steps = 2
  loop.train(cfg, workdir, tok_train.build_task(cfg))
  cfg.total_steps = 4                              # resumes from the step-2 checkpoint
  loop.train(cfg, workdir, tok_train.build_task(cfg))
  return cfg, workdir


def test_multires_training_draws_the_resolution_by_step_and_resumes_to_it(trained):
  cfg, workdir = trained
  assert cfg.data.resolution == 32 and tok_train.pos_grid(cfg) == 4
  expected = [tok_train.resolution_for_step(cfg.seed, s, (16, 32)) for s in range(1, 5)]
  assert set(expected) == {16, 32}                 # both sizes among steps 1..4 at seed 0
  # the batches come at the largest size and carry their step's resolution index
  task = tok_train.build_task(cfg)
  it = iter(task.train_data(tuple(range(8))))
  batches = [next(it) for _ in range(4)]
  assert all(b["x"].shape == (8, 32, 32) for b in batches)
  assert [(16, 32)[b[tok_train.RESOLUTION_KEY][0]] for b in batches] == expected
  # the trained steps (two runs: 1-2, then resumed 3-4) ran at exactly those
  rows = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [rows[s]["resolution"] for s in range(1, 5)] == expected
  assert all(np.isfinite(rows[s]["loss"]) for s in range(1, 5))


def test_a_multires_tokenizer_tokenizes_and_decodes_each_size(trained):
  from pretrain_jax.data import scenes
  from tokenizers_jax.tokenize import Tokenizer
  _, workdir = trained
  tok = Tokenizer(workdir)
  assert tok.model.pos_grid == 4
  depth = scenes.render_scene(5, 0, 32)["depth"]
  for size, grid in ((32, 4), (16, 2), (24, 3)):
    x = tok_train.prepare("depth", depth, size)
    assert x.shape == (size, size) and x.dtype == np.float32
    tokens = np.asarray(tok._fn(tok.variables, x[None]))
    assert tokens.shape == (1, grid, grid) and tokens.dtype == np.int32
    assert tok.detokenize(tokens).shape == (1, size, size, 1)


def test_diffusion_tokenizer_positions_and_grids_at_two_sizes():
  cfg = load_config("configs/tokenizers/diffusion.py", "modality=rgb,variant=tiny")
  cfg.data.resolutions = (32, 64, 32)
  assert tok_train.resolutions(cfg) == (32, 64) and tok_train.pos_grid(cfg) == 8
  model = tok_train.build_model(cfg)
  assert model.pos_grid == 8
  x64 = jax.ShapeDtypeStruct((1, 64, 64, 3), np.float32)
  t = jax.ShapeDtypeStruct((1,), np.int32)
  variables = jax.eval_shape(lambda x, t: model.init(jax.random.key(0), x, t, x), x64, t)
  for size in (32, 64):
    x = jax.ShapeDtypeStruct((2, size, size, 3), np.float32)
    tokens = jax.eval_shape(lambda v, x: model.apply(v, x, method=model.tokenize), variables, x)
    assert tokens.shape == (2, size // 8, size // 8)
  cfg.data.resolutions = (32, 48, 16)          # 48 px: a 12-patch UNet grid, not 8-divisible
  with pytest.raises(ValueError, match=r"\[48\] are not multiples of 32"):
    tok_train.resolutions(cfg)


@pytest.mark.parametrize("value,message", [
    ((32, 16, 16), "need 0 < min <= max"),
    ((16, 32, 0), "step must be positive"),
    ((16, 32, -16), "step must be positive"),
    ((12, 36, 12), "not multiples of the patch size 8"),
    ((16, 40, 16), "must be a multiple of the step"),
    ((16, 32), "three integers"),
])
def test_bad_resolutions_are_refused_naming_the_key(value, message):
  cfg = _tiny()
  cfg.data.resolutions = value
  with pytest.raises(ValueError, match=message) as err:
    tok_train.build_task(cfg)
  assert "data.resolutions" in str(err.value)


def test_no_resolutions_is_the_single_resolution_run():
  cfg = load_config("configs/tokenizers/vqvae.py", "modality=depth,variant=tiny")
  assert tok_train.resolutions(cfg) == () and tok_train.pos_grid(cfg) == 0
  assert tok_train.build_model(cfg).pos_grid == 0
  cfg2 = load_config("configs/tokenizers/vqvae.py", "modality=sam_mask,variant=tiny")
  cfg2.data.resolutions = (64, 128, 64)
  with pytest.raises(ValueError, match="no image resolutions"):
    tok_train.resolutions(cfg2)
  with pytest.raises(ValueError, match="vector"):
    tok_train.prepare("pose", np.zeros(5), 32)


def test_tokenize_writes_grids_at_each_resolution_of_a_multires_tokenizer(trained, tmp_path):
  """tokenizers_jax.tokenize: shards at 16 px, inside the tokenizer's 16-32 range, give 2x2
  grids as they are, and 'OUT=depth@32:WORKDIR' resizes them to 32 px first for a 4x4 grid
  (the 4M super-resolution set's tok_*@448 from 224 px shards, at this scale); a size
  outside the range is refused naming it."""
  from conftest import load_config as load
  from fourm_jax import pseudo_label as pl
  from pretrain_jax.data import multimodal, schema as schema_lib
  from tokenizers_jax import tokenize as tok_lib
  _, workdir = trained
  pcfg = load("configs/fourm/pseudo_label.py", "scenes")
  pcfg.resolution, pcfg.labellers, pcfg.shards = 16, (), 1
  pl.pseudo_label(pcfg, "scenes:3", str(tmp_path / "labelled"))
  c = load("configs/tokenizers/tokenize.py", "")
  c.image_tokenizers.depth = workdir
  c.outputs = f"tok_depth_32=depth@32:{workdir}"
  c.text_tokenizer, c.copy_fields = "", ()
  tok_lib.tokenize(c, f"{tmp_path}/labelled/*.array_record", str(tmp_path / "tokens"))
  schema = schema_lib.read_schema(str(tmp_path / "tokens"))
  assert schema["tok_depth"].shape == (2, 2) and schema["tok_depth_32"].shape == (4, 4)
  tok = tok_lib.Tokenizer(workdir)
  labelled = multimodal.dataset(f"{tmp_path}/labelled/*.array_record", fields=("depth",))
  got = multimodal.dataset(f"{tmp_path}/tokens/*.array_record")
  for i in range(3):
    depth = labelled[i]["depth"]
    np.testing.assert_array_equal(got[i]["tok_depth"], tok([depth])[0])
    np.testing.assert_array_equal(got[i]["tok_depth_32"], tok([depth], 32)[0])
  c.outputs = f"tok_depth_64=depth@64:{workdir}"
  with pytest.raises(ValueError, match=r"'tok_depth_64': the depth tokenizer was trained at "
                     r"16-32 px \(multiples of 8\), not 64 px"):
    tok_lib.tokenize(c, f"{tmp_path}/labelled/*.array_record", str(tmp_path / "bad"))
