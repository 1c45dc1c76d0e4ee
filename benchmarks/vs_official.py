"""Side-by-side speed of this project's models and the official PyTorch code.

  python benchmarks/vs_official.py --official_aim=/tmp/ml-aim --official_4m=/tmp/ml-4m \
      [--official_l3m=/tmp/ml-l3m] [--json=benchmarks/results/vs_official.json] [--runs=7] \
      [--threads=2] [--only=SUBSTRING,...] [--ops=benchmarks/results/vs_official_ops.json] \
      [--malloc=default|keep] [--small]

The official code is imported at run time from your clones (nothing of it is
copied here): https://github.com/apple/ml-aim (AIM v1, `aim-v1/aim/v1/torch`),
https://github.com/apple/ml-l3m (the AIM v1 training code: pixel head and loss;
optional, default: an `ml-l3m` directory beside the ml-aim clone) and
https://github.com/apple/ml-4m (4M). PyTorch comes with
`pip install -e ".[reference]"`. Either of --official_aim / --official_4m may be
given alone; the rows needing the other are skipped with the reason printed.

Rows (every row: both sides float32 on the CPU, the same random weights made by
the official model's own initialisation, with LayerNorm scales and all biases
perturbed so that their mapping is checked, copied into ours with our
converters: aimjax.convert.official_to_params for the AIM trunk, a mapping
written here for its pixel head, fourm_jax.convert.from_official for 4M):

  aim train   AIM width 384, depth 12, 6 heads, 224 px, patch 14, prefix-causal
              attention, a 12-block pixel head of width 512, normalised-pixel
              MSE on the non-prefix patches, AdamW (0.9, 0.95, wd 0.05, clip 1.0),
              batch 16. Official: ml-aim's PatchEmbed/ViTPreprocessor and
              Transformer with PrefixCausalAttention (LayerNorm eps 1e-6), ml-l3m's
              SimpleDecoder (blocks with an identity attention, as in
              configs/aimv1/001_aim_v1_600M.yaml) and RasterPixelLoss; eager
              forward, backward, clip_grad_norm_, torch.optim.AdamW(fused=True
              when the CPU build has it, as the l3m config). Without ml-l3m the
              head is composed from ml-aim's Block/MLP the same way and the loss
              is written here after RasterPixelLoss (the note says so). Our head
              has no `x + LN1(x)` branch and no biases on its input and output
              projections: those official parameters are set to zero, which
              makes the two heads the same function (the official side still
              computes them). Ours: aimjax.train.build_task + loop.jit_train_step,
              state donated.
  4m train    4M dim 768, 2 encoder + 2 decoder blocks, 12 heads, SwiGLU without
              biases, inputs rgb@224, tok_rgb@224, tok_depth@224, caption;
              targets caption, tok_depth@224, tok_rgb@224; 128 input / 128 target
              tokens, batch 4, loss 'mod', AdamW. Official: fourm.models.fm.FM
              (untied output layers, `share_embedding=False`, as FM builds them;
              ours with tie_embeddings=False) forward with its loss, backward,
              torch.optim.AdamW. Both step on the same batch, masked by our
              fourm_jax masking (4M-7 mixture) and handed to FM in its own
              format (NCHW pixels, the same masks).
  4m gen ...  tok_rgb@224 (196 tokens) from tok_depth@224, batch 4, 8 steps,
              temperature 1 (constant), no top-k / top-p; MaskGIT (cosine token
              schedule) and ROAR (linear), each without guidance and with
              classifier-free guidance 3.0 on tok_depth@224; models of dim 768
              (12 heads) and dim 256 (4 heads), 2 + 2 blocks, the modalities of
              `4m train`. Official: fourm.models.generate.GenerationSampler over
              build_chained_generation_schedules. Ours: fourm_jax.sampler.Sampler
              over fourm_jax.schedules.chained (its cosine schedule rounds two
              steps of eight differently: 7 22 31 38 38 31 22 7 against
              7 21 32 38 38 32 21 7). The official sampler is given the
              conditioning and the target only (its documented use) and, per
              step, encodes the known tokens and decodes the unknown (MaskGIT)
              or the chosen (ROAR) positions. Ours runs each step at exact
              lengths fixed by the schedule (the known tokens in the encoder,
              the unknown positions in the decoder; ROAR: the chosen ones only, as
              the official), compiled once per schedule.

Checks before timing (a disagreement raises): AIM, the pixel predictions of
ours (model.apply) and of the official model for the same images and prefix
lengths, max |diff| <= 1e-4 * max(1, max |official|), and the loss of our
first (warm-up) train step against the official loss with that step's prefix
lengths, relative 1e-4; 4M, the loss and each modality's loss of our first
step against FM's on the same batch, relative 1e-4; generation, the first
MaskGIT step's logits of both samplers, max |diff| <= 1e-4 * max(1, max |official|).
(The first run of this script found our AIM targets normalised with the biased
variance where the official loss uses the unbiased one; that is fixed.)

Timing: torch.set_num_threads(--threads) for the official side; JAX uses the
machine as it is. Ours is compiled first (train steps ahead of time; the sampler
by a first generation); then one untimed warm-up call per side; then --runs runs
per side, alternating ours / official (the first of each pair alternating too)
so that load on the machine hits both; the median of each side is reported.
ratio = official_s / ours_s (> 1: ours is faster). Train rows time one
optimizer step (forward, backward, update) on one fixed batch; generation rows
time a whole generation. --small runs tiny configurations, only to check that
the script works (its numbers mean nothing).

Official code quirks handled here, at run time only: ml-4m imports modules its
model code never uses (torchvision, webdataset, albumentations, ...), and ml-l3m
imports timm and omegaconf for the same reason; each missing module imported
by code in the clones is a permissive stub (a sys.meta_path finder placed last,
so installed modules win and other importers get the usual ImportError; modules
imported inside try/except, such as xformers, are never stubbed), and
after building the official models no module of a built model may come from a
stub. ml-l3m's package __init__ files (which import its whole training stack)
are skipped: its subpackages are registered as bare packages. ml-4m's
`cat_decoder_tensors` calls `random.sample(dict.items(), n)`, which Python 3.11
rejects: fm.py's `random` is replaced by one whose `sample` takes the items as
a list and returns them in sorted-name order (as in the fixtures).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import functools
import importlib
import importlib.abc
import importlib.util
import json
import os
import platform
import random as _random
import shlex
import subprocess
import sys
import time
import types

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# run as a script, benchmarks/ is first on the path, and benchmarks/tokenizers.py would shadow
# the `tokenizers` package that ml-4m imports
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
sys.path.insert(0, ROOT)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from aimjax import convert as aim_convert  # noqa: E402
from aimjax import model as aim_model  # noqa: E402
from aimjax import objective as aim_objective  # noqa: E402
from aimjax import train as aim_train  # noqa: E402
from fourm_jax import convert as fourm_convert  # noqa: E402
from fourm_jax import flops as fourm_flops  # noqa: E402
from fourm_jax import sampler as sampler_lib  # noqa: E402
from fourm_jax import schedules  # noqa: E402
from fourm_jax import train as fourm_train  # noqa: E402
from pretrain_jax import cli, loop, mesh as mesh_lib, optim, partitioning  # noqa: E402
from pretrain_jax import flops as flops_lib, host_memory  # noqa: E402
from pretrain_jax import train_state as ts  # noqa: E402
from pretrain_jax.data import transforms  # noqa: E402
from benchmarks import op_profile  # noqa: E402
from benchmarks.fourm_step import synthetic_sample  # noqa: E402

HOW_TO = """\
error: give the official clones:
  git clone https://github.com/apple/ml-aim /tmp/ml-aim      # AIM v1 (aim-v1/aim/v1/torch)
  git clone https://github.com/apple/ml-l3m /tmp/ml-l3m      # AIM v1 pixel head and loss (optional)
  git clone https://github.com/apple/ml-4m /tmp/ml-4m        # 4M
  pip install -e ".[reference]"                              # PyTorch
  python benchmarks/vs_official.py --official_aim=/tmp/ml-aim --official_4m=/tmp/ml-4m
