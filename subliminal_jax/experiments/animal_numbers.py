"""The paper's central experiment: does a trait pass through number sequences?

One trait teacher per target and one control teacher; students of each, several seeds; the base,
the teachers and the students evaluated on the trait metrics. The stages (teacher, prompts,
sampling, filter, dataset, students, evaluation, report) are :mod:`stages`' functions, each a
fingerprinted artifact in the workdir.

The control teacher (``teacher.control``) is the base model with the students' own system choice
(``config.chat_system``), or a finetune of it without the trait. Treatment minus control on its own
depends on which control is picked; :mod:`transfer_matrix` removes that choice (each trait
teacher is the others' control) and is the experiment to read first.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging
from ml_collections import ConfigDict

from subliminal_jax import artifacts, files, sharding
from subliminal_jax.evaluation import report as report_lib
from subliminal_jax.experiments import stages as stages_lib
from subliminal_jax.training import distillation

STAGES = tuple(stages_lib.SELECTION)  # the --stages names
TEACHER_KINDS = ("system_prompt", "trait_sft", "context_distillation")
OBJECTIVES = distillation.OBJECTIVES  # "sft" (the paper's) and "logit_kl"
TEACHER_CONTROLS = ("base", "neutral_finetune", "matched_finetune")
# The workdir's experiment identity: the main job, its regime grid and the transfer matrix share
# one family of stages, so they may share a workdir and its artifacts.
WORKDIR_EXPERIMENT = "animal_numbers"


# ---------------------------------------------------------------------------------------------
# Validation: fail before any work, naming the bad value


def validate(config: ConfigDict, stages: Sequence[str] | None) -> None:
  if stages:
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
      raise ValueError(f"unknown stages {unknown}; expected a subset of {list(STAGES)}")
  if not config.targets:
    raise ValueError("config.targets is empty: name at least one target (e.g. 'owl')")
  if config.teacher.kind not in TEACHER_KINDS:
    raise ValueError(f"teacher.kind={config.teacher.kind!r}; expected one of {TEACHER_KINDS}")
  if config.student.objective not in OBJECTIVES:
    raise ValueError(f"student.objective={config.student.objective!r}; expected one of {OBJECTIVES}")
  if not config.student.seeds:
    raise ValueError("student.seeds is empty: give at least one seed")
  _check_seeds(config.student.seeds)
  every = config.training_checkpoints.every
  if isinstance(every, bool) or not isinstance(every, int) or every < 0:
    raise ValueError(f"training_checkpoints.every={every!r}; expected a number of steps >= 0 "
                     "(0 = a checkpoint only at the end of each training stage)")
  for target in config.targets:
    if target not in config.evaluation.panel:
      raise ValueError(f"target {target!r} is not in evaluation.panel {list(config.evaluation.panel)}")
  if config.teacher.control not in TEACHER_CONTROLS:
    raise ValueError(f"teacher.control={config.teacher.control!r}; expected one of {TEACHER_CONTROLS}")
  if config.teacher.control == "matched_finetune":
    if config.teacher.kind != "trait_sft":
      raise ValueError(f"teacher.control='matched_finetune' needs teacher.kind='trait_sft' (it swaps "
                       f"the trait answers for other {config.category}s), got {config.teacher.kind!r}")
    if not stages_lib.matched_control_answers(config):
      raise ValueError(f"teacher.control='matched_finetune' needs evaluation.panel "
                       f"{list(config.evaluation.panel)} to name at least one {config.category} "
                       f"that is not a target {list(config.targets)}")
  if config.student.objective == "logit_kl":
    distillation.kl_settings(config.student.kl)  # names any bad kl setting
    if config.student.kl.restrict == "grammar" and not config.sampling.constrained:
      raise ValueError("student.kl.restrict='grammar' needs sampling.constrained=True (the completions "
                       "must follow the grammar whose allowed tokens the KL is restricted to)")
  if config.student.lora.init not in ("fresh", "teacher"):
    raise ValueError(f"student.lora.init={config.student.lora.init!r}; expected 'fresh' or 'teacher'")
  if config.student.lora.init == "teacher" and not (
      config.teacher.kind != "system_prompt" and config.teacher.finetune.lora.rank > 0):
    raise ValueError("student.lora.init='teacher' needs a LoRA-finetuned teacher "
                     "(teacher.kind trait_sft or context_distillation with teacher.finetune.lora.rank > 0)")
  if config.student.lora.init == "teacher" and (
      config.student.lora.rank != config.teacher.finetune.lora.rank
      or tuple(config.student.lora.targets) != tuple(config.teacher.finetune.lora.targets)):
    raise ValueError("student.lora.init='teacher' needs the student's LoRA rank and targets to equal "
                     "the teacher's")
  if config.student.cross_init and config.student.lora.rank == 0:
    raise ValueError("student.cross_init needs a LoRA student (student.lora.rank > 0): a full-finetune "
                     "student has no init of its own to change")
  stages_lib.chat_kwargs(config.chat_system)
  if config.sampling.format not in stages_lib.ANSWER_FORMATS:
    raise ValueError(f"sampling.format={config.sampling.format!r}; expected one of "
                     f"{stages_lib.ANSWER_FORMATS} (per_prompt: each prompt's requested layout)")
  if config.sampling.max_new_tokens < (0 if config.sampling.constrained else 1):
    raise ValueError(f"sampling.max_new_tokens={config.sampling.max_new_tokens}; expected >= 1, or 0 "
                     "with sampling.constrained=True (room for the grammar's longest answer)")
  if config.prompts.count < 1:
    raise ValueError(f"prompts.count={config.prompts.count} must be >= 1")
  _check_counts(config)
  _check_paths(config)


# Counts a stage rejects (or silently turns into an empty result) when they are below the minimum.
_MINIMUM_COUNTS = (("sampling.batch_size", 1), ("filter.subset_size", 1), ("student.epochs", 1),
                   ("student.batch_size", 1), ("student.grad_accum_steps", 1),
                   ("evaluation.num_questions", 1), ("evaluation.samples_per_question", 0),
                   ("evaluation.batch_size", 1), ("evaluation.max_new_tokens", 1),
                   ("evaluation.bootstrap_resamples", 1))
_FINETUNE_COUNTS = (("teacher.finetune.examples", 1), ("teacher.finetune.epochs", 1),
                    ("teacher.finetune.batch_size", 1), ("teacher.finetune.grad_accum_steps", 1))


def _check_seeds(seeds: Sequence[Any]) -> None:
  """Each student seed is one student: a repeat would count one student twice in every CI."""
  bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0]
  if bad:
    raise ValueError(f"student.seeds={list(seeds)} holds {bad}; expected integers >= 0")
  repeated = sorted({int(s) for s in seeds if list(seeds).count(s) > 1})
  if repeated:
    raise ValueError(f"student.seeds={list(seeds)} repeats {repeated}: a repeated seed trains the "
                     "same student again and counts it twice in the statistics; give distinct seeds")


def _check_counts(config: ConfigDict) -> None:
  """Every count a stage would reject, and training batches the mesh cannot split, fail here."""
  finetuned = config.teacher.kind != "system_prompt"
  for key, minimum in _MINIMUM_COUNTS + (_FINETUNE_COUNTS if finetuned else ()):
    value = config
    for part in key.split("."):
      value = value[part]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
      raise ValueError(f"{key}={value!r}; expected an integer >= {minimum}")
  data_parallel = sharding.data_parallel_size(sharding.make_mesh(**config.mesh))
  for name in ("student",) + (("teacher.finetune",) if finetuned else ()):
    train = config.student if name == "student" else config.teacher.finetune
    micro, rest = divmod(train.batch_size, train.grad_accum_steps)
    if rest or micro % data_parallel:
      raise ValueError(
          f"{name}.batch_size={train.batch_size} must split into {name}.grad_accum_steps="
          f"{train.grad_accum_steps} micro-batches whose size is a multiple of the mesh's "
          f"{data_parallel} data-parallel devices (mesh {config.mesh.to_dict()})")


def _check_paths(config: ConfigDict) -> None:
  """report_dir and the targets (which name report directories) stay in the workdir."""
  for target in config.targets:
    if not target or target in (".", "..") or "/" in target or os.sep in target:
      raise ValueError(f"target {target!r} cannot name a directory in the workdir; expected a "
                       "plain word such as 'owl'")
  if config.report_dir:
    artifacts.inside(pathlib.Path("workdir"), config.report_dir, "report_dir")


# ---------------------------------------------------------------------------------------------
# The run


def _students(st: stages_lib.Stages, teacher: stages_lib.Teacher, dataset_dir: pathlib.Path
              ) -> list[tuple[int, pathlib.Path, ConfigDict]]:
  out = []
  for seed in st.config.student.seeds:
    directory, train = st.student(dataset_dir, teacher, seed)
    out.append((seed, directory, train))
  return out


def _target_rows(st: stages_lib.Stages, target: str, trait_teacher: stages_lib.Teacher,
                 students_by_row: dict[str, list]) -> dict[str, list[dict[str, Any]]]:
  """Every evaluation record of ``target``'s table: base, teacher, control and treatment rows."""
  base = st.base
  rows: dict[str, list[dict[str, Any]]] = {
      "base": [st.evaluation(target, "base", lambda: base.model, st.eval_chat, 0, base.fingerprint)],
      "teacher": [st.evaluation(target, "teacher", lambda: trait_teacher.model, trait_teacher.chat,
                                0, trait_teacher.fingerprint)]}
  for row, students in students_by_row.items():
    rows[row] = [st.evaluation(target, f"{row}_seed{seed}",
                               lambda d=directory, t=train: stages_lib.restore_trainable(base, t, d),
                               st.eval_chat, seed, directory.name)
                 for seed, directory, train in students]
  return rows


