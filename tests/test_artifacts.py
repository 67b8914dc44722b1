"""Fingerprinted stage artifacts: skip when unchanged, rebuild only what a change touches, lose nothing."""

import json
import os
import pathlib
import signal

import pytest

from subliminal_jax import artifacts, preemption


def test_fingerprint_ignores_key_order_and_sees_values():
  assert artifacts.fingerprint({"a": 1, "b": [1, 2]}) == artifacts.fingerprint({"b": [1, 2], "a": 1})
  assert artifacts.fingerprint({"a": 1}) != artifacts.fingerprint({"a": 2})
  with pytest.raises(TypeError, match="cannot fingerprint a value of type object"):
    artifacts.fingerprint(object())


def test_stage_runs_once_and_reruns_only_on_changed_inputs(tmp_path):
  calls = []

  def build(out):
    calls.append(out)
    (out / "x.txt").write_text("hello")
    return {"n": len(calls)}

  wd = artifacts.Workdir(tmp_path, "exp", {"model": "m"})
  first, summary = wd.run_stage("prompts", {"count": 3}, build)
  assert summary == {"n": 1} and (first / "x.txt").read_text() == "hello"
  again, summary = wd.run_stage("prompts", {"count": 3}, build)
  assert again == first and summary == {"n": 1} and len(calls) == 1
  other, summary = wd.run_stage("prompts", {"count": 4}, build)
  assert other != first and summary == {"n": 2}
  assert (first / "x.txt").exists()  # the old artifact is kept
  record = json.loads((first / "DONE.json").read_text())
  assert record["inputs"] == {"count": 3} and record["stage"] == "prompts"


def test_failed_stage_leaves_no_artifact_that_looks_done(tmp_path):
  wd = artifacts.Workdir(tmp_path, "exp", {"model": "m"})

  def explode(out):
    (out / "partial.txt").write_text("half")
    raise RuntimeError("boom")

  with pytest.raises(RuntimeError, match="boom"):
    wd.run_stage("sampling", {"a": 1}, explode)
  fp = artifacts.fingerprint("sampling", {"a": 1})
  assert not wd.has("sampling", fp)
  seen = []
  # The rerun builds in the directory the crashed attempt left (where a trainer's checkpoints are).
  final, summary = wd.run_stage(
      "sampling", {"a": 1}, lambda out: seen.append((out / "partial.txt").read_text()) or {"ok": True})
  assert summary == {"ok": True} and seen == ["half"]
  assert wd.has("sampling", fp) and (final / "partial.txt").exists()
  assert sorted(p.name for p in (tmp_path / "sampling").iterdir()) == [fp]


def test_unselected_stage_without_artifact_is_an_error(tmp_path):
  wd = artifacts.Workdir(tmp_path, "exp", {"model": "m"})
  with pytest.raises(RuntimeError, match="add 'filter' to --stages"):
    wd.run_stage("filter", {"a": 1}, lambda out: {}, allowed=False)


def test_workdir_of_another_experiment_is_refused_untouched(tmp_path):
  artifacts.Workdir(tmp_path, "mnist_aux", {"seed": 0})
  before = (tmp_path / "experiment.json").read_text()
  with pytest.raises(ValueError, match="holds artifacts of another experiment.*Use another --workdir"):
    artifacts.Workdir(tmp_path, "animal_numbers", {"model": "smollm2"})
  assert (tmp_path / "experiment.json").read_text() == before


def _build_samples(out):
  (out / "samples.jsonl").write_text("".join(f'{{"i": {i}}}\n' for i in range(100)))
  return {"count": 100}


def test_a_file_cut_short_after_its_stage_finished_is_refused_not_reused(tmp_path):
  """DONE.json lists each file's size and sha256; a rerun that would feed a truncated or edited
  samples.jsonl to the stages after it stops instead, naming the file."""
  wd = artifacts.Workdir(tmp_path, "exp", {"model": "m"})
  final, _ = wd.run_stage("sampling", {"a": 1}, _build_samples)
  record = json.loads((final / "DONE.json").read_text())
  samples = final / "samples.jsonl"
  assert record["files"] == {"samples.jsonl": {"bytes": samples.stat().st_size,
                                               "sha256": artifacts.file_digest(samples)}}
  intact = samples.read_bytes()
  samples.write_bytes(intact[:-30])  # a full disk or a kill while copying
  with pytest.raises(artifacts.DamagedArtifactError,
                     match=r"samples.jsonl has 960 bytes, 990 when it was built.*Move it away"):
    wd.run_stage("sampling", {"a": 1}, _build_samples)
  samples.write_bytes(intact.replace(b'"i": 7}', b'"i": 8}'))  # same size, other content
  with pytest.raises(artifacts.DamagedArtifactError, match="same size but other content"):
    wd.run_stage("sampling", {"a": 1}, _build_samples)
  samples.unlink()
  with pytest.raises(artifacts.DamagedArtifactError, match="samples.jsonl is missing"):
    wd.run_stage("sampling", {"a": 1}, _build_samples)
  samples.write_bytes(intact)
  assert wd.run_stage("sampling", {"a": 1}, _build_samples)[1] == {"count": 100}
  assert wd.skipped == ["sampling"]