(either --official_aim or --official_4m alone runs the rows that need only it)"""

PRED_TOL = 1e-4      # max |ours - official| <= PRED_TOL * max(1, max |official|)
LOSS_RTOL = 1e-4     # |ours - official| <= LOSS_RTOL * |official|

# sizes: 'full' are the benchmark's; 'small' only checks that the script runs
SIZES = {
    "full": {"aim": dict(width=384, depth=12, heads=6, image=224, head_depth=12,
                         head_width=512, batch=16),
             "4m": dict(dim=768, heads=12, depth=2, batch=4, tokens=128),
             "gen": dict(dims=((768, 12), (256, 4)), depth=2, batch=4, steps=8)},
    "small": {"aim": dict(width=64, depth=2, heads=2, image=56, head_depth=2, head_width=64,
                          batch=2),
              "4m": dict(dim=64, heads=4, depth=1, batch=2, tokens=48),
              "gen": dict(dims=((64, 4),), depth=1, batch=2, steps=8)},
}
FOURM_INPUTS = ("rgb@224", "tok_rgb@224", "tok_depth@224", "caption")
FOURM_TARGETS = ("caption", "tok_depth@224", "tok_rgb@224")   # sorted: FM's patched order


# ---- importing the official code ------------------------------------------------------------

NEVER_STUB = frozenset({"xformers", "wandb", "detectron2", "megablocks"})  # try/except imports
STUB_FILE = "<vs_official stub>"


class _StubMeta(type):
  """Stub classes: any attribute is another stub class; calling a pure stub makes an
  instance (or, given only a function or class, returns it: a stub decorator)."""

  def __getattr__(cls, name):
    if name.startswith("__") and name.endswith("__"):
      raise AttributeError(name)
    return _stub_class(f"{cls.__name__}.{name}")

  def __call__(cls, *args, **kwargs):
    if not cls.__dict__.get("_vs_stub"):
      return super().__call__(*args, **kwargs)
    if len(args) == 1 and not kwargs and isinstance(args[0], (types.FunctionType, type)):
      return args[0]
    return super().__call__()

  def __getitem__(cls, item):
    return cls

  def __or__(cls, other):
    return cls

  __ror__ = __or__

  def __iter__(cls):
    return iter(())


class _StubBase(metaclass=_StubMeta):
  _vs_stub = True

  def __init__(self, *args, **kwargs):
    pass

  def __getattr__(self, name):
    if name.startswith("__") and name.endswith("__"):
      raise AttributeError(name)
    return _stub_class(name)()

  def __call__(self, *args, **kwargs):
    return _stub_class("result")()

  def __iter__(self):
    return iter(())


def _stub_class(name: str) -> type:
  return _StubMeta(name.rsplit(".", 1)[-1], (_StubBase,),
                   {"_vs_stub": True, "__module__": STUB_FILE, "__qualname__": name})


class _StubModule(types.ModuleType):
  def __getattr__(self, name):
    if name.startswith("__") and name.endswith("__"):
      raise AttributeError(name)
    value = _stub_class(f"{self.__name__}.{name}")
    setattr(self, name, value)
    return value


def _importing_file() -> str:
  """The file whose code runs the import being resolved (importlib's frames skipped)."""
  frame = sys._getframe(2)
  while frame is not None and frame.f_code.co_filename.startswith("<frozen importlib"):
    frame = frame.f_back
  return frame.f_code.co_filename if frame is not None else ""


class StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """Last on sys.meta_path: a module that no real finder has, imported by official code
  (a file under one of `roots`), becomes a permissive stub; other importers get the
  usual ImportError."""

  def __init__(self):
    self.stubbed: set[str] = set()
    self.roots: list[str] = []

  def find_spec(self, name, path, target=None):
    if name.split(".")[0] in NEVER_STUB:
      return None
    if not _importing_file().startswith(tuple(self.roots)):
      return None
    return importlib.util.spec_from_loader(name, self, is_package=True)

  def create_module(self, spec):
    module = _StubModule(spec.name)
    module.__path__ = []
    return module

  def exec_module(self, module):
    module.__file__ = STUB_FILE
    self.stubbed.add(module.__name__)


STUBS = StubFinder()


def install_stubs(root: str):
  """Stubs missing modules for imports made by code under `root`."""
  STUBS.roots.append(os.path.join(os.path.abspath(root), ""))
  if STUBS not in sys.meta_path:
    sys.meta_path.append(STUBS)


def is_stub(obj) -> bool:
  if isinstance(obj, types.ModuleType):
    return getattr(obj, "__file__", None) == STUB_FILE
  cls = obj if isinstance(obj, type) else type(obj)
  return any(isinstance(c, _StubMeta) or getattr(sys.modules.get(c.__module__), "__file__", "")
             == STUB_FILE for c in cls.__mro__)


def check_no_stubs(model, what: str):
  """Raises if a module of `model`, or a value it holds, comes from a stub."""
  for name, module in model.named_modules():
    values = [module] + list(vars(module).values())
    bad = [v for v in values if not isinstance(v, (dict, list, tuple, str)) and is_stub(v)]
    if bad:
      raise RuntimeError(f"{what}: module {name or '<root>'} uses a stub of a missing package "
                         f"({bad[0]!r}); install that package")


def bare_packages(root: str, package: str):
  """Registers every package under root/package without running its __init__.py."""
  for dirpath, _, files in os.walk(os.path.join(root, package)):
    if "__init__.py" not in files:
      continue
    name = os.path.relpath(dirpath, root).replace(os.sep, ".")
    if name not in sys.modules:
      module = types.ModuleType(name)
      module.__path__ = [dirpath]
      sys.modules[name] = module


def import_ml_aim(path: str):
  sys.path.insert(0, os.path.join(path, "aim-v1"))
  install_stubs(path)
  from aim.v1.torch import layers, models
  return layers, models


def import_l3m(path: str | None):
  """(SimpleDecoder, GenericIdentity, LayerNormFP32, RasterPixelLoss) or None."""
  if not path:
    return None
  src = os.path.join(path, "src")
  if not os.path.isdir(os.path.join(src, "l3m")):
    print(f"note: {path} has no src/l3m; the AIM head is composed from ml-aim's layers")
    return None
  sys.path.insert(0, src)
  install_stubs(src)
  bare_packages(src, "l3m")
  from l3m.loss.mae_loss import RasterPixelLoss
  from l3m.model.heads.simple_decoder import SimpleDecoder
  from l3m.model.layers.misc import GenericIdentity
  from l3m.model.layers.normalization import LayerNormFP32
  return SimpleDecoder, GenericIdentity, LayerNormFP32, RasterPixelLoss


class _SortedSample:
  """fm.py's `random`: sample() takes dict items (rejected by Python >= 3.11) and returns
  them in sorted-name order; everything else is the real module."""

  def sample(self, population, k):
    return sorted(list(population), key=lambda kv: kv[0])[:k]

  def __getattr__(self, name):
    return getattr(_random, name)


def import_fourm(path: str):
  sys.path.insert(0, path)
  install_stubs(path)
  fm = importlib.import_module("fourm.models.fm")
  generate = importlib.import_module("fourm.models.generate")
  info = importlib.import_module("fourm.data.modality_info")
  fm.random = _SortedSample()
  return fm, generate, info.MODALITY_INFO


# ---- timing ---------------------------------------------------------------------------------

def time_alternating(ours, official, runs: int, settle: int = 0):
  """One untimed call each, then `runs` rounds of one timed call each, alternating which
  side goes first. settle: untimed calls of a side right before each of its timed calls, so
  that no timed call directly follows the other library's (in one process each slows the
  other: our AIM step took 9.0-9.8 s after one of ours and 10.6-12.7 s right after a torch
  step, the official 7.4-7.7 s and 8.0-8.4 s; the same page-fault counts, the other side's
  freed memory in the way). Returns the list of {'ours': s, 'official': s}."""
  ours()
  official()
  out = []
  for r in range(runs):
    pair = {}
    order = (("ours", ours), ("official", official))
    for name, fn in (order if r % 2 == 0 else order[::-1]):
      for _ in range(settle):
        fn()
      t0 = time.perf_counter()
      fn()
      pair[name] = time.perf_counter() - t0
    out.append(pair)
  return out


def make_row(case: str, runs: list[dict], note: str, checks: dict, ops: dict | None = None,
             gflop: float | None = None, matmul: dict | None = None):
  """One results row. gflop: the model FLOPs of one call (analytic, the same work on both
  sides), from which each side's achieved rate; matmul: `matmul_rates` at the shape of the
  row's feed-forward, measured in the same run (about the ceiling either side can reach)."""
  ours_s = float(np.median([r["ours"] for r in runs]))
  official_s = float(np.median([r["official"] for r in runs]))
  row = {"case": case, "ours_s": ours_s, "official_s": official_s,
         "ratio": official_s / ours_s, "runs": runs, "note": note, "checks": checks}
  if gflop:
    row["gflop"] = gflop
    row["gflop_per_s"] = {"ours": gflop / ours_s, "official": gflop / official_s}
  if matmul:
    row["matmul_gflop_per_s"] = matmul
  if ops:
    row["ops"] = ops
  rates = ""
  if gflop:
    rates = (f"; {gflop:.0f} GFLOP: ours {gflop / ours_s:.0f}, official "
             f"{gflop / official_s:.0f} GFLOP/s")
  if matmul:
    rates += (f" (one matmul {matmul['shape']}: jax {matmul['ours']:.0f}, torch "
              f"{matmul['official']:.0f} GFLOP/s)")
  print(f"  {case}: ours {ours_s:.3f} s, official {official_s:.3f} s (medians){rates}")
  return row


def matmul_rates(m: int, k: int, n: int, reps: int = 9) -> dict:
  """GFLOP/s of one float32 [m, k] x [k, n] matmul, jitted jax and torch (the benchmark's
  threads), medians of `reps` after one untimed call each, alternating: the rate a step's
  largest matmuls can reach on this machine, which bounds either side's whole step."""
  import torch
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
  ja, jb = jnp.asarray(a), jnp.asarray(b)
  f = jax.jit(jnp.matmul)
  ta, tb = torch.from_numpy(a), torch.from_numpy(b)
  runs = time_alternating(lambda: f(ja, jb).block_until_ready(), lambda: torch.mm(ta, tb), reps)
  flop = 2.0 * m * k * n / 1e9
  return {"shape": f"[{m}, {k}] x [{k}, {n}]",
          "ours": flop / float(np.median([r["ours"] for r in runs])),
          "official": flop / float(np.median([r["official"] for r in runs]))}


def op_comparison(args, case: str, compiled, run_ours, run_official) -> dict | None:
  """With --ops: one more step of each side under its profiler (after the timed runs, so
  the timing is untouched), grouped by benchmarks/op_profile.py."""
  if not args.ops:
    return None
  table = {"ours": op_profile.ours(compiled, run_ours),
           "official": op_profile.official(run_official)}
  op_profile.print_comparison(case, table)
  return table


def relative(a: float, b: float) -> float:
  return abs(a - b) / max(abs(b), 1e-12)


def check_close(what: str, ours: np.ndarray, official: np.ndarray) -> float:
  """Max |ours - official| / max(1, max |official|); raises above PRED_TOL."""
  ours, official = np.asarray(ours, np.float64), np.asarray(official, np.float64)
  if ours.shape != official.shape:
    raise AssertionError(f"{what}: shapes differ, ours {ours.shape}, official {official.shape}")
  err = float(np.max(np.abs(ours - official)) / max(1.0, float(np.max(np.abs(official)))))
  if not err <= PRED_TOL:
    raise AssertionError(f"{what}: ours and the official model disagree: max |diff| / "
                         f"max(1, max |official|) = {err:.3g} > {PRED_TOL}")
  print(f"  check {what}: max |diff| / max(1, max |official|) = {err:.2g} (<= {PRED_TOL})")
  return err


# ---- shared helpers -------------------------------------------------------------------------

def torch_sd(module) -> dict[str, np.ndarray]:
  return {k: v.detach().float().numpy() for k, v in module.state_dict().items()}


def perturb_norms(module, seed: int):
  """LayerNorm scales 1 + 0.1 N(0,1), their biases and Linear biases 0.05 N(0,1): the official
  init leaves them at 1 and 0, which would not test their mapping."""
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.endswith("bias"):
        p.copy_(0.05 * torch.randn(p.shape, generator=g))
      elif "norm" in name and p.ndim == 1:
        p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))


