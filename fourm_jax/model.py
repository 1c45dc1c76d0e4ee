"""The 4M encoder-decoder (4M Sec. 2, App. C; 4M-21 Sec. 2) in Flax linen.

Input: a dict modality name -> {
    'tensor':  int [B, N] (or [B, h, w]) token ids; float [B, H, W, C] pixels
               (kind 'pixels'); float [B, L, E] embeddings (kind 'seq_emb'),
    'input_mask':  bool [B, N], True where the token is NOT given to the encoder,
    'target_mask': bool [B, N], True where the token is NOT a decoder target,
    'decoder_attention_mask': int [B, N], the compressed decoder self-attention
               pattern (its cumulative sum bounds what each target sees: [n, 0, ...]
               lets n tokens see each other, [1, 1, ...] is causal)}
(the official model's conventions, so its batches and checkpoints carry over;
fourm_jax.masking makes them).

Encoder: every input modality's tokens (token embedding, patch projection or
linear projection of embeddings) plus its fixed positions and learned
modality embedding are concatenated; the first `num_encoder_tokens` given
tokens are kept (a stable sort on input_mask), the padding is zeroed and
masked out of attention. Decoder: image-like targets enter as the mask token,
sequence targets as their tokens shifted right; the first `num_decoder_tokens`
targets are kept; self-attention is restricted by the compressed pattern and
to tokens of the same modality; cross-attention reads the encoder output
projected and re-summed with the encoder's positions and modality embeddings.
Pre-norm blocks, LayerNorm eps 1e-6 without bias, SwiGLU without biases
(hidden int(2/3 * mlp_ratio * dim)), optional QK-norm. Every shape is fixed
by (modalities, num_encoder_tokens, num_decoder_tokens), so nothing
recompiles between batches.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fourm_jax import xent
from fourm_jax.modalities import Modality
from pretrain_jax import activations
from pretrain_jax import norms
from pretrain_jax import positions
from pretrain_jax import attention as attention_lib
from pretrain_jax import remat as remat_lib
from pretrain_jax import scan as scan_lib

Batch = dict[str, dict[str, jax.Array]]

# size -> (encoder blocks, decoder blocks, dim, heads) (4M Table 4; 'tiny' for tests)
SIZES = {
    "tiny": (2, 2, 64, 4),
    "Ti": (6, 6, 384, 6),
    "S": (8, 8, 512, 8),
    "B": (12, 12, 768, 12),
    "L": (24, 24, 1024, 16),
    "XL": (24, 24, 2048, 32),
}


def _name(modality: str) -> str:
  return modality.replace("@", "_at_")


def _norm(name, dtype):
  return norms.LayerNorm(epsilon=1e-6, use_bias=False, dtype=dtype, name=name,
                         scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)))


def _constrain(x):
  return nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))


def _heads_param(module, name, shape, names, in_axis, out_axis):
  init = nn.initializers.xavier_uniform(in_axis=in_axis, out_axis=out_axis)
  return module.param(name, nn.with_logical_partitioning(init, names), shape, jnp.float32)


class Attention(nn.Module):
  """Multi-head attention; self-attention when `context` is None. mask: bool
  [B, 1 or T, S] (True = may attend).

  decode=True is cached left-to-right decoding (collection 'cache'): self-attention appends
  this call's keys/values at the cache index and attends over the whole cache (mask
  [B, 1, L_max]); cross-attention computes the context's keys/values on the first call
  and reuses them."""
  num_heads: int
  qk_norm: bool = False
  dtype: Any = jnp.float32
  use_bias: bool = False
  implementation: str | None = None   # pretrain_jax.attention's: None (XLA) | 'cudnn'

  def _bias(self, name, shape, names):
    return self.param(name, nn.with_logical_partitioning(nn.initializers.zeros, names), shape,
                      jnp.float32).astype(self.dtype)

  @nn.compact
  def __call__(self, x, mask, context=None, decode: bool = False):
    d, h = x.shape[-1], self.num_heads
    hd = d // h
    x = x.astype(self.dtype)
    cached_ctx = decode and context is not None and self.has_variable("cache", "ctx_k")
    if context is None:
      w = _heads_param(self, "qkv", (d, 3, h, hd), ("embed", "qkv", "heads", "kv"), 0, (1, 2, 3))
      # tokens-major output: x [B*T, D] @ w [D, 3*H*Dh] as the weight is stored. A
      # 'sbthk' output made XLA's CPU backend copy the transposed weight on every call
      # and write a [3*H*Dh, B*T] product (4M sampling 14% slower).
      qkv = jnp.einsum("btd,dshk->btshk", x, w.astype(self.dtype))
      if self.use_bias:
        qkv = qkv + self._bias("qkv_bias", (3, 1, 1, h, hd),
                               ("qkv", None, None, "heads", "kv")).reshape(3, h, hd)
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
      wq = _heads_param(self, "q", (d, h, hd), ("embed", "heads", "kv"), 0, (1, 2))
      wkv = _heads_param(self, "kv", (d, 2, h, hd), ("embed", "qkv", "heads", "kv"), 0, (1, 2, 3))
      q = jnp.einsum("btd,dhk->bthk", x, wq.astype(self.dtype))
      if self.use_bias:
        q = q + self._bias("q_bias", (h, hd), ("heads", "kv"))
    if context is not None and not cached_ctx:
      kv = jnp.einsum("bsd,dchk->bschk", context.astype(self.dtype), wkv.astype(self.dtype))
      if self.use_bias:
        kv = kv + self._bias("kv_bias", (2, 1, 1, h, hd),
                             ("qkv", None, None, "heads", "kv")).reshape(2, h, hd)
      k, v = kv[:, :, 0], kv[:, :, 1]
    if self.qk_norm:
      q = _norm("q_norm", self.dtype)(q)
      if not cached_ctx:
        k = _norm("k_norm", self.dtype)(k)
    if decode and context is not None:
      if cached_ctx:
        k, v = self.get_variable("cache", "ctx_k"), self.get_variable("cache", "ctx_v")
      else:
        self.put_variable("cache", "ctx_k", k)
        self.put_variable("cache", "ctx_v", v)
    elif decode:
      length = mask.shape[-1]
      ck = self.variable("cache", "k", jnp.zeros, (k.shape[0], length, h, hd), k.dtype)
      cv = self.variable("cache", "v", jnp.zeros, (v.shape[0], length, h, hd), v.dtype)
      ci = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
      i = ci.value
      ck.value = jax.lax.dynamic_update_slice(ck.value, k, (0, i, 0, 0))
      cv.value = jax.lax.dynamic_update_slice(cv.value, v, (0, i, 0, 0))
      ci.value = i + x.shape[1]
      k, v = ck.value, cv.value
    q = nn.with_logical_constraint(q, ("activation_batch", "activation_length",
                                       "activation_heads", "activation_kv"))
    impl = None if decode else self.implementation     # cached decoding: XLA's kernel
    mask = mask[:, None]                                # [B, 1, T or 1, S]
    if impl == "cudnn":   # cuDNN takes the mask as a bias of the full [B, 1, T, S] shape
      mask = jnp.broadcast_to(mask, (mask.shape[0], 1, q.shape[1], k.shape[1]))
    out = attention_lib.dot_product_attention(q, k, v, mask=mask, implementation=impl)
    wo = _heads_param(self, "proj", (h, hd, d), ("heads", "kv", "embed"), (0, 1), 2)
    out = jnp.einsum("bthk,hkd->btd", out, wo.astype(self.dtype))
    return out + self._bias("proj_bias", (d,), ("embed",)) if self.use_bias else out


def _dense(n: int, names: tuple, name: str, use_bias: bool, dtype) -> nn.Dense:
  """A feed-forward projection to n features with logical axis names (kernel `names`)."""
  return nn.Dense(n, use_bias=use_bias, dtype=dtype, name=name,
                  kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), names),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[-1:]))


class SwiGLU(nn.Module):
  """fc2(silu(fc1(x)) * fc3(x)), no biases by default; hidden int(2/3 * mlp_ratio * dim)."""
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32
  use_bias: bool = False

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    hidden = int(2 * int(d * self.mlp_ratio) / 3)
    dense = lambda n, names, name: _dense(n, names, name, self.use_bias, self.dtype)
    g = dense(hidden, ("embed", "mlp"), "fc1")(x)
    u = dense(hidden, ("embed", "mlp"), "fc3")(x)
    h = nn.with_logical_constraint(nn.silu(g) * u, ("activation_batch", "activation_length",
                                                    "activation_mlp"))
    return dense(d, ("mlp", "embed"), "fc2")(h)


class GeluMLP(nn.Module):
  """fc2(gelu(fc1(x))), hidden mlp_ratio * dim (the ablation reference's feed-forward)."""
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    dense = lambda n, names, name: _dense(n, names, name, self.use_bias, self.dtype)
    h = activations.gelu_exact(dense(int(d * self.mlp_ratio), ("embed", "mlp"), "fc1")(x))
    h = nn.with_logical_constraint(h, ("activation_batch", "activation_length", "activation_mlp"))
    return dense(d, ("mlp", "embed"), "fc2")(h)


def _ffn(kind: str, mlp_ratio: float, dtype, use_bias: bool, name: str) -> nn.Module:
  if kind == "swiglu":
    return SwiGLU(mlp_ratio, dtype, use_bias, name=name)
  if kind == "gelu":
    return GeluMLP(mlp_ratio, dtype, use_bias, name=name)
  raise ValueError(f"unknown feed-forward {kind!r}; use 'swiglu' or 'gelu'")


class EncoderBlock(nn.Module):
  num_heads: int
  mlp_ratio: float = 4.0
  qk_norm: bool = False
  dtype: Any = jnp.float32
  ffn: str = "swiglu"
  use_bias: bool = False
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x, mask):
    x = x + Attention(self.num_heads, self.qk_norm, self.dtype, self.use_bias,
                      self.attention_impl, name="attn")(
        _norm("norm1", self.dtype)(x), mask)
    x = x + _ffn(self.ffn, self.mlp_ratio, self.dtype, self.use_bias, "mlp")(
        _norm("norm2", self.dtype)(x))
    return _constrain(x)


