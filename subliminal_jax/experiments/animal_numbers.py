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
import pathlib
from typing import Any, Sequence

import jax
from absl import logging
from ml_collections import ConfigDict

from subliminal_jax import artifacts, files, traits
from subliminal_jax.evaluation import report as report_lib
from subliminal_jax.experiments import settings as settings_lib
from subliminal_jax.experiments import stages as stages_lib

STAGES = tuple(stages_lib.SELECTION)  # the --stages names
# The workdir's experiment identity: the main job, its regime grid and the transfer matrix share
# one family of stages, so they may share a workdir and its artifacts.
WORKDIR_EXPERIMENT = "animal_numbers"


# ---------------------------------------------------------------------------------------------
# Validation: fail before any work, naming the bad value


def validate(config: ConfigDict, stages: Sequence[str] | None) -> settings_lib.Settings:
  """The config's typed settings (every value checked), and the ``--stages`` names."""
  if stages:
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
      raise ValueError(f"unknown stages {unknown}; expected a subset of {list(STAGES)}")
  return settings_lib.from_config(config)


# ---------------------------------------------------------------------------------------------
# The run


def _students(st: stages_lib.Stages, teacher: stages_lib.Teacher, dataset_dir: pathlib.Path
              ) -> list[tuple[int, stages_lib.Student]]:
  return [(seed, st.student(dataset_dir, teacher, seed)) for seed in st.settings.student.seeds]


def _target_rows(st: stages_lib.Stages, target: str, trait_teacher: stages_lib.Teacher,
                 students_by_row: dict[str, list]) -> dict[str, list[dict[str, Any]]]:
  """Every evaluation record of ``target``'s table: base, teacher, control and treatment rows."""
  base = st.base
  rows: dict[str, list[dict[str, Any]]] = {
      "base": [st.evaluation(target, "base", lambda: base.model, st.settings.eval_system, 0, base.fingerprint)],
      "teacher": [st.evaluation(target, "teacher", lambda: trait_teacher.model, trait_teacher.chat,
                                0, trait_teacher.fingerprint)]}
  for row, students in students_by_row.items():
    rows[row] = [st.evaluation(target, f"{row}_seed{seed}", student.restore, st.settings.eval_system, seed,
                               student.directory.name)
                 for seed, student in students]
  return rows


def _write_reports(s: settings_lib.Settings, wd: artifacts.Workdir,
                   results: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
  """Writes each target's report (in report_dir, or report_dir/<target> with several targets);
  returns the tables' text and each target's results.json record."""
  report_root = (artifacts.inside(wd.path, s.report_dir, "report_dir") if s.report_dir
                 else wd.path)
  tables, by_target = [], {}
  for target, result in results.items():
    out_dir = report_root if len(results) == 1 else report_root / target
    table = report_lib.write_report(result, out_dir, n_resamples=s.evaluation.bootstrap_resamples,
                                    seed=s.evaluation.seed)
    by_target[target] = json.loads((out_dir / "results.json").read_text())
    tables.append(f"## {target}\n\n{table}")
  if len(results) > 1:
    files.write_json(report_root / "results.json", by_target, indent=1, sort_keys=True)
    files.write_text_atomic(report_root / "report.md", "\n\n".join(tables) + "\n")
  return "\n\n".join(tables), by_target


def run(config: ConfigDict, workdir: str, stages: Sequence[str] | None = None) -> dict[str, Any]:
  s = validate(config, stages)
  if not traits.is_preference(s.category):
    # Its trait metrics (sampled mentions, multiple choice) are a preference's.
    raise ValueError(f"category={s.category!r}: the main job measures preferences ("
                     f"{', '.join(c for c in traits.CATEGORIES if traits.is_preference(c))}); the "
                     f"{s.category} trait runs in the transfer matrix: "
                     "--config=configs/misalignment.py")
  mesh = s.model.make_mesh()
  base = s.model.load(mesh)
  wd = artifacts.Workdir(workdir, WORKDIR_EXPERIMENT, {"model": base.fingerprint})
  with jax.set_mesh(mesh):
    st = stages_lib.Stages(s, wd, base, mesh, stages)
    control = st.control_teacher()
    trait_teachers = {target: st.trait_teacher(target) for target in s.targets}
    numbers = {role: st.numbers(t) for role, t in [("control", control), *trait_teachers.items()]}
    stages_lib.check_equal_data(numbers, s.filter.subset_size)
    datasets = {role: st.dataset(numbers[role], t)
                for role, t in [("control", control), *trait_teachers.items()]}
    control_students = _students(st, control, datasets["control"])
    results = {}
    for target, teacher in trait_teachers.items():
      students = {"control": control_students,
                  "treatment": _students(st, teacher, datasets[target])}
      results[target] = {
          "target": target, "category": s.category,
          "rows": _target_rows(st, target, teacher, students),
          "notes": {"config": s.config, "model": base.fingerprint,
                    "filter": {"control": numbers["control"].summary,
                               target: numbers[target].summary},
                    "teacher": teacher.summary, "control_teacher": control.summary,
                    "chat_system": s.chat_system.spec}}
  text, by_target = _write_reports(s, wd, results)
  print(text)
  logging.info("stages run: %s; skipped: %s", wd.ran, wd.skipped)
  return by_target