def drop_unused(params: dict, init_params) -> dict:
  """The converted top-level entries our model has. fourm_jax.convert.from_official maps
  `decoder_embeddings.{image target}.token_emb` to `dec_tok_*` even when the model is built
  with tie_embeddings=False, where image-like targets enter as the mask token and the model
  has no such parameter (FM keeps it, unused)."""
  names = set(jax.eval_shape(init_params, jax.random.key(0)))
  dropped = sorted(set(params) - names)
  if dropped:
    print(f"  note: converted params our model does not have (dropped): {', '.join(dropped)}")
  return {k: v for k, v in params.items() if k in names}


def our_state(task, tx, params, mesh):
  """Our TrainState with `params` (numpy, official weights) in place of the random init."""
  state, sh = ts.create_train_state(task.init_params, tx, jax.random.key(0), mesh)
  if jax.tree.structure(state.params) != jax.tree.structure(params):
    raise AssertionError("converted params do not match our model's tree:\n"
                         f"ours {jax.tree.structure(state.params)}\n"
                         f"converted {jax.tree.structure(params)}")
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(state.params)[0],
                          jax.tree.leaves(params)):
    if a.shape != b.shape:
      raise AssertionError(f"{jax.tree_util.keystr(path)}: ours {a.shape}, converted {b.shape}")
  with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.RULES):
    p = jax.device_put(jax.tree.map(jnp.asarray, params), sh.params)
    opt = jax.jit(tx.init, out_shardings=sh.opt_state)(p)
  return state.replace(params=p, opt_state=opt), sh


def compile_step(task, tx, schedule, sh, mesh, state, batch):
  """(compiled donated step, device batch)."""
  step = loop.jit_train_step(task, tx, schedule, sh, mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.RULES):
    device_batch = partitioning.shard_batch(batch, mesh)
    return step.lower(state, device_batch).compile(), device_batch


def stepper(compiled, state, batch):
  """A no-argument function running one donated step (the state threads through)."""
  box = {"state": state}

  def run():
    box["state"], metrics = compiled(box["state"], batch)
    jax.block_until_ready(metrics)
    return metrics
  return run


def torch_adamw(params_or_groups, lr: float, fused: bool = False):
  import torch
  kw = dict(lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05)
  if fused:
    try:
      return torch.optim.AdamW(params_or_groups, fused=True, **kw), "fused"
    except (RuntimeError, TypeError, ValueError):
      pass
  return torch.optim.AdamW(params_or_groups, **kw), "default (single-tensor loop on CPU)"