class DecoderBlock(nn.Module):
  num_heads: int
  mlp_ratio: float = 4.0
  qk_norm: bool = False
  dtype: Any = jnp.float32
  ffn: str = "swiglu"
  use_bias: bool = False
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, y, context, self_mask, cross_mask, decode: bool = False):
    attn = lambda name: Attention(self.num_heads, self.qk_norm, self.dtype, self.use_bias,
                                  self.attention_impl, name=name)
    y = y + attn("self_attn")(_norm("norm1", self.dtype)(y), self_mask, decode=decode)
    y = y + attn("cross_attn")(_norm("query_norm", self.dtype)(y), cross_mask,
                               _norm("context_norm", self.dtype)(context), decode=decode)
    y = y + _ffn(self.ffn, self.mlp_ratio, self.dtype, self.use_bias, "mlp")(
        _norm("norm2", self.dtype)(y))
    return _constrain(y)


def patchify(images, p: int):
  """[B, H, W, C] -> [B, (H/p)(W/p), p*p*C], patches in raster order, pixels (row, col, c)."""
  b, hh, ww, c = images.shape
  if hh % p or ww % p:
    raise ValueError(f"images of {hh}x{ww} do not split into {p}x{p} patches")
  t = images.reshape(b, hh // p, p, ww // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return t.reshape(b, (hh // p) * (ww // p), p * p * c)


_remat = remat_lib.wrap


def _embed_init():
  return nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed"))


class FourM(nn.Module):
  """The 4M encoder-decoder over `inputs` and `targets` (registry rows)."""
  inputs: Sequence[Modality]
  targets: Sequence[Modality]
  dim: int = 768
  encoder_depth: int = 12
  decoder_depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  qk_norm: bool = False
  tie_embeddings: bool = True     # decoder token embedding doubles as the output layer
  dtype: Any = jnp.float32
  remat: Any = "none"             # 'none' | 'block' | 'dots' (pretrain_jax.remat; bools too)
  ffn: str = "swiglu"             # 'swiglu' | 'gelu'
  use_bias: bool = False          # biases in attention and feed-forward layers
  attention_impl: str | None = None   # None (XLA) | 'cudnn' (flash attention, GPU, bf16)
  scan_layers: bool = False       # encoder and decoder blocks as one scan each (pretrain_jax.scan)

  def setup(self):
    d = self.dim
    names = {m.name for m in (*self.inputs, *self.targets)}
    # one modality embedding per modality, shared by encoder and decoder
    self.mod_emb = {n: self.param(f"mod_emb_{_name(n)}", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, None, "embed")), (1, 1, d)) for n in sorted(names)}
    enc = {}
    for m in self.inputs:
      if not m.input:
        raise ValueError(f"modality {m.name!r} cannot be an input")
      if m.kind in ("image", "global", "seq"):
        enc[m.name] = nn.Embed(m.vocab_size, d, embedding_init=_embed_init(),
                               name=f"enc_tok_{_name(m.name)}")
      elif m.kind == "pixels":
        enc[m.name] = nn.Dense(d, use_bias=False, name=f"enc_proj_{_name(m.name)}",
                               kernel_init=nn.with_logical_partitioning(
                                   nn.initializers.xavier_uniform(), ("patch", "embed")))
      else:
        enc[m.name] = nn.Dense(d, name=f"enc_proj_{_name(m.name)}",
                               kernel_init=nn.with_logical_partitioning(
                                   nn.initializers.xavier_uniform(), (None, "embed")))
    self.enc_embed = enc
    dec, logits = {}, {}
    for m in self.targets:
      if not m.target:
        raise ValueError(f"modality {m.name!r} cannot be a target")
      dec[m.name] = nn.Embed(m.vocab_size, d, embedding_init=_embed_init(),
                             name=f"dec_tok_{_name(m.name)}")
      if not self.tie_embeddings:
        logits[m.name] = nn.Dense(m.vocab_size, use_bias=False, name=f"to_logits_{_name(m.name)}",
                                  kernel_init=nn.with_logical_partitioning(
                                      nn.initializers.xavier_uniform(), ("embed", "vocab")))
    self.dec_embed, self.to_logits = dec, logits
    # global-embedding modalities have learned positions, one table for the encoder and one
    # for the decoder (as the official model: each embedding module owns its pos_emb)
    learned = lambda prefix, mods: {m.name: self.param(
        f"{prefix}_pos_emb_{_name(m.name)}", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), (None, "embed")), (m.length, d))
        for m in mods if m.kind == "global"}
    self.enc_learned_pos = learned("enc", self.inputs)
    self.dec_learned_pos = learned("dec", self.targets)
    self.mask_token = self.param("mask_token", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, None, "embed")), (1, 1, d))
    self.encoder = self._blocks(EncoderBlock, self.encoder_depth, "encoder")
    self.encoder_norm = _norm("encoder_norm", self.dtype)
    self.decoder_proj_context = nn.Dense(d, name="decoder_proj_context", kernel_init=(
        nn.with_logical_partitioning(nn.initializers.xavier_uniform(), ("embed", "mlp"))))
    self.decoder = self._blocks(DecoderBlock, self.decoder_depth, "decoder")
    self.decoder_norm = _norm("decoder_norm", self.dtype)

  def _blocks(self, cls, n: int, name: str):
    """n blocks: a list named NAME_i, or one scanned Stack named NAME (model.scan_layers)."""
    kw = dict(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, qk_norm=self.qk_norm,
              dtype=self.dtype, ffn=self.ffn, use_bias=self.use_bias,
              attention_impl=self.attention_impl)
    if self.scan_layers:
      return scan_lib.Stack(cls, n, kw, self.remat, name=name)
    return [_remat(cls, self.remat)(**kw, name=f"{name}_{i}") for i in range(n)]

  # ---- positions ------------------------------------------------------------------------------
  def _grid_pos(self, m: Modality, n: int, decoder: bool = False):
    if m.kind == "global":
      return (self.dec_learned_pos if decoder else self.enc_learned_pos)[m.name][:n]
    return jnp.asarray(positions.sincos_2d(*m.grid, self.dim, rows_first=True))

  def _seq_pos(self, mask, length: int):
    """1D positions of the tokens where `mask` is False, counted among them. [B, N, D]."""
    pos_id = jnp.cumsum(~mask, axis=1) - 1
    pos_id = jnp.where(mask | (pos_id >= length), 0, pos_id)
    table = jnp.asarray(positions.sincos_1d(length, self.dim))
    return jnp.where(mask[..., None], 0.0, table[pos_id])

  # ---- embeddings -----------------------------------------------------------------------------
  def embed_inputs(self, batch: Batch):
    """-> tokens [B, O, D], emb [B, O, D], hidden bool [B, O] over the input modalities in
    `batch`. An input modality absent from the batch gives no tokens, as if all hidden (the
    sampler leaves out those it gives nothing of, which saves their embedding)."""
    xs, embs, masks = [], [], []
    for m in self.inputs:
      if m.name not in batch:
        continue
      d = batch[m.name]
      t, mask = d["tensor"], d["input_mask"].astype(bool)
      b = t.shape[0]
      if m.kind == "pixels":
        x = self.enc_embed[m.name](patchify(t, m.patch_size))
      elif m.kind == "seq_emb":
        x = self.enc_embed[m.name](t)
      else:
        x = self.enc_embed[m.name](t.reshape(b, -1))
      n = x.shape[1]
      if m.is_sequence:
        emb = self._seq_pos(mask, m.length)
      else:
        emb = jnp.broadcast_to(self._grid_pos(m, n), (b, n, self.dim))
      xs.append(x)
      embs.append(emb + self.mod_emb[m.name])
      masks.append(mask)
    if not xs:
      raise ValueError(f"the batch holds none of the input modalities "
                       f"{[m.name for m in self.inputs]}")
    return jnp.concatenate(xs, 1), jnp.concatenate(embs, 1), jnp.concatenate(masks, 1)

  def embed_targets(self, batch: Batch):
    """-> tokens, emb [B, P, D]; hidden bool, ids, attention, modality index int [B, P]."""
    xs, embs, masks, ids, att, mods = [], [], [], [], [], []
    for i, m in enumerate(self.targets):
      d = batch[m.name]
      t = d["tensor"].reshape(d["tensor"].shape[0], -1)
      mask, a = d["target_mask"].astype(bool), d["decoder_attention_mask"].astype(jnp.int32)
      b, n = t.shape
      if m.kind == "seq":
        x = self.dec_embed[m.name](t)
        emb = self._seq_pos(mask, m.length) + self.mod_emb[m.name]
        # inputs are the tokens shifted right: position j predicts token j + 1
        xs.append(x[:, :-1])
        embs.append(emb[:, :-1])
        masks.append(mask[:, 1:] | mask[:, :-1])
        ids.append(t[:, 1:])
        att.append(a[:, :-1])
        n -= 1
      else:
        xs.append(jnp.broadcast_to(self.mask_token, (b, n, self.dim)))
        embs.append(jnp.broadcast_to(self._grid_pos(m, n, decoder=True) + self.mod_emb[m.name],
                                     (b, n, self.dim)))
        masks.append(mask)
        ids.append(t)
        att.append(a)
      mods.append(jnp.full((b, n), i, jnp.int32))
    cat = lambda v: jnp.concatenate(v, 1)
    return cat(xs), cat(embs), cat(masks), cat(ids), cat(att), cat(mods)

  # ---- forward --------------------------------------------------------------------------------
  def encode(self, batch: Batch, num_encoder_tokens: int):
    """-> (context [B, N, D] encoder output, emb [B, N, D], valid bool [B, N])."""
    x, emb, hidden = self.embed_inputs(batch)
    keep = jnp.argsort(hidden, axis=1, stable=True)[:, :num_encoder_tokens]
    take = lambda v: jnp.take_along_axis(v, keep[..., None] if v.ndim == 3 else keep, axis=1)
    x, emb, hidden = take(x), take(emb), take(hidden)
    valid = ~hidden
    x = jnp.where(valid[..., None], x, 0.0)
    emb = jnp.where(valid[..., None], emb, 0.0)
    h = _constrain((x + emb).astype(self.dtype))
    mask = valid[:, None, :]
    h = scan_lib.apply(self.encoder, h, mask)
    return self.encoder_norm(h), emb, valid

  def decode(self, batch: Batch, context, context_emb, context_valid, num_decoder_tokens: int):
    """-> (y [B, M, D] decoder output, target ids [B, M], modality index [B, M] into
    `targets`, valid bool [B, M])."""
    y, emb, hidden, ids, att, mods = self.embed_targets(batch)
    keep = jnp.argsort(hidden, axis=1, stable=True)[:, :num_decoder_tokens]
    take = lambda v: jnp.take_along_axis(v, keep[..., None] if v.ndim == 3 else keep, axis=1)
    y, emb, hidden, ids, att, mods = map(take, (y, emb, hidden, ids, att, mods))
    valid = ~hidden
    y = jnp.where(valid[..., None], y, 0.0)
    emb = jnp.where(valid[..., None], emb, 0.0)
    ids = jnp.where(valid, ids, 0)
    # token i may see token j < cumsum(att)[i] of its own modality
    bound = jnp.cumsum(att, axis=1)
    m = y.shape[1]
    self_mask = (jnp.arange(m)[None, None, :] < bound[:, :, None]) & \
        (mods[:, :, None] == mods[:, None, :])
    ctx = self.decoder_proj_context(context) + context_emb
    h = _constrain((y + emb).astype(self.dtype))
    cross_mask = context_valid[:, None, :]
    h = scan_lib.apply(self.decoder, h, ctx, self_mask, cross_mask)
    return self.decoder_norm(h), ids, mods, valid

  def encoder_features(self, images, modality: str, num_blocks: int | None = None):
    """The encoder as a ViT backbone (4M Sec. 3): every patch of `images` (normalised float
    [B, H, W, C]) of the pixel modality `modality` given, full attention.

    Returns the first `num_blocks` (default all) block outputs, each [B, N, D] in raster
    order; the last encoder block's output goes through encoder_norm (the encoder output).
    """
    m = {x.name: x for x in self.inputs}.get(modality)
    if m is None or m.kind != "pixels":
      raise ValueError(f"{modality!r} is not a pixel input of this model "
                       f"(inputs: {[x.name for x in self.inputs]})")
    x = self.enc_embed[modality](patchify(images, m.patch_size))
    h = _constrain((x + self._grid_pos(m, x.shape[1]) + self.mod_emb[modality]).astype(self.dtype))
    mask = jnp.ones((x.shape[0], 1, x.shape[1]), bool)
    outs = []
    for blk in scan_lib.unrolled(self.encoder, "encoder_features")[:num_blocks or
                                                                     self.encoder_depth]:
      h = blk(h, mask)
      outs.append(h)
    if len(outs) == self.encoder_depth:
      outs[-1] = self.encoder_norm(outs[-1])
    return outs

  def decoder_context(self, batch: Batch, num_encoder_tokens: int):
    """Encoder output as the decoder reads it -> (context [B, N, D], valid bool [B, N])."""
    context, emb, valid = self.encode(batch, num_encoder_tokens)
    return self.decoder_proj_context(context) + emb, valid

  def decode_token(self, tokens, position, target: str, context, context_valid,
                   max_len: int):
    """One step of cached left-to-right decoding of sequence `target` (mutable 'cache'):
    tokens int [B] at `position` (a scalar, the same for every row, < max_len) ->
    logits [B, V] of the next token. The first call (position 0) creates the cache."""
    m = {x.name: x for x in self.targets}[target]
    table = jnp.asarray(positions.sincos_1d(m.length, self.dim))
    pos = jnp.where(position < m.length, position, 0)
    h = self.dec_embed[target](tokens[:, None]) + table[pos][None, None] + self.mod_emb[target]
    self_mask = jnp.broadcast_to(jnp.arange(max_len)[None, None, :] <= position,
                                 (tokens.shape[0], 1, max_len))
    cross_mask = context_valid[:, None, :]
    h = h.astype(self.dtype)
    for blk in scan_lib.unrolled(self.decoder, "cached decoding"):
      h = blk(h, context, self_mask, cross_mask, True)
    return self.logits(self.decoder_norm(h), target)[:, 0]

  def logits(self, y, modality: str):
    """Decoder outputs [B, M, D] -> logits [B, M, V] of `modality` (float32)."""
    if self.tie_embeddings:
      return self.dec_embed[modality].attend(y.astype(jnp.float32))
    return self.to_logits[modality](y).astype(jnp.float32)

  def logit_tables(self) -> tuple[list, str]:
    """(each target's output layer as stored, in `targets` order; its layout for
    fourm_jax.xent): the tied decoder embeddings [V, D] ('vd', logits = y @ table.T) or the
    to_logits kernels [D, V] ('dv', logits = y @ kernel). As stored, so that no table is
    transposed on the way in nor its gradient on the way out."""
    if self.tie_embeddings:
      return [self.dec_embed[m.name].embedding for m in self.targets], "vd"
    return [self.to_logits[m.name].variables["params"]["kernel"] for m in self.targets], "dv"

  def __call__(self, batch: Batch, num_encoder_tokens: int, num_decoder_tokens: int):
    context, emb, valid = self.encode(batch, num_encoder_tokens)
    out = self.decode(batch, context, emb, valid, num_decoder_tokens)
    if self.is_initializing():          # create every output layer's parameters
      for m in self.targets:
        self.logits(out[0][:, :1], m.name)
    return out


