"""Compiled, batched any-to-any decoding with 4M (4M App. A.3; 4M-21 Sec. 3.1).

  sampler = Sampler(model, params)
  state = sampler.init_state(batch_size, {"tok_rgb@224": {"tensor": rgb_tokens}})
  steps = schedules.chained(["tok_depth@224"], [196], ["maskgit"], [8], temperatures=[0.5])
  state = sampler.generate(state, steps, jax.random.key(0))
  depth_tokens = state["tok_depth@224"]["tensor"]

The state holds every modality of the model: `tensor` (token ids, or pixels
for a pixel input) and `input_mask` (True where the token is not known).
Known tokens are the conditioning: any subset of any modality, and the
already decoded tokens of the target. A target given in part is
in-painted: its given tokens never change, the others are generated.

Each MaskGIT/ROAR step is one jitted function of exact shapes: the encoder
gets exactly the tokens known at that step (the given ones and the target's
tokens decoded so far) and the decoder exactly the target's unknown
positions. The schedule fixes both lengths before sampling starts, so each
(target, scheme, guidance groups, lengths) compiles once and a repeated
schedule compiles nothing; the number of tokens to select, the temperature,
top-k, top-p and guidance weights are traced values. `Sampler.traces` counts
compilations. (Fixed maximal shapes would compile once for every schedule
but cost 1.7x the FLOPs of a typical 8-step generation.)

Sequences (captions, boxes, metadata) decode left to right from the [S_1]
sentinel until [EOS], in one compiled loop with a key/value cache in the
decoder (`FourM.decode_token`); the result is given from slot 0, so later
targets are conditioned on it. A sequence given in part is in-painted as in
ml-4m (custom_text, autoregressive_step_batched, merge_span_masking): its
given tokens mark the missing spans with [S_1], [S_2], ... ('a [S_1] on the
grass [S_2]') and go to the encoder; the decoder writes '[S_1] span [S_2]
span ...' from [S_1] and a row stops at [EOS] (kept: it ends the span it is
in) or at [S_k+1] after its last sentinel [S_k] (the end of a training
target; the official loop goes on, and drops those tokens in the merge);
each given sentinel is then replaced by the tokens decoded after it
(`merge_spans`). The same compiled loop serves blank rows, which are [S_1]
alone; they decode words only until [EOS] (no PAD, no sentinel), in-painted
rows any token but PAD, as the official decoder. Per row, a row stops on its
own (the official batch runs until every row has [EOS], merging what the
finished rows write meanwhile).

MaskGIT samples every unknown token and keeps the `n` most confident
(probability of the sampled token); ROAR samples `n` random unknown
positions. Guidance mixes the logits of conditional and unconditional passes:
logits = uncond + sum_i w_i (cond_i - uncond), where cond_i gives the model
the modalities of condition group i and uncond none of them; both always get
the target's known tokens. As in ml-4m (fourm/models/generate.py):
- a sequence still to be generated in the schedule (and so the sequence being
  generated) gives the encoder its [S_1] sentinel, in every pass (the
  official init_empty_target_modality);
- classifier-free guidance (a step's `guidance` != 1) is one group of every
  modality known when the target's decoding starts (the conditions and the
  targets finished before it: the official cfg_grow_conditioning); its
  unconditional pass empties them as the official one does: an image-like
  one gives nothing, a sequence its [S_1] alone, a T5-style embedding
  sequence one zero vector (empty_seq_modality, empty_seq_emb_modality); a
  target given in part and decoded later in the schedule (in-painted) is no
  condition: every pass sees it as given;
- multimodal weighted guidance (`generate(conditions=, weights=)`) is one group
  per condition, weights may be negative; its unconditional pass holds no
  condition, and each target finished before the current one becomes a
  condition group of its own, weighted by the extra entries of `weights`
  (generate_multi_guided; a finished target without a weight adds nothing,
  as its zip of weights and conditions drops it).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fourm_jax import model as model_lib
from fourm_jax import masking, schedules
from fourm_jax.masking import SENTINEL_BASE
from pretrain_jax.data import transforms
from tokenizers_jax.text import EOS_ID, NUM_SENTINELS, PAD_ID

State = dict[str, dict[str, jax.Array]]


def filter_logits(logits, top_k, top_p):
  """Top-k (k > 0) then nucleus (0 < p < 1) filtering of [..., V] logits with traced k and p:
  filtered-out entries become -inf; the most likely token always stays. With both off the
  logits pass through (the sort is skipped at run time)."""
  active = (jnp.asarray(top_k) > 0) | ((jnp.asarray(top_p) > 0) & (jnp.asarray(top_p) < 1))
  return jax.lax.cond(active, lambda l: _filter(l, top_k, top_p), lambda l: l, logits)


def _filter(logits, top_k, top_p):
  v = logits.shape[-1]
  srt = jnp.sort(logits, axis=-1)[..., ::-1]
  k = jnp.clip(jnp.asarray(top_k, jnp.int32), 0, v)
  kth = jnp.take(srt, jnp.maximum(k - 1, 0), axis=-1)[..., None]
  logits = jnp.where((k > 0) & (logits < kth), -jnp.inf, logits)
  srt = jnp.where((k > 0) & (srt < kth), -jnp.inf, srt)
  probs = jax.nn.softmax(srt, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs        # mass of the more likely tokens
  kept = jnp.sum(before < top_p, axis=-1, keepdims=True)
  cut = jnp.take_along_axis(srt, jnp.maximum(kept - 1, 0), axis=-1)
  use_p = (top_p > 0) & (top_p < 1)
  return jnp.where(use_p & (logits < cut), -jnp.inf, logits)


_BLOCK = 128   # vocabulary entries per block of sample_tokens' two-level search


def sample_tokens(rng, logits, temperature):
  """One token per row of [..., V] logits (-inf: never drawn) and its probability.

  temperature <= 1e-6 (traced) is greedy: the argmax. Otherwise a draw from
  softmax(logits / temperature) by inverse CDF with one uniform per row, as
  torch.multinomial (the official sampler) draws: the vocabulary is cut into blocks of
  128, the block is found from the cumulative block masses and the token inside it from
  that block's own cumulative sum, so the work is one pass over the logits and no
  [..., V] random numbers are made. (jax.random.categorical's Gumbel-max draws V random
  numbers and takes two logs of each: 30x the time of this at [4, 196, 16384] on CPU, the
  bulk of a MaskGIT step at small widths.) The same rng gives the same draws.

  Returns (token int32 [...], probability float32 [...] of that token under the
  temperature-scaled distribution; for greedy rows, that of the argmax at temperature 1).
  """
  greedy = temperature <= 1e-6
  scaled = logits.astype(jnp.float32) / jnp.where(greedy, 1.0, temperature)
  v = scaled.shape[-1]
  nb, lead = -(-v // _BLOCK), scaled.shape[:-1]
  padded = jnp.pad(scaled, [(0, 0)] * len(lead) + [(0, nb * _BLOCK - v)],
                   constant_values=-jnp.inf)
  top = jnp.max(padded, axis=-1, keepdims=True)
  blocks = padded.reshape(*lead, nb, _BLOCK)
  cum = jnp.cumsum(jnp.sum(jnp.exp(blocks - top[..., None]), axis=-1), axis=-1)   # [..., nb]
  total = cum[..., -1]
  target = jnp.minimum(jax.random.uniform(rng, lead) * total, jnp.nextafter(total, 0.0))
  # the first block whose cumulative mass passes the target (a block of no mass never does)
  blk = jnp.minimum(jnp.sum(cum <= target[..., None], axis=-1), nb - 1)
  before = jnp.where(blk > 0, jnp.take_along_axis(cum, jnp.maximum(blk - 1, 0)[..., None],
                                                  axis=-1)[..., 0], 0.0)
  inner = jnp.take_along_axis(blocks, blk[..., None, None], axis=-2)[..., 0, :]
  inner = jnp.cumsum(jnp.exp(inner - top), axis=-1)                              # [..., 128]
  # rounding can put the rest at or past the block's own total: its last token of mass
  last = jnp.sum(inner < inner[..., -1:], axis=-1)
  j = jnp.minimum(jnp.sum(inner <= (target - before)[..., None], axis=-1), last)
  token = jnp.where(greedy, jnp.argmax(scaled, axis=-1), blk * _BLOCK + j).astype(jnp.int32)
  prob = jnp.exp(jnp.take_along_axis(scaled, token[..., None], axis=-1)[..., 0]
                 - top[..., 0]) / total
  return token, prob


def _rank(score):
  """Rank of each entry along axis 1, highest score first (ties: lower index first)."""
  return jnp.argsort(jnp.argsort(-score, axis=1, stable=True), axis=1)


def guide(logits, weights):
  """[K + 1, ...] logits (K conditions, then the unconditional) -> uncond + sum_i w_i
  (cond_i - uncond)."""
  uncond = logits[-1]
  w = jnp.asarray(weights, logits.dtype).reshape((-1,) + (1,) * (logits.ndim - 1))
  return uncond + jnp.sum(w * (logits[:-1] - uncond[None]), axis=0)


def is_sentinel(ids):
  """True where ids are sentinels [S_0] .. [S_199]."""
  return (ids >= SENTINEL_BASE) & (ids < SENTINEL_BASE + NUM_SENTINELS)


def merge_spans(given, known, generated, size: int):
  """Fills the sentinel spans of given sequences with decoded ones (the official
  merge_span_masking, batched and traceable).

  given: int [B, N], the given sequence in its `known` (bool [B, N]) slots, in slot order;
  generated: int [B, M], '[S_1] span [S_2] span ...' as decoded, PAD where nothing was.
  Each given sentinel is replaced by the tokens that follow that sentinel in `generated` up
  to the next sentinel (all of them, in order, if it was decoded more than once; none if
  never); tokens of a sentinel that is not given are dropped; other given tokens are kept.
  Returns (tensor int [B, size], the merged sequence from slot 0, PAD after it (cut at
  `size`); known bool [B, size], its slots).
  """
  b, m = generated.shape
  order = jnp.arange(m)
  sent = is_sentinel(generated)
  # each decoded token's span: the last sentinel at or before it (none: -1)
  last = jax.lax.cummax(jnp.where(sent, order, -1), axis=1)
  label = jnp.where(last >= 0, jnp.take_along_axis(generated, jnp.maximum(last, 0), 1), -1)
  word = ~sent & (generated != PAD_ID) & (last >= 0)
  # fills[b, t, i]: decoded token t goes into given slot i (its sentinel)
  fills = word[:, :, None] & known[:, None, :] & (label[:, :, None] == given[:, None, :])
  width = jnp.where(known, jnp.where(is_sentinel(given), jnp.sum(fills, 1), 1), 0)
  begin = jnp.cumsum(width, 1) - width                # each given slot's place in the merge
  same = (word[:, :, None] & word[:, None, :] & (label[:, :, None] == label[:, None, :]) &
          (order[None, None, :] < order[None, :, None]))
  rank = jnp.sum(same, 2)                             # place of a token within its span
  rows = jnp.arange(b)[:, None]
  out = jnp.full((b, size), PAD_ID, generated.dtype)
  out = out.at[rows, jnp.where(known & ~is_sentinel(given), begin, size)].set(
      given.astype(generated.dtype), mode="drop")
  where = jnp.where(fills, begin[:, None, :] + rank[:, :, None], size)
  out = out.at[rows[:, :, None], where].set(
      jnp.broadcast_to(generated[:, :, None], where.shape), mode="drop")
  return out, jnp.arange(size)[None] < jnp.sum(width, 1, keepdims=True)


class Sampler:
  """Decoding with a 4M model (fourm_jax.model.FourM) and its params."""

  def __init__(self, model: model_lib.FourM, params, num_encoder_tokens: int | None = None):
    self.model, self.params = model, params
    self.modalities = {m.name: m for m in (*model.inputs, *model.targets)}
    self.input_names = [m.name for m in model.inputs]
    self._target_names = {m.name for m in model.targets}
    # every input position: the most the encoder can be given
    self.max_encoder_tokens = sum(self._length(m) for m in model.inputs)
    self.num_encoder_tokens = num_encoder_tokens    # None: per target, bucketed (below)
    self.traces = 0
    self._steps = {}

  # ---- state ----------------------------------------------------------------------------------
  _length = staticmethod(masking.slots)

  def init_state(self, batch_size: int, given: Mapping[str, Mapping[str, np.ndarray]]) -> State:
    """Every modality of the model, empty unless `given` ({name: {"tensor", optional
    "input_mask"}}; without a mask every token of the tensor is known). Sequences are given
    as ids from slot 0 (PAD is never known); uint8 pixels are ImageNet-normalised."""
    unknown = sorted(set(given) - set(self.modalities))
    if unknown:
      raise ValueError(f"modalities {unknown} are not in the model ({sorted(self.modalities)})")
    state = {}
    for name, m in self.modalities.items():
      n = self._length(m)
      if m.kind == "pixels":
        shape = (batch_size, m.grid[0] * m.patch_size, m.grid[1] * m.patch_size, m.channels)
        dtype = np.float32
      elif m.kind == "seq_emb":
        shape, dtype = (batch_size, n, m.emb_dim), np.float32
      else:
        shape, dtype = (batch_size, n), np.int32
      g = given.get(name)
      if g is None:
        state[name] = {"tensor": np.zeros(shape, dtype), "input_mask": np.ones((batch_size, n),
                                                                                bool)}
        continue
      t = np.asarray(g["tensor"])
      if m.kind == "pixels" and t.dtype == np.uint8:      # as the training step does
        t = np.asarray(transforms.normalize_images(t))
      t = t.astype(dtype)
      if m.kind in ("image", "global"):
        t = t.reshape(batch_size, n)
      if m.kind in ("seq", "seq_emb") and t.shape[1] < n:     # pad sequences to their slots
        pad = [(0, 0), (0, n - t.shape[1])] + [(0, 0)] * (t.ndim - 2)
        mask = np.pad(np.zeros(t.shape[:2], bool), pad[:2], constant_values=True)
        t = np.pad(t, pad)
      else:
        mask = np.zeros((batch_size, n), bool)
      if m.kind == "seq":
        mask = t == PAD_ID                                # PAD is never a given token
      if t.shape != shape:
        raise ValueError(f"{name}: tensor of shape {t.shape}, expected {shape}")
      if "input_mask" in g:
        mask = np.asarray(g["input_mask"], bool).reshape(batch_size, n)
      state[name] = {"tensor": t, "input_mask": mask}
    return jax.tree.map(jnp.asarray, state)

  # ---- one forward ----------------------------------------------------------------------------
  def _batch(self, state: State, target: str, given: Sequence[str], decode=None,
             empty: Sequence[str] = (), leave_out: Sequence[str] = ()) -> dict:
    """The model's batch: `given` modalities as inputs where known, the target's known tokens
    as inputs and its `decode` positions (default: every unknown one) as decoder targets,
    attending to each other. `empty` modalities are given in the official empty form
    whatever the state holds: a sequence as its [S_1] sentinel alone, an embedding sequence
    as one zero vector. `leave_out` modalities are not in the batch (see `_unused`)."""
    unknown = state[target]["input_mask"] if decode is None else decode
    batch = {}
    for name, m in self.modalities.items():
      if name in leave_out:
        continue
      b, n = state[name]["input_mask"].shape
      visible = name == target or name in given
      in_mask = state[name]["input_mask"] if visible else jnp.ones((b, n), bool)
      tensor = state[name]["tensor"]
      if name in empty:
        if m.kind not in ("seq", "seq_emb"):
          raise ValueError(f"{name} is a {m.kind} modality; only sequences have an empty form")
        in_mask = jnp.broadcast_to(jnp.arange(n) != 0, (b, n))
        tensor = (tensor.at[:, 0].set(SENTINEL_BASE + 1) if m.kind == "seq"
                  else jnp.zeros_like(tensor))
      tgt_mask = ~unknown if name == target else jnp.ones((b, n), bool)
      att = jnp.zeros((b, n), jnp.int32)
      if name == target:
        first = jnp.argmax(unknown, axis=1)
        att = att.at[jnp.arange(b), first].set(jnp.sum(unknown, axis=1).astype(jnp.int32))
      batch[name] = {"tensor": tensor, "input_mask": in_mask,
                     "target_mask": tgt_mask, "decoder_attention_mask": att}
    return batch

  def _unused(self, target: str, variants) -> tuple[str, ...]:
    """Inputs that no pass of `variants` ([(given, empty), ...]) is given and that are no
    model target: left out of the batch, so the model does not embed tokens it would drop
    (a pixel input's patch projection: 2% of a 4M ROAR generation at dim 768)."""
    used = {target} | self._target_names
    for given, empty in variants:
      used |= set(given) | set(empty)
    return tuple(n for n in self.input_names if n not in used)

  def encoder_tokens(self, state: State, target: str, empty: Sequence[str] = ()) -> int:
    """Encoder length for decoding `target` from `state`: the fixed `num_encoder_tokens`, or
    the most tokens it can be given (the known tokens of the other inputs, one for each
    other `empty` one, plus all of the target's if it is an input) rounded up to a multiple
    of 64, so that a handful of lengths (compilations) serve every schedule."""
    if self.num_encoder_tokens:
      return self.num_encoder_tokens
    n = sum(int(np.max(np.sum(~np.asarray(state[m]["input_mask"]), axis=1)))
            for m in self.input_names if m != target)
    n += sum(1 for m in empty if m != target)
    if target in self.input_names:
      n += self._length(self.modalities[target])
    return int(min(max(64, -(-n // 64) * 64), self.max_encoder_tokens))

  def _known_counts(self, state: State, target: str) -> tuple[int, int, int]:
    """(most given tokens any row can put in the encoder when decoding `target`: the known
    tokens of the other inputs, plus the target's own if it is an input; the most of the
    target's own known tokens (the unconditional pass's encoder); most unknown target
    positions of any row), read from `state` once per target."""
    mask = lambda n: np.asarray(state[n]["input_mask"])
    given = sum((~mask(n)).sum(1) for n in self.input_names if n != target)
    unknown = mask(target).sum(1)
    own = (~mask(target)).sum(1) if target in self.input_names else np.zeros_like(unknown)
    return int(np.max(given + own)), int(np.max(own)), int(np.max(unknown))

  def slot_logits(self, params, state: State, target: str, groups: Sequence[Sequence[str]],
                  weights=None, num_encoder_tokens: int | None = None,
                  num_decoder_tokens: int | None = None, decode=None,
                  uncond_encoder_tokens: int | None = None, empty: Sequence[str] = (),
                  uncond_empty: Sequence[str] = (), uncond_given: Sequence[str] = ()):
    """The decoder's logits for the positions of an image-like `target` it decodes.

    decode: bool [B, N], the positions to decode (default: every unknown one); the decoder
    gets the first `num_decoder_tokens` of them (default N) in position order. groups:
    condition groups (each a tuple of modality names given in it). With weights (one per
    group) the logits are the guided combination with the unconditional pass (groups + one
    empty group); the conditional passes run as one batched forward, and the unconditional one
    too unless `uncond_encoder_tokens` gives it its own (shorter) encoder length, when it runs
    apart; without weights, groups must be one group. empty: modalities given in their empty
    form ([S_1] alone, see `_batch`) in every pass; uncond_empty: more of them in the
    unconditional pass only (classifier-free guidance's emptied sequence conditions);
    uncond_given: modalities the unconditional pass still sees (partly given targets later
    in the schedule, which the official sampler never empties).

    Returns (logits [B, S, V] float32, position int [B, S] of each slot, valid bool [B, S]:
    the slot holds a position to decode), S = num_decoder_tokens.
    """
    m = self.modalities[target]
    if m.kind not in ("image", "global"):
      raise ValueError(f"{target} is a {m.kind} modality; MaskGIT/ROAR decode image-like "
                       "tokens (use the autoregressive scheme for sequences)")
    decode = state[target]["input_mask"] if decode is None else decode
    n_dec = num_decoder_tokens or m.num_tokens
    variables = {"params": params}
    n_enc = num_encoder_tokens or self.num_encoder_tokens or self.max_encoder_tokens

    def forward(variants, encoder_tokens):     # -> [len(variants), B, S, V]
      out = self._unused(target, variants)
      batches = [self._batch(state, target, g, decode, e, out) for g, e in variants]
      batch = jax.tree.map(lambda *x: jnp.concatenate(x, 0), *batches)
      y, _, _, _ = self.model.apply(variables, batch, encoder_tokens, n_dec)
      logits = self.model.apply(variables, y, target, method=self.model.logits)
      return logits.reshape(len(variants), -1, *logits.shape[1:])

    conds = [(g, tuple(empty)) for g in groups]
    uncond = [(tuple(uncond_given), tuple(empty) + tuple(uncond_empty))]
    if weights is None:
      logits = forward(conds, n_enc)[0]
    elif uncond_encoder_tokens:     # the unconditional pass at its own length
      logits = guide(jnp.concatenate([forward(conds, n_enc),
                                      forward(uncond, uncond_encoder_tokens)]), weights)
    else:
      logits = guide(forward(conds + uncond, n_enc), weights)
    position = jnp.argsort(~decode, axis=1, stable=True)[:, :n_dec]   # decoded positions first
    valid = jnp.arange(n_dec)[None, :] < jnp.sum(decode, axis=1, keepdims=True)
    return logits, position, valid

  def target_logits(self, params, state: State, target: str, groups: Sequence[Sequence[str]],
                    weights=None, num_encoder_tokens: int | None = None,
                    num_decoder_tokens: int | None = None, empty: Sequence[str] = (),
                    uncond_empty: Sequence[str] = ()):
    """Logits [B, N, V] of every position of an image-like `target` (float32), from
    `slot_logits`: the unknown positions' (the first `num_decoder_tokens` of them); the known
    positions hold some unknown position's logits."""
    logits, position, _ = self.slot_logits(params, state, target, groups, weights,
                                           num_encoder_tokens, num_decoder_tokens,
                                           empty=empty, uncond_empty=uncond_empty)
    slot = jnp.minimum(jnp.argsort(jnp.argsort(~state[target]["input_mask"], axis=1,
                                               stable=True), axis=1), position.shape[1] - 1)
    return jnp.take_along_axis(logits, slot[..., None], axis=1)

  # ---- one decoding step ----------------------------------------------------------------------
  def _step_fn(self, target: str, scheme: str, groups: tuple, guided: bool, n_enc: int,
               n_dec: int, n_enc_uncond: int | None = None, empty: tuple = (),
               uncond_empty: tuple = (), uncond_given: tuple = ()):
    key = (target, scheme, groups, guided, n_enc, n_dec, n_enc_uncond, empty, uncond_empty,
           uncond_given)
    if key not in self._steps:
      def step(params, state, rng, n_select, temperature, top_k, top_p, weights):
        self.traces += 1          # runs once per compilation
        unknown = state[target]["input_mask"]
        r_sample, r_pos = jax.random.split(rng)
        if scheme == "roar":      # n random unknown positions, and only they are decoded
          decode = unknown & (_rank(jnp.where(unknown, jax.random.uniform(r_pos, unknown.shape),
                                              -jnp.inf)) < n_select)
        else:                     # maskgit: every unknown position, the n most confident kept
          decode = unknown
        logits, position, valid = self.slot_logits(
            params, state, target, groups, weights if guided else None, n_enc, n_dec, decode,
            n_enc_uncond, empty, uncond_empty, uncond_given)
        sampled, conf = sample_tokens(r_sample, filter_logits(logits, top_k, top_p),
                                      temperature)
        if scheme == "roar":
          keep = valid
        else:
          keep = valid & (_rank(jnp.where(valid, conf, -jnp.inf)) < n_select)
        rows = jnp.arange(position.shape[0])[:, None]
        # slots not kept write to a dropped index
        where = jnp.where(keep, position, unknown.shape[1])
        tensor = state[target]["tensor"].at[rows, where].set(
            sampled.astype(state[target]["tensor"].dtype), mode="drop")
        new = {**state, target: {"tensor": tensor,
                                 "input_mask": unknown.at[rows, where].set(False, mode="drop")}}
        return new
      self._steps[key] = jax.jit(step)
    return self._steps[key]

  # ---- left-to-right decoding of a sequence ---------------------------------------------------
  def _ar_fn(self, target: str, groups: tuple, guided: bool, n_enc: int, empty: tuple = (),
             uncond_empty: tuple = (), uncond_given: tuple = ()):
    key = (target, "autoregressive", groups, guided, n_enc, empty, uncond_empty, uncond_given)
    if key not in self._steps:
      m = self.modalities[target]
      dec = self.model.clone(remat="none")
      length = m.length
      variants = [(g, empty) for g in groups] + (
          [(uncond_given, empty + uncond_empty)] if guided else [])

      def run(params, state, rng, temperature, top_k, top_p, weights):
        self.traces += 1
        variables = {"params": params}
        given, known = state[target]["tensor"], ~state[target]["input_mask"]
        b, n = given.shape
        # a row given nothing is the official empty target: [S_1] alone, generated whole
        blank = ~jnp.any(known, axis=1)
        given = jnp.where(blank[:, None] & (jnp.arange(n) == 0), SENTINEL_BASE + 1, given)
        known = known | (blank[:, None] & (jnp.arange(n) == 0))
        view = {**state, target: {"tensor": given, "input_mask": ~known}}
        # the conditional variants and the unconditional one, decoded side by side
        out = self._unused(target, variants)
        batch = jax.tree.map(lambda *x: jnp.concatenate(x, 0),
                             *[self._batch(view, target, g, None, e, out) for g, e in variants])
        ctx, valid = dec.apply(variables, batch, n_enc, method=dec.decoder_context)
        k = len(variants)
        tile = lambda tok: jnp.tile(tok, k)
        combine = (lambda l: guide(l.reshape(k, b, -1), weights)) if guided else (lambda l: l)
        vocab = jnp.arange(m.vocab_size)
        # a blank row's span holds words only (no sentinel before its EOS); an in-painted row
        # may write any token but PAD, as the official sampler (the merge sorts them out)
        banned = (vocab == PAD_ID)[None] | (blank[:, None] & is_sentinel(vocab)[None])
        # an in-painted row stops at EOS or at the sentinel after its last one ([S_k+1],
        # the end of a training target); one given no sentinel has nothing to fill
        spans = jnp.sum(known & is_sentinel(given), axis=1)
        stop = jnp.where(blank, -1, SENTINEL_BASE + spans + 1)
        start = jnp.full((b,), SENTINEL_BASE + 1, jnp.int32)       # [S_1]: the first span
        logits, cache = dec.apply(variables, tile(start), 0, target, ctx, valid, length,
                                  method=dec.decode_token, mutable=["cache"])

        def sample(t, logits, done):
          logits = jnp.where(banned, -jnp.inf, combine(logits))
          sampled, _ = sample_tokens(jax.random.fold_in(rng, t),
                                     filter_logits(logits, top_k, top_p), temperature)
          tok = jnp.where(done, PAD_ID, sampled).astype(jnp.int32)
          return tok, done | (tok == EOS_ID) | (tok == stop)

        def body(t, carry):
          seq, cache, logits, done = carry
          tok, done = sample(t, logits, done)
          seq = seq.at[:, t].set(tok)
          logits, cache = dec.apply({"params": params, **cache}, tile(tok), t + 1, target, ctx,
                                    valid, length, method=dec.decode_token, mutable=["cache"])
          return seq, cache, logits, done

        seq = jnp.full((b, length), PAD_ID, jnp.int32)
        done = ~blank & (spans == 0)
        seq, _, logits, done = jax.lax.fori_loop(0, length - 1, body,
                                                 (seq, cache, logits, done))
        # the last token: EOS for blank rows that never ended (a whole sequence ends in
        # one), a last sample for in-painted ones (the official loop's length)
        last, _ = sample(length - 1, logits, done)
        seq = seq.at[:, length - 1].set(jnp.where(blank, jnp.where(done, PAD_ID, EOS_ID), last))
        tensor, known = merge_spans(given, known, jnp.concatenate([start[:, None], seq], 1), n)
        return {**state, target: {"tensor": tensor, "input_mask": ~known}}

      self._steps[key] = jax.jit(run)
    return self._steps[key]

  def _check_inpainting(self, state: State, target: str):
    """A partly given sequence target (host-side check): its given tokens must reach the
    encoder, and its sentinels must be [S_1], [S_2], ... in order, each once (the official
    numbering of span masking, which the decoder follows from [S_1])."""
    tensor, known = np.asarray(state[target]["tensor"]), ~np.asarray(state[target]["input_mask"])
    for row, (ids, k) in enumerate(zip(tensor, known)):
      if not k.any():
        continue
      sent = [int(i) for i in ids[k] if SENTINEL_BASE <= i < SENTINEL_BASE + NUM_SENTINELS]
      if sent and target not in self.input_names:
        raise ValueError(f"{target} is given in part but is not an input of the model: the "
                         "encoder could not see the given tokens; give it whole or not at all")
      if sent != list(range(SENTINEL_BASE + 1, SENTINEL_BASE + 1 + len(sent))):
        names = " ".join(f"[S_{i - SENTINEL_BASE}]" for i in sent)
        raise ValueError(f"{target} row {row}: the spans to fill must be marked [S_1], [S_2], "
                         f"... in order, each once; got {names}")

  def _unknown(self, state: State, name: str) -> bool:
    return bool(np.all(np.asarray(state[name]["input_mask"])))

  def generate(self, state: State, schedule: Sequence[schedules.Step], rng: jax.Array,
               conditions: Sequence[Sequence[str]] | None = None,
               weights: Sequence[float] | None = None) -> State:
    """Runs `schedule` on `state`; returns the new state (decoded tokens known).

    By default each step's `guidance` scale is classifier-free guidance (when != 1) with one
    group of every modality known when the target's decoding starts. conditions / weights:
    multimodal weighted guidance instead, one group of modality names per weight; weights
    beyond the groups weigh the targets of the schedule as they finish, in order (the
    first extra weight the first finished target, ...), each a condition group of its own for
    the later targets, as ml-4m's generate_multi_guided chains them.
    """
    targets = list(dict.fromkeys(s.target for s in schedule))
    if conditions is not None:
      if weights is None or not len(conditions) <= len(weights) < len(conditions) + len(targets):
        raise ValueError(f"give one weight per condition group ({len(conditions)}), and at most "
                         f"one more for each target that finishes before the last "
                         f"({len(targets) - 1}); got {None if weights is None else len(weights)}")
    # sequences still to be generated give the encoder their [S_1] (official empty targets)
    seq_targets = [t for t in targets if t in self.input_names and
                   self.modalities[t].kind == "seq"]
    current, previous, finished = None, None, []
    groups, guided, empty, uncond_empty, pending = None, False, (), (), ()
    for i, step in enumerate(schedule):
      if step.target not in [m.name for m in self.model.targets]:
        raise ValueError(f"{step.target!r} is not a target of the model")
      if previous is not None and step.target != previous and previous not in finished:
        finished.append(previous)
      previous = step.target
      if step.target != current or step.scheme == "autoregressive":
        current = step.target
        empty = tuple(t for t in seq_targets if self._unknown(state, t))
        known = tuple(n for n in self.input_names if n != current and n not in empty and
                      not self._unknown(state, n))
        # targets later in the schedule, given in part (in-painted later): not conditions.
        # Classifier-free guidance: every pass sees them as they are (the official uncond
        # pass empties only its cfg_cond_domains: the conditions and the finished targets).
        # Multimodal guidance: the unconditional pass sees them (official uncond_dict holds
        # every target) and the condition groups do not (each official cond_dict holds its
        # condition and the current target)
        pending = tuple(n for n in known if n in targets and n not in finished)
        if conditions is not None:
          extra = len(weights) - len(conditions)
          groups = (tuple(tuple(g) for g in conditions) +
                    tuple((t,) for t in finished[:extra]))
          guided, uncond_empty = True, ()
          w = np.asarray(weights[:len(groups)], np.float32)
        else:
          groups = (known,)
          guided = any(s.guidance != 1.0 for s in schedule if s.target == current)
          # the unconditional pass: sequence conditions as [S_1], embedding ones one zero vector
          uncond_empty = tuple(n for n in known if n not in pending and
                               self.modalities[n].kind in ("seq", "seq_emb"))
        enc_known, own_known, unknown = self._known_counts(state, current)
        pending_known = sum(int(np.max(np.sum(~np.asarray(state[n]["input_mask"]), 1)))
                            for n in pending)
        decoded = 0
      if conditions is None:
        w = np.array([step.guidance], np.float32)
      if step.scheme == "autoregressive":
        if self.modalities[step.target].kind != "seq":
          raise ValueError(f"{step.target} is not a sequence; decode it with maskgit or roar")
        self._check_inpainting(state, step.target)
        # the target's own [S_1] (a blank row) is set in the loop: one compilation serves
        # generating it whole and in-painting it
        own = tuple(e for e in empty if e != step.target)
        fn = self._ar_fn(step.target, groups, step.guidance != 1.0 if conditions is None
                         else True, self.encoder_tokens(state, step.target, own), own,
                         uncond_empty, pending)
        state = fn(self.params, state, jax.random.fold_in(rng, i), jnp.float32(step.temperature),
                   jnp.int32(step.top_k), jnp.float32(step.top_p), jnp.asarray(w))
        continue
      # this step's exact lengths, known before sampling: the encoder gets the given tokens,
      # the target's tokens decoded so far and the empty sequences' [S_1], the decoder the
      # target's still unknown positions
      n_enc = self.num_encoder_tokens or int(min(max(enc_known + decoded + len(empty), 1),
                                                 self.max_encoder_tokens))
      n_dec = max(unknown - decoded, 1)
      if step.scheme == "roar":      # the decoder gets only the n chosen positions
        n_dec = max(min(step.num_tokens, n_dec), 1)
      # guided: the unconditional pass's encoder holds the target's own known tokens and
      # the empty forms
      n_uncond = (None if not guided or self.num_encoder_tokens else int(min(
          max(own_known + pending_known + decoded + len(empty) + len(uncond_empty), 1),
          self.max_encoder_tokens)))
      fn = self._step_fn(current, step.scheme, groups, guided, n_enc, n_dec, n_uncond, empty,
                         uncond_empty, pending)
      decoded += step.num_tokens
      state = fn(self.params, state, jax.random.fold_in(rng, i), jnp.int32(step.num_tokens),
                 jnp.float32(step.temperature), jnp.int32(step.top_k), jnp.float32(step.top_p),
                 jnp.asarray(w))
    return state
