"""The student learning-rate calibration end to end on the tiny model, its KL measure and its rule."""

import json
import math

import numpy as np
import pytest

from configs import student_calibration as calibration_config
from subliminal_jax.experiments import student_calibration as calibration


@pytest.fixture(scope="module")
def tiny_calibration(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("calibration")
  config = calibration_config.get_config("tiny")
  result = calibration.run(config, str(workdir))
  return config, workdir, result


def test_tiny_calibration_end_to_end(tiny_calibration):
  config, workdir, result = tiny_calibration
  report_dir = workdir / config.report_dir
  on_disk = json.loads((report_dir / "calibration.json").read_text())
  assert on_disk["chosen"] == result["chosen"]
  assert (report_dir / calibration.PLOT).stat().st_size > 0
  assert "# Student learning-rate calibration" in (report_dir / "report.md").read_text()
  other = config.calibration.student_model
  rates = list(config.calibration.learning_rates)
  seeds = list(config.student.seeds)
  assert [(r["learning_rate"], r["seed"]) for r in result["students"][other]] == [
      (lr, seed) for lr in rates for seed in seeds]
  assert [r["learning_rate"] for r in result["students"]["same"]] == [config.student.learning_rate] * len(seeds)
  # Each learning rate trained its own student (the LR is in the student stage's fingerprint).
  assert len({r["student"] for r in result["students"][other]}) == len(rates) * len(seeds)


def test_the_kl_is_zero_for_the_base_and_positive_after_training(tiny_calibration):
  _, _, result = tiny_calibration
  assert result["base_kl"] == {"same": 0.0, "tiny-random:1": 0.0}
  for records in result["students"].values():
    for r in records:
      assert r["kl_per_token"] > 0 and r["target_tokens"] > 0
      assert r["kl_per_sequence"] == pytest.approx(r["kl_per_token"] * r["target_tokens"]
                                                   / r["sequences"], rel=1e-9)
  # A larger learning rate moves the tiny students further.
  kls = result["grid_kl"]
  assert kls == sorted(kls)


def test_the_chosen_learning_rate_follows_the_rule_on_the_measured_kls(tiny_calibration):
  config, _, result = tiny_calibration
  other = config.calibration.student_model
  rates = list(config.calibration.learning_rates)
  reference = math.exp(np.mean([math.log(r["kl_per_token"]) for r in result["students"]["same"]]))
  assert result["reference_kl"] == pytest.approx(reference, rel=1e-12)
  grid = [math.exp(np.mean([math.log(r["kl_per_token"]) for r in result["students"][other]
                            if r["learning_rate"] == lr])) for lr in rates]
  assert result["grid_kl"] == pytest.approx(grid, rel=1e-12)
  chosen = result["chosen"]
  pairs = [i for i in range(len(rates) - 1)
           if min(grid[i], grid[i + 1]) <= reference <= max(grid[i], grid[i + 1])]
  nearest = rates[int(np.argmin([abs(math.log(k / reference)) for k in grid]))]
  assert chosen["nearest_grid_learning_rate"] == nearest
  if pairs:
    i = pairs[0]
    t = math.log(reference / grid[i]) / math.log(grid[i + 1] / grid[i])
    expected = math.exp(math.log(rates[i]) + t * math.log(rates[i + 1] / rates[i]))
    assert chosen["bracketed"] and chosen["learning_rate"] == pytest.approx(expected, rel=1e-9)
  else:
    assert not chosen["bracketed"] and chosen["learning_rate"] == nearest


def test_rerun_builds_nothing(tiny_calibration):
  config, workdir, result = tiny_calibration
  done = {p: p.stat().st_mtime for p in workdir.glob("*/*/DONE.json")}
  again = calibration.run(config, str(workdir))
  assert again["chosen"] == result["chosen"]
  assert {p: p.stat().st_mtime for p in workdir.glob("*/*/DONE.json")} == done


def test_choose_learning_rate_interpolates_in_log_between_bracketing_points():
  # KL 1e-3 at lr 1e-4 and 1e-1 at lr 1e-2: KL 1e-2 lies halfway in log, so lr 1e-3.
  chosen = calibration.choose_learning_rate([1e-4, 1e-2, 1e-1], [1e-3, 1e-1, 1.0], 1e-2)
  assert chosen["bracketed"] and chosen["between"] == [1e-4, 1e-2]
  assert chosen["learning_rate"] == pytest.approx(1e-3, rel=1e-12)
  exact = calibration.choose_learning_rate([1e-4, 1e-3], [0.01, 0.03], 0.03)
  assert exact["learning_rate"] == pytest.approx(1e-3, rel=1e-12)


def test_choose_learning_rate_outside_the_grid_takes_the_nearest_in_log():
  chosen = calibration.choose_learning_rate([1e-4, 1e-3, 1e-2], [0.1, 0.2, 0.4], 0.01)
  assert chosen == {"learning_rate": 1e-4, "bracketed": False, "between": None,
                    "nearest_grid_learning_rate": 1e-4}
  assert calibration.choose_learning_rate([1e-4, 1e-3], [0.1, 0.2], 5.0)["learning_rate"] == 1e-3


@pytest.mark.parametrize("key,value,message", [
    ("learning_rates", (1e-3, 1e-4), "increasing"),
    ("learning_rates", (1e-3,), "at least two"),
    ("train_prompts_seed", calibration_config.MEASURE_PROMPTS_SEED, "did not train on"),
])
def test_bad_calibration_settings_are_refused(key, value, message):
  config = calibration_config.get_config("tiny")
  config.calibration[key] = value
  with pytest.raises(ValueError, match=message):
    calibration.CalibrationSettings.from_config(config)


def test_the_cross_family_noise_numbers_regenerate_from_the_committed_results():
  """docs/results/cross_family_noise/numbers.json is what its analyse.py computes from the
  committed matrix results (the tokenization part, which needs the model packages, aside)."""
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).parent.parent / "docs/results/cross_family_noise/analyse.py"
  spec = importlib.util.spec_from_file_location("cross_family_noise_analyse", path)
  analyse = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(analyse)
  committed = json.loads((path.parent / "numbers.json").read_text())
  computed = json.loads(json.dumps(analyse.compute(with_tokenizers=False)))
  assert computed == {k: v for k, v in committed.items() if k != "tokenization"}
  # The headline: Gemma's students moved further from their base, and their spread with it.
  same, gemma = computed["families"]["same"], computed["families"]["gemma3-270m"]
  assert gemma["moved_mean_abs"] > 3 * same["moved_mean_abs"]
