"""The transfer matrix end to end on the tiny model (3 animals x 3 animals), and its design guard."""

import itertools
import json
import pathlib
import shutil

import numpy as np
import pytest
import tiny_jobs

from configs import transfer_matrix as matrix_config
from subliminal_jax.experiments import stages, transfer_matrix


def _done_records(workdir: pathlib.Path) -> dict[str, float]:
  return {str(p.relative_to(workdir)): p.stat().st_mtime for p in workdir.glob("*/*/DONE.json")}


def _clr_means(records, panel, animals):
  """[animals] mean centred log-ratio over students and questions, computed here from scratch."""
  out = []
  for animal in animals:
    values = []
    for record in records:
      logprob = np.asarray(record["logprob"])
      values.append((logprob[:, panel.index(animal)] - logprob.mean(axis=1)).mean())
    out.append(np.mean(values))
  return np.asarray(out)


def test_tiny_three_by_three_matrix_end_to_end(tiny_matrix_job):
  config, workdir, results = tiny_matrix_job
  animals, panel = list(config.targets), list(config.evaluation.panel)
  assert len(animals) == 3
  on_disk = json.loads((workdir / "results.json").read_text())
  assert on_disk["analyses"] == json.loads(json.dumps(results["analyses"]))
  same = results["analyses"]["families"]["same"]
  assert np.asarray(same["matrix"]).shape == (3, 3)
  # The statistic from the raw records, independently of matrix_statistics: each animal's own
  # students' mean clr minus the other teachers' students'.
  trait_units = [u for u in results["measured"]["units"] if u["unit"]["animal"]]
  per_unit = {u["unit"]["animal"]: _clr_means(u["students"]["same"], panel, animals)
              for u in trait_units}
  c = [per_unit[a][i] - np.mean([per_unit[b][i] for b in animals if b != a])
       for i, a in enumerate(animals)]
  assert same["statistic"]["S"] == pytest.approx(np.mean(c), abs=1e-12)
  for i, a in enumerate(animals):
    assert same["per_animal"][a]["C"] == pytest.approx(c[i], abs=1e-12)
  # Exact p over the 3! label orders, by brute force.
  s_of = lambda order: np.mean([per_unit[order[i]][i] - np.mean(
      [per_unit[order[j]][i] for j in range(3) if j != i]) for i in range(3)])
  observed = s_of(animals)
  expected_p = np.mean([s_of(list(o)) >= observed - 1e-12 for o in itertools.permutations(animals)])
  assert same["statistic"]["p_value"] == pytest.approx(expected_p)
  assert same["statistic"]["assignments"] == 6
  # One replicate of three animals can never give p < 0.05: the verdict says so.
  assert not same["verdict"]["passed"] and "cannot reach p < 0.05" in same["verdict"]["text"]
  # The base model's own numbers trained students too, and each reference is reported.
  assert [u["unit"]["animal"] for u in results["measured"]["units"]] == animals + [None]
  assert set(same["per_animal"]["owl"]) >= {"minus_base", "minus_base_numbers", "per_replicate"}
  assert {"in_context", "teachers"} <= set(results["analyses"])
  # The other family: its own datasets and students, analysed side by side with the same family.
  other = results["analyses"]["families"]["tiny-random:1"]
  assert np.asarray(other["matrix"]).shape == (3, 3)
  assert other["statistic"]["S"] != same["statistic"]["S"]
  datasets = [json.loads(p.read_text())["model"] for p in workdir.glob("dataset/*/provenance.json")]
  assert len(datasets) == 2 * 4 and len(set(datasets)) == 2  # each unit's numbers, per family
  report = (workdir / "report.md").read_text()
  assert "## Same family vs another family" in report and "| other family: tiny-random:1 |" in report
  assert "**FAIL" in report and "Criterion (fixed in the config before the run)" in report
  # Each matrix names what its cells are measured against in words, not as a config key.
  assert "minus that of the base-numbers students (rows" in report
  assert "minus the base model's (rows" in report and "base_numbers" not in report
  # results.json (written with sorted keys) gives back the same report: rows follow the design.
  reloaded = json.loads((workdir / "results.json").read_text())
  assert transfer_matrix.matrix_report.format_report(reloaded) + "\n" == report
  assert "students `sft` (LoRA rank 4, init `fresh`)" in report
  reloaded["design"]["config"]["student"]["lora"]["rank"] = 0  # full-finetune students
  assert "students `sft` (full finetune, learning rate " in (
      transfer_matrix.matrix_report.format_report(reloaded))
  assert (workdir / transfer_matrix.matrix_report.HEATMAP).stat().st_size > 0
  design = json.loads((workdir / "design.json").read_text())
  assert design["criterion"] == config.matrix.criterion.to_dict() and design["fixed_at"]


def test_rerun_skips_every_stage_and_a_changed_design_is_refused(tiny_matrix_job, tmp_path):
  config, shared, _ = tiny_matrix_job
  workdir = tmp_path / "matrix"
  tiny_jobs.copy_of(shared, workdir)
  before = _done_records(workdir)
  transfer_matrix.run(config, str(workdir))
  assert _done_records(workdir) == before
  changed = matrix_config.get_config("tiny")
  changed.matrix.student_models = config.matrix.student_models
  changed.matrix.criterion.alpha = 0.2
  with pytest.raises(ValueError, match="fixed another design before its first run.*criterion"):
    transfer_matrix.run(changed, str(workdir))
  assert _done_records(workdir) == before
  # The same change into its own report directory is a new design, fixed before its run.
  changed.report_dir = "alpha_0.2"
  record = transfer_matrix.fix_design(workdir / changed.report_dir,
                                      transfer_matrix.validate(changed, None))
  assert record["criterion"]["alpha"] == 0.2


