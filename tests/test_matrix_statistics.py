"""The transfer matrix's statistic and permutation test against hand computations."""

import itertools

import numpy as np
import pytest

from subliminal_jax.evaluation import matrix_statistics as ms

# Units x animals, already averaged over questions; unit u of the first test is labelled u.
M3 = np.array([[2.0, 0.0, 1.0],
               [0.5, 1.5, 0.0],
               [1.0, 0.5, 3.0]])


def test_statistic_and_exact_p_value_by_hand_three_animals_one_replicate():
  s, c = ms.transfer_statistic(M3, [0, 1, 2])
  # C_0 = 2 - (0.5 + 1) / 2, C_1 = 1.5 - (0 + 0.5) / 2, C_2 = 3 - (1 + 0) / 2.
  np.testing.assert_allclose(c, [1.25, 1.25, 2.5])
  assert s == pytest.approx(5 / 3)
  # The six label orders give D = 6.5 (observed), 2.5, 3.5, 1.0, 2.0, 3.5: one is >= 6.5.
  test = ms.permutation_test(M3, [0, 1, 2], [0, 0, 0])
  assert test["exact"] and test["assignments"] == 6
  assert test["p_value"] == pytest.approx(1 / 6) and test["min_attainable_p"] == pytest.approx(1 / 6)
  # Units 0 and 1 labelled the other way round: D = 0 + 0.5 + 3 = 3.5, tied with one other
  # order and beaten by one: p = 3/6 (ties count as at least as large).
  s_swapped, _ = ms.transfer_statistic(M3, [1, 0, 2])
  assert s_swapped == pytest.approx((3 * 3.5 - M3.sum()) / 6)
  assert ms.permutation_test(M3, [1, 0, 2], [0, 0, 0])["p_value"] == pytest.approx(0.5)


def test_labels_are_permuted_within_replicates_only():
  # Two animals x two replicates: units (a0, r0), (a1, r0), (a0, r1), (a1, r1).
  m = np.array([[1.0, 0.0], [0.0, 0.2], [0.3, 0.1], [0.5, 0.4]])
  labels, replicates = [0, 1, 0, 1], [0, 0, 1, 1]
  s, c = ms.transfer_statistic(m, labels)
  np.testing.assert_allclose(c, [(1.0 + 0.3) / 2 - (0.0 + 0.5) / 2, (0.2 + 0.4) / 2 - (0.0 + 0.1) / 2])
  assert s == pytest.approx(0.325)
  # Per replicate, identity or swap: D in {1.2, 0.0} + {0.7, 0.6}; observed 1.9 is the largest of
  # the 4 (not of the 6 ways to split 4 units into two pairs, which would mix replicates).
  test = ms.permutation_test(m, labels, replicates)
  assert test["assignments"] == 4 and test["p_value"] == pytest.approx(0.25)
  with pytest.raises(ValueError, match="replicate 1 has labels \\[0, 0\\]"):
    ms.permutation_test(m, [0, 1, 0, 0], replicates)


def test_sampled_assignments_estimate_the_exact_p_value():
  rng = np.random.default_rng(3)
  m = rng.normal(size=(8, 4))
  labels, replicates = [0, 1, 2, 3, 1, 0, 3, 2], [0, 0, 0, 0, 1, 1, 1, 1]
  exact = ms.permutation_test(m, labels, replicates)
  assert exact["exact"] and exact["assignments"] == 24 ** 2
  sampled = ms.permutation_test(m, labels, replicates, max_exact=10, samples=40_000, seed=1)
  assert not sampled["exact"] and sampled["assignments"] == 40_000
  assert abs(sampled["p_value"] - exact["p_value"]) < 0.01
  # The observed assignment counts among the draws: p is never 0.
  assert sampled["min_attainable_p"] == pytest.approx(1 / 40_001)