def loss(model: FourM, variables, batch: Batch, num_encoder_tokens: int,
         num_decoder_tokens: int, loss_type: str = "mod", with_count: bool = False):
  """Cross-entropy of the decoder targets -> (loss, {modality: loss}).

  'mod': each target modality's mean over its tokens in the batch, then the
  mean over the target modalities (one without tokens counts 0, as in the
  official code); 'token': the mean over all target tokens. with_count: also
  return the number of target tokens (the 'token' loss's denominator).
  """
  if loss_type not in ("mod", "token"):
    raise ValueError(f"unknown loss_type {loss_type!r}; use 'mod' or 'token'")
  y, ids, mods, valid = model.apply(variables, batch, num_encoder_tokens, num_decoder_tokens)
  # each token's logits over its own modality's vocabulary only (fourm_jax.xent)
  tables, layout = model.apply(variables, method=model.logit_tables)
  sums = xent.own_vocab_losses(tables, y, ids, mods, valid, layout=layout)           # [K]
  per_mod, total, count = {}, 0.0, 0.0
  for i, m in enumerate(model.targets):
    n = (valid & (mods == i)).sum().astype(jnp.float32)
    per_mod[m.name] = jnp.where(n > 0, sums[i] / jnp.maximum(n, 1.0), 0.0)
    total, count = total + sums[i], count + n
  if loss_type == "token":
    value = total / jnp.maximum(count, 1.0)
  else:
    value = sum(per_mod.values()) / len(per_mod)
  return (value, per_mod, count) if with_count else (value, per_mod)


