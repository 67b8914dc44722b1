"""The signature's paired contrasts, hierarchical bootstrap, verdict and power against hand
computations."""

import collections
import json

import numpy as np
import pytest

from subliminal_jax.evaluation import matrix_statistics as ms
from subliminal_jax.evaluation import signature_statistics as ss

# Two animals x two replicates, units (a0, r0), (a1, r0), (a0, r1), (a1, r1); two questions.
LABELS, REPLICATES = [0, 1, 0, 1], [0, 0, 1, 1]


def arm(s0: float, s1: float) -> np.ndarray:
  """[4 units, 2 animals, 2 questions] whose replicate r contributes s_r to S.

  With k = 2, replicate r's S is half of (D_r kept - D_r swapped) = s_r here: unit (a0, r) has
  2 s_r +- 0.1 on animal 0, unit (a1, r) +-0.05 on animal 1 (mean 0 over questions), the rest 0.
  The four assignments (keep/swap per replicate) give S = (s0 + s1)/2, (s0 - s1)/2,
  (-s0 + s1)/2, (-s0 - s1)/2 (keep-keep, keep-swap, swap-keep, swap-swap)."""
  m = np.zeros((4, 2, 2))
  for r, s in enumerate((s0, s1)):
    m[2 * r, 0] = [2 * s + 0.1, 2 * s - 0.1]
    m[2 * r + 1, 1] = [0.05, -0.05]
  return m


STUDENTS = arm(0.6, 0.05)  # S: 0.325, 0.275, -0.275, -0.325
DOSE_1 = arm(0.1, 0.1)  # S: 0.1, 0.0, 0.0, -0.1
DOSE_2 = arm(0.2, -0.1)  # S: 0.05, 0.15, -0.15, -0.05


def test_contrasts_and_exact_p_values_by_hand():
  arms = {"students": STUDENTS, "dose_1": DOSE_1, "dose_2": DOSE_2}
  out = ss.paired_contrasts(arms, LABELS, REPLICATES, {
      "a": ("students", [], "max"), "max": ("students", ["dose_1", "dose_2"], "max"),
      "each": ("students", ["dose_1", "dose_2"], "each"), "c": ("students", ["cross_family"])})
  assert out["permutations"]["exact"] and out["permutations"]["assignments"] == 4
  assert out["arms"]["dose_2"]["S"] == pytest.approx(0.05)
  c = out["contrasts"]
  # S(students): 0.325 is the largest of the four.
  assert c["a"]["value"] == pytest.approx(0.325) and c["a"]["p_value"] == pytest.approx(1 / 4)
  # Max inside each assignment: 0.325 - max(0.1, 0.05) = 0.225; 0.275 - max(0, 0.15) = 0.125;
  # -0.275 - max(0, -0.15) = -0.275; -0.325 - max(-0.1, -0.05) = -0.275: only the observed one.
  assert c["max"]["value"] == pytest.approx(0.225) and c["max"]["p_value"] == pytest.approx(1 / 4)
  # The dose that won on the observed labels kept fixed instead: S(students) - S(dose_1) is
  # 0.225, 0.275, -0.275, -0.225, so p = 2/4: choosing the dose inside the test changes p.
  assert c["max"]["per_arm"]["dose_1"] == pytest.approx({"value": 0.225, "p_value": 0.5})
  # S(students) - S(dose_2): 0.275, 0.125, -0.125, -0.275.
  assert c["max"]["per_arm"]["dose_2"] == pytest.approx({"value": 0.275, "p_value": 0.25})
  # Each dose on its own (intersection-union): the smallest difference, the largest p.
  assert c["each"]["value"] == pytest.approx(0.225) and c["each"]["p_value"] == pytest.approx(0.5)
  assert c["c"]["missing"] == ["cross_family"] and "value" not in c["c"]
  assert c["max"]["definition"].startswith("S(students) - max of S(dose_1, dose_2)")
  json.dumps(out)  # recorded in results as is