def test_p_value_equals_brute_force_over_label_assignments():
  """S itself (not its shortcut through D) over every within-replicate assignment."""
  rng = np.random.default_rng(0)
  m = rng.normal(size=(6, 3))
  labels, replicates = [2, 0, 1, 0, 1, 2], [0, 0, 0, 1, 1, 1]
  observed, _ = ms.transfer_statistic(m, labels)
  values = []
  for first in itertools.permutations(range(3)):
    for second in itertools.permutations(range(3)):
      values.append(ms.transfer_statistic(m, list(first) + list(second))[0])
  expected = np.mean(np.asarray(values) >= observed - 1e-12)
  assert ms.permutation_test(m, labels, replicates)["p_value"] == pytest.approx(expected)


def test_centred_log_ratio_and_unit_means():
  np.testing.assert_allclose(ms.centred_log_ratio([[-1.0, -2.0, -3.0]]), [[1.0, 0.0, -1.0]])
  panel = ("owl", "cat", "dog")
  # Unit 0 has two students, unit 1 one; 2 questions each.
  records = [[np.array([[-1.0, -2.0, -3.0], [-2.0, -2.0, -2.0]]),
              np.array([[-3.0, -2.0, -1.0], [-1.0, -1.0, -4.0]])],
             [np.array([[-5.0, -1.0, -3.0], [0.0, -3.0, -3.0]])]]
  m = ms.unit_means(records, panel, ("dog", "owl"))
  assert m.shape == (2, 2, 2)  # [units, animals (dog, owl), questions]
  # Unit 0, owl: question 0 clr 1 and -1 -> 0; question 1: 0 and 1 -> 0.5.
  np.testing.assert_allclose(m[0, 1], [0.0, 0.5])
  np.testing.assert_allclose(m[1, 0], [0.0, -1.0])
  with pytest.raises(ValueError, match=r"animals \['lion'\] are not in the panel"):
    ms.unit_means(records, panel, ("lion",))
  with pytest.raises(ValueError, match="finite"):
    ms.centred_log_ratio([[0.0, -np.inf]])


def test_analyse_reports_the_statistic_references_and_the_verdict():
  q = 5
  rng = np.random.default_rng(1)
  noise = rng.normal(scale=0.01, size=(6, 3, q))
  m = np.concatenate([M3, M3])[:, :, None] + noise  # two replicates of M3's pattern
  labels, replicates = [0, 1, 2, 0, 1, 2], [0, 0, 0, 1, 1, 1]
  reference = np.zeros((3, q))
  a = ms.analyse(m, labels, replicates, ("owl", "cat", "dog"),
                 criterion={"alpha": 0.05, "min_positive_fraction": 0.6},
                 references={"base": reference}, n_resamples=200)
  s, c = ms.transfer_statistic(m.mean(axis=2), labels)
  assert a.statistic["S"] == pytest.approx(s) and a.statistic["low"] <= s <= a.statistic["high"]
  assert a.statistic["assignments"] == 36 and a.statistic["p_value"] == pytest.approx(1 / 36)
  assert a.verdict["passed"] and a.verdict["text"].startswith("PASS")
  owl = a.per_animal["owl"]
  assert owl["C"] == pytest.approx(c[0]) and set(owl["per_replicate"]) == {0, 1}
  assert owl["minus_base"]["mean"] == pytest.approx(m[[0, 3], 0].mean())
  np.testing.assert_allclose(a.matrix, M3 + noise.reshape(2, 3, 3, q).mean(axis=(0, 3)), atol=1e-12)
  # One replicate of three animals cannot reach p < 0.05 whatever it measures: said plainly.
  one = ms.analyse(m[:3], labels[:3], replicates[:3], ("owl", "cat", "dog"),
                   criterion={"alpha": 0.05, "min_positive_fraction": 0.6}, n_resamples=50)
  assert not one.verdict["passed"] and not one.verdict["can_pass"]
  assert "cannot reach p < 0.05" in one.verdict["text"]
