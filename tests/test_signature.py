"""The signature experiment on the tiny model: run in two parts on the tiny transfer matrix's
artifacts, analysed from the committed parts alone; nested in-context doses; a calibrated learning
rate for the other family only."""

import json
import pathlib
import shutil

import numpy as np
import pytest
import tiny_jobs

from configs import signature as signature_config
from subliminal_jax.experiments import signature, stages, transfer_matrix


def _config(**matrix):
  config = signature_config.get_config("tiny")
  config.matrix.student_models = (tiny_jobs.OTHER_FAMILY,)
  config.matrix.student_learning_rates = (3e-3,)
  config.signature.power.source = "test"
  for key, value in matrix.items():
    setattr(config.matrix, key, value)
  return config


@pytest.fixture(scope="module")
def two_parts(tmp_path_factory, tiny_matrix_job):
  """The two parts, built once per session (read only) into a copy of the tiny transfer matrix's
  workdir without its other-family students (those train at another learning rate here): the
  signature's replicate 0 is the matrix's one replicate, so its teachers, numbers, same-family
  students and their evaluations are reused, as in the real runs (configs/signature.py)."""
  def both_parts(workdir: pathlib.Path):
    tiny_jobs.copy_of(tiny_matrix_job[1], workdir, same_family_students_only=True)
    return (signature.run(_config(replicates_to_run=(0,)), str(workdir)),
            signature.run(_config(replicates_to_run=(1,)), str(workdir)))
  workdir, (first, second) = tiny_jobs.run_once(tmp_path_factory, "tiny_signature", both_parts)
  return workdir, first, second


def test_parts_merge_and_the_verdict_waits_for_every_replicate(two_parts, tmp_path):
  workdir, first, second = two_parts
  report_dir = workdir / "signature"
  assert sorted(p.name for p in (report_dir / "parts").iterdir()) == [
      "replicates_0.json", "replicates_1.json"]
  assert first["analysis"]["replicates_missing"] == [1]
  assert first["analysis"]["verdict"]["verdict"] == "UNDETERMINED"
  assert "not measured yet" in first["analysis"]["verdict"]["reason"]
  a = second["analysis"]
  assert a["replicates_missing"] == [] and a["replicates_measured"] == [0, 1]
  assert a["verdict"]["verdict"] in ("PASS", "FAIL", "UNDETERMINED") and a["verdict"]["reason"]
  assert set(a["contrasts"]) == {"students", "students_minus_in_context",
                                 "students_minus_cross_family"}
  # (b) takes the strongest dose inside every permutation and reports each dose's own contrast.
  assert set(a["contrasts"]["students_minus_in_context"]["per_arm"]) == {
      "in_context_2", "in_context_4", "in_context_max"}
  for c in a["contrasts"].values():
    assert c["low"] <= c["high"] and 0 < c["p_value"] <= 1
  # The analysis is a function of design.json and parts/ alone: copied without the workdir's
  # artifacts, it recomputes to the same results.json.
  copy = tmp_path / "committed_copy"
  shutil.copytree(report_dir, copy, ignore=shutil.ignore_patterns("results.json", "report.md"))
  again = signature.analyse_report_dir(copy)
  assert json.loads(json.dumps(again["analysis"])) == json.loads(json.dumps(a))
  assert [p["commit"] for p in second["parts"]] == [
      p["environment"]["git"]["sha"] for p in (json.loads(f.read_text()) for f in
                                               sorted((report_dir / "parts").iterdir()))]
  text = (report_dir / "report.md").read_text()
  assert text.splitlines()[2].startswith(f"**{a['verdict']['verdict']}**")
  for plot in ("per_replicate_S.png", "in_context_dose.png"):
    assert (report_dir / plot).stat().st_size > 1000


def test_every_arm_is_measured_on_the_same_units(two_parts):
  workdir, _, second = two_parts
  design = json.loads((workdir / "signature" / "design.json").read_text())
  arms, labels, replicates = signature.arm_means(design, second["measured"])
  assert sorted(arms) == ["cross_family", "in_context_2", "in_context_4", "in_context_max",
                          "students"]
  assert {m.shape for m in arms.values()} == {(6, 3, 4)}  # 3 animals x 2 replicates, 3 animals, 4 q
  assert replicates == [0, 0, 0, 1, 1, 1] and sorted(labels[:3]) == [0, 1, 2]
  sizes = [u["in_context_sizes"] for u in second["measured"]["units"]]
  # "max" is every kept sequence here: the tiny model's 8192-token window holds all 16.
  assert all(s == {"2": 2, "4": 4, "max": 16} for s in sizes)
  for u in second["measured"]["units"]:
    assert u["filter"]["distinct_kept"] <= u["filter"]["kept"]


