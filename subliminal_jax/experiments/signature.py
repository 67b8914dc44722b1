"""The subliminal signature, tested head to head: students against in-context reading, same
family against another.

  python -m subliminal_jax.main --config=configs/signature.py:cpu --workdir=workdir/signature \
      --config.matrix.replicates_to_run="(0, 1)"     # one part; then (2, 3), (4, 5)
  python -m subliminal_jax.experiments.signature --report_dir=docs/results/signature_cpu

A transfer matrix (:mod:`transfer_matrix`: k animals x R teacher replicates x student seeds, the
base's own numbers, the base) with three arms measured on the SAME teacher units:

* ``students``: same-family students of each teacher's numbers;
* ``cross_family``: students of another model family on the same numbers, at a learning rate
  calibrated on held-out base numbers so both families move as far from their base;
* ``in_context_<dose>``: the base with the first ``dose`` of each teacher's sequences before every
  question (nested doses, the last as many as fit the context window), no training.

A subliminal channel needs shared weights, not content the model can read, so its signature is:
(a) students' S > 0; (b) students' S above the strongest in-context dose's (the maximum over doses
is taken inside every permutation, so choosing the dose is part of the test); (c) same-family S
above cross-family S. Each contrast has a permutation p (one label shuffle, within replicates,
applied to every arm) and a CI from a bootstrap over teacher replicates, then questions
(:mod:`subliminal_jax.evaluation.signature_statistics`). Thresholds, contrasts, the power figure
and the calibration are fixed in ``design.json`` before the first stage.

A design too long for one sitting runs in parts (``matrix.replicates_to_run``): each part writes
its measured records to ``parts/`` of the report directory; the analysis reads every committed part
(never a workdir) and gives a verdict only when every replicate of the design is in.
"""

from __future__ import annotations

import pathlib
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import ConfigDict

from subliminal_jax import artifacts, environment, files
from subliminal_jax.evaluation import matrix_statistics as stats
from subliminal_jax.evaluation import signature_report
from subliminal_jax.evaluation import signature_statistics as sig
from subliminal_jax.experiments import animal_numbers
from subliminal_jax.experiments import settings as settings_lib
from subliminal_jax.experiments import transfer_matrix

PARTS = "parts"
STUDENTS, CROSS_FAMILY = "students", "cross_family"


def dose_arm(dose: Any) -> str:
  return f"in_context_{dose}"


def validate(config: ConfigDict, stages: Sequence[str] | None) -> settings_lib.Settings:
  """The transfer matrix's checks, then the signature's: in-context doses, exactly one other
  family, and the ``signature`` section."""
  s = transfer_matrix.validate(config, stages)
  m = s.matrix
  if not m.in_context_doses:
    raise ValueError("the signature needs in-context doses to compare students with "
                     "(matrix.in_context.doses, e.g. (8, 32, 'max'))")
  if len(m.student_models) != 1:
    raise ValueError(f"the signature needs exactly one other student family for contrast (c), "
                     f"got matrix.student_models={list(m.student_models)}")
  criterion = dict(config.signature.criterion)
  expected = set(sig.DEFAULT_CRITERION)
  if set(criterion) != expected or not all(0 < v < 1 for v in criterion.values()):
    raise ValueError(f"signature.criterion={criterion}; expected thresholds in (0, 1) for "
                     f"{sorted(expected)}")
  return s


VERDICT_RULE = ("PASS (subliminal signature) iff (a) S(students) > 0 with permutation p below "
                "criterion.students, (b) S(students) minus the largest in-context dose's S > 0 "
                "with p below criterion.students_minus_in_context, and (c) S(students) minus "
                "S(cross_family) > 0 with p below criterion.students_minus_cross_family; FAIL when "
                "the data decide one of them fails; UNDETERMINED when none failed but one cannot "
                "be decided (or replicates of the design are missing)")
BOOTSTRAP_DEFINITION = ("percentile CI from resampling whole teacher replicates with replacement, "
                        "then questions with replacement (evaluation.bootstrap_resamples draws, "
                        "seed evaluation.seed); it includes teacher-to-teacher variation")


def contrasts(s: settings_lib.Settings) -> dict[str, Any]:
  """The pre-registered contrasts over this design's arms, as data."""
  return {name: c.to_dict() for name, c in sig.signature_contrasts(
      [dose_arm(d) for d in s.matrix.in_context_doses], STUDENTS, CROSS_FAMILY).items()}


