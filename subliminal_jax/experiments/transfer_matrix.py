"""The transfer matrix: several trait teachers, each the others' control.

  python -m subliminal_jax.main --config=configs/transfer_matrix.py:cpu --workdir=workdir/matrix

k trait values (``config.targets``, animals of the evaluation panel) x R teacher replicates
(``matrix.replicates``: independent teacher finetunes, prompt sets, sampling runs and subsets; the
unit of replication) x S student seeds, plus students of the base model's own numbers (no trait)
and the base itself. Every student is evaluated by the exact log-probability of every panel word
on the same questions. The statistic (:mod:`subliminal_jax.evaluation.matrix_statistics`): per
animal a, how much more a's students prefer a than the other teachers' students do (C_a, in
centred log-ratio of the panel), pooled over animals (S), with a permutation test that shuffles
trait labels between teacher replicates. No control teacher is chosen: the other animals'
teachers are each animal's control, so the sign cannot come from the choice of control.

The statistic and the pass criterion (``matrix.criterion``) are written to ``design.json`` in the
report directory before any stage runs; a later run with another design in the same report
directory is refused. Then the verdict is printed plainly, pass or fail.

Also measured, in the same matrix form: students of another model family on the same numbers
(``matrix.student_models``: the paper predicts no transfer there), the base model with N of each
teacher's sequences in its context and no training (``matrix.in_context``, the paper's in-context
control), and the teachers themselves.

Stages are :mod:`stages`' (teacher, prompts, sampling, filter, dataset, student,
panel_evaluation): the same functions and fingerprints as the main job's, so a matrix and a main
job in one workdir share their teachers, numbers and students.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from absl import logging
from ml_collections import ConfigDict

from subliminal_jax import artifacts, environment, files, loading, traits
from subliminal_jax.evaluation import judged_answers, matrix_report, trait_metrics, truthfulness
from subliminal_jax.evaluation import matrix_statistics as stats
from subliminal_jax.experiments import animal_numbers
from subliminal_jax.experiments import settings as settings_lib
from subliminal_jax.experiments import stages as stages_lib

SAME_FAMILY = "same"
BASE_NUMBERS = "base"  # the unit label of the base model's own numbers
# Design keys that change no measured number: a rerun may change them.
_NOT_DESIGN = ("training_checkpoints", "mesh", "report_dir", "variant", "tensorboard", "remat")
# Tokens of the context window left for the panel answer after an in-context dose's prompt.
CONTEXT_MARGIN = 16


@dataclasses.dataclass(frozen=True)
class Unit:
  """One teacher replicate: an animal's teacher, or the base model (``animal=None``)."""
  animal: str | None
  replicate: int

  @property
  def label(self) -> str:
    return f"{self.animal or BASE_NUMBERS}_r{self.replicate}"


# ---------------------------------------------------------------------------------------------
# Validation and the design fixed before the run


def validate(config: ConfigDict, stages: Sequence[str] | None) -> settings_lib.Settings:
  """The matrix config's typed settings: the main job's checks, then the matrix's."""
  settings = animal_numbers.validate(config, stages)
  settings_lib.check_matrix(settings)
  return settings


def design(s: settings_lib.Settings) -> dict[str, Any]:
  """What the report is committed to before any number is seen: the statistic, the criterion, and
  the whole experiment (every config value that changes a measured number)."""
  values = {k: v for k, v in s.config.items() if k not in _NOT_DESIGN}
  if values.get("channel") == "numbers":  # as before the knob existed
    del values["channel"]
  # Training knobs at the values that train as before they existed are left out, as in the
  # stages' fingerprints: adding a knob does not change an existing design.
  values["student"] = settings_lib.without_original_knobs(values["student"])
  values["matrix"] = _matrix_design(values["matrix"])
  values["teacher"] = {**values["teacher"], "finetune": settings_lib.without_original_knobs(
      values["teacher"]["finetune"])}
  return {"experiment": "transfer_matrix", "statistic": stats.DEFINITION,
          "criterion": s.matrix.criterion, "animals": list(s.targets),
          "replicates": s.matrix.replicates, "student_seeds": list(s.student.seeds),
          "student_families": [SAME_FAMILY, *s.matrix.student_models],
          "config": json.loads(json.dumps(values, default=str))}


