"""Tiny main jobs built once per test session and shared read-only (conftest's fixtures): the tiny
config itself, and the tiny job with finetuned teachers (LoRA trait-SFT teacher, matched control
teacher, students from the teacher's adapter A), which test_main_job checks and reruns a copy of
and test_multihost takes as the one-process reference of the same settings on two processes."""

import os
import pathlib
import shutil
from typing import Any

import filelock
from ml_collections import ConfigDict

from configs import animal_numbers as animal_config

# One sampling batch and two student steps: every step of a 2-process run waits on gloo
# collectives, so its length, not its shapes, sets that test's time.
FINETUNED_TEACHERS = {
    "mesh.data": 1, "mesh.fsdp": 8,  # parameters sharded 8 ways (across both processes there)
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


def finetuned_teachers_flags() -> list[str]:
  """:data:`FINETUNED_TEACHERS` as ``--config.`` flags of the tiny main job."""
  def flag_value(value: Any) -> str:
    return "".join(f"{v}," for v in value) if isinstance(value, tuple) else str(value)
  return ["--config=configs/animal_numbers.py:tiny",
          *(f"--config.{key}={flag_value(value)}" for key, value in FINETUNED_TEACHERS.items())]


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


def copy_of(workdir: pathlib.Path, into: pathlib.Path, stages: tuple[str, ...] | None = None) -> None:
  """A shared job's workdir copied into ``into`` (times kept), with only ``stages``' artifacts if
  given; a test reruns the copy."""
  def left_out(directory: str, names: list[str]) -> list[str]:
    if pathlib.Path(directory) != workdir:
      return []
    kept = {"experiment.json", *stages} if stages is not None else set(names)
    return [n for n in names if n not in kept or n == ".lock"]
  shutil.copytree(workdir, into, dirs_exist_ok=True, ignore=left_out)
