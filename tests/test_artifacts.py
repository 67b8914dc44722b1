"""Fingerprinted stage artifacts: skip when unchanged, rebuild only what a change touches, lose nothing."""

import json

import pytest

from subliminal_jax import artifacts


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
  with pytest.raises(RuntimeError, match="include 'filter' in --stages"):
    wd.run_stage("filter", {"a": 1}, lambda out: {}, allowed=False)


def test_workdir_of_another_experiment_is_refused_untouched(tmp_path):
  artifacts.Workdir(tmp_path, "mnist_aux", {"seed": 0})
  before = (tmp_path / "experiment.json").read_text()
  with pytest.raises(ValueError, match="holds artifacts of another experiment.*Use another --workdir"):
    artifacts.Workdir(tmp_path, "animal_numbers", {"model": "smollm2"})
  assert (tmp_path / "experiment.json").read_text() == before