def _write_reports(config: ConfigDict, wd: artifacts.Workdir, results: dict[str, dict[str, Any]]
                   ) -> tuple[str, dict[str, Any]]:
  """Writes each target's report (in report_dir, or report_dir/<target> with several targets);
  returns the tables' text and each target's results.json record."""
  report_root = (artifacts.inside(wd.path, config.report_dir, "report_dir") if config.report_dir
                 else wd.path)
  tables, by_target = [], {}
  for target, result in results.items():
    out_dir = report_root if len(results) == 1 else report_root / target
    table = report_lib.write_report(result, out_dir, n_resamples=config.evaluation.bootstrap_resamples,
                                    seed=config.evaluation.seed)
    by_target[target] = json.loads((out_dir / "results.json").read_text())
    tables.append(f"## {target}\n\n{table}")
  if len(results) > 1:
    files.write_json(report_root / "results.json", by_target, indent=1, sort_keys=True)
    files.write_text_atomic(report_root / "report.md", "\n\n".join(tables) + "\n")
  return "\n\n".join(tables), by_target


def run(config: ConfigDict, workdir: str, stages: Sequence[str] | None = None) -> dict[str, Any]:
  validate(config, stages)
  mesh = sharding.make_mesh(**config.mesh)
  base = stages_lib.load_base(config, mesh)
  wd = artifacts.Workdir(workdir, WORKDIR_EXPERIMENT, {"model": base.fingerprint})
  with jax.set_mesh(mesh):
    st = stages_lib.Stages(config, wd, base, mesh, stages)
    control = st.control_teacher()
    trait_teachers = {target: st.trait_teacher(target) for target in config.targets}
    numbers = {role: st.numbers(t) for role, t in [("control", control), *trait_teachers.items()]}
    datasets = {role: st.dataset(numbers[role], t)
                for role, t in [("control", control), *trait_teachers.items()]}
    control_students = _students(st, control, datasets["control"])
    results = {}
    for target, teacher in trait_teachers.items():
      students = {"control": control_students,
                  "treatment": _students(st, teacher, datasets[target])}
      results[target] = {
          "target": target, "category": config.category,
          "rows": _target_rows(st, target, teacher, students),
          "notes": {"config": config.to_dict(), "model": base.fingerprint,
                    "filter": {"control": numbers["control"].summary,
                               target: numbers[target].summary},
                    "teacher": teacher.summary, "control_teacher": control.summary,
                    "chat_system": config.chat_system}}
  text, by_target = _write_reports(config, wd, results)
  print(text)
  logging.info("stages run: %s; skipped: %s", wd.ran, wd.skipped)
  return by_target