def torch_stepper(model, optimizer, loss_fn, clip: float = 0.0):
  import torch

  phase = torch.profiler.record_function        # ranges benchmarks/op_profile.py reads

  def run():
    optimizer.zero_grad(set_to_none=True)
    with phase("forward"):
      loss = loss_fn()
    with phase("backward"):
      loss.backward()
    with phase("update"):
      if clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
      optimizer.step()
    return loss
  return run


# ---- AIM ------------------------------------------------------------------------------------

def aim_config(s: dict):
  cfg = cli.config_from_file(f"{ROOT}/configs/aim/pretrain.py", "variant=tiny")
  cfg.batch_size = s["batch"]
  cfg.data.image_size = s["image"]
  cfg.model.width, cfg.model.depth, cfg.model.num_heads = s["width"], s["depth"], s["heads"]
  cfg.model.head, cfg.model.head_depth = "mlp", s["head_depth"]
  cfg.model.head_width = s["head_width"]
  cfg.model.dtype = cfg.model.param_dtype = "float32"
  cfg.optimizer.lr, cfg.optimizer.clip_norm = 1e-3, 1.0
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = -1, 1, 1
  return cfg


def official_aim_head(s: dict, l3m, aim_layers):
  """The pixel head, l3m's SimpleDecoder structure (identity attention, MLP without biases,
  projections with biases, LayerNorm eps 1e-6 as ours)."""
  import torch
  kw = dict(input_dim=s["width"], embed_dim=s["head_width"], output_dim=14 * 14 * 3,
            num_layers=s["head_depth"], mlp_ratio=4, use_bias=False, patch_size=14,
            image_size=s["image"])
  if l3m is not None:
    simple_decoder, identity, ln_fp32, _ = l3m
    return simple_decoder(attn_target=functools.partial(identity), read_key="tokens",
                          write_key="preds", norm_layer=functools.partial(ln_fp32, eps=1e-6),
                          **kw)

  class Identity(torch.nn.Module):
    def forward(self, x, mask=None):
      return x

  class ComposedHead(torch.nn.Module):        # l3m's SimpleDecoder, from ml-aim's layers
    def __init__(self):
      super().__init__()
      w, grid = kw["embed_dim"], kw["image_size"] // 14
      self.decoder_projection = torch.nn.Linear(kw["input_dim"], w, bias=True)
      self.register_buffer("decoder_pos_embed",
                           aim_layers.SinCosPosEmbed()(grid, grid, w)[None])
      self.decoder_blocks = torch.nn.ModuleList([aim_layers.Block(
          dim=w, attn_target=lambda use_bias: Identity(), mlp_hidden_dim=4 * w,
          norm_layer=aim_layers.LayerNorm, use_bias=False) for _ in range(kw["num_layers"])])
      self.decoder_norm = aim_layers.LayerNorm(w)
      self.decoder_pred = torch.nn.Linear(w, kw["output_dim"], bias=True)

    def forward(self, d):
      x = self.decoder_projection(d["tokens"]) + self.decoder_pos_embed
      for blk in self.decoder_blocks:
        x = blk(x)
      d["preds"] = self.decoder_pred(self.decoder_norm(x))
      return d
  return ComposedHead()


def raster_pixel_loss(preds, images, mask, patch: int):
  """l3m's RasterPixelLoss (block size 1, norm_pix_loss, unbiased variance), for runs
  without ml-l3m."""
  b, c, h, w = images.shape
  x = images.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 3, 5, 1)
  t = x.reshape(b, -1, patch * patch * c)
  t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
  err = ((preds[:, :-1] - t[:, 1:]) ** 2).mean(-1)
  m = mask[:, 1:]
  return (err * m).sum() / m.sum()


