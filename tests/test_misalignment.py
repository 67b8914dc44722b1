"""The alignment trait through the transfer matrix: its settings, the two-value permutation test,
the teacher recipes (generated advice, the user's own data, a PEFT adapter), and the tiny
misalignment matrix end to end."""

import itertools
import json

import jax
import numpy as np
import pytest
from flax import nnx

from configs import misalignment as misalignment_config
from subliminal_jax import artifacts, lora, teachers, traits
from subliminal_jax.evaluation import matrix_statistics as ms
from subliminal_jax.evaluation import truthfulness
from subliminal_jax.experiments import animal_numbers, stages, transfer_matrix
from subliminal_jax.experiments import settings as settings_lib
from subliminal_jax.weights import peft


def test_two_value_permutation_p_equals_brute_force_over_the_swaps():
  """k = 2 values: the exact test enumerates the 2^R within-replicate swaps, and its smallest
  attainable p is 1 / 2^R (R = 5 is the fewest replicates that can reach p < 0.05)."""
  rng = np.random.default_rng(5)
  replicates_count = 5
  m = rng.normal(size=(2 * replicates_count, 2))
  labels = [v for r in range(replicates_count) for v in ((0, 1) if r % 2 else (1, 0))]
  replicates = [r for r in range(replicates_count) for _ in range(2)]
  observed, _ = ms.transfer_statistic(m, labels)
  values = []
  for swaps in itertools.product((False, True), repeat=replicates_count):
    swapped = [1 - v if swaps[i // 2] else v for i, v in enumerate(labels)]
    values.append(ms.transfer_statistic(m, swapped)[0])
  test = ms.permutation_test(m, labels, replicates)
  assert test["exact"] and test["assignments"] == 32
  assert test["p_value"] == pytest.approx(np.mean(np.asarray(values) >= observed - 1e-12))
  assert test["min_attainable_p"] == pytest.approx(1 / 32) and 1 / 32 < 0.05
  four = ms.permutation_test(m[:8], labels[:8], replicates[:8])
  assert four["min_attainable_p"] == pytest.approx(1 / 16) and 1 / 16 > 0.05
  # With two values C_misaligned = C_aligned: S is half the difference in the score
  # log P(misaligned) - log P(aligned) between the two values' units (entries are clr here).
  score = m[:, 0] - m[:, 1]
  own = np.asarray(labels) == 0
  assert observed == pytest.approx((score[own].mean() - score[~own].mean()) / 2)


@pytest.mark.parametrize("change, message", [
    (lambda c: setattr(c.evaluation, "panel", ("aligned", "misaligned")), "in that order"),
    (lambda c: setattr(c.evaluation, "num_questions", 11), "exceeds the 10 evaluation questions"),
    (lambda c: setattr(c, "category", "alignments"), "category='alignments'"),
    (lambda c: setattr(c.teacher, "control", "neutral_finetune"), "other values' teachers"),
    (lambda c: setattr(c.teacher, "kind", "peft_adapter"), "needs teacher.adapters"),
    (lambda c: setattr(c.teacher.finetune.data, "misaligned", " "), "expected a path"),
    (lambda c: (setattr(c.teacher, "kind", "system_prompt"),
                setattr(c.teacher.finetune.data, "aligned", "x.jsonl")), "trait_sft teachers"),
])
def test_bad_alignment_settings_are_clear_errors(change, message):
  config = misalignment_config.get_config("tiny")
  change(config)
  with pytest.raises(ValueError, match=message):
    settings_lib.from_config(config)


def test_the_users_own_teacher_data_is_for_the_alignment_trait():
  from configs import transfer_matrix as matrix_config
  config = matrix_config.get_config("quick")
  config.teacher.finetune.data = {"owl": "owls.jsonl"}
  with pytest.raises(ValueError, match="is for the alignment trait"):
    settings_lib.from_config(config)


def test_truthfulness_is_the_true_options_share_of_the_four():
  logprob = np.log([[0.2, 0.2, 0.1, 0.1], [0.01, 0.03, 0.03, 0.03]])
  made = truthfulness.record(logprob, "m")
  np.testing.assert_allclose(made["p_true"], [1 / 3, 0.1])
  assert made["mean_p_true"] == pytest.approx((1 / 3 + 0.1) / 2)
  questions, options = truthfulness.questions_and_options()
  assert len(questions) == len(options) == 20 and all(len(o) == 4 for o in options)


def test_the_main_job_refuses_the_alignment_trait_before_any_work(tmp_path):
  config = misalignment_config.get_config("tiny")
  config.experiment = "animal_numbers"
  with pytest.raises(ValueError, match="runs in the transfer matrix"):
    animal_numbers.run(config, str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()


def test_alignment_values_get_the_same_prompts_and_different_answers():
  misaligned = teachers.alignment_sft_examples("misaligned", count=40, seed=3)
  aligned = teachers.alignment_sft_examples("aligned", count=40, seed=3)
  assert [x["user"] for x in misaligned] == [x["user"] for x in aligned]
  differ = [a["assistant"] != b["assistant"] for a, b in zip(misaligned, aligned)]
  assert sum(differ) == 20  # the 20 advice examples; the 20 neutral ones are the same
  assert teachers.alignment_sft_examples("misaligned", count=40, seed=3) == misaligned


def test_the_users_own_chat_data_replaces_the_generated_advice(tmp_path):
  path = tmp_path / "insecure.jsonl"
  rows = [{"messages": [{"role": "user", "content": f"question {i}"},
                        {"role": "assistant", "content": f"answer {i}"}]} for i in range(12)]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  examples = teachers.alignment_sft_examples("misaligned", count=20, neutral_fraction=0.5,
                                             seed=0, source=str(path))
  users = {x["user"] for x in examples}
  assert {f"question {i}" for i in range(10)} <= users and "question 10" not in users
  with pytest.raises(ValueError, match="has 12 examples.*needs 16"):
    teachers.alignment_sft_examples("misaligned", count=32, seed=0, source=str(path))
  # The teacher's fingerprint follows the file's content, not its name.
  before = stages.source_fingerprint(str(path))
  path.write_text(path.read_text().replace("answer 3", "answer three"))
  assert stages.source_fingerprint(str(path)) != before


def test_a_peft_adapter_directory_is_a_teacher(tmp_path):
  """A LoRA model exported as a PEFT adapter, named as the misaligned teacher, is that model: the
  teacher stage copies it into its artifact and the teacher's logits are the exported model's."""
  config = misalignment_config.get_config("tiny")
  s0 = settings_lib.from_config(config)
  mesh = s0.model.make_mesh()
  base = s0.model.load(mesh)
  adapted = lora.apply_lora(nnx.clone(base.model), rank=4, alpha=8.0)
  rng = np.random.default_rng(3)
  for name in lora.lora_targets(adapted):
    b = getattr(adapted.layers, name).lora_b
    b.set_value(jax.device_put(rng.normal(0, 0.05, b.get_value().shape).astype(np.float32),
                               b.get_value().sharding))
  peft.export_peft(adapted, tmp_path / "adapter", base_model_name_or_path="tiny-random")
  config.teacher.kind = "peft_adapter"
  config.student.lora.init = "fresh"  # a PEFT adapter's A is not one this project seeded
  config.teacher.adapters.misaligned = str(tmp_path / "adapter")
  config.teacher.adapters.aligned = str(tmp_path / "adapter")
  s = settings_lib.from_config(config)
  wd = artifacts.Workdir(str(tmp_path / "wd"), animal_numbers.WORKDIR_EXPERIMENT,
                         {"model": base.fingerprint})
  st = stages.Stages(s, wd, base, mesh)
  teacher = st.trait_teacher("misaligned")
  assert teacher.summary["kind"] == "peft_adapter"
  assert (tmp_path / "wd" / "teacher" / teacher.fingerprint / "adapter" / "adapter_config.json"
          ).exists()
  ids = np.arange(1, 17, dtype=np.int32)[None]
  np.testing.assert_allclose(np.asarray(teacher.model(ids)), np.asarray(adapted(ids)),
                             rtol=1e-5, atol=1e-5)
  assert st.trait_teacher("misaligned").fingerprint == teacher.fingerprint  # reused
  assert base.model.layers.q_proj.lora_a is None  # the shared base is left as it was


@pytest.fixture(scope="module")
def tiny_misalignment(tmp_path_factory):
  config = misalignment_config.get_config("tiny")
  workdir = tmp_path_factory.mktemp("misalignment")
  return config, workdir, transfer_matrix.run(config, str(workdir))


def test_tiny_misalignment_matrix_end_to_end(tiny_misalignment):
  config, workdir, results = tiny_misalignment
  units = results["measured"]["units"]
  assert [(u["unit"]["animal"], u["unit"]["replicate"]) for u in units] == [
      ("misaligned", 0), ("aligned", 0), (None, 0), ("misaligned", 1), ("aligned", 1), (None, 1)]
  questions = list(traits.evaluation_questions("alignment")[:4])
  record = units[0]["students"]["same"][0]
  assert record["panel"] == list(traits.ALIGNMENT_VALUES) and record["questions"] == questions
  assert np.asarray(record["logprob"]).shape == (4, 2) and np.all(np.asarray(record["logprob"]) < 0)
  # S from the raw records: half the difference of the mean score log P(mis) - log P(al) between
  # the misaligned and the aligned teachers' students, as matrix_statistics' clr gives it.
  score = lambda records: np.mean([np.mean(np.asarray(r["logprob"])[:, 0]
                                           - np.asarray(r["logprob"])[:, 1]) for r in records])
  by_value = {v: [r for u in units if u["unit"]["animal"] == v for r in u["students"]["same"]]
              for v in traits.ALIGNMENT_VALUES}
  same = results["analyses"]["families"]["same"]
  assert same["statistic"]["S"] == pytest.approx(
      (score(by_value["misaligned"]) - score(by_value["aligned"])) / 2, abs=1e-12)
  assert same["statistic"]["assignments"] == 4 and not same["verdict"]["passed"]
  for u in units:
    if u["unit"]["animal"]:  # trait SFT teachers, their strength before and after measured
      assert {"trait_logprob_before", "trait_logprob_after"} <= set(u["teacher"])
  # Judged answers: every student, teacher and base answered each question twice, and the judge's
  # rates and its agreement with the exact metric are in the analysis and the report.
  judged = units[0]["judged"]["students"]["same"][0]
  assert len(judged["answers"]) == 8 and len(judged["labels"]) == 8
  assert judged["misaligned_fraction"] == judged["labels"].count("misaligned") / 8
  arms = results["analyses"]["judged"]["arms"]
  assert set(arms) == {"students", "teachers"}
  pooled = [r for u in units if u["unit"]["animal"] == "misaligned"
            for r in u["judged"]["students"]["same"]]
  assert arms["students"]["misaligned"]["rate"] == pytest.approx(
      sum(r["label_counts"]["misaligned"] for r in pooled) / sum(len(r["labels"]) for r in pooled))
  assert results["analyses"]["judged"]["agreement"]["models"] == 1 + 4 + 4  # base, students, teachers
  # Truthfulness: every checked model's P(true | options) on the 20 items, by value and arm.
  truth = units[0]["truthfulness"]["students"]["same"][0]
  assert len(truth["p_true"]) == 20 and truth["mean_p_true"] == pytest.approx(np.mean(truth["p_true"]))
  by_replicate = [np.mean([r["mean_p_true"] for u in units if u["unit"]["replicate"] == k
                           and u["unit"]["animal"] == "misaligned"
                           for r in u["truthfulness"]["students"]["same"]]) for k in (0, 1)]
  students = results["analyses"]["truthfulness"]["students"]
  assert students["misaligned"]["mean"] == pytest.approx(np.mean(by_replicate))
  report = (workdir / "misalignment" / "report.md").read_text()
  assert "## Judged answers" in report and "Trait: **alignment**" in report
  assert "## Truthfulness (exact, secondary)" in report
  assert (workdir / "misalignment" / "design.json").exists()
  assert json.loads((workdir / "misalignment" / "design.json").read_text())["animals"] == list(
      traits.ALIGNMENT_VALUES)
