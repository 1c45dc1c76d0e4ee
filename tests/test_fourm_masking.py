"""4M masking (fourm_jax.masking): budgets, overlap, span masks, strategy mixture."""
import numpy as np
import pytest

from fourm_jax import masking, modalities

NAMES = ["rgb@224", "tok_rgb@224", "tok_depth@224", "caption", "metadata"]
MODS = modalities.get(NAMES)


def _sample(rng):
  cap = np.concatenate([rng.integers(4300, 20000, rng.integers(3, 40)), [3]])
  meta = np.concatenate([rng.integers(204, 4204, 2 * rng.integers(1, 10)), [3]])
  return {"rgb@224": rng.uniform(-1, 1, (224, 224, 3)).astype(np.float32),
          "tok_rgb@224": rng.integers(0, 16384, (14, 14)),
          "tok_depth@224": rng.integers(0, 8192, (14, 14)),
          "caption": np.pad(cap, (0, 64 - len(cap))), "metadata": meta}


def _masker(**kw):
  strategies = [masking.all_to_all(NAMES, 0.5, inputs_only=["rgb@224"], name="all2all"),
                masking.one_to_all("rgb@224", NAMES, 0.5, inputs_only=["rgb@224"], name="rgb2all")]
  return masking.UnifiedMasking(MODS, strategies, kw.get("inputs", 128), kw.get("targets", 128),
                                chunks={"metadata": 2})


def test_span_masks_decode_back_to_the_sequence():
  rng = np.random.default_rng(0)
  for trial in range(300):
    chunk = 2 if trial % 3 == 0 else 0
    n = 2 * rng.integers(0, 30) if chunk else rng.integers(0, 60)
    ids = np.concatenate([4300 + rng.permutation(20000)[:n], [3]])     # distinct, then EOS
    inputs, target = masking.span_mask(rng, ids, float(rng.random()), chunk)
    np.testing.assert_array_equal(masking.unmask(inputs, target), ids)
    if chunk:      # whole (type, value) pairs are dropped or kept together
      kept = np.isin(ids[:-1], inputs).reshape(-1, 2)
      assert (kept[:, 0] == kept[:, 1]).all()


def test_budgets_respected_and_no_overlap_over_many_seeds():
  m = _masker()
  for seed in range(200):
    rng = np.random.default_rng(seed)
    out = m(_sample(rng), rng)
    n_in = sum(int((~out[n]["input_mask"]).sum()) for n in NAMES)
    n_tgt = sum(int((~out[n]["target_mask"]).sum()) for n in NAMES)
    assert n_in <= 128 and n_tgt <= 128, (seed, n_in, n_tgt)
    for name in ("tok_rgb@224", "tok_depth@224", "rgb@224"):
      o = out[name]
      assert not np.any(~o["input_mask"] & ~o["target_mask"])     # never input and target
      if (~o["target_mask"]).any():
        assert o["decoder_attention_mask"].sum() == (~o["target_mask"]).sum()
    assert out["rgb@224"]["target_mask"].all()                     # input only
    for name in ("caption", "metadata"):
      o = out[name]
      assert o["tensor"].shape == (2 * (modalities.REGISTRY[name].length + 1),)
      tgt = o["tensor"][~o["target_mask"]]
      if len(tgt):
        assert masking.SENTINEL_BASE < tgt[0] < masking.SENTINEL_BASE + 200   # starts at a sentinel
        assert (o["decoder_attention_mask"][~o["target_mask"]] == 1).all()


def test_an_untruncated_sequence_mask_reconstructs_the_caption():
  # the whole budget goes to the caption, more than it can use: nothing is cut
  m = masking.UnifiedMasking(MODS, [masking.Strategy("cap", {"caption": 1}, {"caption": 1})],
                             300, 300)
  for seed in range(50):
    rng = np.random.default_rng(seed)
    s = _sample(rng)
    o = m(s, rng)["caption"]
    inputs, target = o["tensor"][~o["input_mask"]], o["tensor"][~o["target_mask"]]
    if len(target):
      np.testing.assert_array_equal(masking.unmask(inputs, target), s["caption"][s["caption"] > 0])


def test_strategies_are_sampled_in_their_proportions():
  strategies = [masking.all_to_all(NAMES, 1.0, ["rgb@224"], name="a"),
                masking.Strategy("b", {"tok_rgb@224": 1.0}, {"tok_depth@224": 1.0}, weight=3.0)]
  m = masking.UnifiedMasking(MODS, strategies, 64, 64)
  rng = np.random.default_rng(0)
  picks = np.array([m.budgets(rng)[0] for _ in range(4000)])
  assert abs(picks.mean() - 0.75) < 0.03
  # strategy b: everything goes to its one input and one target modality
  k, b_in, b_tgt = next(r for r in (m.budgets(rng) for _ in range(100)) if r[0] == 1)
  assert b_in.tolist() == [0, 64, 0, 0, 0] and b_tgt.tolist() == [0, 0, 64, 0, 0]