def design(s: settings_lib.Settings) -> dict[str, Any]:
  """The transfer matrix's design plus the contrasts, thresholds, the power figure and the
  cross-family calibration, all fixed before the first stage."""
  out = transfer_matrix.design(s)
  g = s.config["signature"]
  out.update(experiment="signature", arms=arm_names(s), contrasts=contrasts(s),
             criterion=dict(g["criterion"]), verdict_rule=VERDICT_RULE,
             bootstrap=BOOTSTRAP_DEFINITION, power=g["power"], calibration=g["calibration"])
  return out


def arm_names(s: settings_lib.Settings) -> list[str]:
  return [STUDENTS, CROSS_FAMILY, *(dose_arm(d) for d in s.matrix.in_context_doses)]


def design_digest(record: Mapping[str, Any]) -> str:
  """The design's content, without the time it was fixed: a part measured under an equal design
  (a new machine's workdir fixes its own copy) combines with the committed ones; any other
  difference is refused."""
  return artifacts.fingerprint({k: v for k, v in record.items() if k != "fixed_at"})


def part_name(replicates: Sequence[int]) -> str:
  return "replicates_" + "-".join(str(r) for r in replicates) + ".json"


def run(config: ConfigDict, workdir: str, stages: Sequence[str] | None = None) -> dict[str, Any]:
  s = validate(config, stages)
  start = time.time()
  mesh = s.model.make_mesh()
  base = s.model.load(mesh)
  wd = artifacts.Workdir(workdir, animal_numbers.WORKDIR_EXPERIMENT, {"model": base.fingerprint})
  report_dir = (artifacts.inside(wd.path, s.report_dir, "report_dir") if s.report_dir
                else wd.path)
  fixed = transfer_matrix.fix_design(report_dir, s, design(s))
  replicates = list(s.matrix.run_replicates())
  logging.info("signature design fixed at %s; this part: replicates %s of %d", fixed["fixed_at"],
               replicates, s.matrix.replicates)
  families = transfer_matrix.load_families(s, base, mesh)
  with jax.set_mesh(mesh):
    measured = transfer_matrix.collect(s, wd, base, families, mesh, stages)
  part = {"experiment": "signature_part", "design_fixed_at": fixed["fixed_at"],
          "design_digest": design_digest(fixed),
          "replicates": replicates, "measured": measured, "model": base.fingerprint,
          "families": {f: b.source or f for f, b in families.items()},
          "environment": environment.describe(), "wall_seconds": round(time.time() - start, 1)}
  if jax.process_index() != 0:  # process 0 alone writes the part and the report it reads back
    return {"experiment": "signature_part", "part": part}
  (report_dir / PARTS).mkdir(parents=True, exist_ok=True)
  files.write_json(report_dir / PARTS / part_name(replicates), part, indent=1)
  results = analyse_report_dir(report_dir)
  text = signature_report.write(results, report_dir)
  print(text)
  logging.info("stages run: %d; skipped: %d", len(wd.ran), len(wd.skipped))
  return results


# ---------------------------------------------------------------------------------------------
# The analysis, from the committed parts


def load_parts(report_dir: pathlib.Path) -> tuple[dict[str, Any], dict[str, Any], list[dict]]:
  """(design, the parts' measured records merged, each part's summary). A part counts when its
  design was fixed at the report's time or equals the report's in content; any other part, or two
  parts that measured the same replicate, is refused."""
  design_record = files.read_json(report_dir / "design.json")
  digest = design_digest(design_record)
  paths = sorted((report_dir / PARTS).glob("replicates_*.json"))
  if not paths:
    raise FileNotFoundError(f"{report_dir / PARTS} holds no part records (replicates_*.json): run "
                            "a part first (python -m subliminal_jax.main --config=... "
                            "--config.matrix.replicates_to_run=...)")
  units, seen, summaries, base = [], {}, [], None
  for path in paths:
    part = files.read_json(path)
    if (part["design_fixed_at"] != design_record["fixed_at"]
        and part.get("design_digest") != digest):
      raise ValueError(
          f"{path} was measured under another design (fixed at {part['design_fixed_at']}, digest "
          f"{part.get('design_digest')}) than this report's (fixed at "
          f"{design_record['fixed_at']}, digest {digest}); copy the report's design.json into "
          "the part's workdir before running it, so a changed design is refused before any stage")
    for r in part["replicates"]:
      if r in seen:
        raise ValueError(f"replicate {r} is in both {seen[r]} and {path.name}")
      seen[r] = path.name
    units += part["measured"]["units"]
    base = base or part["measured"]["base"]  # the first part's; later parts re-measure the same
    summaries.append({"part": path.name, "replicates": part["replicates"],
                      "wall_seconds": part["wall_seconds"],
                      "host": part["environment"]["host"].get("cpu"),
                      "commit": part["environment"]["git"].get("sha")})
  return design_record, {"base": base, "units": units}, summaries