def from_config(model_cfg, registry=None) -> FourM:
  """model_cfg: size, inputs, targets (names in `registry`, default the module's), and
  optional overrides (dim, depths, heads, qk_norm, tie_embeddings, dtype, remat, ffn,
  use_bias); a bad value raises naming its `model.` config key."""
  from fourm_jax import modalities
  size = model_cfg.get("size", "B")
  if size not in SIZES:
    raise ValueError(f"config key 'model.size': unknown {size!r}; known: {list(SIZES)}")
  ffn = model_cfg.get("ffn", "swiglu")
  if ffn not in ("swiglu", "gelu"):
    raise ValueError(f"config key 'model.ffn': unknown {ffn!r}; use 'swiglu' or 'gelu'")
  enc, dec, dim, heads = SIZES[size]
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[model_cfg.get("dtype", "float32")]
  return FourM(modalities.get(model_cfg.inputs, registry),
               modalities.get(model_cfg.targets, registry),
               dim=model_cfg.get("dim", 0) or dim,
               encoder_depth=model_cfg.get("encoder_depth", 0) or enc,
               decoder_depth=model_cfg.get("decoder_depth", 0) or dec,
               num_heads=model_cfg.get("num_heads", 0) or heads,
               mlp_ratio=float(model_cfg.get("mlp_ratio", 4.0)),
               qk_norm=model_cfg.get("qk_norm", False),
               tie_embeddings=model_cfg.get("tie_embeddings", True), dtype=dtype,
               remat=remat_lib.policy_name(model_cfg.get("remat", "none")),
               ffn=ffn, use_bias=model_cfg.get("use_bias", False),
               scan_layers=bool(model_cfg.get("scan_layers", False)),
               attention_impl=attention_lib.implementation(model_cfg.get("attention_impl", ""),
                                                           model_cfg.get("dtype", "float32")))


def count_params(params, embeddings: bool = False) -> int:
  """Parameters; without `embeddings`, leaves out per-modality embeddings and output layers
  (as 4M Table 4 counts them)."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  total = 0
  for path, leaf in flat:
    top = str(getattr(path[0], "key", path[0]))
    if not embeddings and top.startswith(("mod_emb_", "enc_tok_", "enc_proj_", "dec_tok_",
                                          "to_logits_", "enc_pos_emb_", "dec_pos_emb_",
                                          "mask_token")):
      continue
    total += int(np.prod(leaf.shape))
  return total