def test_in_context_histories_are_teacher_sequences_before_each_question(tiny_matrix_job):
  config, workdir, results = tiny_matrix_job
  unit = results["measured"]["units"][0]
  (numbers_dir,) = [p.parent for p in workdir.glob("filter/*/DONE.json")
                    if json.loads(p.read_text())["summary"]["label"] == unit["unit"]["animal"]]
  numbers = stages.Numbers(numbers_dir, unit["filter"])
  histories = transfer_matrix.in_context_histories(numbers, 2, 4, seed=0)
  kept = [json.loads(line) for line in numbers.kept_path.read_text().splitlines()]
  assert len(histories) == 4 and all(len(h) == 4 for h in histories)
  pairs = {(s["prompt"], s["completion"]) for s in kept}
  for history in histories:
    assert [t["role"] for t in history] == ["user", "assistant"] * 2
    assert {(history[i]["content"], history[i + 1]["content"]) for i in (0, 2)} <= pairs
  assert histories == transfer_matrix.in_context_histories(numbers, 2, 4, seed=0)
  assert histories != transfer_matrix.in_context_histories(numbers, 2, 4, seed=1)


def test_bad_matrix_settings_are_clear_errors(tmp_path):
  config = matrix_config.get_config("tiny")
  config.targets = ("owl",)
  with pytest.raises(ValueError, match="needs 2..8 distinct animals"):
    transfer_matrix.run(config, str(tmp_path / "a"))
  config = matrix_config.get_config("tiny")
  config.matrix.replicates = 0
  with pytest.raises(ValueError, match="matrix.replicates=0"):
    transfer_matrix.run(config, str(tmp_path / "b"))
  config = matrix_config.get_config("tiny")
  config.matrix.student_models = ("tiny-random",)
  config.student.objective = "logit_kl"
  with pytest.raises(ValueError, match="need student.objective='sft'"):
    transfer_matrix.run(config, str(tmp_path / "c"))
  config = matrix_config.get_config("tiny")
  config.matrix.in_context.sequences = 99
  with pytest.raises(ValueError, match="in_context.sequences=99 exceeds filter.subset_size=16"):
    transfer_matrix.run(config, str(tmp_path / "d"))
  assert not any((tmp_path / d).exists() for d in "abcd")


def test_adapters_together_reuse_every_artifact_and_agree_with_one_at_a_time(tiny_matrix_job,
                                                                              tmp_path):
  """The fixture ran with ``matrix.adapters_per_step`` = 8 (the default): teachers, samples,
  students and evaluations K at a time. K is in no fingerprint: a rerun with K = 1 builds nothing.
  Students and evaluations rebuilt one at a time from the same numbers agree with the batched
  ones up to float rounding, not bit for bit: K students in one vmapped step sum their gradients
  and the base's matmuls in another order than one student's step, and the batched evaluation
  scores each panel word from one shared prefill (a trie of the words after the question) rather
  than from a copy of the prompt's cache per word; so the verdict and S must agree, the last
  digits need not."""
  config, shared, results = tiny_matrix_job
  workdir = tmp_path / "matrix"
  tiny_jobs.copy_of(shared, workdir)
  assert config.matrix.adapters_per_step == 8
  one = matrix_config.get_config("tiny")
  one.matrix.student_models = config.matrix.student_models
  one.matrix.adapters_per_step = 1
  before = _done_records(workdir)
  transfer_matrix.run(one, str(workdir))
  assert _done_records(workdir) == before
  batched_students = [json.loads(p.read_text()) for p in workdir.glob("student/*/DONE.json")]
  assert {r.get("batch") for r in batched_students} == {4}  # 4 units' students per family
  # The same family's students and every evaluation again, one at a time, from the same numbers
  # (the other family's are left out: a design of its own, to keep this test short).
  copy = tmp_path / "one_at_a_time"
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns(
      "student", "panel_evaluation", "design.json", ".lock"))
  one.matrix.student_models = ()
  alone = transfer_matrix.run(one, str(copy))
  rebuilt = set(_done_records(copy))
  assert rebuilt <= set(before)  # every artifact one at a time has a batched one's fingerprint
  assert len([n for n in rebuilt if n.startswith("student/")]) == 4  # one per unit
  analysis, other = (r["analyses"]["families"]["same"] for r in (results, alone))
  assert other["verdict"]["text"] == analysis["verdict"]["text"]
  assert other["statistic"]["low"] <= analysis["statistic"]["S"] <= other["statistic"]["high"]
  assert analysis["statistic"]["S"] == pytest.approx(other["statistic"]["S"], abs=1e-3)
  for batched, single in zip(results["measured"]["units"], alone["measured"]["units"]):
    for a, b in zip(batched["students"]["same"] + [batched["in_context_record"]],
                    single["students"]["same"] + [single["in_context_record"]]):
      assert a["label"] == b["label"]
      np.testing.assert_allclose(a["logprob"], b["logprob"], rtol=1e-4, atol=1e-3)