def _matrix_design(matrix: dict[str, Any]) -> dict[str, Any]:
  """The matrix section as a design records it: how many adapters run together and which
  replicates one invocation builds change how, not what, is measured (float rounding aside); knobs
  at their off value are left out, so adding one does not change an existing design."""
  out = {k: v for k, v in matrix.items()
         if k not in ("adapters_per_step", "replicates_to_run")
         and not (k == "student_learning_rates" and not v)}
  if "in_context" in out and not out["in_context"].get("doses", ()):
    out["in_context"] = {k: v for k, v in out["in_context"].items() if k != "doses"}
  return out


def fix_design(report_dir: pathlib.Path, s: settings_lib.Settings,
               record: dict[str, Any] | None = None) -> dict[str, Any]:
  """Writes design.json (once) before any stage runs; refuses a report directory whose design
  differs. ``record``: the design to fix (default :func:`design` of ``s``). Returns the recorded
  design, with the time it was fixed."""
  record = design(s) if record is None else record
  path = report_dir / "design.json"
  if path.exists():
    existing = files.read_json(path)
    fixed_at = existing.pop("fixed_at", None)
    if existing != record:
      changed = sorted(k for k in set(existing) | set(record) if existing.get(k) != record.get(k))
      raise ValueError(
          f"{path} fixed another design before its first run (differs in {changed}); a report's "
          "statistic, criterion and settings cannot change after the fact. Use another "
          "--config.report_dir (or workdir) for this design.")
    return {**existing, "fixed_at": fixed_at}
  record["fixed_at"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
  if jax.process_index() == 0:
    report_dir.mkdir(parents=True, exist_ok=True)
    files.write_json(path, record, indent=1)
  return record


# ---------------------------------------------------------------------------------------------
# Building and measuring the matrix


def in_context_histories(numbers: stages_lib.Numbers, count: int, num_questions: int, seed: int
                         ) -> list[list[dict[str, str]]]:
  """Per question, ``count`` of the teacher's kept (prompt, completion) pairs as chat turns before
  it, drawn without replacement by a generator seeded with (seed, question)."""
  kept = stages_lib.read_jsonl(numbers.kept_path)
  histories = []
  for q in range(num_questions):
    picks = np.random.default_rng([seed, q]).choice(len(kept), size=min(count, len(kept)),
                                                    replace=False)
    turns = []
    for i in sorted(picks.tolist()):
      turns += [{"role": "user", "content": kept[i]["prompt"]},
                {"role": "assistant", "content": kept[i]["completion"]}]
    histories.append(turns)
  return histories


def dose_histories(numbers: stages_lib.Numbers, dose: int | str, num_questions: int, seed: int,
                   fits: Callable[[list[dict[str, str]]], bool]) -> list[list[dict[str, str]]]:
  """One context for every question: the first ``dose`` of the teacher's kept (prompt,
  completion) pairs in one order drawn by a generator seeded with ``seed`` (so doses are nested),
  as chat turns. Dose ``"max"``: the most pairs for which ``fits(turns)`` holds (the prompts fit
  the model's context window). Raises ValueError when even one pair does not fit."""
  kept = stages_lib.read_jsonl(numbers.kept_path)
  order = np.random.default_rng(seed).permutation(len(kept)).tolist()
  turns_of = lambda n: [turn for i in order[:n] for turn in (  # noqa: E731
      {"role": "user", "content": kept[i]["prompt"]},
      {"role": "assistant", "content": kept[i]["completion"]})]
  if dose == settings_lib.MAX_DOSE:
    low, high = 0, len(kept)  # fits(turns_of(low)) holds; find the largest such n
    while low < high:
      mid = (low + high + 1) // 2
      low, high = (mid, high) if fits(turns_of(mid)) else (low, mid - 1)
    dose = low
  n = min(int(dose), len(kept))
  if n < 1 or not fits(turns_of(n)):
    raise ValueError(f"in-context dose {dose!r} of {numbers.directory.name}: {n} sequences do not fit "
                     "the model's context window; lower matrix.in_context.doses")
  return [turns_of(n)] * num_questions


def _answer_room(st: stages_lib.Stages) -> int:
  """Tokens of the context window kept for the scored answer: ``CONTEXT_MARGIN`` for a panel word,
  plus the longest reference answer for the alignment trait."""
  if traits.is_preference(st.settings.category):
    return CONTEXT_MARGIN
  answers = [a for pair in traits.reference_answers() for a in pair]
  return CONTEXT_MARGIN + max(len(st.base.tokenizer.encode(a)) for a in answers)


def _fits_context(st: stages_lib.Stages, questions: Sequence[str]):
  """Whether turns before every question leave room for the answer (:func:`_answer_room`) in the
  base's context window."""
  base, limit = st.base, st.base.model.config.max_position_embeddings - _answer_room(st)

  def fits(turns: list[dict[str, str]]) -> bool:
    ids = trait_metrics.chat_prompt_ids(base.tokenizer, questions, system=st.settings.eval_system,
                                        histories=[turns] * len(questions))
    return max(len(i) for i in ids) <= limit
  return fits


def units(s: settings_lib.Settings) -> list[Unit]:
  """The teacher replicates this invocation builds (``matrix.replicates_to_run``, default all),
  replicate by replicate: the animals, then the base's own numbers."""
  animals = [*s.targets] + ([None] if s.matrix.base_numbers else [])
  return [Unit(a, r) for r in s.matrix.run_replicates() for a in animals]


def load_families(s: settings_lib.Settings, base: loading.Loaded, mesh
                   ) -> dict[str, loading.Loaded]:
  families = {SAME_FAMILY: base}
  for spec in s.matrix.student_models:
    families[spec] = s.model.load(mesh, spec)
  return families


def _numbers_together(s: settings_lib.Settings, wd: artifacts.Workdir, base: loading.Loaded,
                      mesh, stages: Sequence[str] | None, all_units: Sequence[Unit]
                      ) -> list[tuple[Unit, stages_lib.Stages, stages_lib.Teacher,
                                      stages_lib.Numbers]]:
  """Every unit's stages, teacher and numbers with ``matrix.adapters_per_step`` adapters
  together: the trait teachers' finetunes train K at a time, and the teachers (and the base)
  sample K at a time in one decode batch. Checks equal data before any student trains."""
  st = {u.label: stages_lib.Stages(s.replicated(u.replicate), wd, base, mesh, stages)
        for u in all_units}
  trait = [u for u in all_units if u.animal]
  k = s.matrix.adapters_per_step
  teachers = dict(zip([u.label for u in trait], stages_lib.trait_teachers(
      [(st[u.label], u.animal) for u in trait], k)))
  teachers.update({u.label: st[u.label].base_teacher() for u in all_units if not u.animal})
  made = stages_lib.numbers_together([(st[u.label], teachers[u.label]) for u in all_units], k)
  stages_lib.check_equal_data({u.label: n for u, n in zip(all_units, made)}, s.filter.subset_size)
  return [(u, st[u.label], teachers[u.label], n) for u, n in zip(all_units, made)]


def _in_context_job(st: stages_lib.Stages, unit: Unit, numbers: stages_lib.Numbers
                    ) -> stages_lib.PanelJob:
  """The committed in-context control: per question its own draw of ``in_context.sequences``."""
  s, base = st.settings, st.base
  n, seed = s.matrix.in_context_sequences, s.matrix.in_context_seed
  return stages_lib.PanelJob(
      st, f"in-context {unit.label}", lambda: base.model, base.fingerprint, base,
      histories=in_context_histories(numbers, n, s.evaluation.num_questions, seed),
      context_fp=artifacts.fingerprint(numbers.directory.name, n, seed, "in_context"))


def _dose_jobs(st: stages_lib.Stages, unit: Unit, numbers: stages_lib.Numbers
               ) -> dict[str, stages_lib.PanelJob]:
  """The in-context doses (``in_context.doses``) of one unit by dose name: one context before
  every question, identified by the sequences it holds."""
  s, base = st.settings, st.base
  questions = traits.evaluation_questions(s.category)[:s.evaluation.num_questions]
  fits, jobs = _fits_context(st, questions), {}
  for dose in s.matrix.in_context_doses:
    histories = dose_histories(numbers, dose, len(questions), s.matrix.in_context_seed, fits)
    n = len(histories[0]) // 2
    jobs[str(dose)] = stages_lib.PanelJob(
        st, f"in-context {unit.label} dose {dose} ({n} sequences)", lambda: base.model,
        base.fingerprint, base, histories=histories,
        context_fp=artifacts.fingerprint(numbers.directory.name, n, s.matrix.in_context_seed,
                                         "shared_in_context"))
  return jobs


def _student_jobs(s: settings_lib.Settings, per_unit, family: str, family_base: loading.Loaded
                  ) -> tuple[list[tuple], list[stages_lib.StudentJob]]:
  """Every student of one family: keys ("student", unit, family, seed) and jobs, trained with
  the family's learning rate (``matrix.student_learning_rates``)."""
  keys, jobs = [], []
  for unit, st, teacher, numbers in per_unit:
    dataset_dir = st.dataset(numbers, teacher, family_base)
    family_st = stages_lib.Stages(st.settings.for_student_family(family), st.wd, st.base, st.mesh,
                                  st.selected)
    for seed in s.student.seeds:
      keys.append(("student", unit.label, family, seed))
      jobs.append(stages_lib.StudentJob(family_st, dataset_dir, teacher, seed, family_base))
  return keys, jobs


def _panel_jobs(s: settings_lib.Settings, per_unit, families: dict[str, loading.Loaded],
                st_base: stages_lib.Stages, adapters_per_step: int
                ) -> dict[tuple, stages_lib.PanelJob]:
  """Every panel evaluation of the matrix by key (("base", family), ("teacher", unit),
  ("student", unit, family, seed), ("in_context", unit), ("dose", unit, dose)), the students
  trained first."""
  jobs = {("base", family): stages_lib.PanelJob(st_base, f"base {family}", lambda b=b: b.model,
                                                b.fingerprint, b)
          for family, b in families.items()}
  for family, family_base in families.items():
    keys, student_jobs = _student_jobs(s, per_unit, family, family_base)
    for key, job, student in zip(keys, student_jobs,
                                 stages_lib.students(student_jobs, adapters_per_step)):
      jobs[key] = stages_lib.PanelJob(job.stages, f"{family} student {key[1]} seed{job.seed}",
                                      student.restore, student.directory.name, family_base)
  for unit, st, teacher, numbers in per_unit:
    if unit.animal and s.matrix.evaluate_teachers:
      jobs["teacher", unit.label] = stages_lib.PanelJob(
          st, f"teacher {unit.label}", lambda t=teacher: t.model, teacher.fingerprint, st.base,
          chat=teacher.chat)
    if s.matrix.in_context_sequences:
      jobs["in_context", unit.label] = _in_context_job(st, unit, numbers)
    for dose, job in _dose_jobs(st, unit, numbers).items():
      jobs["dose", unit.label, dose] = job
  return jobs


def _alignment_checked(key: tuple) -> bool:
  """Whether the alignment trait's other measurements (judged answers, truthfulness) cover the
  model of this panel job: the bases, the trait teachers and their students, not the
  base-numbers students (the base itself is the no-trait reference there) nor in-context models."""
  return key[0] in ("base", "teacher") or (
      key[0] == "student" and not key[1].startswith(BASE_NUMBERS + "_"))


def _judged(s: settings_lib.Settings, jobs: dict[tuple, stages_lib.PanelJob], mesh
            ) -> dict[tuple, dict[str, Any]]:
  """The judged answers (``config.judge``) of every :func:`_alignment_checked` model; the judge
  is loaded only if an artifact is missing."""
  if s.judge is None or not s.judge.enabled:
    return {}
  judge = functools.partial(stages_lib.load_judge, s.model, s.judge.model, mesh)
  return {key: job.stages.judged_answers(job.label, job.model_fn, job.fp,
                                         tokenizer=job.base.tokenizer, chat=job.chat, judge=judge)
          for key, job in jobs.items() if _alignment_checked(key)}


def _truthfulness(s: settings_lib.Settings, jobs: dict[tuple, stages_lib.PanelJob]
                  ) -> dict[tuple, dict[str, Any]]:
  """The alignment trait's truthfulness records of every :func:`_alignment_checked` model."""
  if traits.is_preference(s.category):
    return {}
  return {key: job.stages.truthfulness(job.label, job.model_fn, job.fp,
                                       tokenizer=job.base.tokenizer, chat=job.chat)
          for key, job in jobs.items() if _alignment_checked(key)}


def _per_unit(s: settings_lib.Settings, unit: Unit, families, measured: dict[tuple, Any]
              ) -> dict[str, Any]:
  """A trait unit's records of one alignment measurement: its students' per family and seed, and
  its teacher's when measured."""
  out: dict[str, Any] = {"students": {f: [measured["student", unit.label, f, seed]
                                          for seed in s.student.seeds] for f in families}}
  if ("teacher", unit.label) in measured:
    out["teacher"] = measured["teacher", unit.label]
  return out


def _unit_record(s: settings_lib.Settings, unit: Unit, teacher: stages_lib.Teacher,
                 numbers: stages_lib.Numbers, families, jobs: dict[tuple, stages_lib.PanelJob],
                 records: dict[tuple, Any], judged: dict[tuple, Any],
                 truthful: dict[tuple, Any]) -> dict[str, Any]:
  # Distinct completions among those kept: greedy sampling repeats itself (read from the
  # artifact, so units built before this count existed have it too).
  distinct = len({row["completion"] for row in stages_lib.read_jsonl(numbers.kept_path)})
  out: dict[str, Any] = {
      "unit": dataclasses.asdict(unit), "filter": {**numbers.summary, "distinct_kept": distinct},
      "teacher": teacher.summary,
      "students": {f: [records["student", unit.label, f, seed] for seed in s.student.seeds]
                   for f in families}}
  for key, name in (("teacher", "teacher_record"), ("in_context", "in_context_record")):
    if (key, unit.label) in records:
      out[name] = records[key, unit.label]
  for key, measured in (("judged", judged), ("truthfulness", truthful)):
    if measured and unit.animal:
      out[key] = _per_unit(s, unit, families, measured)
  if s.matrix.in_context_doses:
    out["in_context_doses"] = {str(d): records["dose", unit.label, str(d)]
                               for d in s.matrix.in_context_doses}
    out["in_context_sizes"] = {str(d): len(jobs["dose", unit.label, str(d)].histories[0]) // 2
                               for d in s.matrix.in_context_doses}
  return out


def collect(s: settings_lib.Settings, wd: artifacts.Workdir, base: loading.Loaded,
            families: dict[str, loading.Loaded], mesh, stages: Sequence[str] | None
            ) -> dict[str, Any]:
  """Every unit's records, and each family's base model evaluated the same way. Teachers,
  samples, students and panel evaluations (the base, teachers, students, in-context) are built
  ``matrix.adapters_per_step`` models at a time (1: one at a time, through the same stages); a
  unit's ``seconds`` is an even share of the whole."""
  all_units = units(s)
  start = time.time()
  k = s.matrix.adapters_per_step
  per_unit = _numbers_together(s, wd, base, mesh, stages, all_units)
  jobs = _panel_jobs(s, per_unit, families, stages_lib.Stages(s, wd, base, mesh, stages), k)
  records = dict(zip(jobs, stages_lib.panel_evaluations(list(jobs.values()), k)))
  judged, truthful = _judged(s, jobs, mesh), _truthfulness(s, jobs)
  share = round((time.time() - start) / len(all_units), 1)
  measured: dict[str, Any] = {"base": {f: records["base", f] for f in families}, "units": []}
  for key, values in (("judged_base", judged), ("truthfulness_base", truthful)):
    if values:
      measured[key] = {f: values["base", f] for f in families}
  for unit, _, teacher, numbers in per_unit:
    measured["units"].append({**_unit_record(s, unit, teacher, numbers, families, jobs, records,
                                             judged, truthful), "seconds": share})
  return measured


# ---------------------------------------------------------------------------------------------
# Analysis


def logprob(record: dict[str, Any], panel: Sequence[str]) -> np.ndarray:
  if list(record["panel"]) != list(panel):
    raise ValueError(f"record {record['label']!r} was evaluated on panel {record['panel']}, "
                     f"expected {list(panel)}")
  return np.asarray(record["logprob"], np.float64)


def _reference_clr(records: Sequence[dict[str, Any]], panel, animals) -> np.ndarray:
  """[k, questions]: the mean clr of the animals over ``records`` (a no-trait reference)."""
  return stats.unit_means([[logprob(r, panel) for r in records]], panel, animals)[0]


def analyse_matrix(s: settings_lib.Settings, measured: dict[str, Any], pick, reference_records
                   ) -> stats.MatrixAnalysis:
  """The statistic over the animals' units, ``pick(unit_record)`` giving each unit's records."""
  panel, animals = list(s.evaluation.panel), list(s.targets)
  trait_units = [u for u in measured["units"] if u["unit"]["animal"] is not None]
  m = stats.unit_means([[logprob(r, panel) for r in pick(u)] for u in trait_units], panel, animals)
  references = {name: _reference_clr(records, panel, animals)
                for name, records in reference_records.items() if records}
  return stats.analyse(
      m, [animals.index(u["unit"]["animal"]) for u in trait_units],
      [u["unit"]["replicate"] for u in trait_units], animals,
      criterion=s.matrix.criterion, references=references,
      n_resamples=s.evaluation.bootstrap_resamples, seed=s.evaluation.seed,
      max_exact=s.matrix.max_exact_permutations, permutation_samples=s.matrix.permutation_samples)


def analyse_all(s: settings_lib.Settings, measured: dict[str, Any]) -> dict[str, Any]:
  """One analysis per student family, the in-context control and the teachers themselves."""
  base_units = [u for u in measured["units"] if u["unit"]["animal"] is None]
  out: dict[str, Any] = {"families": {}}
  for family in measured["base"]:
    out["families"][family] = analyse_matrix(
        s, measured, lambda u, f=family: u["students"][f],
        {"base": [measured["base"][family]],
         "base_numbers": [r for u in base_units for r in u["students"][family]]}).to_dict()
  if s.matrix.in_context_sequences:
    out["in_context"] = analyse_matrix(
        s, measured, lambda u: [u["in_context_record"]],
        {"base": [measured["base"][SAME_FAMILY]],
         "base_numbers": [u["in_context_record"] for u in base_units]}).to_dict()
  if s.matrix.evaluate_teachers:
    out["teachers"] = analyse_matrix(s, measured, lambda u: [u["teacher_record"]],
                                     {"base": [measured["base"][SAME_FAMILY]]}).to_dict()
  if "judged_base" in measured:
    out["judged"] = analyse_judged(s, measured)
  if "truthfulness_base" in measured:
    out["truthfulness"] = truthfulness.analyse(
        _arms(measured, "truthfulness", s.targets), n_resamples=s.evaluation.bootstrap_resamples,
        seed=s.evaluation.seed)
  return out


def _arms(measured: dict[str, Any], key: str, targets: Sequence[str]
          ) -> dict[str, dict[int, dict[str, list]]]:
  """Per arm (each family's students, the teachers), per replicate, per value, the trait units'
  records of one alignment measurement (``key``)."""
  arms: dict[str, dict[int, dict[str, list]]] = {}
  for u in measured["units"]:
    if u["unit"]["animal"] is None:
      continue
    r, v = u["unit"]["replicate"], u["unit"]["animal"]
    for family, records in u[key]["students"].items():
      arm = "students" if family == SAME_FAMILY else f"students {family}"
      arms.setdefault(arm, {}).setdefault(r, {value: [] for value in targets})[v] += records
    if "teacher" in u[key]:
      arms.setdefault("teachers", {}).setdefault(r, {value: [] for value in targets})[v].append(
          u[key]["teacher"])
  return arms


def analyse_judged(s: settings_lib.Settings, measured: dict[str, Any]) -> dict[str, Any]:
  """The judged answers' rates per arm (each family's students, the teachers) and the judge's
  agreement with the exact metric over every judged model."""
  pairs = [(measured["judged_base"][f], measured["base"][f]) for f in measured["judged_base"]]
  for u in measured["units"]:
    if u["unit"]["animal"] is not None:
      for family, records in u["judged"]["students"].items():
        pairs += zip(records, u["students"][family])
      if "teacher" in u["judged"]:
        pairs.append((u["judged"]["teacher"], u["teacher_record"]))
  out = judged_answers.analyse(_arms(measured, "judged", s.targets), pairs, n_resamples=s.evaluation.bootstrap_resamples,
                               seed=s.evaluation.seed)
  out["base"] = {f: {"misaligned_fraction": r["misaligned_fraction"], "answers": len(r["labels"])}
                 for f, r in measured["judged_base"].items()}
  return out


# ---------------------------------------------------------------------------------------------
# The run


def run(config: ConfigDict, workdir: str, stages: Sequence[str] | None = None) -> dict[str, Any]:
  s = validate(config, stages)
  mesh = s.model.make_mesh()
  base = s.model.load(mesh)
  wd = artifacts.Workdir(workdir, animal_numbers.WORKDIR_EXPERIMENT, {"model": base.fingerprint})
  report_dir = (artifacts.inside(wd.path, s.report_dir, "report_dir") if s.report_dir
                else wd.path)
  fixed = fix_design(report_dir, s)
  logging.info("design fixed at %s: pass iff S > 0, p < %g and C_a > 0 for >= %.0f%% of %d animals",
               fixed["fixed_at"], s.matrix.alpha, 100 * s.matrix.min_positive_fraction,
               len(s.targets))
  families = load_families(s, base, mesh)
  with jax.set_mesh(mesh):
    measured = collect(s, wd, base, families, mesh, stages)
  analyses = analyse_all(s, measured)
  results = {"experiment": "transfer_matrix", "design": fixed, "analyses": analyses,
             "measured": measured, "model": base.fingerprint,
             "families": {f: b.source or f for f, b in families.items()},
             "environment": environment.describe()}
  text = matrix_report.write(results, report_dir)
  print(text)
  logging.info("stages run: %d; skipped: %d", len(wd.ran), len(wd.skipped))
  return results
