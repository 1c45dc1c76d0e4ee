"""Parity with the official AIM v1 model (fixtures computed with apple/ml-aim's own code)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aimjax import convert
from aimjax import model as model_lib
from conftest import SHARED
from pretrain_jax import heads

FIXTURE = SHARED / "fixtures" / "aim_v1_small.safetensors"
pytestmark = pytest.mark.skipif(not FIXTURE.exists(),
                                reason=f"{FIXTURE} absent: ../shared/ is not beside the checkout")


@pytest.fixture(scope="module")
def fixture():
  from safetensors import safe_open
  with safe_open(str(FIXTURE), "np") as f:
    cfg = json.loads(f.metadata()["config"])
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  inputs = {k: v for k, v in tensors.items() if k.startswith("__")}
  sd = {k: v for k, v in tensors.items() if not k.startswith("__")}
  return cfg, sd, inputs


def _model(cfg):
  return model_lib.AIM(image_size=cfg["img_size"], patch_size=cfg["patch_size"],
                       width=cfg["embed_dim"], depth=cfg["num_blocks"], num_heads=cfg["num_heads"],
                       head="none")


def test_converted_weights_reproduce_official_block_features_and_logits(fixture):
  cfg, sd, inputs = fixture
  params, probe_vars = convert.official_to_params(sd, cfg["embed_dim"], cfg["num_blocks"],
                                                  cfg["num_heads"], cfg["patch_size"])
  model = _model(cfg)
  x = jnp.asarray(inputs["__input__"].transpose(0, 2, 3, 1))   # NCHW -> NHWC
  blocks = model.apply({"params": params}, x, method=model.features)
  for i, feats in enumerate(blocks):
    np.testing.assert_allclose(feats, inputs[f"__block_{i}__"], atol=1e-4, rtol=1e-4)
  probe = heads.AttentiveProbe(num_heads=cfg["num_heads"], num_classes=cfg["num_classes"])
  pooled_in = jnp.mean(jnp.stack(blocks[-cfg["probe_layers"]:]), axis=0)
  logits = probe.apply(probe_vars, pooled_in)
  np.testing.assert_allclose(logits, inputs["__logits__"], atol=1e-4, rtol=1e-4)


def test_round_trip_through_the_official_layout_is_exact(fixture):
  cfg, sd, _ = fixture
  params, probe_vars = convert.official_to_params(sd, cfg["embed_dim"], cfg["num_blocks"],
                                                  cfg["num_heads"], cfg["patch_size"])
  back = convert.params_to_official(params, probe_vars, cfg["patch_size"])
  assert set(back) == set(sd)
  for k in sd:
    if k != "head.bn.num_batches_tracked":
      np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
  again, _ = convert.official_to_params(back, cfg["embed_dim"], cfg["num_blocks"],
                                        cfg["num_heads"], cfg["patch_size"])
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)


def test_bad_state_dicts_list_missing_extra_and_misshaped_keys(fixture):
  cfg, sd, _ = fixture
  bad = dict(sd)
  del bad["trunk.blocks.1.mlp.fc1.weight"]
  bad["trunk.blocks.9.attn.qkv.weight"] = np.zeros((192, 64), np.float32)
  bad["trunk.blocks.0.attn.proj.weight"] = np.zeros((64, 65), np.float32)
  with pytest.raises(ValueError) as e:
    convert.official_to_params(bad, cfg["embed_dim"], cfg["num_blocks"], cfg["num_heads"])
  msg = str(e.value)
  assert "missing keys (1): trunk.blocks.1.mlp.fc1.weight" in msg
  assert "unexpected keys (1): trunk.blocks.9.attn.qkv.weight" in msg
  assert "trunk.blocks.0.attn.proj.weight: (64, 65) (expected (64, 64))" in msg
  with pytest.raises(ValueError, match="depth=6"):
    convert.official_to_params(sd, cfg["embed_dim"], 6, cfg["num_heads"])


def test_attentive_probe_has_2d2_plus_d_params_plus_the_classifier():
  d, classes = 64, 10
  probe = heads.AttentiveProbe(num_heads=4, num_classes=classes)
  variables = probe.init(jax.random.key(0), jnp.zeros((2, 16, d)))
  import flax.linen as nn
  n = sum(x.size for x in jax.tree.leaves(nn.unbox(variables["params"])))
  assert n == 2 * d * d + d + d * classes


# ---- released files in: backbone + head, one file, an HF-hub snapshot; any input size ----

def _split(sd):
  """The release layout: a backbone file (preprocessor.*, trunk.*) and a head file (head.*)."""
  return ({k: v for k, v in sd.items() if not k.startswith("head.")},
          {k: v for k, v in sd.items() if k.startswith("head.")})


def _convert_cli(*args):
  import subprocess
  import sys
  from conftest import ROOT, subprocess_env
  return subprocess.run([sys.executable, "-m", "aimjax.convert", *map(str, args)], cwd=ROOT,
                        env=subprocess_env(JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                        timeout=120)


def _probe_logits(workdir, x):
  from aimjax import classify
  return classify.load(str(workdir)).logits(x)


def test_the_cli_converts_a_backbone_file_plus_a_head_file_as_released(fixture, tmp_path):
  from safetensors.numpy import save_file
  cfg, sd, inputs = fixture
  backbone, head = _split(sd)
  del head["head.bn.num_batches_tracked"]                  # optional: unused at inference
  save_file(backbone, str(tmp_path / "aim_small_attnprobe_backbone.safetensors"))
  save_file(head, str(tmp_path / "aim_small_attnprobe_head_best_layers.safetensors"))
  out = tmp_path / "converted"
  proc = _convert_cli(f"--input={tmp_path / 'aim_small_attnprobe_backbone.safetensors'}",
                      f"--head={tmp_path / 'aim_small_attnprobe_head_best_layers.safetensors'}",
                      f"--out={out}", "--num_heads=4", "--image_size=56", "--probe_layers=2,3")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "head reads the mean of blocks [2, 3]" in proc.stdout
  written = json.loads((out / "config.json").read_text())
  assert written["probe"]["layers"] == [2, 3] and written["probe"]["num_classes"] == 10
  x = inputs["__input__"].transpose(0, 2, 3, 1)
  np.testing.assert_allclose(_probe_logits(out, x), inputs["__logits__"], atol=1e-4, rtol=1e-4)
  # the head alone as --input: told to pass it as --head
  proc = _convert_cli(f"--input={tmp_path / 'aim_small_attnprobe_head_best_layers.safetensors'}",
                      f"--out={tmp_path / 'bad'}", "--num_heads=4")
  assert proc.returncode != 0 and "holds only a classifier head" in proc.stderr
  assert "--head" in proc.stderr


def test_one_combined_file_and_an_hf_hub_snapshot_convert_alike(fixture, tmp_path):
  from safetensors.numpy import save_file
  cfg, sd, inputs = fixture
  x = inputs["__input__"].transpose(0, 2, 3, 1)
  convert.convert(str(FIXTURE), str(tmp_path / "combined"), num_heads=4, image_size=56,
                  layers_spec="2,3")
  np.testing.assert_allclose(_probe_logits(tmp_path / "combined", x), inputs["__logits__"],
                             atol=1e-4, rtol=1e-4)
  hub = tmp_path / "hub"   # what AIMForImageClassification.save_pretrained writes
  hub.mkdir()
  save_file(sd, str(hub / "model.safetensors"))
  (hub / "config.json").write_text(json.dumps(
      {"img_size": 56, "patch_size": 14, "embed_dim": 64, "num_blocks": 4, "num_heads": 4,
       "probe_layers": 2, "num_classes": 10}))
  info = convert.convert(str(hub), str(tmp_path / "from_hub"))   # everything from config.json
  assert info["probe_layers"] == (2, 3) and info["num_heads"] == 4 and info["image_size"] == 56
  np.testing.assert_allclose(_probe_logits(tmp_path / "from_hub", x), inputs["__logits__"],
                             atol=1e-4, rtol=1e-4)


def test_optional_head_keys_and_the_default_probe_layers(fixture, tmp_path):
  """head.linear.bias (heads trained with ml-l3m's probe) is applied when present; a
  ..._head_last_layers file defaults to the last blocks, others to the official best."""
  from safetensors.numpy import save_file
  cfg, sd, inputs = fixture
  backbone, head = _split(sd)
  bias = np.linspace(-1, 1, 10).astype(np.float32)
  head["head.linear.bias"] = bias
  save_file(backbone, str(tmp_path / "backbone.safetensors"))
  save_file(head, str(tmp_path / "x_head_last_layers.safetensors"))
  info = convert.convert(str(tmp_path / "backbone.safetensors"), str(tmp_path / "out"),
                         head=str(tmp_path / "x_head_last_layers.safetensors"), num_heads=4,
                         image_size=56, layers_spec="2,3")
  x = inputs["__input__"].transpose(0, 2, 3, 1)
  np.testing.assert_allclose(_probe_logits(tmp_path / "out", x), inputs["__logits__"] + bias,
                             atol=1e-4, rtol=1e-4)
  back = convert.params_to_official(*convert.official_to_params(
      {**backbone, **head}, 64, 4, 4))
  np.testing.assert_array_equal(back["head.linear.bias"], bias)
  info = convert.convert(str(tmp_path / "backbone.safetensors"), str(tmp_path / "last"),
                         head=str(tmp_path / "x_head_last_layers.safetensors"), num_heads=4)
  assert info["probe_layers"] == (0, 1, 2, 3)               # 'last': the last 6, of 4 blocks
  assert convert.probe_layers("best", 1536, 24) == (14, 15, 16, 17, 18, 19)
  assert convert.probe_layers("best", 2048, 24) == convert.probe_layers("best", 3072, 24) == (
      12, 13, 14, 15, 16, 17)
  assert convert.probe_layers("best", 4096, 32) == (14, 15, 16, 17, 18, 19)
  assert convert.probe_layers("last", 4096, 32) == (26, 27, 28, 29, 30, 31)
  with pytest.raises(ValueError, match="no released AIM has width 64"):
    convert.convert(str(tmp_path / "backbone.safetensors"), str(tmp_path / "best"),
                    head=str(tmp_path / "x_head_last_layers.safetensors"), num_heads=4,
                    layers_spec="best")


def test_a_pth_file_without_torch_names_the_torch_extra(tmp_path):
  try:
    import torch   # noqa: F401
    pytest.skip("torch is installed: the .pth path is exercised instead by a round trip")
  except ImportError:
    pass
  (tmp_path / "aim_backbone.pth").write_bytes(b"not read")
  with pytest.raises(ValueError, match=r'pip install -e "\.\[torch\]"'):
    convert.load_state_dict(str(tmp_path / "aim_backbone.pth"))


def _official_features(sd, x_nchw, patch, heads_n):
  """The official AIM v1 forward (aim/v1/torch: PatchEmbed, SinCosPosEmbed, Block), written
  out in numpy for any H x W, to check ours without sharing any of its code:
  - patches: Conv2d(k = s = patch, bias) == per-patch dot product over (c, i, j); tokens
    flattened row-major over the (H/p) x (W/p) grid; then LayerNorm(eps 1e-6).
  - positions: SinCosPosEmbed(h, w, D) builds `meshgrid(arange(w), arange(h), indexing="xy")`,
    two (h, w) arrays: grid[0][r, c] = c (the column) and grid[1][r, c] = r (the row); the
    embedding is [emb(D/2, grid[0]), emb(D/2, grid[1])] flattened row-major, with
    emb(E, pos) = [sin(pos * omega), cos(pos * omega)], omega_i = 1 / 10000^(i / (E/2)),
    i < E/2. So the first D/2 channels encode the column, the last D/2 the row, for a
    non-square grid too.
  - blocks: x + proj(attn(LN1(x))), x + fc2(gelu_erf(fc1(LN2(x)))), qkv weight (3D, D)
    split q, k, v then heads (head-major), softmax(q k^T / sqrt(d_head)), no biases.
  Returns the list of block outputs [B, K, D]."""
  from math import erf
  b, c, h, w = x_nchw.shape
  gh, gw = h // patch, w // patch
  d = sd["preprocessor.patchifier.proj.weight"].shape[0]

  def ln(v, p):
    mu = v.mean(-1, keepdims=True)
    var = ((v - mu) ** 2).mean(-1, keepdims=True)
    return (v - mu) / np.sqrt(var + 1e-6) * sd[p + ".weight"] + sd[p + ".bias"]
  cols = x_nchw.reshape(b, c, gh, patch, gw, patch).transpose(0, 2, 4, 1, 3, 5)
  tok = np.einsum("brqcij,dcij->brqd", cols, sd["preprocessor.patchifier.proj.weight"])
  tok = ln(tok.reshape(b, gh * gw, d) + sd["preprocessor.patchifier.proj.bias"],
           "preprocessor.patchifier.norm")
  grid0, grid1 = np.meshgrid(np.arange(gw, dtype=np.float64), np.arange(gh, dtype=np.float64),
                             indexing="xy")
  assert grid0.shape == (gh, gw)

  def emb(e, pos):
    omega = 1.0 / 10000 ** (np.arange(e // 2) / (e / 2.0))
    out = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  x = tok + np.concatenate([emb(d // 2, grid0), emb(d // 2, grid1)], axis=1)
  gelu = np.vectorize(lambda v: 0.5 * v * (1.0 + erf(v / np.sqrt(2.0))))
  hd = d // heads_n
  outs = []
  for i in range(sum(1 for k in sd if k.endswith("attn.qkv.weight"))):
    p = f"trunk.blocks.{i}."
    qkv = ln(x, p + "norm_1") @ sd[p + "attn.qkv.weight"].T            # [B, K, 3D]
    q, k, v = (qkv[..., j * d:(j + 1) * d].reshape(b, -1, heads_n, hd).transpose(0, 2, 1, 3)
               for j in range(3))
    a = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
    a = np.exp(a - a.max(-1, keepdims=True))
    a = a / a.sum(-1, keepdims=True)
    o = (a @ v).transpose(0, 2, 1, 3).reshape(b, -1, d)
    x = x + o @ sd[p + "attn.proj.weight"].T
    x = x + gelu(ln(x, p + "norm_2") @ sd[p + "mlp.fc1.weight"].T) @ sd[p + "mlp.fc2.weight"].T
    outs.append(x)
  return outs


def test_a_non_square_input_matches_the_official_algorithm(fixture, tmp_path):
  """56 x 42 pixels: a 4 x 3 patch grid. The converted model (built by the CLI for
  --image_size=56,42) gives the block features of the official forward derived step by
  step in _official_features (float64 numpy), whose positions follow the official
  SinCosPosEmbed for a non-square grid."""
  cfg, sd, inputs = fixture
  sd64 = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  x = inputs["__input__"][:, :, :, 7:49]                    # (2, 3, 56, 42)
  want = _official_features(sd64, x.astype(np.float64), 14, 4)
  out = tmp_path / "wide"
  proc = _convert_cli(f"--input={FIXTURE}", f"--out={out}", "--num_heads=4",
                      "--image_size=56,42", "--probe_layers=2,3")
  assert proc.returncode == 0, proc.stderr[-2000:]
  from aimjax import inference
  model, params, _ = inference.load(str(out))
  assert model.image_size == (56, 42) and model.grid_hw == (4, 3) and model.num_patches == 12
  got = model.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)),
                    method=model.features)
  for i, (g, w) in enumerate(zip(got, want)):
    assert g.shape == (2, 12, 64)
    np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4, err_msg=f"block {i}")
  # the square-grid positions would differ: the layout is pinned, not just the shapes
  assert np.abs(model_lib.sincos_2d((4, 3), 64) - model_lib.sincos_2d((3, 4), 64)[:12]).max() > 0.1


def _continued_config(tmp_path):
  from conftest import load_config
  convert.convert(str(FIXTURE), str(tmp_path / "released"), num_heads=4, layers_spec="2,3")
  cfg = load_config("configs/aim/pretrain.py", "variant=tiny")
  cfg.init_from = str(tmp_path / "released")
  cfg.model.depth, cfg.model.num_heads = 4, 4
  return cfg


def test_init_from_a_converted_workdir_copies_the_trunk_and_checks_its_size(fixture, tmp_path):
  """configs/aim/pretrain.py's init_from, as pretrain_jax.loop applies it (warm_start on the
  freshly initialised params): the converted trunk is copied, the pixel head (not released)
  keeps its initialisation; a trunk of another size is refused naming the key."""
  import flax.linen as nn
  from aimjax import train as aim_train
  from pretrain_jax import checkpoint
  cfg = _continued_config(tmp_path)
  aim_train.check_init_from(cfg)
  # the initialised params' tree and shapes (traced, not compiled: quick), as zeros
  shapes = nn.unbox(jax.eval_shape(aim_train.build_task(cfg).init_params, jax.random.key(0)))
  fresh = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes)
  got, report = checkpoint.warm_start(fresh, cfg.init_from)
  assert report["new"] and all("head" in p for p in report["new"]) and not report["mismatched"]
  released = checkpoint.restore_parts(cfg.init_from)["params"]
  for name in ("patch_embed", "blocks_0", "blocks_3"):
    for a, b in zip(jax.tree.leaves(got[name]), jax.tree.leaves(released[name])):
      np.testing.assert_array_equal(a, b)
  cfg.model.depth = 2
  with pytest.raises(ValueError, match="'model.depth' is 2 but the init_from"):
    aim_train.check_init_from(cfg)
  cfg.init_from = str(tmp_path / "nowhere")
  with pytest.raises(ValueError, match="config key 'init_from' must be a workdir"):
    aim_train.check_init_from(cfg)


@pytest.mark.slow
def test_continued_pretraining_runs_from_a_converted_workdir(fixture, tmp_path):
  """The whole entry point: one step at learning rate 0 keeps the copied trunk."""
  from aimjax import train as aim_train
  from pretrain_jax import checkpoint
  cfg = _continued_config(tmp_path)
  cfg.total_steps, cfg.checkpoint_every, cfg.eval_every, cfg.batch_size = 1, 1, 0, 4
  cfg.optimizer.lr, cfg.optimizer.warmup_steps, cfg.data.train = 0.0, 0, "scenes:16"
  cfg.async_checkpoint = False
  aim_train.main(cfg, str(tmp_path / "continued"))
  got = checkpoint.restore_parts(str(tmp_path / "continued"))["params"]
  released = checkpoint.restore_parts(cfg.init_from)["params"]
  for a, b in zip(jax.tree.leaves(got["blocks_3"]), jax.tree.leaves(released["blocks_3"])):
    np.testing.assert_array_equal(a, b)
  assert "head_in" in got and "head_in" not in released