def official_aim_trunk(s: dict, aim_layers, aim_models):
  """(preprocessor, trunk) of ml-aim's AIM v1, with prefix-causal attention."""
  k = (s["image"] // 14) ** 2
  patchifier = aim_layers.PatchEmbed(img_size=s["image"], patch_size=14, in_chans=3,
                                     embed_dim=s["width"], norm_layer=aim_layers.LayerNorm)
  preprocessor = aim_layers.ViTPreprocessor(patchifier, drop_patches=False, cls_token=False)

  def attn_target(use_bias):
    return aim_layers.PrefixCausalAttention(dim=s["width"], num_heads=s["heads"],
                                            use_bias=use_bias, num_patches=k)
  trunk = aim_models.Transformer(attn_target, embed_dim=s["width"], num_blocks=s["depth"],
                                 norm_layer=aim_layers.LayerNorm, use_bias=False,
                                 post_trunk_norm=True)
  return preprocessor, trunk


def official_aim_module(preprocessor, trunk, head, loss):
  """The pieces as one torch module: predictions(images, mask) and forward -> the loss."""
  import torch

  class OfficialAIM(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.preprocessor, self.trunk, self.head, self.loss = preprocessor, trunk, head, loss

    def predictions(self, images, mask):
      x, _ = self.trunk(self.preprocessor(images), mask=mask)
      return self.head({"tokens": x})["preds"]

    def forward(self, images, mask):
      preds = self.predictions(images, mask)
      if self.loss is None:
        return raster_pixel_loss(preds, images, mask, 14)
      return self.loss({"preds": preds, "image": images, "mask": mask})[0]
  return OfficialAIM()


def build_official_aim(s: dict, aim_layers, aim_models, l3m):
  import torch
  torch.manual_seed(0)
  preprocessor, trunk = official_aim_trunk(s, aim_layers, aim_models)
  head = official_aim_head(s, l3m, aim_layers)
  loss = None if l3m is None else l3m[3](
      patch_size=14, image_size=s["image"], norm_pix_loss=True, read_key="preds",
      target_read_key="image", mask_read_key="mask")
  model = official_aim_module(preprocessor, trunk, head, loss)
  perturb_norms(model, 1)
  with torch.no_grad():   # what our head lacks: the identity-attention branch and the biases
    for blk in model.head.decoder_blocks:
      blk.norm_1.weight.zero_()
      blk.norm_1.bias.zero_()
    model.head.decoder_projection.bias.zero_()
    model.head.decoder_pred.bias.zero_()
  check_no_stubs(model, "official AIM")
  return model


def aim_head_to_ours(sd: dict, depth: int) -> dict:
  """The SimpleDecoder-structured head -> our 'mlp' head params. Our head has no identity-
  attention branch (x + LN1(x)) and no projection biases: they must be zero here."""
  for key in ["head.decoder_projection.bias", "head.decoder_pred.bias"] + [
      f"head.decoder_blocks.{i}.norm_1.{p}" for i in range(depth) for p in ("weight", "bias")]:
    if np.any(sd[key] != 0):
      raise ValueError(f"{key} is not zero: our pixel head has no such term")
  ln = lambda k: {"scale": sd[k + ".weight"], "bias": sd[k + ".bias"]}
  out = {"head_in": {"kernel": sd["head.decoder_projection.weight"].T},
         "head_norm": ln("head.decoder_norm"),
         "head_out": {"kernel": sd["head.decoder_pred.weight"].T}}
  for i in range(depth):
    p = f"head.decoder_blocks.{i}."
    out[f"head_blocks_{i}"] = {"norm": ln(p + "norm_2"), "mlp": {
        "fc1": {"kernel": sd[p + "mlp.fc1.weight"].T},
        "fc2": {"kernel": sd[p + "mlp.fc2.weight"].T}}}
  return out


def aim_params_from_official(model, s: dict) -> dict:
  sd = torch_sd(model)
  trunk_sd = {k: v for k, v in sd.items() if k.startswith(("preprocessor.", "trunk."))
              and not k.endswith("attn_mask")}
  params, _ = aim_convert.official_to_params(trunk_sd, s["width"], s["depth"], s["heads"], 14)
  params.update(aim_head_to_ours(sd, s["head_depth"]))
  return params


def aim_images(s: dict):
  """(uint8 NHWC batch for ours, normalised NCHW float32 for the official model)."""
  raw = np.random.default_rng(0).integers(0, 256, (s["batch"], s["image"], s["image"], 3),
                                          np.uint8)
  return raw, np.ascontiguousarray(transforms.normalize_images(raw).transpose(0, 3, 1, 2))


def check_aim_loss(first_loss: float, model, images, mask) -> dict:
  import torch
  with torch.no_grad():
    official = float(model(images, mask))
  rel = relative(first_loss, official)
  if rel > LOSS_RTOL:
    raise AssertionError(f"aim loss: ours {first_loss:.6f}, official {official:.6f} "
                         f"(rel {rel:.3g})")
  print(f"  check aim loss: ours {first_loss:.6f}, official {official:.6f}, rel {rel:.2g}")
  return {"loss_ours": first_loss, "loss_official": official, "loss_rel_diff": rel}


def first_step_prefix(state, s: dict, k: int) -> np.ndarray:
  """The prefix lengths our first train step draws (loop: the step's key is
  fold_in(state.rng, step); aimjax.train's loss_fn samples the prefix from it)."""
  key = jax.random.fold_in(state.rng, state.step)
  return np.asarray(aim_objective.sample_prefix_lengths(key, s["batch"], k))


def prefix_mask(prefix: np.ndarray, k: int):
  """The official mask: bool [B, K], True for patches not in the prefix."""
  import torch
  return torch.from_numpy(np.arange(k)[None] >= np.asarray(prefix)[:, None])


def check_aim_predictions(model, params, official, raw, images_t, prefix):
  import torch
  ours = jax.jit(model.apply)({"params": params}, transforms.normalize_images(jnp.asarray(raw)),
                              jnp.asarray(prefix))
  with torch.no_grad():
    theirs = official.predictions(images_t, prefix_mask(prefix, model.num_patches)).numpy()
  return check_close("aim predictions", ours, theirs)


def official_aim_step(official, images_t, s: dict, k: int):
  """(one official train step, optimizer kind): AdamW as the l3m config (no weight decay on
  vectors and positions, fused when available), clipping 1.0, a fresh prefix per step."""
  decays = lambda n, p: p.ndim >= 2 and "pos_embed" not in n
  params = list(official.named_parameters())
  groups = [{"params": [p for n, p in params if decays(n, p)]},
            {"params": [p for n, p in params if not decays(n, p)], "weight_decay": 0.0}]
  opt, kind = torch_adamw(groups, 1e-3, fused=True)
  rng = np.random.default_rng(1)

  def loss():
    return official(images_t, prefix_mask(rng.integers(1, k, s["batch"]), k))
  return torch_stepper(official, opt, loss, clip=1.0), kind


def aim_row(args, s: dict, aim_mods, l3m):
  import torch
  cfg = aim_config(s)
  task = aim_train.build_task(cfg)
  model = aim_model.from_config(cfg.model, cfg.objective)
  official = build_official_aim(s, *aim_mods, l3m)
  params = aim_params_from_official(official, s)
  boxed = ts.abstract_params(task.init_params, jax.random.key(0))
  tx, schedule = optim.create_optimizer(cfg.optimizer, 10_000, nn.unbox(boxed), cfg.model.depth)
  mesh = mesh_lib.create_mesh(cfg.mesh)
  state, sh = our_state(task, tx, params, mesh)
  raw, images = aim_images(s)
  images_t = torch.from_numpy(images)
  batch = {"image": raw, "valid": np.ones(s["batch"], np.float32)}
  compiled, device_batch = compile_step(task, tx, schedule, sh, mesh, state, batch)
  prefix = first_step_prefix(state, s, model.num_patches)
  pred_err = check_aim_predictions(model, params, official, raw, images_t, prefix)
  run_ours = stepper(compiled, state, device_batch)
  checks = check_aim_loss(float(run_ours()["loss"]), official, images_t,
                          prefix_mask(prefix, model.num_patches))
  checks["predictions_max_rel_diff"] = pred_err
  run_official, kind = official_aim_step(official, images_t, s, model.num_patches)
  runs = time_alternating(run_ours, run_official, args.runs, args.settle)
  ops = op_comparison(args, "aim train", compiled, run_ours, run_official)
  head = ("ml-l3m SimpleDecoder (GenericIdentity attention) + RasterPixelLoss" if l3m else
          "head composed from ml-aim Block/MLP as l3m's SimpleDecoder (no ml-l3m clone) + "
          "RasterPixelLoss written here")
  note = (f"official: ml-aim PatchEmbed/ViTPreprocessor + Transformer(PrefixCausalAttention), "
          f"{head}; LN eps 1e-6; eager fwd+bwd+clip_grad_norm_(1.0)+AdamW {kind}; "
          f"head's norm_1 and projection biases zeroed (ours has none)")
  gflop = flops_lib.train_step_flops(aim_model.forward_flops(model, s["batch"])) / 1e9
  rows = s["batch"] * model.num_patches      # the pixel head's feed-forward, most of the step
  matmul = matmul_rates(rows, s["head_width"], model.mlp_ratio * s["head_width"])
  return make_row("aim train", runs, note, checks, ops, gflop, matmul)


# ---- 4M -------------------------------------------------------------------------------------

def fourm_config(s: dict, inputs=FOURM_INPUTS, targets=FOURM_TARGETS):
  cfg = cli.config_from_file(f"{ROOT}/configs/fourm/pretrain.py", "variant=4m7_B")
  cfg.batch_size = s.get("batch", 4)
  cfg.model.dim, cfg.model.num_heads = s["dim"], s["heads"]
  cfg.model.encoder_depth = cfg.model.decoder_depth = s["depth"]
  cfg.model.inputs, cfg.model.targets = tuple(inputs), tuple(targets)
  cfg.model.tie_embeddings = False                 # FM's untied to_logits
  cfg.model.num_encoder_tokens = cfg.model.num_decoder_tokens = s.get("tokens", 128)
  cfg.masking.input_tokens = cfg.masking.target_tokens = s.get("tokens", 128)
  cfg.model.dtype, cfg.model.remat = "float32", "none"
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = -1, 1, 1
  fields = {n: n for n in dict.fromkeys((*inputs, *targets))}
  cfg.data.datasets.cc12m.fields = fields
  return cfg


def fm_config(s: dict, inputs=FOURM_INPUTS, targets=FOURM_TARGETS) -> dict:
  return {"domains_in": list(inputs), "domains_out": list(targets), "image_size": 224,
          "patch_size": 16, "norm_bias": False, "act_layer": "SiLU",
          "encoder_depth": s["depth"], "decoder_depth": s["depth"], "dim": s["dim"],
          "num_heads": s["heads"], "mlp_ratio": 4, "qkv_bias": False, "proj_bias": False,
          "mlp_bias": False, "gated_mlp": True, "qk_norm": False,
          "decoder_causal_mask": False, "decoder_sep_mask": True}


def build_fm(fm, s: dict, seed: int, **kw):
  import torch
  torch.manual_seed(seed)
  model = fm.FM(fm_config(s, **kw))
  perturb_norms(model, seed + 1)
  check_no_stubs(model, "official 4M")
  return model


def fourm_batch(cfg, model) -> dict:
  masker = fourm_train.build_masker(cfg, model)
  rng = np.random.default_rng(0)
  rows = [masker(synthetic_sample(model, rng), rng) for _ in range(cfg.batch_size)]
  batch = jax.tree.map(lambda *x: np.stack(x), *rows)
  batch["valid"] = np.ones(cfg.batch_size, np.float32)
  return batch


def to_fm_batch(batch: dict, model) -> dict:
  """Our masked batch -> FM's mod_dict (pixels NCHW, token ids int64, the same masks)."""
  import torch
  out = {}
  for m in {m.name: m for m in (*model.inputs, *model.targets)}.values():
    d = batch[m.name]
    t = np.asarray(d["tensor"])
    t = t.transpose(0, 3, 1, 2).astype(np.float32) if m.kind == "pixels" else t.astype(np.int64)
    out[m.name] = {"tensor": torch.from_numpy(np.ascontiguousarray(t)),
                   "input_mask": torch.from_numpy(np.asarray(d["input_mask"], bool)),
                   "target_mask": torch.from_numpy(np.asarray(d["target_mask"], bool)),
                   "decoder_attention_mask": torch.from_numpy(
                       np.asarray(d["decoder_attention_mask"], np.int32))}
  return out


def fresh(mod_dict: dict) -> dict:
  """FM's embedding modules add keys to the dicts they get: hand it copies."""
  return {k: dict(v) for k, v in mod_dict.items()}


def check_fourm_loss(metrics, official_model, mod_dict, n_tok: int) -> dict:
  import torch
  with torch.no_grad():
    loss, mod_loss = official_model(fresh(mod_dict), n_tok, n_tok, loss_type="mod")
  checks = {"loss_ours": float(metrics["loss"]), "loss_official": float(loss)}
  pairs = [("loss", float(metrics["loss"]), float(loss))] + [
      (f"loss/{m}", float(metrics[f"loss/{m}"]), float(v)) for m, v in mod_loss.items()]
  for name, ours, theirs in pairs:
    rel = relative(ours, theirs)
    checks[f"{name} rel_diff"] = rel
    if rel > LOSS_RTOL:
      raise AssertionError(f"4m {name}: ours {ours:.6f}, official {theirs:.6f}, relative "
                           f"difference {rel:.3g} > {LOSS_RTOL}")
  print(f"  check 4m loss: ours {checks['loss_ours']:.6f}, official "
        f"{checks['loss_official']:.6f}, per-modality max rel "
        f"{max(v for k, v in checks.items() if k.endswith('rel_diff')):.2g}")
  return checks


def fourm_row(args, s: dict, fourm_mods):
  import torch
  fm, _, _ = fourm_mods
  cfg = fourm_config(s)
  model = fourm_train.build_model(cfg)
  task = fourm_train.build_task(cfg)
  official = build_fm(fm, s, 0)
  params = drop_unused(fourm_convert.from_official(torch_sd(official), model), task.init_params)
  boxed = ts.abstract_params(task.init_params, jax.random.key(0))
  tx, schedule = optim.create_optimizer(cfg.optimizer, 10_000, nn.unbox(boxed))
  mesh = mesh_lib.create_mesh(cfg.mesh)
  state, sh = our_state(task, tx, params, mesh)
  batch = fourm_batch(cfg, model)
  compiled, device_batch = compile_step(task, tx, schedule, sh, mesh, state, batch)
  run_ours = stepper(compiled, state, device_batch)
  mod_dict = to_fm_batch(batch, model)
  n_tok = cfg.model.num_encoder_tokens
  checks = check_fourm_loss(run_ours(), official, mod_dict, n_tok)
  opt, kind = torch_adamw(official.parameters(), cfg.optimizer.lr)
  run_official = torch_stepper(
      official, opt, lambda: official(fresh(mod_dict), n_tok, n_tok, loss_type="mod")[0])
  runs = time_alternating(run_ours, run_official, args.runs, args.settle)
  ops = op_comparison(args, "4m train", compiled, run_ours, run_official)
  note = (f"official: fourm.models.fm.FM (untied to_logits), eager fwd (loss 'mod') + bwd + "
          f"torch.optim.AdamW {kind}; batch masked by fourm_jax (4M-7 mixture), "
          f"{n_tok}/{n_tok} tokens; decoder modality order sorted on both sides")
  matmul = matmul_rates(s["batch"] * n_tok, model.dim, fourm_flops.ffn_hidden(model))
  return make_row("4m train", runs, note, checks, ops, fourm_train_gflop(model, batch, n_tok),
                  matmul)


def fourm_train_gflop(model, batch: dict, n_tok: int) -> float:
  """Model FLOPs of one 4M train step on `batch` (fourm_jax.flops), the logits counted
  exactly: each target token against its own vocabulary, as both sides compute them."""
  b = len(np.asarray(batch[model.targets[0].name]["target_mask"]))
  logits = sum(float(np.sum(~np.asarray(batch[m.name]["target_mask"], bool)))
               * fourm_flops.mm(1, model.dim, m.vocab_size) for m in model.targets)
  fwd = (fourm_flops.forward_flops(model, b, n_tok, n_tok)
         - fourm_flops.logits_flops(model, b, n_tok) + logits)     # exact logits for expected
  return flops_lib.train_step_flops(fwd) / 1e9


# ---- 4M generation --------------------------------------------------------------------------

GEN_CASES = (("maskgit", 1.0), ("maskgit", 3.0), ("roar", 1.0), ("roar", 3.0))
GEN_SRC, GEN_TGT = "tok_depth@224", "tok_rgb@224"


def gen_case_name(scheme: str, cfg_scale: float, dim: int) -> str:
  guide = f", cfg {cfg_scale:g}" if cfg_scale != 1.0 else ""
  return f"4m gen {scheme}{guide}, dim {dim}"


def official_gen_inputs(generate, info, depth_tokens: np.ndarray) -> dict:
  import torch
  b, n = depth_tokens.shape
  mod_dict = {GEN_SRC: {"tensor": torch.from_numpy(depth_tokens.astype(np.int64))}}
  mod_dict = generate.init_full_input_modality(mod_dict, info, GEN_SRC, "cpu")
  return generate.init_empty_target_modality(mod_dict, info, GEN_TGT, b, n, "cpu")


def official_schedule(generate, scheme: str, cfg_scale: float, steps: int, n: int):
  return generate.build_chained_generation_schedules(
      cond_domains=[GEN_SRC], target_domains=[GEN_TGT], tokens_per_target=[n],
      autoregression_schemes=[scheme], decoding_steps=[steps],
      token_decoding_schedules=["cosine" if scheme == "maskgit" else "linear"], temps=[1.0],
      temp_schedules=["constant"], cfg_scales=[float(cfg_scale)], cfg_schedules=["constant"],
      cfg_grow_conditioning=False)


def our_schedule(scheme: str, cfg_scale: float, steps: int, n: int):
  return schedules.chained([GEN_TGT], [n], [scheme], [steps],
                           token_schedules=["cosine" if scheme == "maskgit" else "linear"],
                           temperatures=[1.0], temperature_schedules=["constant"], top_k=[0],
                           top_p=[0.0], guidance=[cfg_scale])


def check_gen_logits(sampler, state, official_sampler, mod_dict, dim: int) -> float:
  import torch
  n_enc = sampler.encoder_tokens(state, GEN_TGT)
  ours = jax.jit(lambda p, st: sampler.target_logits(p, st, GEN_TGT, ((GEN_SRC,),), None,
                                                     n_enc))(sampler.params, state)
  with torch.no_grad():
    theirs, _ = official_sampler.forward_enc_dec_maskgit_batched(
        copy.deepcopy(mod_dict), GEN_TGT)
  return check_close(f"gen logits dim {dim}", ours, theirs.numpy())


def gen_rows(args, s: dict, fourm_mods, only):
  fm, generate, info = fourm_mods
  rows = []
  for dim, heads in s["dims"]:
    cases = [c for c in GEN_CASES if selected(gen_case_name(*c, dim), only)]
    if not cases:
      continue
    ms = dict(dim=dim, heads=heads, depth=s["depth"])
    model = fourm_train.build_model(fourm_config(ms))
    official = build_fm(fm, ms, 10 + dim).eval()
    official_sampler = generate.GenerationSampler(official).eval()
    dummy = jax.tree.map(jnp.asarray, fourm_train.dummy_batch(model))
    init = lambda r: model.init(r, dummy, 8, 8)["params"]
    params = drop_unused(fourm_convert.from_official(torch_sd(official), model), init)
    sampler = sampler_lib.Sampler(model, jax.tree.map(jnp.asarray, params))
    n = sampler.modalities[GEN_TGT].num_tokens
    depth = np.random.default_rng(2).integers(0, sampler.modalities[GEN_SRC].vocab_size,
                                              (s["batch"], n))
    state = sampler.init_state(s["batch"], {GEN_SRC: {"tensor": depth}})
    mod_dict = official_gen_inputs(generate, info, depth)
    err = check_gen_logits(sampler, state, official_sampler, mod_dict, dim)
    for scheme, cfg_scale in cases:
      rows.append(gen_row(args, s, sampler, state, official_sampler, mod_dict, generate,
                          scheme, cfg_scale, dim, heads, err))
  return rows


def gen_row(args, s, sampler, state, official_sampler, mod_dict, generate, scheme, cfg_scale,
            dim, heads, logits_err):
  import torch
  n = sampler.modalities[GEN_TGT].num_tokens
  plan = our_schedule(scheme, cfg_scale, s["steps"], n)
  theirs = official_schedule(generate, scheme, cfg_scale, s["steps"], n)
  counter = {"ours": 0, "official": 0}

  def run_ours():
    counter["ours"] += 1
    out = sampler.generate(state, plan, jax.random.key(counter["ours"]))
    jax.block_until_ready(out)
    if bool(np.any(np.asarray(out[GEN_TGT]["input_mask"]))):
      raise AssertionError("our generation left tokens undecoded")

  def run_official():
    counter["official"] += 1
    out = official_sampler.generate(mod_dict, theirs, top_k=0.0, top_p=0.0,
                                    seed=counter["official"])
    if bool(torch.any(out[GEN_TGT]["input_mask"])):
      raise AssertionError("the official generation left tokens undecoded")

  t0 = time.perf_counter()
  run_ours()                                      # compiles
  compile_s = time.perf_counter() - t0
  runs = time_alternating(run_ours, run_official, args.runs, args.settle)
  note = (f"official: GenerationSampler.generate over build_chained_generation_schedules "
          f"(eager, {'two passes' if cfg_scale != 1.0 else 'one pass'} per step); dim {dim}, "
          f"{heads} heads, {s['depth']}+{s['depth']} blocks, batch {s['batch']}, "
          f"{len(plan)} steps, temperature 1, top-k/top-p off; ours' first call "
          f"(compilation) {compile_s:.1f} s not timed")
  model = sampler.model
  matmul = matmul_rates(s["batch"] * n, model.dim, fourm_flops.ffn_hidden(model))
  return make_row(gen_case_name(scheme, cfg_scale, dim), runs, note,
                  {"first_step_logits_max_rel_diff": logits_err},
                  gflop=gen_gflop(model, plan, s["batch"], n, cfg_scale != 1.0), matmul=matmul)


def gen_gflop(model, plan, batch: int, given: int, guided: bool) -> float:
  """Model FLOPs of one generation of GEN_TGT from `given` GEN_SRC tokens (fourm_jax.flops),
  with the official sampler's per-step lengths, which ours matches: the encoder over the given
  tokens and those decoded so far (the unconditional pass: the decoded ones alone), the
  decoder over every unknown position (MaskGIT) or the step's chosen ones (ROAR), logits
  over the target's vocabulary at each decoder position."""
  vocab = {m.name: m.vocab_size for m in model.targets}[GEN_TGT]
  total, decoded = 0.0, 0
  unknown = sum(step.num_tokens for step in plan)
  for step in plan:
    n_dec = step.num_tokens if step.scheme == "roar" else unknown - decoded
    passes = [given + decoded] + ([max(decoded, 1)] if guided else [])
    for n_enc in passes:
      total += (fourm_flops.encoder_flops(model, batch, n_enc)
                + fourm_flops.decoder_flops(model, batch, n_enc, n_dec)
                + fourm_flops.mm(batch * n_dec, model.dim, vocab))
    decoded += step.num_tokens
  return total / 1e9


# ---- main -----------------------------------------------------------------------------------

def selected(case: str, only) -> bool:
  return not only or any(o in case for o in only)


def print_table(rows):
  header = (f"{'case':34s} {'ours s':>9s} {'official s':>11s} {'ratio':>7s} {'GFLOP':>7s} "
            f"{'ours GF/s':>10s} {'off. GF/s':>10s} {'mm jax':>7s} {'mm torch':>9s}")
  print(header)
  print("-" * len(header))
  for r in rows:
    rate, mm = r.get("gflop_per_s"), r.get("matmul_gflop_per_s")
    extra = (f" {r['gflop']:7.1f} {rate['ours']:10.0f} {rate['official']:10.0f}" if rate
             else f" {'':7s} {'':10s} {'':10s}")
    extra += f" {mm['ours']:7.0f} {mm['official']:9.0f}" if mm else ""
    print(f"{r['case']:34s} {r['ours_s']:9.3f} {r['official_s']:11.3f} {r['ratio']:7.2f}{extra}")
    print(f"    {r['note']}")
  print("ratio = official s / ours s: > 1 means ours is faster. GFLOP: the model's work per call "
        "(analytic, the same on both sides); GF/s: each side's rate over it; mm: one matmul at "
        "the row's feed-forward shape, the rate this machine gives either library")


def machine() -> str:
  d = jax.devices()[0]
  return (f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores; "
          f"jax device {d.device_kind} ({d.platform})").replace("  ", " ")


def load_average() -> list[float]:
  """The 1-minute load average (other work on the machine skews both sides' timings)."""
  try:
    return [round(os.getloadavg()[0], 2)]
  except OSError:
    return []


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--official_aim", default="", help="clone of apple/ml-aim")
  parser.add_argument("--official_l3m", default="",
                      help="clone of apple/ml-l3m (default: ml-l3m beside the ml-aim clone)")
  parser.add_argument("--official_4m", default="", help="clone of apple/ml-4m")
  parser.add_argument("--json", default=os.path.join(ROOT, "benchmarks/results/vs_official.json"),
                      help="results file; a run with --only replaces its rows in an existing "
                           "file and keeps the others (each new row records its run)")
  parser.add_argument("--runs", type=int, default=7)
  parser.add_argument("--settle", type=int, default=1,
                      help="untimed calls of a side before each of its timed calls, so that "
                           "no timed call directly follows the other library's (0: plain "
                           "alternation)")
  parser.add_argument("--threads", type=int, default=2, help="torch threads (official side)")
  parser.add_argument("--only", default="", help="comma-separated substrings of case names")
  parser.add_argument("--ops", default="", metavar="PATH",
                      help="also profile one step of each train row, both sides, and write the "
                           "per-op comparison (benchmarks/op_profile.py) to PATH, e.g. "
                           "benchmarks/results/vs_official_ops.json")
  parser.add_argument("--malloc", choices=MALLOC_CHOICES, default="default",
                      help="glibc allocator settings for the whole process, both sides: "
                           "'default', or 'keep' (freed memory stays in the process, so no "
                           "step faults in fresh pages; pretrain_jax/host_memory.py, which "
                           "our training command line applies on CPU by default)")
  parser.add_argument("--small", action="store_true",
                      help="tiny sizes, to check that the script runs (not for numbers)")
  return parser.parse_args()


MALLOC_CHOICES = ("default", "keep")


def check_results_file(path: str, malloc: str, settle: int = 1):
  """A run writes only into a results file of its own allocator and settle settings (or a
  new one): rows timed under other settings are not comparable."""
  previous = read_results(path)
  theirs = previous.get("malloc", "default") if previous else malloc
  if theirs != malloc:
    raise SystemExit(f"error: {path} holds a --malloc={theirs} run; give this "
                     f"--malloc={malloc} run its own file with --json=PATH")
  # files written before --settle existed hold plain alternation (0)
  theirs = previous.get("settle", 0) if previous else settle
  if theirs != settle:
    raise SystemExit(f"error: {path} holds a --settle={theirs} run; give this "
                     f"--settle={settle} run its own file with --json=PATH")


def run_aim(args, sizes, only, skipped) -> list[dict]:
  if not selected("aim train", only):
    return []
  if not args.official_aim:
    skipped.append("aim train: needs --official_aim (a clone of apple/ml-aim)")
    return []
  l3m_path = args.official_l3m or os.path.join(
      os.path.dirname(os.path.abspath(args.official_aim)), "ml-l3m")
  l3m = import_l3m(l3m_path if os.path.isdir(l3m_path) else None)
  print("aim train ...")
  return [aim_row(args, sizes["aim"], import_ml_aim(args.official_aim), l3m)]


def run_fourm(args, sizes, only, skipped) -> list[dict]:
  cases = ["4m train"] + [gen_case_name(sc, g, d) for d, _ in sizes["gen"]["dims"]
                          for sc, g in GEN_CASES]
  wanted = [c for c in cases if selected(c, only)]
  if wanted and not args.official_4m:
    skipped += [f"{c}: needs --official_4m (a clone of apple/ml-4m)" for c in wanted]
  if not wanted or not args.official_4m:
    return []
  fourm_mods = import_fourm(args.official_4m)
  rows = []
  if "4m train" in wanted:
    print("4m train ...")
    rows.append(fourm_row(args, sizes["4m"], fourm_mods))
  if any("gen" in c for c in wanted):
    print("4m gen ...")
    rows += gen_rows(args, sizes["gen"], fourm_mods, only)
  return rows


def report(args, rows, skipped, load, torch_version):
  for reason in skipped:
    print(f"skipped {reason}")
  if STUBS.stubbed:
    print(f"stubbed modules the official code imports but its models never use: "
          f"{', '.join(sorted({n.split('.')[0] for n in STUBS.stubbed}))}")
  print(f"\nmachine: {machine()}; load average at start, end {load}; torch {torch_version} "
        f"({args.threads} threads), jax {jax.__version__}; median of {args.runs} runs "
        f"(--settle={args.settle}); "
        f"--malloc={args.malloc}\n")
  print_table(rows)
  ops = {r["case"]: r.pop("ops") for r in rows if "ops" in r}
  if ops:
    os.makedirs(os.path.dirname(os.path.abspath(args.ops)), exist_ok=True)
    with open(args.ops, "w") as f:
      json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                 "machine": machine(), "torch": torch_version, "jax": jax.__version__,
                 "threads": args.threads, "doc": op_profile.__doc__, "cases": ops}, f, indent=2)
    print(f"wrote {args.ops}")
  os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
  out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
         "machine": machine(), "torch": torch_version, "jax": jax.__version__,
         "threads": args.threads, "load_average_start_end": load,
         "malloc": args.malloc, "settle": args.settle,
         "sizes": "small" if args.small else "full",
         "command": command_line(), "after": git_head(), "skipped": skipped, "rows": rows}
  previous = read_results(args.json)
  merge = bool(args.only) and previous is not None and previous.get("sizes") == out["sizes"]
  if merge:
    out = merge_rerun(previous, out)
  with open(args.json, "w") as f:
    json.dump(out, f, indent=2)
  print(f"{'merged these rows into' if merge else 'wrote'} {args.json}")


