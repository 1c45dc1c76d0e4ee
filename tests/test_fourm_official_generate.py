"""4M generation's passes as ml-4m's GenerationSampler builds them (fourm/models/generate.py).

Each test builds the model inputs the official algorithm would give, by hand, from its steps
(init_empty_target_modality, empty_seq_modality, empty_seq_emb_modality,
guided_maskgit_step_batched, generate_multi_guided), runs the plain model on them and checks
that `Sampler.generate` decodes the argmax of the logits so mixed (temperature 0, one step
decoding every position). Nothing is compared to the sampler's own output.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fourm_jax import model as model_lib
from fourm_jax import modalities, sampler as sampler_lib, schedules
from fourm_jax.masking import SENTINEL_BASE
from tokenizers_jax.text import EOS_ID

RGB, DEPTH, CAP, T5 = "tok_rgb@32", "tok_depth@32", "caption", "t5_caption"
S_1 = SENTINEL_BASE + 1
REG = {RGB: modalities.Modality(RGB, "image", vocab_size=64, grid=(4, 4)),
       DEPTH: modalities.Modality(DEPTH, "image", vocab_size=64, grid=(4, 4)),
       CAP: modalities.Modality(CAP, "seq", vocab_size=300, length=12),
       T5: modalities.Modality(T5, "seq_emb", length=4, emb_dim=8, target=False)}
B = 2


@pytest.fixture(scope="module")
def sampler():
  inputs = modalities.get([RGB, DEPTH, CAP, T5], REG)
  targets = modalities.get([RGB, DEPTH, CAP], REG)
  model = model_lib.FourM(inputs, targets, dim=32, encoder_depth=1, decoder_depth=1,
                          num_heads=4)
  s = sampler_lib.Sampler(model, None)
  batch = _batch(s, DEPTH, {})
  s.params = jax.jit(lambda r: model.init(r, batch, s.max_encoder_tokens, 16))(
      jax.random.key(0))["params"]
  return s


def _batch(s, target, inputs):
  """Every modality hidden but `inputs` ({name: (tensor, input_mask)}); the image-like
  `target` decoded at all of its positions, attending to each other (one MaskGIT pass)."""
  empty = s.init_state(B, {})
  batch = {}
  for name, d in empty.items():
    n = d["input_mask"].shape[1]
    tensor, mask = inputs.get(name, (np.asarray(d["tensor"]), np.ones((B, n), bool)))
    att = np.zeros((B, n), np.int32)
    if name == target:
      att[:, 0] = n
    batch[name] = {"tensor": jnp.asarray(tensor), "input_mask": jnp.asarray(mask),
                   "target_mask": jnp.full((B, n), name != target),
                   "decoder_attention_mask": jnp.asarray(att)}
  return batch


def _logits(s, batch, target):
  """The plain model's logits [B, 16, V] of every position of `target`."""
  if not hasattr(s, "_plain"):
    def plain(params, batch, target):
      y, _, _, _ = s.model.apply({"params": params}, batch, s.max_encoder_tokens, 16)
      return s.model.apply({"params": params}, y, target, method=s.model.logits)
    s._plain = jax.jit(plain, static_argnums=2)
  return np.asarray(s._plain(s.params, batch, target))


def _given(rng):
  rgb = rng.integers(0, 64, (B, 16))
  cap = np.zeros((B, 26), np.int32)
  cap[:, :4] = [[20, 31, 42, EOS_ID], [50, 61, 72, EOS_ID]]
  cap_mask = cap == 0                       # init_full_input_modality: given up to its EOS
  t5 = np.zeros((B, 4, 8), np.float32)
  t5[:, :3] = rng.normal(size=(B, 3, 8))
  t5_mask = np.arange(4)[None].repeat(B, 0) >= 3
  return rgb, (cap, cap_mask), (t5, t5_mask)


def _first_only(n):
  return np.broadcast_to(np.arange(n) != 0, (B, n)).copy()


