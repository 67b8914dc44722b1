"""Student learning-rate calibration: students of two families moved the same distance from their base.

  python -m subliminal_jax.main --config=configs/student_calibration.py:cpu --workdir=workdir/calibration

The cross-family matrix trains students of another family (Gemma 3 270M) at the learning rate
designed for the same-family students (SmolLM2). Its Gemma students moved about 3.6 times further
from their base in the panel's centred log-ratio, and their C_a is that much noisier
(docs/results/cross_family_noise). This experiment finds, for the other family, the learning rate
at which its students move as far from their own base as the same-family students do from theirs.

Protocol (every stage is :mod:`stages`', fingerprinted in the workdir):

1. Training data: the base model's (SmolLM2's) own numbers on a held-out prompt set
   (``calibration.train_prompts_seed``, used by no matrix unit; sampling and subset seeds moved to
   it as well), exactly as the matrix's base-numbers students get theirs: ``st.base_teacher()``,
   ``st.numbers``, and ``st.dataset`` tokenized for each family with its own chat template.
2. Students: same-family students at the config's ``student.learning_rate`` (the design LR), and
   the other family's (``calibration.student_model``) at every ``calibration.learning_rates``,
   each with ``student.seeds``; every other setting is the matrix's student recipe (the LR is part
   of the student stage's fingerprint, so each is its own artifact).
3. Distance: a second held-out prompt set (``calibration.measure``: its own prompts, sampling and
   subset seed) sampled by the same base, tokenized per family. For each student, the mean over
   completion-target positions (every position whose next token is a completion token, the end of
   turn included) of KL(student || its own base) over the full vocabulary, teacher-forced on those
   completions (stage ``student_kl``). The base itself measures 0.
4. Rule: reference = the geometric mean of the same-family students' KLs; each grid LR's KL = the
   geometric mean over its seeds. Chosen LR: log-linear interpolation in (log LR, log KL) between the
   two neighbouring grid points (in increasing LR) whose KLs bracket the reference (the first such
   pair); if none brackets it, the grid LR whose KL is nearest to the reference in log, flagged
   ``bracketed: false`` (then widen the grid). :func:`choose_learning_rate`.

Written into the report directory: calibration.json (grid, KLs, reference, chosen LR, rule),
report.md (the table) and kl_vs_lr.png (KL against LR per family).
"""

from __future__ import annotations

import dataclasses
import gc
import math
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from ml_collections import ConfigDict

from subliminal_jax import artifacts, environment, files, loading
from subliminal_jax.evaluation import report as report_lib
from subliminal_jax.experiments import animal_numbers
from subliminal_jax.experiments import settings as settings_lib
from subliminal_jax.experiments import stages as stages_lib
from subliminal_jax.training import data as data_lib
from subliminal_jax.training import losses

SAME_FAMILY = "same"
KL_STAGE = "student_kl"  # a measurement, not a --stages name: it always runs when missing
KL_VERSION = 1
RULE = ("reference = geometric mean of the same-family students' KLs; per grid LR, the geometric "
        "mean over seeds; chosen = log-linear interpolation in (log LR, log KL) between the first "
        "pair of neighbouring grid LRs whose KLs bracket the reference, else the grid LR whose KL "
        "is nearest the reference in log (bracketed: false)")
PLOT = "kl_vs_lr.png"


@dataclasses.dataclass(frozen=True)
class CalibrationSettings:
  """``calibration``: the other family, its LR grid and the two held-out prompt sets."""
  student_model: str
  learning_rates: tuple[float, ...]
  train_prompts_seed: int
  measure_prompts_seed: int
  measure_prompts_count: int
  measure_batch_size: int

  def __post_init__(self):
    if not isinstance(self.student_model, str) or not self.student_model.strip():
      raise ValueError(f"calibration.student_model={self.student_model!r}; expected a model name "
                       "or path (e.g. 'gemma3-270m')")
    rates = list(self.learning_rates)
    if len(rates) < 2 or any(not isinstance(r, (int, float)) or isinstance(r, bool) or r <= 0
                             for r in rates) or rates != sorted(set(rates)):
      raise ValueError(f"calibration.learning_rates={rates}; expected at least two distinct "
                       "increasing positive learning rates")
    if self.train_prompts_seed == self.measure_prompts_seed:
      raise ValueError("calibration.train_prompts_seed and measure.prompts_seed are equal: the "
                       "distance must be measured on prompts the students did not train on")
    for key in ("measure_prompts_count", "measure_batch_size"):
      if getattr(self, key) < 1:
        raise ValueError(f"calibration.{key}={getattr(self, key)!r}; expected >= 1")

  @classmethod
  def from_config(cls, config: ConfigDict) -> "CalibrationSettings":
    c = config.calibration
    return cls(student_model=c.student_model, learning_rates=tuple(c.learning_rates),
               train_prompts_seed=c.train_prompts_seed, measure_prompts_seed=c.measure.prompts_seed,
               measure_prompts_count=c.measure.prompts_count, measure_batch_size=c.measure.batch_size)


