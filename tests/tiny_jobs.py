"""Tiny jobs built once per test session and shared read-only (conftest's fixtures): the tiny
config itself, and the tiny job with finetuned teachers (LoRA trait-SFT teacher, matched control
teacher, students from the teacher's adapter A), which test_main_job checks and reruns a copy of
and test_multihost takes as the one-process reference of the same settings on two processes; and
the tiny transfer matrix, which test_transfer_matrix checks and test_signature builds on."""

import json
import os
import pathlib
import pickle
import shutil
from typing import Any, Callable

import filelock
from ml_collections import ConfigDict

from configs import animal_numbers as animal_config
from configs import transfer_matrix as matrix_config

# One sampling batch and two student steps: every step of a 2-process run waits on gloo
# collectives, so its length, not its shapes, sets that test's time.
FINETUNED_TEACHERS = {
    "mesh.data": 1, "mesh.fsdp": 8,  # parameters sharded over every device
    "teacher.kind": "trait_sft", "teacher.control": "matched_finetune",
    "teacher.finetune.examples": 16, "teacher.finetune.epochs": 1,
    "teacher.finetune.warmup_steps": 1, "teacher.finetune.lora.rank": 4,
    "student.lora.init": "teacher", "student.seeds": (0,),
    "evaluation.num_questions": 2, "evaluation.samples_per_question": 0,
    "evaluation.multiple_choice": False,
    "prompts.count": 16, "sampling.batch_size": 16,
    # 6 of the 16 random-model answers run past the token limit: both teachers keep 10.
    "filter.subset_size": 10,
}


def finetuned_teachers_config() -> ConfigDict:
  """The tiny config with :data:`FINETUNED_TEACHERS` applied."""
  config = animal_config.get_config("tiny")
  for key, value in FINETUNED_TEACHERS.items():
    *path, leaf = key.split(".")
    node = config
    for part in path:
      node = node[part]
    node[leaf] = value
  return config


def finetuned_teachers_flags(**overrides: Any) -> list[str]:
  """:data:`FINETUNED_TEACHERS`, with ``overrides`` (dotted keys) on top, as ``--config.`` flags
  of the tiny main job."""
  def flag_value(value: Any) -> str:
    return "".join(f"{v}," for v in value) if isinstance(value, tuple) else str(value)
  return ["--config=configs/animal_numbers.py:tiny",
          *(f"--config.{key}={flag_value(value)}"
            for key, value in {**FINETUNED_TEACHERS, **overrides}.items())]


OTHER_FAMILY = "tiny-random:1"  # the tiny matrix's students of another initialization


def tiny_matrix_config() -> ConfigDict:
  """configs/transfer_matrix.py:tiny with students of another initialization learning from the
  same numbers (the cross-family control; the real one is Gemma 3 students of SmolLM2's numbers)."""
  config = matrix_config.get_config("tiny")
  config.matrix.student_models = (OTHER_FAMILY,)
  return config


def built_once(tmp_path_factory, name: str, build) -> pathlib.Path:
  """``build(directory)`` once per test session, also across pytest-xdist workers (the first
  worker to ask builds it under a file lock, the others wait and reuse it); returns the directory.
  Callers must not change it."""
  root = tmp_path_factory.getbasetemp()
  if "PYTEST_XDIST_WORKER" in os.environ:
    root = root.parent  # the session's directory, above each worker's own
  directory, done = root / name, root / f"{name}.done"
  with filelock.FileLock(str(root / f"{name}.lock")):
    if not done.exists():
      build(directory)
      done.touch()
  return directory


def run_once(tmp_path_factory, name: str, run: Callable[[pathlib.Path], Any]
             ) -> tuple[pathlib.Path, Any]:
  """:func:`built_once` of ``run(directory)``: the directory, and what ``run`` returned (pickled
  beside it for the workers that did not build it)."""
  def build(directory: pathlib.Path) -> None:
    returned = run(directory)
    (directory.parent / f"{name}.returned.pkl").write_bytes(pickle.dumps(returned))
  directory = built_once(tmp_path_factory, name, build)
  return directory, pickle.loads((directory.parent / f"{name}.returned.pkl").read_bytes())


def copy_of(workdir: pathlib.Path, into: pathlib.Path, stages: tuple[str, ...] | None = None,
            same_family_students_only: bool = False) -> None:
  """A shared job's workdir copied into ``into`` (times kept), with only ``stages``' artifacts if
  given, and without the students of other model families if ``same_family_students_only``; a test
  reruns the copy."""
  def left_out(directory: str, names: list[str]) -> list[str]:
    if same_family_students_only and pathlib.Path(directory) == workdir / "student":
      base = json.loads((workdir / "experiment.json").read_text())["model"]  # the workdir's own
      return [n for n in names if _student_base(workdir / "student" / n) not in (base, None)]
    if pathlib.Path(directory) != workdir:
      return []
    kept = {"experiment.json", *stages} if stages is not None else set(names)
    return [n for n in names if n not in kept or n == ".lock"]
  shutil.copytree(workdir, into, dirs_exist_ok=True, ignore=left_out)


def _student_base(directory: pathlib.Path) -> str | None:
  """The fingerprint of the base model a finished student stage trained on (None for anything
  else)."""
  done = directory / "DONE.json"
  return json.loads(done.read_text())["inputs"]["model"] if done.is_file() else None