def test_classifier_free_guidance_empties_conditions_as_official(sampler):
  """Official guided_maskgit_step_batched with cfg_cond_domains = {rgb, caption, t5}:
  conditional pass: all three given; unconditional pass: rgb emptied (empty_img_modality:
  nothing given), the caption emptied to [S_1] alone at its first slot (empty_seq_modality),
  the T5 embeddings to one zero vector at their first slot (empty_seq_emb_modality); logits
  uncond + 3 (cond - uncond); greedy decoding of all 16 positions takes their argmax."""
  rgb, (cap, cap_mask), (t5, t5_mask) = _given(np.random.default_rng(0))
  state = sampler.init_state(B, {RGB: {"tensor": rgb}, CAP: {"tensor": cap[:, :4]},
                                 T5: {"tensor": t5[:, :3]}})
  out = sampler.generate(state, [schedules.Step(DEPTH, "maskgit", 16, 0.0, guidance=3.0)],
                         jax.random.key(0))
  cond = _logits(sampler, _batch(sampler, DEPTH, {
      RGB: (rgb, np.zeros((B, 16), bool)), CAP: (cap, cap_mask), T5: (t5, t5_mask)}), DEPTH)
  s1 = np.zeros((B, 26), np.int32)
  s1[:, 0] = S_1
  uncond = _logits(sampler, _batch(sampler, DEPTH, {
      CAP: (s1, _first_only(26)), T5: (np.zeros_like(t5), _first_only(4))}), DEPTH)
  want = np.argmax(uncond + 3.0 * (cond - uncond), -1)
  np.testing.assert_array_equal(out[DEPTH]["tensor"], want)
  # the emptied sequences matter: with nothing at all given the unconditional logits differ
  bare = _logits(sampler, _batch(sampler, DEPTH, {}), DEPTH)
  assert not np.allclose(bare, uncond, atol=1e-4)


def test_a_sequence_still_to_generate_gives_the_encoder_its_s1(sampler):
  """Official run_generation initialises every target with init_empty_target_modality
  before generating: the caption, decoded after the depth here, is then [S_1] given at its
  first slot while the depth is decoded (unguided: one pass with rgb given)."""
  rgb, _, _ = _given(np.random.default_rng(1))
  state = sampler.init_state(B, {RGB: {"tensor": rgb}})
  plan = [schedules.Step(DEPTH, "maskgit", 16, 0.0),
          schedules.Step(CAP, "autoregressive", 12, 0.0)]
  out = sampler.generate(state, plan, jax.random.key(0))
  s1 = np.zeros((B, 26), np.int32)
  s1[:, 0] = S_1
  logits = _logits(sampler, _batch(sampler, DEPTH, {
      RGB: (rgb, np.zeros((B, 16), bool)), CAP: (s1, _first_only(26))}), DEPTH)
  np.testing.assert_array_equal(out[DEPTH]["tensor"], np.argmax(logits, -1))
  without = _logits(sampler, _batch(sampler, DEPTH, {RGB: (rgb, np.zeros((B, 16), bool))}),
                    DEPTH)
  assert not np.allclose(without, logits, atol=1e-4)
  assert not bool(out[CAP]["input_mask"][:, 0].any())     # and the caption got decoded