def held_out(s: settings_lib.Settings, seed: int, count: int | None = None) -> settings_lib.Settings:
  """``s`` with its prompts, sampling and subset seeds all at ``seed`` (a prompt set no matrix unit
  draws), and ``count`` prompts all kept by the filter when given."""
  out = dataclasses.replace(
      s, prompts=dataclasses.replace(s.prompts, seed=seed),
      sampling=dataclasses.replace(s.sampling, seed=seed),
      filter=dataclasses.replace(s.filter, seed=seed))
  if count is not None:
    out = dataclasses.replace(out, prompts=dataclasses.replace(out.prompts, count=count),
                              filter=dataclasses.replace(out.filter, subset_size=count))
  return out


# ---------------------------------------------------------------------------------------------
# The distance: mean per-token KL(student || base) on held-out completions


@nnx.jit
def _batch_kl(student: nnx.Module, base: nnx.Module, input_ids, attention_mask, loss_mask):
  """(summed KL over target positions, per-row sums, target positions per row)."""
  _, target_mask = losses.shifted_targets(input_ids, loss_mask, attention_mask)
  kl = losses.masked_kl(student(input_ids, attention_mask), base(input_ids, attention_mask))
  per_row = jnp.where(target_mask, kl, 0.0).sum(axis=1)
  return per_row, target_mask.sum(axis=1)


def token_kl(student: nnx.Module, base: nnx.Module, dataset, *, pad_id: int, batch_size: int
             ) -> dict[str, float]:
  """KL(student || base) of the next-token distributions at every position of ``dataset`` (a
  tokenized SFT dataset) whose next token is a completion target: the mean per target token, the
  mean per sequence (summed over its targets) and the number of target tokens."""
  rows = dataset.with_format(None).select_columns(["input_ids", "loss_mask"])
  sums, counts = [], []
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    batch = data_lib.pad_batch(chunk["input_ids"], chunk["loss_mask"], batch_size=batch_size,
                               pad_id=pad_id)
    per_row, count = _batch_kl(student, base, batch["input_ids"], batch["attention_mask"],
                               batch["loss_mask"])
    real = len(chunk["input_ids"])
    sums.extend(np.asarray(per_row, np.float64)[:real].tolist())
    counts.extend(np.asarray(count)[:real].tolist())
  tokens = int(sum(counts))
  return {"kl_per_token": float(sum(sums) / tokens), "kl_per_sequence": float(np.mean(sums)),
          "target_tokens": tokens, "sequences": len(sums)}


def measured_kl(st: stages_lib.Stages, label: str, model_fn, model_fp: str,
                family_base: loading.Loaded, measure_dir: pathlib.Path, batch_size: int
                ) -> dict[str, Any]:
  """The ``student_kl`` stage: :func:`token_kl` of one model against ``family_base`` on the
  measurement dataset ``measure_dir`` (tokenized for that family). Returns its record."""
  inputs = {"model": model_fp, "base": family_base.fingerprint, "dataset": measure_dir.name,
            "version": KL_VERSION}

  def build(out: pathlib.Path) -> dict[str, Any]:
    dataset = data_lib.load_dataset(measure_dir / "dataset")
    record = {"label": label, **token_kl(model_fn(), family_base.model, dataset,
                                         pad_id=family_base.tokenizer.pad_id,
                                         batch_size=batch_size)}
    files.write_json(out / "record.json", record, indent=1)
    logging.info("%s: KL(student || base) %.4g per token", label, record["kl_per_token"])
    return record

  directory, _ = st.wd.run_stage(KL_STAGE, inputs, build)
  return files.read_json(directory / "record.json")


# ---------------------------------------------------------------------------------------------
# The rule


def geometric_mean(values: Sequence[float]) -> float:
  return float(np.exp(np.mean(np.log(np.asarray(values, np.float64)))))