def test_every_arm_gets_the_same_shuffle():
  rng = np.random.default_rng(0)
  m = rng.normal(size=(12, 3, 4))
  labels, replicates = [0, 1, 2] * 4, [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
  arms = {"students": m, "copy": m + 0.5}  # the copy's S is the students' under every shuffle
  for max_exact in (10 ** 6, 10):  # enumerated, then sampled
    out = ss.paired_contrasts(arms, labels, replicates, {"a": ("students",),
                                                         "zero": ("students", ["copy"])},
                              max_exact=max_exact, samples=500, seed=3)
    assert out["permutations"]["exact"] == (max_exact > 6 ** 4)
    # Every assignment ties with the observed 0: p = 1 (independent shuffles would give < 1).
    assert out["contrasts"]["zero"]["value"] == pytest.approx(0, abs=1e-12)
    assert out["contrasts"]["zero"]["p_value"] == 1.0
    # One arm alone: matrix_statistics' test, the same sampled draws included.
    single = ms.permutation_test(m.mean(axis=2), labels, replicates, max_exact=max_exact,
                                 samples=500, seed=3)
    assert out["contrasts"]["a"]["p_value"] == single["p_value"]


def test_bootstrap_draws_recompute_the_contrast_on_resampled_replicates_and_questions():
  arms = {"students": STUDENTS, "dose_1": DOSE_1, "dose_2": DOSE_2}
  contrasts = {"max": ("students", ["dose_1", "dose_2"])}
  draws = ss.bootstrap_draws(arms, LABELS, REPLICATES, contrasts, n_resamples=5, seed=7)["max"]
  rng = np.random.default_rng(7)  # the documented calls, replayed
  reps, questions = rng.integers(2, size=(5, 2)), rng.integers(2, size=(5, 2))
  for value, rep, question in zip(draws, reps, questions):
    units = np.concatenate([np.flatnonzero(np.asarray(REPLICATES) == r) for r in rep])
    s = {name: ms.transfer_statistic(m[units][:, :, question].mean(axis=2),
                                     np.asarray(LABELS)[units])[0] for name, m in arms.items()}
    assert value == pytest.approx(s["students"] - max(s["dose_1"], s["dose_2"]))


def test_bootstrap_distribution_is_the_enumerated_one():
  # Students' per-replicate, per-question S: s_r +- 0.075 = [[0.675, 0.525], [0.125, -0.025]].
  # Drawing 2 of 2 replicates gives weights (1, 0), (1/2, 1/2), (0, 1) with chances 1/4, 1/2,
  # 1/4, and questions the same: nine values.
  expected = {0.675: 1 / 16, 0.6: 2 / 16, 0.525: 1 / 16, 0.4: 2 / 16, 0.325: 4 / 16,
              0.25: 2 / 16, 0.125: 1 / 16, 0.05: 2 / 16, -0.025: 1 / 16}
  draws = ss.bootstrap_draws({"students": STUDENTS}, LABELS, REPLICATES, {"a": ("students",)},
                             n_resamples=8000, seed=0)["a"]
  counts = collections.Counter(np.round(draws, 9).tolist())
  assert set(counts) == set(expected)
  for value, chance in expected.items():
    assert counts[value] / len(draws) == pytest.approx(chance, abs=0.015)
  ci = ss.hierarchical_bootstrap({"students": STUDENTS}, LABELS, REPLICATES,
                                 {"a": ("students",)}, n_resamples=8000, seed=0)
  assert ci["contrasts"]["a"] == pytest.approx({"low": -0.025, "high": 0.675})  # 1/16 > 2.5%
  assert ci["teacher_variance_included"] and "note" not in ci


def test_one_replicate_bootstrap_says_it_leaves_teachers_out():
  one = {"students": STUDENTS[:2]}
  ci = ss.hierarchical_bootstrap(one, LABELS[:2], REPLICATES[:2], {"a": ("students",)},
                                 n_resamples=200)
  assert not ci["teacher_variance_included"] and "question-to-question" in ci["note"]
  # Only questions vary: 0.675 or 0.525 each drawn, 0.6 in between.
  assert ci["contrasts"]["a"] == pytest.approx({"low": 0.525, "high": 0.675})


def _results(values: dict, min_p: float = 1e-5) -> dict:
  return {"contrasts": {name: ({"value": v[0], "p_value": v[1]} if v else {"missing": ["x"]})
                        for name, v in values.items()},
          "permutations": {"min_attainable_p": min_p}}


def test_verdict_pass_fail_and_undetermined():
  passing = _results({"students": (0.02, 0.001), "students_minus_in_context": (0.01, 0.02),
                      "students_minus_cross_family": (0.015, 0.03)})
  v = ss.verdict(passing)
  assert v["verdict"] == "PASS" and v["passed"]
  assert v["reason"].startswith(
      "subliminal signature PASS: students = 0.02 > 0 with p = 0.001 < 0.01")
  # (b) at p 0.27: the data decide, even with (c) not measured.
  failing = _results({"students": (0.02, 0.001), "students_minus_in_context": (0.006, 0.27),
                      "students_minus_cross_family": None})
  v = ss.verdict(failing)
  assert v["verdict"] == "FAIL" and not v["passed"]
  assert ("students_minus_in_context = 0.006 > 0 but p = 0.27 is not < 0.05" in v["reason"])
  assert v["conditions"]["students_minus_cross_family"]["status"] == "undetermined"
  v = ss.verdict(_results({"students": (-0.01, 0.6), "students_minus_in_context": (0.01, 0.02),
                           "students_minus_cross_family": (0.01, 0.02)}))
  assert v["verdict"] == "FAIL" and "students = -0.01 is not > 0" in v["reason"]
  v = ss.verdict(_results({"students": (0.02, 0.001), "students_minus_in_context": (0.01, 0.02),
                           "students_minus_cross_family": None}))
  assert v["verdict"] == "UNDETERMINED"
  assert v["reason"] == ("subliminal signature UNDETERMINED: students_minus_cross_family cannot be "
                         "computed: arm(s) x missing")
  # Two replicates of two animals: p >= 1/4 whatever is measured, so alpha 0.01 is out of reach.
  v = ss.verdict(_results({"students": (0.3, 0.25)}, min_p=0.25), {"students": 0.01})
  assert v["verdict"] == "UNDETERMINED" and "smallest attainable p (0.25)" in v["reason"]
  # A failed condition decides, whatever else is undetermined.
  v = ss.verdict(_results({"students": (0.3, 0.25)}), {"students": 0.01, "other": 0.05})
  assert v["verdict"] == "FAIL" and v["conditions"]["other"]["reason"] == "other was not computed"


def _matrix_results(x: np.ndarray, extra_words: int = 3) -> dict:
  """A transfer matrix's results.json whose students' clr of the animals, averaged over two
  questions, is ``x`` [R, seeds, k, k] up to a per-student shift (which centring removes)."""
  r, n, k, _ = x.shape
  animals = [f"animal{i}" for i in range(k)]
  panel = animals + [f"word{i}" for i in range(extra_words)]
  units = []
  for rep in range(r):
    for a in range(k):
      records = []
      for s in range(n):
        row = np.concatenate([x[rep, s, a], np.zeros(extra_words)]) - 5.0
        records.append({"panel": panel, "logprob": np.stack([row + 0.1, row - 0.1]).tolist()})
      units.append({"unit": {"animal": animals[a], "replicate": rep},
                    "students": {"same": records}})
  units.append({"unit": {"animal": None, "replicate": 0}, "students": {"same": records}})
  return {"design": {"animals": animals, "student_seeds": list(range(n))},
          "measured": {"units": units}}


def test_variance_components_recover_a_known_configuration(tmp_path):
  rng = np.random.default_rng(0)
  r, n, k, teacher_sd, seed_sd = 40, 3, 5, 0.02, 0.01
  x = (0.03 * np.eye(k) + rng.normal(scale=teacher_sd, size=(r, 1, k, k))
       + rng.normal(scale=seed_sd, size=(r, n, k, k))
       + rng.normal(scale=0.5, size=(r, n, k, 1)) + rng.normal(scale=0.5, size=(1, 1, 1, k)))
  path = tmp_path / "results.json"
  path.write_text(json.dumps(_matrix_results(x)))
  report = ss.power_from_results(path, replicates=6, seeds=2, alpha=0.01, simulations=400)
  components = report["components"]
  assert components["teacher_sd"] == pytest.approx(teacher_sd, rel=0.15)
  assert components["seed_sd"] == pytest.approx(seed_sd, rel=0.1)
  assert components["C"] == pytest.approx([0.03] * k, abs=0.01)
  assert not components["clipped"]["teacher_var"]
  assert components["teacher_var_upper"] > components["teacher_var"]
  json.dumps(report)
  # Every replicate alike: the moment estimate is -seed_var / seeds, clipped at 0, and said so.
  flat = ss.variance_components(np.repeat(rng.normal(scale=seed_sd, size=(1, 2, k, k)), 3, axis=0))
  assert flat["teacher_var_unclipped"] == pytest.approx(-flat["seed_var"] / 2)
  assert flat["teacher_var"] == 0 and flat["clipped"]["teacher_var"]


def test_minimum_detectable_s_falls_with_replicates_and_matches_the_permutation_test():
  components = {"teacher_var": 0.01 ** 2, "seed_var": 0.02 ** 2}
  mde = {r: ss.minimum_detectable_s(components, replicates=r, simulations=1000)
         for r in (3, 6, 12)}
  assert mde[3]["simulated"] > mde[6]["simulated"] > mde[12]["simulated"]
  for result in mde.values():
    assert result["simulated"] == pytest.approx(result["normal_approximation"], rel=0.15)
  again = ss.minimum_detectable_s(components, replicates=6, simulations=1000, seed=1)
  assert again["simulated"] == pytest.approx(mde[6]["simulated"], rel=0.1)
  # The test itself at that effect: S > 0 and p < 0.01 in about 80% of fresh matrices.
  rng = np.random.default_rng(5)
  delta, sd = mde[6]["simulated"], mde[6]["unit_entry_sd"]
  labels, replicates = list(range(5)) * 6, np.repeat(np.arange(6), 5)
  detected = []
  for _ in range(300):
    m = delta * np.tile(np.eye(5), (6, 1)) + rng.normal(scale=sd, size=(30, 5))
    out = ss.paired_contrasts({"students": m[:, :, None]}, labels, replicates,
                              {"a": ("students",)}, samples=999, seed=int(rng.integers(1 << 30)))
    detected.append(out["contrasts"]["a"]["value"] > 0 and out["contrasts"]["a"]["p_value"] < 0.01)
  assert np.mean(detected) == pytest.approx(0.8, abs=0.08)
  # Two animals in one replicate: two assignments, p >= 1/2, nothing is detectable.
  assert ss.minimum_detectable_s(components, replicates=1, animals=2)["simulated"] == np.inf