def _arm_records(unit: Mapping[str, Any], arm: str, cross: str) -> list[Any]:
  if arm == STUDENTS:
    return unit["students"][transfer_matrix.SAME_FAMILY]
  if arm == CROSS_FAMILY:
    return unit["students"][cross]
  return [unit["in_context_doses"][arm[len("in_context_"):]]]


def arm_means(design_record: Mapping[str, Any], measured: Mapping[str, Any]
              ) -> tuple[dict[str, np.ndarray], list[int], list[int]]:
  """Each arm's unit means [units, k, questions] over the trait units (same units, same order in
  every arm), with each unit's label and replicate."""
  panel, animals = design_record["config"]["evaluation"]["panel"], design_record["animals"]
  cross = design_record["student_families"][1]
  trait = sorted((u for u in measured["units"] if u["unit"]["animal"] is not None),
                 key=lambda u: (u["unit"]["replicate"], animals.index(u["unit"]["animal"])))
  arms = {arm: stats.unit_means(
      [[transfer_matrix.logprob(r, panel) for r in _arm_records(u, arm, cross)] for u in trait],
      panel, animals) for arm in design_record["arms"]}
  return (arms, [animals.index(u["unit"]["animal"]) for u in trait],
          [u["unit"]["replicate"] for u in trait])


def analyse(design_record: Mapping[str, Any], measured: Mapping[str, Any]) -> dict[str, Any]:
  """Every arm's S per replicate, the contrasts with their permutation p and hierarchical CI, and
  the verdict (UNDETERMINED until every replicate of the design is measured)."""
  arms, labels, replicates = arm_means(design_record, measured)
  have = sorted(set(replicates))
  missing = sorted(set(range(design_record["replicates"])) - set(have))
  perms = design_record["config"]["matrix"]["permutations"]
  e = design_record["config"]["evaluation"]
  tested = sig.paired_contrasts(arms, labels, replicates, design_record["contrasts"],
                                max_exact=perms["max_exact"], samples=perms["samples"],
                                seed=e["seed"])
  intervals = sig.hierarchical_bootstrap(arms, labels, replicates, design_record["contrasts"],
                                         n_resamples=e["bootstrap_resamples"], seed=e["seed"])
  if missing:
    verdict = {"verdict": "UNDETERMINED", "passed": False,
               "reason": f"interim: replicates {missing} of the design's "
                         f"{design_record['replicates']} are not measured yet; the pre-registered "
                         "test is run on all of them, and these numbers are descriptive only"}
  else:
    verdict = sig.verdict(tested, design_record["criterion"])
  per_replicate = {arm: dict(zip((f"r{r}" for r in have), map(float, sig.per_replicate_s_table(
      m, np.asarray(labels), np.asarray(replicates)).mean(axis=1)))) for arm, m in arms.items()}
  return {"replicates_measured": have, "replicates_missing": missing,
          "per_replicate_S": per_replicate, "arms": tested["arms"],
          "permutations": tested["permutations"],
          "bootstrap": {k: v for k, v in intervals.items() if k != "contrasts"},
          "contrasts": {name: {**entry, **intervals["contrasts"].get(name, {})}
                        for name, entry in tested["contrasts"].items()},
          "verdict": verdict}


def analyse_report_dir(report_dir: str | pathlib.Path) -> dict[str, Any]:
  """The whole results record of a report directory, from its design and committed parts."""
  report_dir = pathlib.Path(report_dir)
  design_record, measured, parts = load_parts(report_dir)
  return {"experiment": "signature", "design": design_record, "parts": parts,
          "analysis": analyse(design_record, measured), "measured": measured}


def main(argv: Sequence[str]) -> None:
  del argv
  report_dir = pathlib.Path(flags.FLAGS.report_dir)
  print(signature_report.write(analyse_report_dir(report_dir), report_dir))


if __name__ == "__main__":
  flags.DEFINE_string("report_dir", None, "A signature report directory (its design.json and "
                      "parts/): recompute its results.json, report and plots from them.")
  flags.mark_flag_as_required("report_dir")
  app.run(main)
