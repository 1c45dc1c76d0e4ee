"""AIM: a ViT trunk with prefix-causal attention and a pixel prediction head.

Paper Sec. 3 and Table 1; layer layout as the official implementation
(`../shared/reference/aim.md`): patch projection with bias then LayerNorm,
fixed 2D sine-cosine positions, pre-norm blocks with bias-free linears,
exact GELU, LayerNorm eps 1e-6. No class token.

Shapes: B batch, K = (H / patch_size) * (W / patch_size) patches for images of
H x W (`image_size`: an int for square images, or (H, W)), D width,
P = patch_size^2 * 3 pixels per patch.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pretrain_jax import activations
from pretrain_jax import norms
from pretrain_jax import positions
from pretrain_jax import attention as attention_lib
from pretrain_jax import remat as remat_lib
from pretrain_jax import scan as scan_lib

from aimjax import objective
from pretrain_jax import flops as flops_lib

HEADS = ("mlp", "transformer", "none")
REMAT = remat_lib.POLICIES


def sincos_2d(grid: int | tuple[int, int], dim: int) -> np.ndarray:
  """Fixed positions [rows*cols, dim] of a patch grid (an int: square), raster order; the
  first half of the channels encodes the column, as the official SinCosPosEmbed
  (pretrain_jax.positions)."""
  rows, cols = (grid, grid) if isinstance(grid, int) else grid
  return positions.sincos_2d(rows, cols, dim)


def image_hw(image_size) -> tuple[int, int]:
  """An image size (int: square, or (H, W)) as (H, W)."""
  if np.ndim(image_size) == 0:
    return int(image_size), int(image_size)
  h, w = image_size
  return int(h), int(w)


def _dense(features, names, use_bias=False, **kw):
  return nn.Dense(features, use_bias=use_bias,
                  kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), names),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[-1:]), **kw)


def _norm(name, dtype, param_dtype):
  return norms.LayerNorm(epsilon=1e-6, dtype=dtype, param_dtype=param_dtype, name=name,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


def _constrain(x):
  return nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))


@dataclasses.dataclass(frozen=True)
class LoRA:
  """Low-rank adapters (Hu et al., 2021) on the trunk's projections.

  rank 0 disables them. Adapters live in their own variable collection,
  'lora', so the frozen 'params' and the trainable adapters are separate
  pytrees; B starts at zero, so an adapted model starts equal to the base.
  """
  rank: int = 0
  alpha: float = 16.0
  targets: tuple[str, ...] = ("qkv", "proj", "mlp")

  @property
  def scale(self) -> float:
    return self.alpha / max(self.rank, 1)

  def on(self, target: str) -> bool:
    return self.rank > 0 and target in self.targets


def _lora_delta(module: nn.Module, name: str, x, in_shape, out_shape, lora: LoRA):
  """scale * (x @ A) @ B for A: [*in_shape, r] (random), B: [r, *out_shape] (zeros).

  x: [..., *in_shape] -> [..., *out_shape].
  """
  r = lora.rank
  a = module.variable("lora", f"{name}_a", lambda: nn.initializers.he_uniform(
      in_axis=tuple(range(len(in_shape))), out_axis=-1)(
          module.make_rng("params"), (*in_shape, r), jnp.float32)).value
  b = module.variable("lora", f"{name}_b", lambda: jnp.zeros((r, *out_shape), jnp.float32)).value
  n_in = len(in_shape)
  h = jnp.tensordot(x, a.astype(x.dtype), axes=(tuple(range(x.ndim - n_in, x.ndim)),
                                               tuple(range(n_in))))
  return lora.scale * jnp.tensordot(h, b.astype(x.dtype), axes=((h.ndim - 1,), (0,)))


class Mlp(nn.Module):
  hidden: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  lora: LoRA = LoRA()

  @nn.compact
  def __call__(self, x):  # [B, T, D] -> [B, T, D]
    d = x.shape[-1]
    h = _dense(self.hidden, ("embed", "mlp"), dtype=self.dtype, param_dtype=self.param_dtype,
               name="fc1")(x)
    if self.lora.on("mlp"):
      h = h + _lora_delta(self, "fc1", x.astype(self.dtype), (d,), (self.hidden,), self.lora)
    h = nn.with_logical_constraint(h, ("activation_batch", "activation_length", "activation_mlp"))
    h = activations.gelu_exact(h)
    out = _dense(d, ("mlp", "embed"), dtype=self.dtype, param_dtype=self.param_dtype,
                 name="fc2")(h)
    if self.lora.on("mlp"):
      out = out + _lora_delta(self, "fc2", h, (self.hidden,), (d,), self.lora)
    return out


class Attention(nn.Module):
  num_heads: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  implementation: str | None = None   # None: XLA; 'cudnn': flash attention on GPU
  lora: LoRA = LoRA()

  @nn.compact
  def __call__(self, x, mask):
    """x: [B, T, D]; mask: bool [B, 1, T, T] (True = may attend) or None."""
    d = x.shape[-1]
    head_dim = d // self.num_heads
    init = nn.initializers.xavier_uniform
    w_qkv = self.param(
        "qkv", nn.with_logical_partitioning(init(in_axis=0, out_axis=(1, 2, 3)),
                                            ("embed", "qkv", "heads", "kv")),
        (d, 3, self.num_heads, head_dim), self.param_dtype)
    w_proj = self.param(
        "proj", nn.with_logical_partitioning(init(in_axis=(0, 1), out_axis=2),
                                             ("heads", "kv", "embed")),
        (self.num_heads, head_dim, d), self.param_dtype)
    x = x.astype(self.dtype)
    qkv = jnp.einsum("btd,dshk->btshk", x, w_qkv.astype(self.dtype))
    if self.lora.on("qkv"):
      qkv = qkv + _lora_delta(self, "qkv", x, (d,), (3, self.num_heads, head_dim), self.lora)
    qkv = nn.with_logical_constraint(
        qkv, ("activation_batch", "activation_length", None, "activation_heads", "activation_kv"))
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    out = attention_lib.dot_product_attention(q, k, v, mask=mask,
                                               implementation=self.implementation)
    y = jnp.einsum("bthk,hkd->btd", out, w_proj.astype(self.dtype))
    if self.lora.on("proj"):
      y = y + _lora_delta(self, "proj", out, (self.num_heads, head_dim), (d,), self.lora)
    return y


class Block(nn.Module):
  """Pre-norm transformer block: x + Attn(LN(x)); x + MLP(LN(x))."""
  num_heads: int
  mlp_ratio: int = 4
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  attention_impl: str | None = None
  lora: LoRA = LoRA()

  @nn.compact
  def __call__(self, x, mask):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = x + Attention(self.num_heads, implementation=self.attention_impl, lora=self.lora,
                      name="attn", **kw)(_norm("norm_1", **kw)(x), mask)
    x = x + Mlp(self.mlp_ratio * x.shape[-1], lora=self.lora, name="mlp", **kw)(
        _norm("norm_2", **kw)(x))
    return _constrain(x)


class MlpBlock(nn.Module):
  """A head block that processes each patch independently: x + MLP(LN(x))."""
  mlp_ratio: int = 4
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    del mask
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = x + Mlp(self.mlp_ratio * x.shape[-1], name="mlp", **kw)(_norm("norm", **kw)(x))
    return _constrain(x)


_maybe_remat = remat_lib.wrap


class AIM(nn.Module):
  """AIM trunk + pixel head.

  `__call__(images, prefix_len)` returns next-patch predictions [B, K, P] in
  sequence order (the order of `objective.patch_order(order, grid)`).
  `features(images)` returns block outputs with full bidirectional
  attention, in raster order, for downstream use.
  """
  image_size: int | tuple[int, int] = 224   # square side, or (H, W)
  patch_size: int = 14
  width: int = 1536
  depth: int = 24
  num_heads: int = 12
  mlp_ratio: int = 4
  head: str = "mlp"             # 'mlp' | 'transformer' | 'none'
  head_depth: int = 12
  head_width: int = 2048
  head_num_heads: int = 16      # transformer head only
  order: str = "raster"
  order_seed: int = 0
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  remat: str = "none"
  attention_impl: str | None = None
  scan_layers: bool = False     # trunk and head blocks as one scan each (pretrain_jax.scan)
  lora: LoRA = LoRA()          # adapters on the trunk only (downstream tuning)

  @property
  def grid_hw(self) -> tuple[int, int]:
    """Patch rows and columns."""
    h, w = image_hw(self.image_size)
    return h // self.patch_size, w // self.patch_size

  @property
  def grid(self) -> int:
    """Patches per side of a square grid (the patch orders and pretraining need one)."""
    rows, cols = self.grid_hw
    if rows != cols:
      raise ValueError(f"patch orders need a square patch grid; this AIM reads {rows}x{cols} "
                       f"patches ({self.image_size})")
    return rows

  @property
  def num_patches(self) -> int:
    rows, cols = self.grid_hw
    return rows * cols

  def sequence_order(self) -> np.ndarray:
    """Raster patch indices [K] in sequence order (objective.patch_order)."""
    if self.order == "raster":   # also for a non-square grid
      return np.arange(self.num_patches)
    return objective.patch_order(self.order, self.grid, self.order_seed)

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.patch_embed = _dense(self.width, ("patch", "embed"), use_bias=True, name="patch_embed",
                              **kw)
    self.patch_norm = _norm("patch_norm", **kw)
    trunk_kw = dict(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                    attention_impl=self.attention_impl, lora=self.lora, **kw)
    self.blocks = self._blocks(Block, self.depth, trunk_kw, "blocks")
    self.post_trunk_norm = _norm("post_trunk_norm", **kw)
    out = self.patch_size * self.patch_size * 3
    if self.head == "none":
      self.head_out = _dense(out, ("embed", "patch"), name="head_out", **kw)
      return
    self.head_in = _dense(self.head_width, ("embed", "mlp"), name="head_in", **kw)
    if self.head == "mlp":
      self.head_blocks = self._blocks(MlpBlock, self.head_depth,
                                      dict(mlp_ratio=self.mlp_ratio, **kw), "head_blocks")
    else:
      self.head_blocks = self._blocks(
          Block, self.head_depth, dict(num_heads=self.head_num_heads, mlp_ratio=self.mlp_ratio,
                                       attention_impl=self.attention_impl, **kw), "head_blocks")
    self.head_norm = _norm("head_norm", **kw)
    self.head_out = _dense(out, ("embed", "patch"), name="head_out", **kw)

  def _blocks(self, cls, n: int, kwargs: dict, name: str):
    """n blocks: a list named NAME_i, or one scanned Stack named NAME (model.scan_layers)."""
    if self.scan_layers:
      if self.lora.rank:
        raise ValueError("LoRA adapters need the blocks unrolled; build AIM with "
                         "scan_layers=False (scan.unstack converts scanned params)")
      return scan_lib.Stack(cls, n, kwargs, self.remat, name=name)
    block = _maybe_remat(cls, self.remat)
    return [block(**kwargs, name=f"{name}_{i}") for i in range(n)]

  def _embed(self, images, perm):
    """images [B, H, W, 3] -> tokens [B, K, D] in the order `perm`."""
    h, w = image_hw(self.image_size)
    if images.shape[1:3] != (h, w):
      raise ValueError(f"AIM expects images of {h}x{w} (HxW), "
                       f"got {images.shape[1]}x{images.shape[2]}")
    x = self.patch_norm(self.patch_embed(objective.patchify(images, self.patch_size)))
    x = x + jnp.asarray(sincos_2d(self.grid_hw, self.width), x.dtype)
    return _constrain(x[:, perm])

  def trunk(self, images, mask, perm, num_blocks=None):
    """Returns the list of block outputs, each [B, K, D]."""
    x = self._embed(images, perm)
    if num_blocks is None and isinstance(self.blocks, scan_lib.Stack):
      return [self.blocks(x, mask)]    # scanned: only the last block's output
    outs = []
    for block in scan_lib.unrolled(self.blocks, "AIM features")[:num_blocks]:
      x = block(x, mask)
      outs.append(x)
    return outs

  def __call__(self, images, prefix_len):
    """images: float [B, H, W, 3]; prefix_len: int [B] (0 = plain causal).

    Returns float [B, K, P]: at position i, the prediction of patch i+1.
    """
    perm = self.sequence_order()
    mask = objective.prefix_causal_mask(prefix_len, self.num_patches)
    x = self.post_trunk_norm(self.trunk(images, mask, perm)[-1])
    if self.head != "none":
      # The head's residual stream, like the trunk's, is not split over 'tensor' (head_in's
      # kernel is: ('embed', 'mlp')). Unconstrained, its output kept the kernel's tensor split
      # into the head's LayerNorms, and on a data x fsdp x tensor = 2 x 2 x 2 mesh the XLA CPU
      # partitioner then gave wrong gradients there (the loss was right).
      x = _constrain(self.head_in(x))
      x = x + jnp.asarray(sincos_2d(self.grid_hw, self.head_width)[perm], x.dtype)
      x = scan_lib.apply(self.head_blocks, x, mask)
      x = self.head_norm(x)
    return self.head_out(x)

  def features(self, images, num_blocks: int | None = None, causal: bool = False):
    """Block outputs in raster order: list of [B, K, D].

    Bidirectional attention (no mask) by default, as downstream; causal=True
    keeps the plain causal mask (the paper's Table 3d comparison).
    """
    mask = None
    if causal:
      mask = objective.prefix_causal_mask(jnp.zeros((images.shape[0],), jnp.int32),
                                          self.num_patches)
    scan_lib.unrolled(self.blocks, "AIM features")
    return self.trunk(images, mask, np.arange(self.num_patches), num_blocks)


def from_config(model_cfg, objective_cfg=None) -> AIM:
  """Builds AIM from `config.model` (+ `config.objective` for the order)."""
  dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
  for key in ("dtype", "param_dtype"):
    if model_cfg[key] not in dtypes:
      raise ValueError(f"config key 'model.{key}' must be one of {list(dtypes)}, "
                       f"got {model_cfg[key]!r}")
  for key in ("image_size", "patch_size", "width", "depth", "num_heads", "mlp_ratio",
              "head_depth", "head_width", "head_num_heads"):
    v = model_cfg[key]
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
      raise ValueError(f"config key 'model.{key}' must be a positive int, got {v!r}")
  if model_cfg.image_size % model_cfg.patch_size:
    raise ValueError(f"config key 'model.image_size' ({model_cfg.image_size}) must be a multiple "
                     f"of model.patch_size ({model_cfg.patch_size})")
  if model_cfg.width % model_cfg.num_heads or model_cfg.width % 4:
    raise ValueError(f"config key 'model.width' ({model_cfg.width}) must be divisible by "
                     f"model.num_heads ({model_cfg.num_heads}) and by 4")
  if model_cfg.head not in HEADS:
    raise ValueError(f"config key 'model.head' must be one of {HEADS}, got {model_cfg.head!r}")
  if model_cfg.remat not in REMAT:
    raise ValueError(f"config key 'model.remat' must be one of {REMAT}, got {model_cfg.remat!r}")
  order = objective_cfg.order if objective_cfg is not None else "raster"
  if order not in objective.ORDERS:
    raise ValueError(f"config key 'objective.order' must be one of {objective.ORDERS}, "
                     f"got {order!r}")
  return AIM(
      image_size=model_cfg.image_size, patch_size=model_cfg.patch_size, width=model_cfg.width,
      depth=model_cfg.depth, num_heads=model_cfg.num_heads, mlp_ratio=model_cfg.mlp_ratio,
      head=model_cfg.head, head_depth=model_cfg.head_depth, head_width=model_cfg.head_width,
      head_num_heads=model_cfg.head_num_heads, order=order,
      order_seed=objective_cfg.order_seed if objective_cfg is not None else 0,
      dtype=dtypes[model_cfg.dtype], param_dtype=dtypes[model_cfg.param_dtype],
      remat=model_cfg.remat, scan_layers=bool(model_cfg.get("scan_layers", False)),
      attention_impl=attention_lib.implementation(model_cfg.attention_impl, model_cfg.dtype))


def forward_flops(model: AIM, batch: int) -> float:
  """Analytic FLOPs of one forward pass over `batch` images (matmuls and attention)."""
  k, d, p = model.num_patches, model.width, model.patch_size ** 2 * 3
  mm = flops_lib.matmul
  per_block = (mm(k, d, 3 * d) + mm(k, d, d) + 2 * mm(k, d, model.mlp_ratio * d))
  total = mm(k, p, d) + model.depth * per_block + flops_lib.attention(1, k, d) * model.depth
  if model.head == "none":
    total += mm(k, d, p)
  else:
    w = model.head_width
    head_block = 2 * mm(k, w, model.mlp_ratio * w)
    if model.head == "transformer":
      head_block += mm(k, w, 3 * w) + mm(k, w, w) + flops_lib.attention(1, k, w)
    total += mm(k, d, w) + model.head_depth * head_block + mm(k, w, p)
  return float(batch * total)


def merge_lora(params, lora_vars, lora: LoRA):
  """Folds adapters into the trunk weights: W + scale * A @ B, reshaped.

  Returns params (same tree as `params`) whose plain forward equals the
  adapted forward; export these for inference without LoRA code.
  """
  merged = jax.tree.map(lambda x: x, params)
  for block, ad in lora_vars.items():
    for module, names in (("attn", ("qkv", "proj")), ("mlp", ("fc1", "fc2"))):
      for name in names:
        if f"{name}_a" not in ad.get(module, {}):
          continue
        a, b = ad[module][f"{name}_a"], ad[module][f"{name}_b"]
        delta = lora.scale * jnp.tensordot(a, b, axes=((a.ndim - 1,), (0,)))
        target = merged[block][module]
        if module == "mlp":
          target[name] = dict(target[name], kernel=target[name]["kernel"] + delta.astype(
              target[name]["kernel"].dtype))
        else:
          target[name] = target[name] + delta.astype(target[name].dtype)
  return merged


def trunk_param_count(params) -> int:
  """Parameters of the transformer blocks (what the paper's Table 1 counts)."""
  return sum(int(x.size) for name, sub in scan_lib.unstack(dict(params)).items()
             if name.startswith("blocks_")
             for x in jax.tree.leaves(sub))


def head_param_count(params) -> int:
  return sum(int(x.size) for name, sub in params.items() if name.startswith("head")
             for x in jax.tree.leaves(sub))