def test_chained_multimodal_guidance_adds_each_finished_target_as_a_condition(sampler):
  """Official generate_multi_guided, uncond_dict = the targets, cond_dicts = [{caption}],
  weights [2] for the rgb target then [2, 1.5] for the depth: rgb: uncond = nothing given,
  cond_0 = caption; logits u + 2 (c0 - u). depth, after rgb finished: rgb leaves the
  unconditional inputs and becomes condition 1 of its own (given whole); cond_0 = caption
  only; logits u + 2 (c0 - u) + 1.5 (c1 - u)."""
  _, (cap, cap_mask), _ = _given(np.random.default_rng(2))
  state = sampler.init_state(B, {CAP: {"tensor": cap[:, :4]}})
  plan = [schedules.Step(RGB, "maskgit", 16, 0.0), schedules.Step(DEPTH, "maskgit", 16, 0.0)]
  out = sampler.generate(state, plan, jax.random.key(0), conditions=[(CAP,)],
                         weights=[2.0, 1.5])
  c0 = _logits(sampler, _batch(sampler, RGB, {CAP: (cap, cap_mask)}), RGB)
  u = _logits(sampler, _batch(sampler, RGB, {}), RGB)
  rgb = np.argmax(u + 2.0 * (c0 - u), -1)
  np.testing.assert_array_equal(out[RGB]["tensor"], rgb)
  c0 = _logits(sampler, _batch(sampler, DEPTH, {CAP: (cap, cap_mask)}), DEPTH)
  c1 = _logits(sampler, _batch(sampler, DEPTH, {RGB: (rgb, np.zeros((B, 16), bool))}), DEPTH)
  u = _logits(sampler, _batch(sampler, DEPTH, {}), DEPTH)
  want = np.argmax(u + 2.0 * (c0 - u) + 1.5 * (c1 - u), -1)
  np.testing.assert_array_equal(out[DEPTH]["tensor"], want)
  with pytest.raises(ValueError, match="one weight per condition"):
    sampler.generate(state, plan, jax.random.key(0), conditions=[(CAP,)],
                     weights=[2.0, 1.5, 1.0])


def test_guidance_keeps_a_caption_to_in_paint_later_in_both_passes(sampler):
  """Official: a caption given in part (w [S_1] w [S_2], custom_text without EOS) and
  scheduled after the depth is a target, not one of the depth step's cfg_cond_domains (the
  conditions, here rgb): guided_maskgit_step_batched empties only those, so both passes see
  the caption's given tokens; the unconditional pass has rgb emptied and the caption as is."""
  rgb, _, _ = _given(np.random.default_rng(3))
  part = np.array([[220, S_1, 242, S_1 + 1], [250, S_1, 272, S_1 + 1]], np.int32)
  state = sampler.init_state(B, {RGB: {"tensor": rgb}, CAP: {"tensor": part}})
  plan = [schedules.Step(DEPTH, "maskgit", 16, 0.0, guidance=3.0),
          schedules.Step(CAP, "autoregressive", 12, 0.0)]
  out = sampler.generate(state, plan, jax.random.key(0))
  cap = np.zeros((B, 26), np.int32)
  cap[:, :4] = part
  cap_mask = np.arange(26)[None].repeat(B, 0) >= 4
  cond = _logits(sampler, _batch(sampler, DEPTH, {
      RGB: (rgb, np.zeros((B, 16), bool)), CAP: (cap, cap_mask)}), DEPTH)
  uncond = _logits(sampler, _batch(sampler, DEPTH, {CAP: (cap, cap_mask)}), DEPTH)
  np.testing.assert_array_equal(out[DEPTH]["tensor"],
                                np.argmax(uncond + 3.0 * (cond - uncond), -1))
  s1 = np.zeros((B, 26), np.int32)
  s1[:, 0] = S_1                              # what emptying the caption would have given
  emptied = _logits(sampler, _batch(sampler, DEPTH, {CAP: (s1, _first_only(26))}), DEPTH)
  assert not np.allclose(emptied, uncond, atol=1e-4)
  # multimodal weighted guidance (generate_multi_guided, cond_dicts = [{rgb}], uncond_dict =
  # the targets): the unconditional pass holds every target, so the caption as given; the
  # condition's pass holds rgb and the current target only
  # (weight -3: the mix 4 u - 3 c leans on the unconditional pass, where the caption acts)
  out = sampler.generate(state, plan, jax.random.key(0), conditions=[(RGB,)], weights=[-3.0])
  cond_rgb = _logits(sampler, _batch(sampler, DEPTH, {RGB: (rgb, np.zeros((B, 16), bool))}),
                     DEPTH)
  want = np.argmax(uncond - 3.0 * (cond_rgb - uncond), -1)
  np.testing.assert_array_equal(out[DEPTH]["tensor"], want)
  bare = _logits(sampler, _batch(sampler, DEPTH, {}), DEPTH)   # the caption hidden instead
  assert (np.argmax(bare - 3.0 * (cond_rgb - bare), -1) != want).any()
