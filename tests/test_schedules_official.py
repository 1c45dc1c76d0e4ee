"""Generation schedules rounded as the official ml-4m code rounds them.

Every expected value below is worked out by hand from the official algorithm
(fourm/utils/generation.py: cosine_schedule, linear_schedule, linear_temp_schedule;
fourm/models/generate.py: build_chained_generation_schedules), not taken from our output.
"""
import numpy as np
import pytest

from fourm_jax import schedules


def test_cosine_rounds_each_step_on_its_own_as_official():
  """Official cosine: c_i = (1 + cos(pi i / 8)) / 2 for i = 0..7 is
  1, .96194, .85355, .69134, .5, .30866, .14645, .03806; the first 7 steps decode
  round(196 (c_i - c_{i+1})) = round(7.46, 21.24, 31.79, 37.50(3), 37.50(3), 31.79, 21.24)
  = 7 21 32 38 38 32 21, the last 196 - 189 = 7. (Rounding the cumulative share instead
  gives 7 22 31 38 38 31 22 7.)"""
  np.testing.assert_array_equal(schedules.token_schedule("cosine", 8, 196),
                                [7, 21, 32, 38, 38, 32, 21, 7])
  # 4 steps over 16: c = 1, .85355, .5, .14645 -> round(2.34, 5.66, 5.66) = 2 6 6, last 2
  np.testing.assert_array_equal(schedules.token_schedule("cosine", 4, 16), [2, 6, 6, 2])
  # one step decodes everything: no rounded steps, the last is the whole
  np.testing.assert_array_equal(schedules.token_schedule("cosine", 1, 16), [16])


def test_cosine_overshoot_is_taken_off_the_last_steps():
  """8 steps over 16: the official rounding gives round(.61, 1.73, 2.60, 3.06, 3.06, 2.60,
  1.73) = 1 2 3 3 3 3 2 and a last step of 16 - 17 = -1, which the official sampler cannot
  run; the one token too many comes off the last non-empty step: 1 2 3 3 3 3 1 0."""
  np.testing.assert_array_equal(schedules.token_schedule("cosine", 8, 16),
                                [1, 2, 3, 3, 3, 3, 1, 0])


def test_linear_truncates_linspace_and_puts_the_larger_steps_first():
  """Official linear: linspace(0, 196, 9) = 0 24.5 49 73.5 98 122.5 147 171.5 196, truncated
  to 0 24 49 73 98 122 147 171 196; differences 24 25 24 25 24 25 24 25, sorted
  descending. 5 steps over 16: 0 3.2 6.4 9.6 12.8 16 -> 0 3 6 9 12 16 -> 4 3 3 3 3.
  30 steps over 16: differences of 0s and 1s, the zeros (trailing once sorted) dropped."""
  np.testing.assert_array_equal(schedules.token_schedule("linear", 8, 196),
                                [25, 25, 25, 25, 24, 24, 24, 24])
  np.testing.assert_array_equal(schedules.token_schedule("linear", 5, 16), [4, 3, 3, 3, 3])
  np.testing.assert_array_equal(schedules.token_schedule("linear", 30, 16), [1] * 16)


def test_chained_roar_takes_the_linear_schedule_and_drops_empty_steps():
  """build_chained_generation_schedules gives ROAR linear_schedule whatever token schedule
  is named, and MaskGIT the named one; a cosine split with more steps than it can fill
  (30 steps, 16 tokens: 0 0 0 0 0 0 1 .. 1 0 .. 0 officially) has zero-token steps, which
  decode nothing and are left out, the others keeping their official temperatures."""
  steps = schedules.chained(["a", "b"], [16, 16], ["roar", "maskgit"], [5, 30])
  assert [s.num_tokens for s in steps if s.target == "a"] == [4, 3, 3, 3, 3]
  assert [s.num_tokens for s in steps if s.target == "b"] == [1] * 16
  with pytest.raises(ValueError, match="linear"):
    schedules.chained(["a"], [16], ["roar"], [5], token_schedules=["cosine"])
  # linear temperature (official linear_temp_schedule): t, then t (16 - cumsum) / 16 of the
  # steps before: 2, 2 * 12/16, 2 * 9/16, 2 * 6/16, 2 * 3/16
  steps = schedules.chained(["a"], [16], ["roar"], [5], temperatures=[2.0],
                            temperature_schedules=["linear"])
  np.testing.assert_allclose([s.temperature for s in steps], [2.0, 1.5, 1.125, 0.75, 0.375])