def choose_learning_rate(learning_rates: Sequence[float], kls: Sequence[float], reference: float
                         ) -> dict[str, Any]:
  """The grid LR at which the other family's KL equals ``reference`` (see :data:`RULE`)."""
  lrs, kl = np.log(np.asarray(learning_rates, np.float64)), np.log(np.asarray(kls, np.float64))
  ref = math.log(reference)
  nearest = int(np.argmin(np.abs(kl - ref)))
  for i in range(len(lrs) - 1):
    low, high = sorted((kl[i], kl[i + 1]))
    if low <= ref <= high:
      fraction = 0.0 if kl[i + 1] == kl[i] else (ref - kl[i]) / (kl[i + 1] - kl[i])
      chosen = float(np.exp(lrs[i] + fraction * (lrs[i + 1] - lrs[i])))
      return {"learning_rate": chosen, "bracketed": True,
              "between": [float(learning_rates[i]), float(learning_rates[i + 1])],
              "nearest_grid_learning_rate": float(learning_rates[nearest])}
  return {"learning_rate": float(learning_rates[nearest]), "bracketed": False, "between": None,
          "nearest_grid_learning_rate": float(learning_rates[nearest])}


# ---------------------------------------------------------------------------------------------
# The run


def _measure_sets(s: settings_lib.Settings, c: CalibrationSettings, wd: artifacts.Workdir, base,
                  families: dict[str, loading.Loaded], mesh, stages) -> tuple[Any, dict, dict]:
  """The training numbers' stages and teacher, and per family its training and measurement
  datasets (both sampled by the base from held-out prompts)."""
  train = stages_lib.Stages(held_out(s, c.train_prompts_seed), wd, base, mesh, stages)
  measure = stages_lib.Stages(held_out(s, c.measure_prompts_seed, c.measure_prompts_count), wd,
                              base, mesh, stages)
  teacher = train.base_teacher()
  numbers, measure_numbers = train.numbers(teacher), measure.numbers(measure.base_teacher())
  stages_lib.check_equal_data({"train": numbers}, s.filter.subset_size)
  train_sets = {f: train.dataset(numbers, teacher, b) for f, b in families.items()}
  measure_sets = {f: measure.dataset(measure_numbers, measure.base_teacher(), b)
                  for f, b in families.items()}
  return (train, teacher), train_sets, measure_sets


def _students_kl(train: stages_lib.Stages, teacher: stages_lib.Teacher, family: str,
                 family_base: loading.Loaded, learning_rate: float, train_set: pathlib.Path,
                 measure_set: pathlib.Path, batch_size: int) -> list[dict[str, Any]]:
  """Every seed's student of ``family`` at ``learning_rate``, and its KL record."""
  st = stages_lib.Stages(train.settings.with_student_learning_rate(learning_rate), train.wd, train.base,
                         train.mesh, train.selected)
  records = []
  for seed in st.settings.student.seeds:
    student = st.student(train_set, teacher, seed, family_base)
    record = measured_kl(st, f"{family} lr={learning_rate:g} seed{seed}", student.restore,
                         student.directory.name, family_base, measure_set, batch_size)
    records.append({**record, "seed": seed, "learning_rate": learning_rate,
                    "student": student.directory.name})
    gc.collect()  # the student's copy of the model
  return records


def collect(s: settings_lib.Settings, c: CalibrationSettings, wd: artifacts.Workdir,
            base: loading.Loaded, other: loading.Loaded, mesh, stages) -> dict[str, Any]:
  families = {SAME_FAMILY: base, c.student_model: other}
  (train, teacher), train_sets, measure_sets = _measure_sets(s, c, wd, base, families, mesh, stages)
  bases = {f: measured_kl(train, f"base {f}", lambda b=b: b.model, b.fingerprint, b,
                          measure_sets[f], c.measure_batch_size) for f, b in families.items()}
  design_lr = s.student.recipe.optimization.learning_rate
  same = _students_kl(train, teacher, SAME_FAMILY, base, design_lr, train_sets[SAME_FAMILY],
                      measure_sets[SAME_FAMILY], c.measure_batch_size)
  grid = [_students_kl(train, teacher, c.student_model, other, lr, train_sets[c.student_model],
                       measure_sets[c.student_model], c.measure_batch_size)
          for lr in c.learning_rates]
  reference = geometric_mean([r["kl_per_token"] for r in same])
  grid_kl = [geometric_mean([r["kl_per_token"] for r in records]) for records in grid]
  return {
      "rule": RULE, "measure": "mean per completion-target token of KL(student || own base), full "
      "vocabulary, teacher-forced on the base's own completions of the measurement prompts",
      "design_learning_rate": design_lr, "reference_kl": reference,
      "student_model": c.student_model, "learning_rates": list(c.learning_rates),
      "grid_kl": grid_kl, "chosen": choose_learning_rate(c.learning_rates, grid_kl, reference),
      "base_kl": {f: r["kl_per_token"] for f, r in bases.items()},
      "students": {SAME_FAMILY: same, c.student_model: [r for records in grid for r in records]},
      "train_data": {"prompts_seed": c.train_prompts_seed, "examples": s.filter.subset_size},
      "measure_data": {"prompts_seed": c.measure_prompts_seed,
                       "prompts": c.measure_prompts_count,
                       "target_tokens": {f: r["target_tokens"] for f, r in bases.items()}},
  }