def test_rgb_to_all_gives_only_rgb_as_input():
  m = masking.UnifiedMasking(MODS, [masking.one_to_all("rgb@224", NAMES, 0.5, ["rgb@224"])],
                             128, 128)
  rng = np.random.default_rng(1)
  out = m(_sample(rng), rng)
  assert (~out["rgb@224"]["input_mask"]).sum() == 128
  assert all(out[n]["input_mask"].all() for n in NAMES[1:])


def test_bad_strategies_are_refused():
  with pytest.raises(ValueError, match="not being masked"):
    masking.UnifiedMasking(MODS, [masking.Strategy("x", {"tok_normal@224": 1}, {})], 8, 8)
  with pytest.raises(ValueError, match="cannot be a target"):
    masking.UnifiedMasking(MODS, [masking.Strategy("x", {}, {"rgb@224": 1})], 8, 8)


def test_masked_samples_feed_the_model():
  import jax
  import jax.numpy as jnp
  from fourm_jax import model as model_lib
  m = _masker(inputs=64, targets=64)
  rng = np.random.default_rng(3)
  samples = [m(_sample(rng), rng) for _ in range(3)]
  batch = {n: {k: jnp.asarray(np.stack([s[n][k] for s in samples])) for k in samples[0][n]}
           for n in NAMES}
  model = model_lib.FourM(MODS, MODS[1:], dim=32, encoder_depth=1, decoder_depth=1, num_heads=4)
  variables = model.init(jax.random.key(0), batch, 64, 64)
  loss, per_mod = model_lib.loss(model, variables, batch, 64, 64)
  assert np.isfinite(float(loss)) and set(per_mod) == set(NAMES[1:])
  # with random weights every modality's loss is near log(vocab)
  for name, value in per_mod.items():
    if float(value) > 0:
      assert abs(float(value) - np.log(modalities.REGISTRY[name].vocab_size)) < 1.5, name


def test_strategy_tables_follow_the_official_alphas_layout():
  s = masking.strategy("cap", NAMES, input_alpha=0.05, target_alpha=0.5,
                       inputs={"caption": 5.0, "t5_caption": 9.0}, targets={"caption": 0.0},
                       keep={"caption": "all"}, inputs_only=["rgb@224"])
  assert s.input_alphas == {"rgb@224": 0.05, "tok_rgb@224": 0.05, "tok_depth@224": 0.05,
                            "caption": 5.0, "metadata": 0.05}     # t5_caption: not here
  assert s.target_alphas["rgb@224"] == 0.0 and s.target_alphas["caption"] == 0.0
  assert s.target_alphas["metadata"] == 0.5 and s.keep == {"caption": "all"}
  with pytest.raises(ValueError, match="keep"):
    masking.strategy("x", NAMES, keep={"caption": "some"})
  with pytest.raises(ValueError, match="alphas must be >= 0"):
    masking.strategy("x", NAMES, inputs={"caption": -1.0})
  e = masking.empty(modalities.REGISTRY["caption"])
  assert e["tensor"].shape == (2 * 257,) and e["input_mask"].all() and e["target_mask"].all()


def test_repeated_sampling_reuses_each_record_with_fresh_masks():
  import grain
  from pretrain_jax.data import pipeline
  rng = np.random.default_rng(0)
  records = [_sample(rng) for _ in range(8)]
  reads = []

  class Source:
    def __len__(self):
      return len(records)

    def __getitem__(self, i):
      reads.append(i)
      return records[i]

  m = _masker(inputs=64, targets=64)

  class Mask(grain.transforms.RandomMap):
    def random_map(self, element, rng):
      return {"src": int(np.flatnonzero([element is r for r in records])[0]), **m(element, rng)}

  base = grain.MapDataset.source(Source()).shuffle(seed=1)
  ds = pipeline.repeated(base, 4, seed=2, window=4).random_map(Mask(), seed=3)
  epoch = [ds[i] for i in range(len(ds))]
  assert len(epoch) == 32
  assert sorted(np.bincount([e["src"] for e in epoch])) == [4] * 8    # each record 4 times
  assert len(reads) == 8                                               # and read once
  for r in range(8):
    copies = [e for e in epoch if e["src"] == r]
    masks = {b"".join(c[n][k].tobytes() for n in NAMES for k in ("input_mask", "target_mask"))
             for c in copies}
    assert len(masks) == 4                                             # with fresh masks
  # the copies are spread: no batch of 4 consecutive samples is one record 4 times
  assert all(len({e["src"] for e in epoch[i:i + 4]}) > 1 for i in range(0, 32, 4))
  with pytest.raises(ValueError, match="repeats must be a positive int"):
    pipeline.RepeatEach(base, 0)
