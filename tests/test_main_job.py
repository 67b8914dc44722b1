"""The main job end to end on the tiny model, its skip-on-rerun, and its bad-input errors."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

import tiny_jobs
from configs import animal_numbers as animal_config
from subliminal_jax import artifacts
from subliminal_jax.experiments import animal_numbers
from subliminal_jax.experiments import settings as settings_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
ROWS = ("base", "teacher", "control", "treatment")


def _done_records(workdir: pathlib.Path) -> dict[str, float]:
  return {str(p.relative_to(workdir)): p.stat().st_mtime for p in workdir.glob("*/*/DONE.json")}


def _summaries(workdir: pathlib.Path, stage: str) -> dict[pathlib.Path, dict]:
  """Each artifact directory of ``stage`` with the summary its DONE.json records."""
  return {p.parent: json.loads(p.read_text())["summary"] for p in workdir.glob(f"{stage}/*/DONE.json")}


def test_tiny_pipeline_end_to_end_then_rerun_skips_every_stage(tmp_path, tiny_job):
  config = animal_config.get_config("tiny")
  tiny_jobs.copy_of(tiny_job, tmp_path)  # the session's run of the tiny config

  results = json.loads((tmp_path / "results.json").read_text())
  assert set(results["rows"]) == set(ROWS)
  assert len(results["rows"]["control"]) == len(config.student.seeds)
  assert len(results["rows"]["treatment"]) == len(config.student.seeds)
  estimates = results["estimates"]
  for row in ROWS:
    for metric in ("logprob", "panel_share", "prefix_logprob", "sampled_rate", "mc_prob"):
      estimate = estimates["table"][row][metric]
      assert estimate["low"] <= estimate["mean"] <= estimate["high"], (row, metric, estimate)
  for metric in estimates["metrics"]:
    difference = estimates["treatment_minus_control"][metric]
    assert difference["low"] <= difference["mean"] <= difference["high"]
    assert difference["num_seeds"] == len(config.student.seeds)
  assert (tmp_path / "report.md").read_text().count("| treatment |") >= 1
  assert (tmp_path / "target_preference.png").stat().st_size > 0
  assert (tmp_path / "panel.png").stat().st_size > 0
  # Provenance: the dataset records the filter's counts. Under the grammar every finished sample
  # passes; the ones cut by max_new_tokens (12 here) are dropped, never trained on.
  provenances = [json.loads(p.read_text()) for p in tmp_path.glob("dataset/*/provenance.json")]
  (provenance,) = [p for p in provenances if p["teacher_label"] == "owl"]
  counts = provenance["filter"]
  assert set(counts["reject_reasons"]) <= {"unfinished"}
  assert counts["passed"] + counts["unfinished"] == counts["sampled"] == config.prompts.count
  assert provenance["examples"] == config.filter.subset_size

  before = _done_records(tmp_path)
  counts = {}
  for key in before:
    counts[key.split("/")[0]] = counts.get(key.split("/")[0], 0) + 1
  seeds = len(config.student.seeds)
  # A system-prompted teacher needs no artifact; the control's and the owl teacher's numbers do.
  assert counts == {"prompts": 1, "sampling": 2, "filter": 2, "dataset": 2, "student": 2 * seeds,
                    "evaluation": 2 + 2 * seeds}
  animal_numbers.run(config, str(tmp_path))
  assert _done_records(tmp_path) == before  # nothing rebuilt, nothing added


def test_finetuned_teachers_with_the_matched_control_and_teacher_adapter_init(
    tmp_path, finetuned_tiny_job):
  """The quick run's path on the tiny model: LoRA trait-SFT teacher, a control teacher finetuned on
  the same data with the trait answers naming other panel animals, students from the teacher's A.
  The session's run of it (tests/tiny_jobs.py; also test_multihost's one-process reference) is
  copied here, then rerun with a neutral control teacher and with another student learning rate."""
  tiny_jobs.copy_of(finetuned_tiny_job, tmp_path)
  config = tiny_jobs.finetuned_teachers_config()
  results = json.loads((tmp_path / "results.json").read_text())
  others = [a for a in config.evaluation.panel if a != "owl"]
  control = results["notes"]["control_teacher"]
  assert control["kind"] == "matched_finetune" and control["answers"] == others
  assert control["examples"] == 16 and results["notes"]["teacher"]["kind"] == "trait_sft"
  assert set(results["rows"]) == set(ROWS)
  kinds = {summary["kind"]: d for d, summary in _summaries(tmp_path, "teacher").items()}
  control_dir, teacher_dir = kinds["matched_finetune"], kinds["trait_sft"]
  assert len(kinds) == 2
  # Once a training stage is done its resumable checkpoints are gone (training_checkpoints.keep).
  for stage_dir in (teacher_dir, control_dir, *tmp_path.glob("student/*")):
    assert (stage_dir / "training" / "fit_summary.json").exists()
    assert not (stage_dir / "training" / "checkpoints").exists(), stage_dir
  # The neutral control is a different artifact: switching builds a new control teacher. The
  # checkpoint settings are in no fingerprint: changing them rebuilds nothing else.
  config.teacher.control = "neutral_finetune"
  config.training_checkpoints.keep = True
  config.training_checkpoints.every = 1
  animal_numbers.run(config, str(tmp_path))
  kinds = {summary["kind"]: d for d, summary in _summaries(tmp_path, "teacher").items()}
  assert len(kinds) == 3 and kinds["trait_sft"] == teacher_dir
  assert (kinds["neutral_finetune"] / "training" / "checkpoints").is_dir()
  assert json.loads((tmp_path / "results.json").read_text())["notes"]["control_teacher"]["kind"] == \
      "neutral_finetune"

  # A student knob rebuilds the students (treatment and control, one seed) and their evaluations
  # only.
  before = _done_records(tmp_path)
  config.student.learning_rate = 1e-3
  animal_numbers.run(config, str(tmp_path))
  added = sorted(key.split("/")[0] for key in set(_done_records(tmp_path)) - set(before))
  assert added == ["evaluation", "evaluation", "student", "student"]


def test_units_that_keep_less_than_the_subset_stop_the_run_before_any_student(tmp_path, tiny_job):
  """The arms of a design train on equal data: the tiny teachers' filters pass 39 (owl) and 33
  (control) of 48 samples, so a subset of 36 is refused once both are filtered, naming the short
  unit, its yield and reasons, and the largest subset every unit meets; nothing trains. (The
  samples are the session's tiny job's.)"""
  tiny_jobs.copy_of(tiny_job, tmp_path, stages=("prompts", "sampling"))
  config = animal_config.get_config("tiny")
  config.filter.subset_size = 36
  with pytest.raises(ValueError, match=r"filter.subset_size=36, but 1 of 2 teacher units kept fewer "
                                       r"sequences: control kept 33 \(passed 33 of 48 sampled; "
                                       r"reject reasons \{.*\}\).*--config.filter.subset_size=33"):
    animal_numbers.run(config, str(tmp_path))
  assert len(list(tmp_path.glob("filter/*/DONE.json"))) == 2
  assert not list(tmp_path.glob("dataset/*")) and not list(tmp_path.glob("student/*"))


def test_a_filter_that_keeps_nothing_names_the_reasons_and_keeps_what_was_written(tmp_path):
  config = animal_config.get_config("tiny")
  config.prompts.count = 8
  config.sampling.constrained = False  # a random model's free text never parses as numbers
  with pytest.raises(ValueError, match="kept none of the 8 samples.*dominant reject reasons"):
    animal_numbers.run(config, str(tmp_path))
  assert list(tmp_path.glob("prompts/*/DONE.json")) and list(tmp_path.glob("sampling/*/DONE.json"))


def test_adding_seeds_keeps_the_existing_students_fingerprints():
  config = animal_config.get_config("tiny")
  config.student.seeds = (0, 1)
  more = animal_config.get_config("tiny")
  more.student.seeds = (0, 1, 2, 3)
  config, more = settings_lib.from_config(config), settings_lib.from_config(more)
  for seed in (0, 1):
    assert (artifacts.fingerprint(config.student_fingerprint(seed)) ==
            artifacts.fingerprint(more.student_fingerprint(seed)))
  assert more.student_fingerprint(0) != more.student_fingerprint(1)


def test_bad_inputs_are_clear_errors(tmp_path):
  config = animal_config.get_config("tiny")
  config.model = str(tmp_path / "no_such_model")
  with pytest.raises((FileNotFoundError, ValueError), match="no_such_model"):
    animal_numbers.run(config, str(tmp_path / "wd"))

  other = tmp_path / "other"
  artifacts.Workdir(other, "mnist_aux", {"seed": 0})
  with pytest.raises(ValueError, match="holds artifacts of another experiment"):
    animal_numbers.run(animal_config.get_config("tiny"), str(other))

  config = animal_config.get_config("tiny")
  config.targets = ("unicorn",)
  with pytest.raises(ValueError, match="target 'unicorn' is not in evaluation.panel"):
    animal_numbers.run(config, str(tmp_path / "wd2"))
  config = animal_config.get_config("tiny")
  config.student.lora.init = "teacher"
  with pytest.raises(ValueError, match="needs a LoRA-finetuned teacher"):
    animal_numbers.run(config, str(tmp_path / "wd3"))
  config = animal_config.get_config("tiny")
  config.teacher.control = "matched_finetune"
  with pytest.raises(ValueError, match="'matched_finetune' needs teacher.kind='trait_sft'.*'system_prompt'"):
    animal_numbers.run(config, str(tmp_path / "wd5"))
  config.teacher.kind = "trait_sft"
  config.evaluation.panel = ("owl",)
  with pytest.raises(ValueError, match=r"evaluation.multiple_choice needs a panel of at least 5"):
    animal_numbers.run(config, str(tmp_path / "wd6"))
  config.evaluation.multiple_choice = False
  with pytest.raises(ValueError, match=r"evaluation.panel \['owl'\] to name at least one animal that is not a target"):
    animal_numbers.run(config, str(tmp_path / "wd6"))
  config = animal_config.get_config("tiny")
  config.training_checkpoints.every = -5
  with pytest.raises(ValueError, match=r"training_checkpoints.every=-5; expected a number of steps >= 0"):
    animal_numbers.run(config, str(tmp_path / "wd7"))
  assert not (tmp_path / "wd7").exists()
  with pytest.raises(ValueError, match="unknown stages \\['sampler'\\]"):
    animal_numbers.run(animal_config.get_config("tiny"), str(tmp_path / "wd4"), stages=["sampler"])


@pytest.mark.parametrize("key, value, message", [
    ("student.seeds", (0, 1, 1), r"student.seeds=\[0, 1, 1\] repeats \[1\]: .*counts it twice"),
    ("student.seeds", (0, 1.5), r"student.seeds=\[0, 1.5\] holds \[1.5\]; expected integers >= 0"),
    ("student.seeds", ("0",), r"holds \['0'\]; expected integers"),
    ("student.epochs", 0, r"student.epochs=0; expected an integer >= 1"),
    ("filter.subset_size", 0, r"filter.subset_size=0; expected an integer >= 1"),
    ("evaluation.num_questions", 0, r"evaluation.num_questions=0"),
    ("student.batch_size", 12, r"student.batch_size=12 must split into .* 8 data-parallel devices"),
    ("report_dir", "../elsewhere", r"report_dir='../elsewhere' leads outside the workdir"),
    ("report_dir", "/tmp/x", r"report_dir='/tmp/x' is an absolute path"),
    ("targets", ("../owl",), r"target '../owl' cannot name a directory"),
])
def test_config_values_a_stage_would_reject_fail_before_any_work(tmp_path, key, value, message):
  """validate() refuses them before the model loads or a file is written; a repeated student seed
  would count one student twice (a CI that excludes zero where the true one does not)."""
  config = animal_config.get_config("tiny")
  *path, leaf = key.split(".")
  node = config
  for part in path:
    node = node[part]
  with config.unlocked():
    node[leaf] = value
  if key == "targets":
    config.evaluation.panel = tuple(config.evaluation.panel) + value
  with pytest.raises(ValueError, match=message):
    animal_numbers.run(config, str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()


def test_stages_missing_a_dependency_name_a_stage_the_user_can_pass(tmp_path, tiny_job):
  config = animal_config.get_config("tiny")
  with pytest.raises(RuntimeError, match=r"stage 'sampling' was not selected.*add 'sampling' to "
                     r"--stages"):
    animal_numbers.run(config, str(tmp_path), stages=["prompts"])
  # The session's tiny job's numbers: the run reaches the students without sampling again.
  tiny_jobs.copy_of(tiny_job, tmp_path, stages=("sampling", "filter", "dataset"))
  with pytest.raises(RuntimeError, match=r"stage 'student' \(part of 'students'\) was not "
                     r"selected.*add 'students' to --stages"):
    animal_numbers.run(config, str(tmp_path), stages=[s for s in animal_numbers.STAGES
                                                     if s != "students"])


def test_unknown_config_key_on_the_command_line_is_rejected(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "subliminal_jax.main", "--config=configs/animal_numbers.py:tiny",
       f"--workdir={tmp_path}", "--config.student.learning_rat=0.1"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, "PYTHONPATH": str(ROOT)})
  assert result.returncode != 0
  assert "learning_rat" in result.stderr
  assert not any(tmp_path.iterdir())  # nothing written


def test_the_job_names_its_stages_in_progress_and_writes_tensorboard_when_asked(tmp_path):
  """Through main: bars say which stage runs ("student (stage 6 of 8): training"),
  datasets' own bars are off, and config.tensorboard writes each training stage's events."""
  result = subprocess.run(
      [sys.executable, "-m", "subliminal_jax.main", "--config=configs/animal_numbers.py:tiny",
       f"--workdir={tmp_path}", "--config.tensorboard=True", "--config.student.seeds=0,",
       # One sampling batch per teacher and one step per student: the bars and events are the same.
       "--config.prompts.count=16", "--config.filter.subset_size=8",
       "--stages=prompts,teacher,sampling,filter,dataset,students"],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env={**os.environ, "PYTHONPATH": str(ROOT)})
  assert result.returncode != 0 and "add 'evaluation' to --stages" in result.stderr
  assert "sampling (stage 3 of 8): sampling" in result.stderr
  assert "student (stage 6 of 8): training" in result.stderr
  assert "Saving the dataset" not in result.stderr and "Map" not in result.stderr
  events = list(tmp_path.glob("student/*/training/tensorboard/events.out.tfevents.*"))
  assert len(events) == 2 and all(e.stat().st_size > 0 for e in events)  # treatment and control


def _records_of_an_orbax_save(directory: pathlib.Path, log_filter) -> list:
  """Every absl record that reaches a handler during one real orbax save and one log line of ours."""
  import logging as std_logging

  import numpy as np
  import orbax.checkpoint as ocp
  from absl import logging as absl_logging

  records = []
  handler = std_logging.Handler(level=std_logging.DEBUG)
  handler.emit = records.append
  if log_filter is not None:
    handler.addFilter(log_filter)
  absl_logger = std_logging.getLogger("absl")
  previous_level = absl_logger.level
  absl_logger.addHandler(handler)
  absl_logger.setLevel(std_logging.INFO)
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(directory / "ckpt", {"w": np.arange(4.0)})
      checkpointer.wait_until_finished()
    absl_logging.info("stage progress line")
    absl_logging.warning("a warning")
  finally:
    absl_logger.removeHandler(handler)
    absl_logger.setLevel(previous_level)
  return records


def test_orbax_info_logs_are_dropped_and_ours_and_warnings_kept(tmp_path):
  from subliminal_jax.main import OrbaxInfoFilter

  unfiltered = _records_of_an_orbax_save(tmp_path / "a", None)
  assert any("/orbax/" in r.pathname and r.levelno < 30 for r in unfiltered)  # orbax does log INFO
  filtered = _records_of_an_orbax_save(tmp_path / "b", OrbaxInfoFilter())
  assert not any("/orbax/" in r.pathname and r.levelno < 30 for r in filtered)
  messages = [r.getMessage() for r in filtered]
  assert "stage progress line" in messages and "a warning" in messages


def test_a_url_workdir_is_refused_with_what_to_do_instead():
  result = subprocess.run(
      [sys.executable, "-m", "subliminal_jax.main", "--config=configs/animal_numbers.py:tiny",
       "--workdir=gs://bucket/run1"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, "PYTHONPATH": str(ROOT)})
  assert result.returncode != 0
  assert "--workdir='gs://bucket/run1' is a URL" in result.stderr and "mount" in result.stderr
  assert not (ROOT / "gs:").exists()