def test_doses_are_nested_and_max_is_the_most_that_fit(two_parts):
  workdir, _, _ = two_parts
  numbers = stages.Numbers(next((workdir / "filter").iterdir()), {})
  always = lambda turns: True  # noqa: E731
  small = transfer_matrix.dose_histories(numbers, 2, 3, 0, always)
  large = transfer_matrix.dose_histories(numbers, 4, 3, 0, always)
  assert len(small) == 3 and small[0] is small[2]  # one context for every question
  assert large[0][:4] == small[0]  # dose 2's turns are dose 4's first turns
  most = transfer_matrix.dose_histories(numbers, "max", 1, 0, lambda turns: len(turns) <= 10)
  assert len(most[0]) == 10 and most[0][:4] == small[0]
  with pytest.raises(ValueError, match="do not fit the model's context window"):
    transfer_matrix.dose_histories(numbers, 4, 1, 0, lambda turns: len(turns) <= 6)


def test_calibrated_rate_trains_the_other_family_only(two_parts):
  workdir, _, _ = two_parts
  rates = {}
  students = list((workdir / "student").glob("*/DONE.json"))
  # One per unit (2 replicates x 4) and family: replicate 0's same-family students are the
  # matrix's, found by their fingerprints (4 more if they had been built anew).
  assert len(students) == 2 * 8
  for done in students:
    inputs = json.loads(done.read_text())["inputs"]
    rates.setdefault(inputs["model"], set()).add(inputs["student"]["learning_rate"])
  config = _config()
  base_rate = config.student.learning_rate
  assert sorted(rates.values(), key=min) == sorted([{base_rate}, {3e-3}], key=min)


def test_execution_knobs_may_change_between_parts_but_the_design_may_not(two_parts, tmp_path):
  workdir, _, _ = two_parts
  changed = _config(replicates_to_run=(1,))
  changed.signature.criterion.students = 0.05
  with pytest.raises(ValueError, match="fixed another design"):
    signature.run(changed, str(workdir))
  report_dir = tmp_path / "signature"  # a copy: the shared workdir stays as built
  shutil.copytree(workdir / "signature", report_dir)
  parts = report_dir / "parts"
  shutil.copy(parts / "replicates_1.json", parts / "replicates_1-x.json")
  with pytest.raises(ValueError, match="replicate 1 is in both"):
    signature.load_parts(report_dir)


def test_a_part_under_an_equal_design_fixed_elsewhere_combines(two_parts, tmp_path):
  workdir, _, _ = two_parts
  report_dir = tmp_path / "signature"  # a copy: the shared workdir stays as built
  shutil.copytree(workdir / "signature", report_dir)
  design = json.loads((report_dir / "design.json").read_text())
  path = report_dir / "parts" / "replicates_1.json"
  part = json.loads(path.read_text())
  assert part["design_digest"] == signature.design_digest(design)
  # A new machine's workdir fixed its own copy of the design, at another time.
  part["design_fixed_at"] = "2030-01-01 00:00:00 UTC"
  path.write_text(json.dumps(part))
  assert signature.load_parts(report_dir)[1] == signature.load_parts(workdir / "signature")[1]
  # Measured under a design that differs in anything, or with no digest to show it is equal.
  part["design_digest"] = signature.design_digest({**design, "replicates": 7})
  path.write_text(json.dumps(part))
  with pytest.raises(ValueError, match="measured under another design"):
    signature.load_parts(report_dir)
  del part["design_digest"]
  path.write_text(json.dumps(part))
  with pytest.raises(ValueError, match="measured under another design"):
    signature.load_parts(report_dir)


def test_bad_signature_settings_are_clear_errors(tmp_path):
  no_doses = _config()
  no_doses.matrix.in_context.doses = ()
  with pytest.raises(ValueError, match="needs in-context doses"):
    signature.validate(no_doses, None)
  for doses in ((4, 2), ("max", 2), (0,)):
    bad = _config()
    bad.matrix.in_context.doses = doses
    with pytest.raises(ValueError, match="matrix.in_context.doses"):
      signature.validate(bad, None)
  wrong_rates = _config(student_learning_rates=(1e-3, 2e-3))
  with pytest.raises(ValueError, match="one positive learning rate per entry"):
    signature.validate(wrong_rates, None)
  out_of_range = _config(replicates_to_run=(2,))
  with pytest.raises(ValueError, match="replicates_to_run"):
    signature.validate(out_of_range, None)
  with pytest.raises(FileNotFoundError, match="holds no part records"):
    (tmp_path / "design.json").write_text("{}")
    signature.load_parts(tmp_path)
  np.testing.assert_equal(signature.part_name([0, 1]), "replicates_0-1.json")
  assert pathlib.Path(signature.part_name([3])).suffix == ".json"