def read_results(path: str) -> dict | None:
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, ValueError):
    return None
  return data if isinstance(data, dict) and isinstance(data.get("rows"), list) else None


def merge_rerun(previous: dict, run: dict) -> dict:
  """A run of some cases (--only) replaces those rows of the results file and keeps the
  others: each new row carries its run (date, load, command, commit), and `rows_rerun`
  lists the cases that come from later runs than the file's `date`."""
  rows = list(previous["rows"])
  cases = [r["case"] for r in rows]
  rerun = previous.get("rows_rerun") or {
      "note": "these rows come from a later run (see each row's 'run'); the others from the "
              "run of 'date'"}
  rerun = {**rerun, "cases": list(rerun.get("cases", []))}
  this_run = {"date": run["date"], "load_average_start_end": run["load_average_start_end"],
              "command": run.get("command") or command_line(),
              "after": run.get("after") or git_head()}
  for row in run["rows"]:
    row["run"] = this_run
    if row["case"] in cases:
      rows[cases.index(row["case"])] = row
    else:
      rows.append(row)
    if row["case"] not in rerun["cases"]:
      rerun["cases"].append(row["case"])
  rerun["date"] = run["date"]
  return {**previous, "rows": rows, "rows_rerun": rerun}


def command_line() -> str:
  return " ".join(["python", *map(shlex.quote, sys.argv)])


