"""Analytic model FLOPs of 4M (fourm_jax.model), for MFU and the planner.

MaxText's convention (pretrain_jax.flops): a matmul [m, k] x [k, n] is 2*m*k*n FLOPs; the
backward pass costs twice the forward, so a training step is 3x the forward; attention
scores and the weighted sum are counted over the full square (or rectangle), masked or not;
element-wise work (norms, activations, softmax), embedding lookups (gathers) and biases are
not counted. The count is of the model, not of the program: rematerialised recomputation is
left out, and a fused attention kernel (cuDNN) counts as the XLA attention it replaces.

Shapes follow the code path of `FourM.__call__` and `fourm_jax.model.loss`, with B the
batch, N = num_encoder_tokens, M = num_decoder_tokens, D the width:

  input embeddings  a matmul only for 'pixels' (patch projection of every patch of the
                    grid, before the encoder's token selection) and 'seq_emb' (linear
                    projection of every embedding); token ids are gathered (0)
  encoder block     qkv [BN, D] x [D, 3D], scores + weighted sum over [N, N], output
                    projection, feed-forward (SwiGLU: 3 matmuls of hidden
                    int(2/3 * mlp_ratio * D); GELU: 2 of hidden mlp_ratio * D)
  context           decoder_proj_context [BN, D] x [D, D], once
  decoder block     self-attention as the encoder's over M tokens; cross-attention:
                    q [BM, D] x [D, D], kv [BN, D] x [D, 2D], scores + weighted sum over
                    [M, N], output projection; feed-forward over M tokens
  logits            each decoder token's logits over its own modality's vocabulary
                    (fourm_jax.xent), [D] x [D, V_m] per token; how many tokens each
                    target gets varies per sample (Dirichlet budgets), so the count uses
                    the expected share, equal for every target: B M D mean_m(V_m); see
                    `logits_flops`. The chunked loss pads each modality's last chunk:
                    program FLOPs, not model FLOPs, like remat.
"""
from __future__ import annotations

from pretrain_jax import flops as flops_lib

mm = flops_lib.matmul


def ffn_hidden(model) -> int:
  """Hidden width of one block's feed-forward (SwiGLU: int(2/3 * mlp_ratio * D))."""
  if model.ffn == "swiglu":
    return int(2 * int(model.dim * model.mlp_ratio) / 3)
  return int(model.dim * model.mlp_ratio)


def ffn_flops(model, tokens: int) -> float:
  """The feed-forward of one block over `tokens` rows (fourm_jax.model.SwiGLU / GeluMLP)."""
  return (3 if model.ffn == "swiglu" else 2) * mm(tokens, model.dim, ffn_hidden(model))


def input_embedding_flops(model, batch: int) -> float:
  """Patch / linear projections of the input modalities (FourM.embed_inputs), over all of
  each modality's tokens (the encoder's selection of N comes after)."""
  total = 0.0
  for m in model.inputs:
    if m.kind == "pixels":
      total += mm(batch * m.num_tokens, m.patch_size ** 2 * m.channels, model.dim)
    elif m.kind == "seq_emb":
      total += mm(batch * m.length, m.emb_dim, model.dim)
  return total


def encoder_flops(model, batch: int, n: int) -> float:
  d = model.dim
  block = (mm(batch * n, d, 3 * d) + flops_lib.attention(batch, n, d) + mm(batch * n, d, d)
           + ffn_flops(model, batch * n))
  return model.encoder_depth * block


def decoder_flops(model, batch: int, n: int, m: int) -> float:
  d = model.dim
  self_attn = mm(batch * m, d, 3 * d) + flops_lib.attention(batch, m, d) + mm(batch * m, d, d)
  cross_attn = (mm(batch * m, d, d) + mm(batch * n, d, 2 * d)
                + flops_lib.attention(batch, m, d, kv_length=n) + mm(batch * m, d, d))
  block = self_attn + cross_attn + ffn_flops(model, batch * m)
  return mm(batch * n, d, d) + model.decoder_depth * block     # + decoder_proj_context


def logits_flops(model, batch: int, m: int) -> float:
  """The output layers as `fourm_jax.model.loss` applies them: each of the B x M decoder
  tokens against its own target's vocabulary, in expectation an equal share per target."""
  vocab = sum(t.vocab_size for t in model.targets) / len(model.targets)
  return mm(batch * m, model.dim, vocab)


def forward_flops(model, batch: int, num_encoder_tokens: int, num_decoder_tokens: int) -> float:
  """Analytic FLOPs of one forward pass and loss of `batch` samples (see the module doc)."""
  n, m = num_encoder_tokens, num_decoder_tokens
  return float(input_embedding_flops(model, batch) + encoder_flops(model, batch, n)
               + decoder_flops(model, batch, n, m) + logits_flops(model, batch, m))


def train_step_flops(model, batch: int, num_encoder_tokens: int,
                     num_decoder_tokens: int) -> float:
  """Forward + backward = 3x the forward (MaxText's convention)."""
  return flops_lib.train_step_flops(
      forward_flops(model, batch, num_encoder_tokens, num_decoder_tokens))
