"""4M generation (fourm_jax.schedules, fourm_jax.sampler) on a small random-weight model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fourm_jax import model as model_lib
from fourm_jax import modalities, sampler as sampler_lib, schedules

RGB, DEPTH = "tok_rgb@32", "tok_depth@32"
REG = {RGB: modalities.Modality(RGB, "image", vocab_size=64, grid=(4, 4)),
       DEPTH: modalities.Modality(DEPTH, "image", vocab_size=64, grid=(4, 4)),
       "caption": modalities.Modality("caption", "seq", vocab_size=300, length=12)}


@pytest.fixture(scope="module")
def sampler():
  mods = modalities.get([RGB, DEPTH, "caption"], REG)
  model = model_lib.FourM(mods, mods, dim=32, encoder_depth=1, decoder_depth=1, num_heads=4)
  s = sampler_lib.Sampler(model, None)
  state = s.init_state(2, {})
  batch = s._batch(state, DEPTH, ())
  params = jax.jit(lambda r: model.init(r, batch, s.max_encoder_tokens, 16))(
      jax.random.key(0))["params"]
  s.params = params
  return s


def _rgb(b=2, seed=0):
  return np.random.default_rng(seed).integers(0, 64, (b, 4, 4))


@pytest.mark.parametrize("kind", ["cosine", "linear"])
@pytest.mark.parametrize("steps,total", [(1, 16), (8, 196), (25, 196), (30, 16), (12, 784)])
def test_token_schedules_sum_to_the_token_count(kind, steps, total):
  toks = schedules.token_schedule(kind, steps, total)
  assert toks.sum() == total and (toks >= 0).all() and len(toks) <= steps
  if kind == "linear":
    assert len(toks) == min(steps, total) and (toks > 0).all()
  # chained leaves out the steps of no tokens (a cosine split of few tokens has some)
  plan = schedules.chained(["x"], [total], ["maskgit"], [steps], token_schedules=[kind])
  assert [s.num_tokens for s in plan] == [t for t in toks if t]
  if kind == "cosine" and steps > 2 and total > 100:
    assert toks[0] < toks[len(toks) // 2]          # few tokens first, as MaskGIT
  temps = schedules.temperature_schedule("linear", 2.0, toks)
  assert temps[0] == 2.0 and (np.diff(temps) <= 0).all()
  assert len(schedules.temperature_schedule("onex:0.5:0.5", 3.0, toks)) == len(toks)


def test_chained_schedules_decode_each_target_fully_in_turn():
  steps = schedules.chained([RGB, DEPTH], [16, 16], ["maskgit", "roar"], [4, 16],
                            token_schedules=["cosine", "linear"], temperatures=[1.0, 0.5],
                            guidance=[1.0, 3.0])
  assert [s.target for s in steps] == [RGB] * 4 + [DEPTH] * 16
  assert sum(s.num_tokens for s in steps if s.target == RGB) == 16
  assert all(s.guidance == 3.0 and s.scheme == "roar" for s in steps[4:])
  with pytest.raises(ValueError, match="unknown decoding scheme"):
    schedules.Step(RGB, "beam", 4)


@pytest.mark.slow     # about 60 s
def test_maskgit_at_temperature_zero_is_deterministic_and_fills_every_position(sampler):
  state = sampler.init_state(2, {RGB: {"tensor": _rgb()}})
  steps = schedules.chained([DEPTH], [16], ["maskgit"], [5], temperatures=[0.0])
  a = sampler.generate(state, steps, jax.random.key(1))
  b = sampler.generate(state, steps, jax.random.key(2))
  assert not bool(a[DEPTH]["input_mask"].any())                  # every position decoded
  np.testing.assert_array_equal(a[DEPTH]["tensor"], b[DEPTH]["tensor"])
  np.testing.assert_array_equal(a[RGB]["tensor"], state[RGB]["tensor"])
  # one step at temperature 0 decoding everything is the argmax of the logits
  full = sampler.generate(state, [schedules.Step(DEPTH, "maskgit", 16, 0.0)], jax.random.key(3))
  logits = sampler.target_logits(sampler.params, state, DEPTH, ((RGB,),))
  np.testing.assert_array_equal(full[DEPTH]["tensor"], np.argmax(logits, -1))


def test_roar_and_sampling_decode_exactly_the_scheduled_number_of_tokens(sampler):
  state = sampler.init_state(2, {RGB: {"tensor": _rgb()}})
  for step in (schedules.Step(DEPTH, "roar", 5, 1.0), schedules.Step(DEPTH, "maskgit", 5, 1.0,
                                                                       top_k=3, top_p=0.9)):
    out = sampler.generate(state, [step], jax.random.key(4))
    assert (np.asarray(~out[DEPTH]["input_mask"]).sum(1) == 5).all()


def test_in_painting_never_changes_the_given_tokens(sampler):
  rng = np.random.default_rng(5)
  depth = rng.integers(0, 64, (2, 16))
  known = rng.random((2, 16)) < 0.5
  state = sampler.init_state(2, {RGB: {"tensor": _rgb()},
                                 DEPTH: {"tensor": depth, "input_mask": ~known}})
  steps = schedules.chained([DEPTH], [int((~known).sum(1).max())], ["maskgit"], [3])
  out = sampler.generate(state, steps, jax.random.key(6))
  got = np.asarray(out[DEPTH]["tensor"])
  np.testing.assert_array_equal(got[known], depth[known])
  assert not bool(out[DEPTH]["input_mask"].any())


def test_guidance_weight_one_is_conditional_and_zero_unconditional(sampler):
  state = sampler.init_state(2, {RGB: {"tensor": _rgb()}})
  params = sampler.params
  logits = jax.jit(sampler.target_logits, static_argnums=(2, 3))
  cond = logits(params, state, DEPTH, ((RGB,),))
  uncond = logits(params, state, DEPTH, ((),))
  assert not np.allclose(cond, uncond)
  for w, want in ((1.0, cond), (0.0, uncond)):
    got = logits(params, state, DEPTH, ((RGB,),), jnp.array([w]))
    np.testing.assert_allclose(got, want, atol=1e-5)
  # multimodal guidance: weights (1, 0) select the first condition alone
  cap = np.array([[5, 17, 3]] * 2)
  state2 = sampler.init_state(2, {RGB: {"tensor": _rgb()}, "caption": {"tensor": cap}})
  only_rgb = logits(params, state2, DEPTH, ((RGB,),))
  got = logits(params, state2, DEPTH, ((RGB,), ("caption",)), jnp.array([1., 0.]))
  np.testing.assert_allclose(got, only_rgb, atol=1e-5)


def test_a_negative_weight_moves_probability_away_from_the_negated_condition():
  """Constructed logits: condition A favours token 0, condition B favours token 1; with
  weights (+1, -1) token 1 ends up less likely than unconditionally, token 0 more."""
  uncond = jnp.zeros(4)
  cond_a = jnp.array([3.0, 0.0, 0.0, 0.0])
  cond_b = jnp.array([0.0, 3.0, 0.0, 0.0])
  p = lambda l: jax.nn.softmax(l)
  mixed = sampler_lib.guide(jnp.stack([cond_a, cond_b, uncond]), jnp.array([1.0, -1.0]))
  assert p(mixed)[1] < p(uncond)[1] < p(cond_b)[1]
  assert p(mixed)[0] > p(cond_a)[0]


def test_a_repeated_schedule_compiles_nothing(sampler):
  """Each step has its own exact lengths (compiled once); calling the same schedule again with
  other temperatures, top-k/p, inputs or guidance scales compiles nothing."""
  state = sampler.init_state(2, {RGB: {"tensor": _rgb()}})
  steps = schedules.chained([DEPTH], [16], ["maskgit"], [4])
  before = sampler.traces
  sampler.generate(state, steps, jax.random.key(7))
  traced = sampler.traces
  assert traced - before <= 4           # at most one compilation per step
  steps = schedules.chained([DEPTH], [16], ["maskgit"], [4], temperatures=[0.3],
                            temperature_schedules=["linear"], top_k=[5], top_p=[0.8])
  sampler.generate(sampler.init_state(2, {RGB: {"tensor": _rgb(seed=9)}}), steps,
                   jax.random.key(8))
  assert sampler.traces == traced
  # guidance compiles the guided steps once, then any scale reuses them
  guided = lambda scale: sampler.generate(state, schedules.chained(
      [DEPTH], [16], ["maskgit"], [4], guidance=[scale]), jax.random.key(9))
  guided(2.0)
  assert 0 < sampler.traces - traced <= 4
  traced = sampler.traces
  for scale in (3.0, -1.0):
    guided(scale)
  assert sampler.traces == traced


def test_exact_lengths_give_the_fixed_length_logits(sampler):
  """The step's logits at unknown positions do not depend on the padding: the exact encoder
  and decoder lengths give what the maximal lengths give."""
  state = sampler.init_state(2, {RGB: {"tensor": _rgb()}})
  mask = np.ones((2, 16), bool)
  mask[0, :5] = False
  mask[1, 3:9] = False
  state[DEPTH] = {"tensor": state[DEPTH]["tensor"] + 3, "input_mask": jnp.asarray(mask)}
  enc, _, dec = sampler._known_counts(state, DEPTH)
  assert dec == 11
  full = sampler.target_logits(sampler.params, state, DEPTH, [(RGB,)], None,
                               sampler.max_encoder_tokens, 16)
  exact = sampler.target_logits(sampler.params, state, DEPTH, [(RGB,)], None, enc, dec)
  np.testing.assert_allclose(np.asarray(exact)[mask], np.asarray(full)[mask], atol=2e-5)


def test_filtering_keeps_the_top_tokens():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  assert np.isfinite(sampler_lib.filter_logits(logits, 2, 0.0)).sum() == 2
  assert np.isfinite(sampler_lib.filter_logits(logits, 0, 0.7)).sum() == 2   # 0.5 + 0.3 >= 0.7
  assert np.isfinite(sampler_lib.filter_logits(logits, 0, 0.0)).sum() == 4
  assert np.isfinite(sampler_lib.filter_logits(logits, 1, 0.99)).sum() == 1


def _uncached_greedy(sampler, state, target, steps):
  """Reference: the full decoder at every step (the training forward), greedy; the encoder
  gets the target's [S_1] (slot 0), as ml-4m's empty target sequence gives it."""
  model, m = sampler.model, sampler.modalities[target]
  n = sampler._length(m)
  seq = [masking_sentinel()]
  b = state[target]["tensor"].shape[0]
  seqs = np.array([seq] * b)
  for _ in range(steps):
    t = seqs.shape[1]
    tensor = np.zeros((b, n), np.int32)
    tensor[:, :t] = seqs
    tgt_mask = np.ones((b, n), bool)
    tgt_mask[:, :t + 1] = False                      # one more slot: the token to predict
    batch = sampler._batch(state, target, (RGB,))
    batch[target] = {"tensor": jnp.asarray(tensor),
                     "input_mask": jnp.asarray(np.broadcast_to(np.arange(n) != 0, (b, n))),
                     "target_mask": jnp.asarray(tgt_mask),
                     "decoder_attention_mask": jnp.ones((b, n), jnp.int32)}
    y, _, _, valid = model.apply({"params": sampler.params}, batch, sampler.max_encoder_tokens,
                                 t + 1)
    logits = model.apply({"params": sampler.params}, y, target, method=model.logits)
    last = np.array(logits[:, t - 1])
    last[:, 0] = -np.inf                               # PAD and sentinels are never generated
    last[:, masking_sentinel() - 1:masking_sentinel() + 199] = -np.inf
    nxt = np.argmax(last, -1)
    seqs = np.concatenate([seqs, nxt[:, None]], 1)
  return seqs[:, 1:]


def masking_sentinel():
  from fourm_jax.masking import SENTINEL_BASE
  return SENTINEL_BASE + 1


def test_cached_left_to_right_decoding_matches_the_full_decoder(sampler):
  state = sampler.init_state(2, {RGB: {"tensor": _rgb()}})
  out = sampler.generate(state, [schedules.Step("caption", "autoregressive", 12, 0.0)],
                         jax.random.key(0))
  got = np.asarray(out["caption"]["tensor"])
  want = _uncached_greedy(sampler, state, "caption", 5)
  from tokenizers_jax.text import EOS_ID, PAD_ID
  for row, ref in zip(got, want):
    end = list(ref).index(EOS_ID) + 1 if EOS_ID in ref else len(ref)
    np.testing.assert_array_equal(row[:end], ref[:end])
  known = ~np.asarray(out["caption"]["input_mask"])
  assert (known == (got != PAD_ID)).all() and known[:, 0].all()
  assert ((got == EOS_ID).sum(1) == 1).all()        # every sequence ends in exactly one EOS
  traced = sampler.traces
  sampler.generate(state, [schedules.Step("caption", "autoregressive", 12, 0.7, top_k=5)],
                   jax.random.key(1))
  assert sampler.traces == traced
  # the caption then conditions a chained image target
  chained = sampler.generate(out, [schedules.Step(DEPTH, "maskgit", 16, 0.0)], jax.random.key(2))
  assert not bool(chained[DEPTH]["input_mask"].any())


def test_guided_caption_decoding_with_weight_one_is_the_conditional_decoding(sampler):
  """Guidance in the cached loop: weight 1 gives the unguided (conditional) greedy caption,
  weight 0 the caption decoded from nothing."""
  state = sampler.init_state(2, {RGB: {"tensor": _rgb()}})
  step = lambda g: [schedules.Step("caption", "autoregressive", 12, 0.0, guidance=g)]
  plain = sampler.generate(state, step(1.0), jax.random.key(0))["caption"]["tensor"]
  w1 = sampler.generate(state, step(1.0), jax.random.key(0), conditions=[(RGB,)], weights=[1.0])
  np.testing.assert_array_equal(w1["caption"]["tensor"], plain)
  empty = sampler.init_state(2, {})
  uncond = sampler.generate(empty, step(1.0), jax.random.key(0))["caption"]["tensor"]
  w0 = sampler.generate(state, step(1.0), jax.random.key(0), conditions=[(RGB,)], weights=[0.0])
  np.testing.assert_array_equal(w0["caption"]["tensor"], uncond)
  strong = sampler.generate(state, step(3.0), jax.random.key(0))["caption"]["tensor"]
  assert strong.shape == plain.shape


def test_token_super_resolution_decodes_the_large_grid_from_the_small_one():
  """The super-resolution config's use: a 4 x 4 grid given, the 8 x 8 grid of the same
  modality generated (4M App. A.1's 14x14 -> 28x28, scaled down)."""
  lo = modalities.Modality("tok_rgb@32", "image", vocab_size=64, grid=(4, 4))
  hi = modalities.Modality("tok_rgb@64", "image", vocab_size=64, grid=(8, 8))
  model = model_lib.FourM((lo, hi), (hi,), dim=32, encoder_depth=1, decoder_depth=1, num_heads=4)
  s = sampler_lib.Sampler(model, None)
  batch = s._batch(s.init_state(2, {}), hi.name, ())
  s.params = jax.jit(lambda r: model.init(r, batch, s.max_encoder_tokens, 64))(
      jax.random.key(0))["params"]
  state = s.init_state(2, {lo.name: {"tensor": _rgb()}})
  steps = schedules.chained([hi.name], [64], ["maskgit"], [6], temperatures=[0.5])
  out = s.generate(state, steps, jax.random.key(1))
  assert not bool(out[hi.name]["input_mask"].any())
  assert out[hi.name]["tensor"].shape == (2, 64) and (np.asarray(out[hi.name]["tensor"]) < 64).all()
  np.testing.assert_array_equal(out[lo.name]["tensor"], state[lo.name]["tensor"])


def test_cached_decoding_with_qk_norm_and_biases_matches_the_full_decoder():
  """The cache path of the other attention variants (QK-norm on cached keys, biases on
  cached cross-attention values): the ablation reference model uses biases."""
  mods = modalities.get([RGB, DEPTH, "caption"], REG)
  model = model_lib.FourM(mods, mods, dim=32, encoder_depth=1, decoder_depth=2, num_heads=4,
                          qk_norm=True, use_bias=True, ffn="gelu")
  s = sampler_lib.Sampler(model, None)
  batch = s._batch(s.init_state(2, {}), DEPTH, ())
  params = jax.jit(lambda r: model.init(r, batch, s.max_encoder_tokens, 16))(jax.random.key(5))
  # non-zero biases, so that skipping one would show
  s.params = jax.tree.map(lambda x: x + 0.05, params["params"])
  state = s.init_state(2, {RGB: {"tensor": _rgb()}})
  out = s.generate(state, [schedules.Step("caption", "autoregressive", 12, 0.0)],
                   jax.random.key(0))
  want = _uncached_greedy(s, state, "caption", 4)
  from tokenizers_jax.text import EOS_ID
  for row, ref in zip(np.asarray(out["caption"]["tensor"]), want):
    end = list(ref).index(EOS_ID) + 1 if EOS_ID in ref else len(ref)
    np.testing.assert_array_equal(row[:end], ref[:end])


def test_roar_decodes_only_the_chosen_positions(sampler):
  """Official ROAR (ml-4m generate.py, forward_mask_decoder_roar): n random unknown positions
  are chosen first and only they go through the decoder, attending to each other; the other
  unknown positions are not in the decoder at all. So, greedy, a ROAR step's tokens are the
  argmax of a forward pass whose decoder targets are exactly the decoded positions, and that
  pass differs from one over every unknown position (MaskGIT's)."""
  state = sampler.init_state(2, {RGB: {"tensor": _rgb()}})
  out = sampler.generate(state, [schedules.Step(DEPTH, "roar", 5, 0.0)], jax.random.key(3))
  chosen = np.asarray(state[DEPTH]["input_mask"]) & ~np.asarray(out[DEPTH]["input_mask"])
  assert (chosen.sum(1) == 5).all()
  model, variables = sampler.model, {"params": sampler.params}

  def logits_over(decode, n):
    batch = sampler._batch(state, DEPTH, (RGB,), jnp.asarray(decode))
    y, _, _, _ = model.apply(variables, batch, sampler.max_encoder_tokens, n)
    return np.asarray(model.apply(variables, y, DEPTH, method=model.logits))   # slots in order

  got = np.asarray(out[DEPTH]["tensor"])
  want = logits_over(chosen, 5)
  for row in range(2):
    np.testing.assert_array_equal(got[row][chosen[row]], want[row].argmax(-1))
  everything = logits_over(np.ones((2, 16), bool), 16)
  for row in range(2):
    assert not np.allclose(everything[row][chosen[row]], want[row], atol=1e-4)


def test_the_unconditional_pass_at_its_own_length_gives_the_same_guided_logits(sampler):
  """Guidance runs the unconditional pass apart, its encoder holding only the target's own
  known tokens; padding it to the conditional pass's length (one batched forward) gives the
  same guided logits."""
  state = sampler.init_state(2, {RGB: {"tensor": _rgb()}})
  mask = np.ones((2, 16), bool)
  mask[:, :3] = False
  state[DEPTH] = {"tensor": state[DEPTH]["tensor"] + 1, "input_mask": jnp.asarray(mask)}
  enc, own, dec = sampler._known_counts(state, DEPTH)
  assert own == 3
  w = jnp.asarray([2.5])
  batched, _, _ = sampler.slot_logits(sampler.params, state, DEPTH, [(RGB,)], w, enc, dec)
  apart, _, _ = sampler.slot_logits(sampler.params, state, DEPTH, [(RGB,)], w, enc, dec,
                                    uncond_encoder_tokens=own)
  np.testing.assert_allclose(apart, batched, atol=2e-5)


def test_generate_cli_schedule_and_weights_parse_into_steps(tmp_path):
  """--schedule 'TARGET:SCHEME:STEPS:TEMP,...' (or a JSON file of entries) and
  --condition_weights, without a model: the steps are chained's (depth: 4 maskgit steps,
  cosine over 16 tokens: c = 1, .854, .5, .146 -> round(2.34, 5.66, 5.66) = 2 6 6 and the
  rest 2; the caption one left-to-right step); weights: one per condition, then one per
  target finishing before the last."""
  import json
  from fourm_jax import generate
  targets = {n: REG[n] for n in (DEPTH, "caption", RGB)}
  entries = generate.parse_schedule("depth:maskgit:4:0.5,caption:ar:1:0.7")
  names, plan = generate.build_plan(entries, targets, guidance=2.0)
  assert names == [DEPTH, "caption"]
  assert [(s.target, s.scheme, s.num_tokens, s.temperature, s.guidance) for s in plan] == [
      (DEPTH, "maskgit", 2, 0.5, 2.0), (DEPTH, "maskgit", 6, 0.5, 2.0),
      (DEPTH, "maskgit", 6, 0.5, 2.0), (DEPTH, "maskgit", 2, 0.5, 2.0),
      ("caption", "autoregressive", 12, 0.7, 2.0)]
  path = tmp_path / "plan.json"
  path.write_text(json.dumps([{"target": RGB, "scheme": "roar", "steps": 5, "temperature": 1.0,
                               "temperature_schedule": "linear", "guidance": 3.0}]))
  names, plan = generate.build_plan(generate.parse_schedule(str(path)), targets)
  # ROAR's official linear split of 16 in 5: 4 3 3 3 3; linear temperature 1, 12/16, ...
  assert [s.num_tokens for s in plan] == [4, 3, 3, 3, 3]
  np.testing.assert_allclose([s.temperature for s in plan], [1, .75, .5625, .375, .1875])
  assert {s.guidance for s in plan} == {3.0}
  for bad, match in (("depth:maskgit:4", "TARGET:SCHEME"), ("depth:beam:4:1", "unknown scheme"),
                     ("caption:maskgit:4:1", "decode it with ar")):
    with pytest.raises(ValueError, match=match):
      generate.build_plan(generate.parse_schedule(bad), targets)
  groups, weights = generate.guidance_weights("caption:3,rgb:-1,depth:1.5", ["caption", RGB],
                                              [DEPTH, "tok_normal@32"])
  assert groups == [("caption",), (RGB,)] and weights == [3.0, -1.0, 1.5]
  assert generate.guidance_weights("caption:3", ["caption"], [DEPTH, RGB])[1] == [3.0]
  with pytest.raises(ValueError, match="no weight to the conditions"):
    generate.guidance_weights("caption:3", ["caption", RGB], [DEPTH])


def test_tokenizers_given_per_modality_serve_two_modalities_of_one_kind(monkeypatch):
  """--tokenizers=DIR serves every modality of its tokenizer's kind; MODALITY=DIR serves
  that modality alone, so two global embeddings get their own MLP tokenizers."""
  import types
  from fourm_jax import generate
  from tokenizers_jax import tokenize as tok_lib

  class FakeTokenizer:
    def __init__(self, workdir):
      self.workdir = workdir
      self.modality = "global" if "global" in workdir else "depth"
  monkeypatch.setattr(tok_lib, "Tokenizer", FakeTokenizer)
  rows = modalities.get("tok_depth@224,tok_dinov2_global,tok_imagebind_global")
  model = types.SimpleNamespace(inputs=rows, targets=rows)
  toks = generate.load_tokenizers(["w/tok_depth", "tok_dinov2_global=w/global_a",
                                   "imagebind_global=w/global_b"], model)
  assert set(toks) == {"depth", "tok_dinov2_global", "tok_imagebind_global"}
  assert generate.tokenizer_for("tok_depth@224", toks).workdir == "w/tok_depth"
  assert generate.tokenizer_for("tok_dinov2_global", toks).workdir == "w/global_a"
  assert generate.tokenizer_for("tok_imagebind_global", toks).workdir == "w/global_b"
  assert generate.tokenizer_for("tok_rgb@224", toks) is None
  one = generate.load_tokenizers(["w/global_c"], model)      # by kind: both globals
  assert generate.tokenizer_for("tok_imagebind_global", one).workdir == "w/global_c"
  with pytest.raises(ValueError, match="no modality of the model matches 'clip'"):
    generate.load_tokenizers(["clip=w/tok_clip"], model)


def test_inputs_given_nothing_are_left_out_without_changing_the_logits():
  """Sampler._unused drops inputs no pass is given (and no model target) from the batch, so
  their tokens are never embedded; the logits must equal those of the full batch, where the
  same tokens were embedded, hidden and dropped by the encoder."""
  lo = modalities.Modality("tok_rgb@32", "image", vocab_size=64, grid=(4, 4))
  hi = modalities.Modality("tok_rgb@64", "image", vocab_size=64, grid=(8, 8))
  model = model_lib.FourM((lo, hi), (hi,), dim=32, encoder_depth=1, decoder_depth=1, num_heads=4)
  s = sampler_lib.Sampler(model, None)
  state = s.init_state(2, {hi.name: {"tensor": np.zeros((2, 64), np.int32),
                                     "input_mask": np.arange(64)[None].repeat(2, 0) >= 20}})
  s.params = jax.jit(lambda r: model.init(r, s._batch(state, hi.name, ()), s.max_encoder_tokens,
                                          64))(jax.random.key(0))["params"]
  assert s._unused(hi.name, [((), ())]) == (lo.name,)
  assert s._unused(hi.name, [((lo.name,), ())]) == ()
  pruned = s.slot_logits(s.params, state, hi.name, ((),), num_encoder_tokens=20)[0]
  s._unused = lambda *a: ()
  full = s.slot_logits(s.params, state, hi.name, ((),), num_encoder_tokens=20)[0]
  np.testing.assert_allclose(np.asarray(pruned), np.asarray(full), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="none of the input modalities"):
    model.apply({"params": s.params}, {}, method=model.embed_inputs)