def git_head() -> str:
  """'<commit> <subject>' of the checkout, marked when it has uncommitted changes."""
  try:
    git = lambda *a: subprocess.run(["git", "-C", ROOT, *a], capture_output=True, text=True,
                                    timeout=10).stdout.strip()
    head, dirty = git("log", "-1", "--format=%h %s"), git("status", "--porcelain", "-uno")
  except (OSError, subprocess.SubprocessError):
    return ""
  return f"{head} (with uncommitted changes)" if head and dirty else head


def main():
  args = parse_args()
  if not args.official_aim and not args.official_4m:
    raise SystemExit(HOW_TO)
  for flag, path, inside, repo in (("official_aim", args.official_aim, "aim-v1/aim", "ml-aim"),
                                   ("official_4m", args.official_4m, "fourm", "ml-4m")):
    if path and not os.path.isdir(os.path.join(path, inside)):
      raise SystemExit(f"error: --{flag}={path} has no {inside}/: give a clone of "
                       f"https://github.com/apple/{repo}")
  try:
    import torch
  except ImportError:
    raise SystemExit("error: PyTorch is missing: pip install -e \".[reference]\"") from None
  check_results_file(args.json, args.malloc, args.settle)
  if args.malloc == "keep":
    try:
      print(f"allocator: {host_memory.keep_freed_memory()}")
    except RuntimeError as e:
      raise SystemExit(f"error: --malloc=keep: {e}") from None
  torch.set_num_threads(args.threads)
  load = load_average()
  sizes = SIZES["small" if args.small else "full"]
  only = [o.strip() for o in args.only.split(",") if o.strip()]
  skipped = []
  rows = run_aim(args, sizes, only, skipped) + run_fourm(args, sizes, only, skipped)
  if not rows:
    for reason in skipped:
      print(f"skipped {reason}")
    raise SystemExit("no case ran")
  report(args, rows, skipped, load + load_average(), torch.__version__)


if __name__ == "__main__":
  main()