def format_report(result: dict[str, Any]) -> str:
  other, chosen = result["student_model"], result["chosen"]
  lines = [
      "# Student learning-rate calibration", "",
      f"Distance: {result['measure']}. Rule: {result['rule']}.", "",
      "| family | learning rate | seed | KL per token | KL per sequence | target tokens |",
      "|---|---|---|---|---|---|"]
  for family in (SAME_FAMILY, other):
    for r in result["students"][family]:
      lines.append(f"| {family} | {r['learning_rate']:g} | {r['seed']} | {r['kl_per_token']:.4g} | "
                   f"{r['kl_per_sequence']:.4g} | {r['target_tokens']} |")
  where = (f"interpolated between {chosen['between'][0]:g} and {chosen['between'][1]:g}"
           if chosen["bracketed"] else "NOT bracketed by the grid: the nearest grid point; widen "
           "the grid")
  lines += ["", f"Reference (same family at its design LR {result['design_learning_rate']:g}): "
            f"KL {result['reference_kl']:.4g} per token.", "",
            f"**{other}: learning rate {chosen['learning_rate']:.3g}** ({where}; nearest grid LR "
            f"{chosen['nearest_grid_learning_rate']:g}).", "", f"![KL vs LR]({PLOT})"]
  return "\n".join(lines)


def plot(result: dict[str, Any], path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  other = result["student_model"]
  fig, ax = plt.subplots(figsize=(5.2, 3.8))
  for family, marker in ((SAME_FAMILY, "o"), (other, "s")):
    records = result["students"][family]
    ax.scatter([r["learning_rate"] for r in records], [r["kl_per_token"] for r in records],
               marker=marker, label=family)
  ax.plot(result["learning_rates"], result["grid_kl"], color="C1")
  ax.axhline(result["reference_kl"], color="C0", linestyle="--", linewidth=1)
  ax.axvline(result["chosen"]["learning_rate"], color="gray", linestyle=":", linewidth=1)
  ax.set(xscale="log", yscale="log", xlabel="student learning rate",
         ylabel="KL(student || own base) per token")
  ax.legend()
  fig.tight_layout()
  report_lib.save_figure(fig, path)


def run(config: ConfigDict, workdir: str, stages: Sequence[str] | None = None) -> dict[str, Any]:
  s = animal_numbers.validate(config, stages)
  c = CalibrationSettings.from_config(config)
  mesh = s.model.make_mesh()
  base = s.model.load(mesh)
  other = s.model.load(mesh, c.student_model)
  # The matrix's workdir identity: a calibration may share a matrix's workdir (and its datasets).
  wd = artifacts.Workdir(workdir, animal_numbers.WORKDIR_EXPERIMENT, {"model": base.fingerprint})
  report_dir = artifacts.inside(wd.path, s.report_dir, "report_dir") if s.report_dir else wd.path
  with jax.set_mesh(mesh):
    result = collect(s, c, wd, base, other, mesh, stages)
  result.update(experiment="student_calibration", config=s.config, model=base.fingerprint,
                environment=environment.describe())
  if jax.process_index() == 0:
    report_dir.mkdir(parents=True, exist_ok=True)
    files.write_json(report_dir / "calibration.json", result, indent=1, default=str)
    files.write_text_atomic(report_dir / "report.md", format_report(result) + "\n")
    plot(result, report_dir / PLOT)
  print(format_report(result))
  return result
