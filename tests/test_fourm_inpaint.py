"""Sequence in-painting in 4M generation (fourm_jax.sampler), against ml-4m's algorithm.

The official sampler (fourm/models/generate.py) in-paints a caption given as text with
sentinels ('a [S_1] on the grass', custom_text): the encoder gets the given tokens, the
decoder starts from [S_1] and appends its greedy/sampled token until [EOS]
(autoregressive_step_batched), and merge_span_masking (fourm/utils/tokenizer) replaces each
given sentinel by the tokens that followed it in the decoded sequence. The expected values
here are derived from those steps by hand (the merge examples) or by replaying them with the
plain model (a full decoder pass per token, batch of one), never from the sampler's output.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fourm_jax import model as model_lib
from fourm_jax import modalities, sampler as sampler_lib, schedules
from fourm_jax.masking import SENTINEL_BASE
from tokenizers_jax.text import EOS_ID, PAD_ID

RGB, CAP = "tok_rgb@32", "caption"
REG = {RGB: modalities.Modality(RGB, "image", vocab_size=64, grid=(4, 4)),
       CAP: modalities.Modality(CAP, "seq", vocab_size=300, length=12)}


def S(k):
  return SENTINEL_BASE + k


def _merge(given, generated, size=24):
  g = np.full((1, size), PAD_ID, np.int32)
  g[0, :len(given)] = given
  known = np.arange(size)[None] < len(given)
  t, k = sampler_lib.merge_spans(jnp.asarray(g), jnp.asarray(known),
                                 jnp.asarray([generated], jnp.int32), size)
  t, k = np.asarray(t)[0], np.asarray(k)[0]
  assert (t[~k] == PAD_ID).all() and k[:k.sum()].all()
  return t[k].tolist()


@pytest.mark.parametrize("given,generated,want", [
    # each sentinel takes the tokens after it up to the next sentinel; [EOS] is a token
    ([300, S(1), 301, S(2)], [S(1), 400, 401, S(2), 402, EOS_ID], [300, 400, 401, 301, 402,
                                                                  EOS_ID]),
    # a sentinel decoded twice: its span is both runs, in order (split_by_sentinel appends)
    ([S(1), 301, S(2)], [S(1), 400, S(2), 401, S(1), 402], [400, 402, 301, 401]),
    # a decoded sentinel that is not given: its tokens are dropped
    ([300, S(1), 301, S(2), 302], [S(1), 400, S(5), 500, 501, S(2), 401],
     [300, 400, 301, 401, 302]),
    # a given sentinel never decoded: an empty span
    ([300, S(1), 301, S(2), 302], [S(1), 400], [300, 400, 301, 302]),
    # nothing to fill: the given sequence unchanged
    ([300, 301, EOS_ID], [S(1), 400, 401], [300, 301, EOS_ID]),
    # the empty target ([S_1]): the decoded span; PAD (after the stop) is nothing
    ([S(1)], [S(1), 400, 401, EOS_ID, PAD_ID, PAD_ID], [400, 401, EOS_ID]),
])
def test_merge_fills_each_sentinel_with_its_decoded_span(given, generated, want):
  """Hand-derived merge_span_masking(input_seq, decoder_seq, sentinel_ids) results."""
  assert _merge(given, generated) == want


@pytest.fixture(scope="module")
def sampler():
  mods = modalities.get([RGB, CAP], REG)
  model = model_lib.FourM(mods, mods, dim=32, encoder_depth=1, decoder_depth=1, num_heads=4)
  s = sampler_lib.Sampler(model, None)
  batch = s._batch(s.init_state(1, {}), RGB, ())
  s.params = s.base = jax.jit(lambda r: model.init(r, batch, s.max_encoder_tokens, 16))(
      jax.random.key(0))["params"]
  s.plain = jax.jit(lambda p, b: model.apply({"params": p}, model.apply(
      {"params": p}, b, s.max_encoder_tokens, 16)[0], CAP, method=model.logits))
  return s


def _favour(s, eos: float, s2: float):
  """The random model with the output embeddings of [EOS] and [S_2] scaled, so that greedy
  spans end, or hold sentinels, within the 12 tokens."""
  s.params = jax.tree_util.tree_map_with_path(
      lambda path, x: (x.at[EOS_ID].mul(eos).at[S(2)].mul(s2)
                       if "dec_tok_caption" in jax.tree_util.keystr(path) else x), s.base)


def _official_inpaint(s, rgb, given):
  """ml-4m's in-painting of one row (batch of one), replayed with the plain model: the
  caption tensor holds the given tokens (input) then the decoder's tokens (target), as
  custom_text lays it out; each step runs the whole decoder over [S_1] + the tokens so far
  (causal) and appends the argmax of the last position, until [EOS] or 12 new tokens (the
  target's length); then merge_span_masking. Returns (decoded sequence, merged ids)."""
  n, g = s._length(s.modalities[CAP]), len(given)
  out = [S(1)]
  for _ in range(12):
    t = len(out)
    tensor = np.zeros((1, n), np.int32)
    tensor[0, :g] = given
    tensor[0, g:g + t] = out
    tgt = np.ones((1, n), bool)
    tgt[0, g:g + t + 1] = False                       # one slot more: the token to predict
    batch = {RGB: {"tensor": jnp.asarray(rgb[None]), "input_mask": jnp.zeros((1, 16), bool),
                   "target_mask": jnp.ones((1, 16), bool),
                   "decoder_attention_mask": jnp.zeros((1, 16), jnp.int32)},
             CAP: {"tensor": jnp.asarray(tensor),
                   "input_mask": jnp.asarray(np.arange(n)[None] >= g),
                   "target_mask": jnp.asarray(tgt),
                   "decoder_attention_mask": jnp.ones((1, n), jnp.int32)}}
    logits = np.asarray(s.plain(s.params, batch))
    out.append(int(np.argmax(logits[0, t - 1])))
    if EOS_ID in out:
      break
  # merge_span_masking, step by step
  spans, cur = {}, None
  for tok in out:
    if SENTINEL_BASE <= tok < SENTINEL_BASE + 200:
      cur = tok
      spans.setdefault(cur, [])
    else:
      spans.setdefault(cur, []).append(tok)
  merged = []
  for tok in given:
    merged.extend(spans.get(tok, []) if SENTINEL_BASE <= tok < SENTINEL_BASE + 200 else [tok])
  return out, merged


@pytest.mark.slow       # two replays of 3 x 12 full decoder passes: ~40 s on 2 shared cores
@pytest.mark.parametrize("eos,s2,decoded", [
    # spans end at [EOS]
    (1.8, 2.0, [[S(1), 251, 251, 268, EOS_ID]] * 3),
    # [S_2] decoded three times, then S_67 (71), whose tokens are dropped; no [EOS]
    (1.8, 2.5, [[S(1), 251, 251, S(2), S(2), S(2)] + [71] * 7] +
     [[S(1), 251, 251, S(2), S(2), S(2), 268] + [71] * 6] * 2),
])
def test_inpainting_matches_the_official_greedy_decoding_and_merge(sampler, eos, s2, decoded):
  """Greedy in-painting of three differently given captions (a span at the end, two spans,
  a span in front of a given [EOS]) equals the official algorithm replayed per row. (The
  small model hardly reads its context: the rows decode alike; `decoded`, the official
  decodings, pins them so that the cases stay what they are.) Our loop also stops a row at [S_k+1] (the end of a
  training target; here rows 0 and 2 at [S_2] in the second case, where the official loop
  goes on to its length) and never writes PAD: the official decodings hold no PAD and no
  given sentinel after [S_k+1], so the merges agree whatever follows it."""
  _favour(sampler, eos, s2)
  rgb = np.random.default_rng(0).integers(0, 64, (3, 16))
  rows = [[250, 251, 252, S(1)], [S(1), 260, S(2), 261], [S(1), 270, 271, EOS_ID]]
  tensor = np.zeros((3, 6), np.int32)
  for i, r in enumerate(rows):
    tensor[i, :len(r)] = r
  state = sampler.init_state(3, {RGB: {"tensor": rgb}, CAP: {"tensor": tensor}})
  out = sampler.generate(state, [schedules.Step(CAP, "autoregressive", 12, 0.0)],
                         jax.random.key(0))
  got_t, got_k = np.asarray(out[CAP]["tensor"]), ~np.asarray(out[CAP]["input_mask"])
  for i, given in enumerate(rows):
    official, want = _official_inpaint(sampler, rgb[i], given)
    assert official == decoded[i]
    k = sum(SENTINEL_BASE <= t < SENTINEL_BASE + 200 for t in given)
    assert PAD_ID not in official
    if S(k + 1) in official:
      after = official[official.index(S(k + 1)):]
      assert not any(S(j) in after for j in range(1, k + 1))
    assert got_t[i][got_k[i]].tolist() == want, (i, official, want)


def test_blank_and_inpainted_rows_share_one_compilation(sampler):
  """A blank row is decoded whole (its known words unchanged by the merge of [S_1]) and a
  partly given one in-painted by the same compiled loop; bad sentinels are refused."""
  _favour(sampler, 1.8, 2.0)
  rgb = np.random.default_rng(1).integers(0, 64, (2, 16))
  whole = sampler.generate(sampler.init_state(2, {RGB: {"tensor": rgb}}),
                           [schedules.Step(CAP, "autoregressive", 12, 0.0)], jax.random.key(0))
  traced = sampler.traces
  tensor = np.zeros((2, 4), np.int32)
  tensor[1] = [250, S(1), 251, EOS_ID]                 # row 0 all PAD: given nothing
  state = sampler.init_state(2, {RGB: {"tensor": rgb}, CAP: {"tensor": tensor}})
  out = sampler.generate(state, [schedules.Step(CAP, "autoregressive", 12, 0.0)],
                         jax.random.key(0))
  assert sampler.traces == traced
  np.testing.assert_array_equal(out[CAP]["tensor"][0], whole[CAP]["tensor"][0])
  row = np.asarray(out[CAP]["tensor"][1])
  known = ~np.asarray(out[CAP]["input_mask"][1])
  assert row[0] == 250 and S(1) not in row[known].tolist() and known.sum() >= 3
  bad = tensor.copy()
  bad[1] = [250, S(2), 251, EOS_ID]
  state = sampler.init_state(2, {RGB: {"tensor": rgb}, CAP: {"tensor": bad}})
  with pytest.raises(ValueError, match=r"row 1: the spans to fill must be marked \[S_1\]"):
    sampler.generate(state, [schedules.Step(CAP, "autoregressive", 12, 0.0)],
                     jax.random.key(0))


def test_a_condition_text_with_sentinels_is_given_without_eos():
  """fourm_jax.generate's --condition: a caption holding [S_k] is encoded as ml-4m's
  custom_text encodes its input text (no [EOS] appended: the last span may run to the
  end); one without sentinels is a whole caption ending in [EOS]."""
  import types
  from fourm_jax import generate
  from tokenizers_jax import text
  tok = text.fit_wordpiece(["a red sphere left of a blue cube"] * 4, vocab_size=4400)
  model = types.SimpleNamespace(inputs=[REG[CAP]])
  given, _ = generate.build_conditions(["caption:a red [S_1] cube [S_2]"], model, 2, {}, tok)
  ids = given[CAP]["tensor"][0].tolist()
  assert ids == [tok.token_to_id("a"), tok.token_to_id("red"), S(1), tok.token_to_id("cube"),
                 S(2)]
  given, _ = generate.build_conditions(["caption:a red cube"], model, 2, {}, tok)
  assert given[CAP]["tensor"][0].tolist()[-1] == EOS_ID