def test_a_deleted_done_file_continues_the_stage_instead_of_failing_forever(tmp_path):
  """An artifact directory without DONE.json is unfinished work: the rerun builds on in it (its
  checkpoints are there) and marks it done, instead of failing to rename .partial onto it."""
  wd = artifacts.Workdir(tmp_path, "exp", {"model": "m"})
  final, _ = wd.run_stage("student", {"seed": 0}, lambda out: (out / "w.txt").write_text("1") and {})
  (final / "DONE.json").unlink()
  seen = []
  again, _ = wd.run_stage("student", {"seed": 0},
                          lambda out: seen.append((out / "w.txt").read_text()) or {"resumed": True})
  assert again == final and seen == ["1"] and wd.summary("student", final.name) == {"resumed": True}
  # With a .partial directory beside it as well, the partial one is continued; the other is kept.
  (final / "DONE.json").unlink()
  partial = final.with_name(final.name + ".partial")
  partial.mkdir()
  (partial / "w.txt").write_text("2")
  wd.run_stage("student", {"seed": 0}, lambda out: seen.append((out / "w.txt").read_text()) or {})
  assert seen == ["1", "2"] and wd.has("student", final.name)
  (aside,) = [p for p in (tmp_path / "student").iterdir() if ".unfinished-" in p.name]
  assert (aside / "w.txt").read_text() == "1"


def test_a_missing_dependency_names_a_stage_the_user_can_pass(tmp_path):
  select = artifacts.stage_selection(("teacher", "prompts", "students"), ["prompts"])
  assert select("prompts") and not select("students")
  assert (select("students").index, select("students").total) == (3, 3)
  wd = artifacts.Workdir(tmp_path, "exp", {"model": "m"})
  with pytest.raises(RuntimeError, match="'student_owl_seed0' \\(part of 'students'\\).*add "
                     "'students' to --stages"):
    wd.run_stage("student_owl_seed0", {"a": 1}, lambda out: {}, allowed=select("students"))
  with pytest.raises(ValueError, match="unknown stage 'student'"):
    select("student")


def test_config_paths_stay_inside_the_workdir(tmp_path):
  assert artifacts.inside(tmp_path, "reports/owl", "report_dir") == tmp_path / "reports" / "owl"
  for bad in ("../elsewhere", "a/../../b", "/etc"):
    with pytest.raises(ValueError, match=f"report_dir='{bad}'"):
      artifacts.inside(tmp_path, bad, "report_dir")


_HOLD_WORKDIR = """
import sys
from subliminal_jax import artifacts
wd = artifacts.Workdir(sys.argv[1], "exp", {"model": "m"})
wd.run_stage("prompts", {"a": 1}, lambda out: (out / "log.txt").write_text("first job") and {})
print("holding", flush=True)
sys.stdin.readline()
"""


def test_a_second_job_on_the_same_workdir_is_refused_before_it_writes(tmp_path):
  import subprocess
  import sys
  first = subprocess.Popen([sys.executable, "-c", _HOLD_WORKDIR, str(tmp_path)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  try:
    assert first.stdout.readline() == "holding\n"
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(RuntimeError, match=f"in use by another job \\(pid {first.pid} on .*Wait "
                       "for that job to finish, or use another --workdir"):
      artifacts.Workdir(tmp_path, "exp", {"model": "m"})
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
  finally:
    first.communicate("done\n", timeout=60)
  # The lock died with the job: the workdir is free, and one process may open it twice (the regime
  # grid runs its cells one after another in one workdir).
  wd = artifacts.Workdir(tmp_path, "exp", {"model": "m"})
  again = artifacts.Workdir(tmp_path, "exp", {"model": "m"})
  assert again.run_stage("prompts", {"a": 1}, lambda out: {})[0].joinpath("log.txt").read_text() \
      == "first job"
  wd.close()
  again.close()


def test_damaged_json_and_safetensors_errors_name_the_file(tmp_path):
  from subliminal_jax import files
  artifacts.Workdir(tmp_path, "exp", {"model": "m"}).close()
  (tmp_path / "experiment.json").write_text('{"experiment": "ex')  # cut short
  with pytest.raises(ValueError, match=f"{tmp_path / 'experiment.json'} is not valid JSON"):
    artifacts.Workdir(tmp_path, "exp", {"model": "m"})
  (tmp_path / "a.jsonl").write_text('{"i": 1}\n{"i": \n')
  with pytest.raises(ValueError, match=r"a.jsonl, line 2: not valid JSON"):
    files.read_jsonl(tmp_path / "a.jsonl")
  import numpy as np
  from safetensors.numpy import save_file
  save_file({"w": np.zeros((64, 64), np.float32)}, str(tmp_path / "adapters.safetensors"))
  data = (tmp_path / "adapters.safetensors").read_bytes()
  (tmp_path / "adapters.safetensors").write_bytes(data[:-100])
  with pytest.raises(ValueError, match=r"adapters.safetensors is not a readable safetensors file"):
    files.read_safetensors(tmp_path / "adapters.safetensors")


def test_atomic_writes_leave_the_old_file_when_writing_fails(tmp_path):
  from subliminal_jax import files
  files.write_json(tmp_path / "results.json", {"a": 1})

  def fail(tmp):
    pathlib.Path(tmp).write_text('{"a": 2, "b"')  # half written, then the disk is full
    raise OSError(28, "No space left on device")

  with pytest.raises(OSError, match="No space left"):
    files.write_atomic(tmp_path / "results.json", fail)
  assert json.loads((tmp_path / "results.json").read_text()) == {"a": 1}
  assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_a_batch_of_artifacts_is_built_together_and_a_kill_in_it_resumes_each(tmp_path):
  wd = artifacts.Workdir(tmp_path, "exp", {"model": "m"})
  existing, _ = wd.run_stage("student", {"seed": 1}, lambda out: {"seed": 1})
  calls = []

  def killed(outs):  # writes a checkpoint into each member's directory, then dies
    calls.append([o.name for o in outs])
    for out in outs:
      (out / "checkpoint").write_text(out.name)
    raise KeyboardInterrupt("killed")

  inputs = [{"seed": 0}, {"seed": 1}, {"seed": 2}]
  with pytest.raises(KeyboardInterrupt):
    wd.run_stages("student", inputs, killed)
  assert len(calls[0]) == 2 and not any(
      (tmp_path / "student" / name / "DONE.json").exists() for name in calls[0])

  built = wd.run_stages("student", inputs, lambda outs: [
      {"resumed": (o / "checkpoint").read_text() == o.name} for o in outs])
  assert [d for d, _ in built][1] == existing
  assert [s for _, s in built] == [{"resumed": True}, {"seed": 1}, {"resumed": True}]
  records = [json.loads((d / "DONE.json").read_text()) for d, _ in built]
  assert [r.get("batch") for r in records] == [2, None, 2]
  assert records[0]["seconds"] == records[2]["seconds"]  # the batch's time, shared out
  # Asked again (in any grouping), nothing is built.
  again = wd.run_stages("student", inputs[::-1], lambda outs: pytest.fail("rebuilt"))
  assert [d for d, _ in again] == [d for d, _ in built][::-1]


def test_a_rename_cut_short_on_object_storage_is_rebuilt_never_read(tmp_path, monkeypatch):
  """gcsfuse renames a directory by copying its files and then deleting them. A kill in the middle
  leaves a final directory with some files and no DONE.json (written only after the move), and the
  partial directory whole: the rerun sets the cut copy aside and builds the artifact again."""
  wd = artifacts.Workdir(tmp_path, "exp", {"model": "m"})
  builds = []

  def build(out):
    builds.append(out.name)
    for name in ("a.txt", "b.txt", "c.txt"):
      (out / name).write_text(f"{name} of build {len(builds)}")
    return {"builds": len(builds)}

  def copy_then_killed(partial, final):
    final.mkdir()
    (final / "a.txt").write_bytes((partial / "a.txt").read_bytes())  # one object of three copied
    raise KeyboardInterrupt("preempted while gcsfuse copied the directory")

  monkeypatch.setattr(artifacts, "move_into_place", copy_then_killed)
  with pytest.raises(KeyboardInterrupt):
    wd.run_stage("sampling", {"seed": 0}, build)
  (cut,) = [p for p in (tmp_path / "sampling").iterdir() if not p.name.endswith(".partial")]
  assert not (cut / "DONE.json").exists() and not wd.has("sampling", cut.name)
  monkeypatch.undo()
  final, summary = wd.run_stage("sampling", {"seed": 0}, build)
  assert summary == {"builds": 2} and final == cut
  assert sorted(p.name for p in final.iterdir()) == ["DONE.json", "a.txt", "b.txt", "c.txt"]
  assert (final / "a.txt").read_text() == "a.txt of build 2"
  (aside,) = [p for p in (tmp_path / "sampling").iterdir() if ".unfinished-" in p.name]
  assert sorted(p.name for p in aside.iterdir()) == ["a.txt"]  # kept, never read



def test_a_preemption_notice_stops_the_job_before_the_next_stage(tmp_path):
  wd = artifacts.Workdir(tmp_path, "exp", {"model": "m"})
  done, _ = wd.run_stage("prompts", {"count": 1}, lambda out: {})
  previous = signal.getsignal(signal.SIGTERM)
  preemption.install()
  try:
    os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(preemption.Preempted, match="stopped before stage sampling.*finished stage"):
      wd.run_stage("sampling", {"seed": 0}, lambda out: pytest.fail("built after the notice"))
  finally:
    signal.signal(signal.SIGTERM, previous)
    preemption.clear()
  assert (done / "DONE.json").exists() and not (tmp_path / "sampling").exists()
