"""The transfer matrix's statistic, its permutation test and its bootstrap CIs.

Setting: k trait values (animals) a_1..a_k, each with R teacher replicates; teacher replicate
(a, r) trains several students; every model is evaluated on Q questions by the exact
log-probability of each word of a panel (which contains the k animals).

Per student and question, the centred log-ratio of the panel,
``clr(a) = log P(a) - mean over panel words b of log P(b)``: a preference that does not move when
the student gets better or worse at answering with one word at all. Per teacher unit (a, r),
``M[(a, r), b, q]``: its students' mean clr of animal b on question q.

  C_b = mean over the units labelled b of M[., b]  -  mean over the other units of M[., b]
  S   = mean over b of C_b

C_b > 0: students of b's teachers prefer b more than students of the other teachers do. The
other teachers are b's control, so no separate control teacher (whose own habits could set the
sign) is chosen. S pools the k animals.

Permutation test: under the null hypothesis that a teacher's trait does not change what its
students prefer, the trait labels are exchangeable between the teachers that share everything
else. Replicate r's k teachers share their seeds (prompts, sampling, finetuning data order), so the
labels are permuted within each replicate: (k!)^R assignments, enumerated exactly up to
``max_exact`` and sampled beyond. S depends on an assignment only through the sum of each unit's
entry in its own label's column (``S = (k D - T) / (k (k-1) R)`` with D that sum and T the sum of
all entries), which makes the exact test cheap. p = the share of assignments (the observed one
included) whose S is at least the observed S.

Bootstrap CIs resample questions (the teachers and students fixed); the permutation test is the
one that accounts for teacher-to-teacher variation, the unit of replication.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Mapping, Sequence

import numpy as np

from subliminal_jax.evaluation import statistics

__all__ = ["DEFINITION", "centred_log_ratio", "unit_means", "check_labels", "transfer_statistic",
           "Assignments", "assignments", "permutation_test", "MatrixAnalysis", "analyse"]

# The statistic in one sentence, recorded in every design before its run.
DEFINITION = ("clr(a) = log P(a) - mean over the panel of log P, per student and question; "
              "C_a = mean clr(a) of the students of a's teachers - mean clr(a) of the other "
              "teachers' students; S = mean over animals of C_a; p = share of trait-label "
              "assignments, permuted among the teachers of each replicate, with S at least the "
              "observed S; CIs by bootstrap over questions")

# S values within this relative tolerance of the observed one count as ties (>=): float sums of the
# same numbers in another order must not turn a tie into a strict inequality.
_TIE_TOLERANCE = 1e-10


def centred_log_ratio(logprob: Any) -> np.ndarray:
  """``logprob`` [..., panel] -> log P(a) minus the mean over the panel of log P, [..., panel]."""
  logprob = np.asarray(logprob, np.float64)
  if logprob.shape[-1] < 2:
    raise ValueError(f"a centred log-ratio needs a panel of >= 2 words, got shape {logprob.shape}")
  if not np.all(np.isfinite(logprob)):
    raise ValueError("log-probabilities must be finite")
  return logprob - logprob.mean(axis=-1, keepdims=True)


def unit_means(records_by_unit: Sequence[Sequence[Any]], panel: Sequence[str],
               animals: Sequence[str]) -> np.ndarray:
  """``M`` [units, k, questions]: each unit's students' mean clr of each animal per question.

  ``records_by_unit[u]``: the [questions, panel] log-probability matrices of unit u's students.
  """
  panel = list(panel)
  missing = [a for a in animals if a not in panel]
  if missing:
    raise ValueError(f"animals {missing} are not in the panel {panel}")
  columns = [panel.index(a) for a in animals]
  out = []
  for u, records in enumerate(records_by_unit):
    if not len(records):
      raise ValueError(f"unit {u} has no students")
    clr = np.stack([centred_log_ratio(r) for r in records])  # [students, Q, panel]
    out.append(clr.mean(axis=0)[:, columns].T)  # [k, Q]
  shapes = {m.shape for m in out}
  if len(shapes) != 1:
    raise ValueError(f"units were evaluated on different questions: shapes {sorted(shapes)}")
  return np.stack(out)


def check_labels(labels: Sequence[int], replicates: Sequence[int], k: int) -> tuple[np.ndarray, np.ndarray]:
  """(labels, replicates) as arrays; every replicate must hold each of the k animals once."""
  labels = np.asarray(labels)
  replicates = np.asarray(replicates)
  if labels.shape != replicates.shape or labels.ndim != 1:
    raise ValueError(f"labels {labels.shape} and replicates {replicates.shape} must be equal 1-d")
  for r in np.unique(replicates):
    got = sorted(labels[replicates == r].tolist())
    if got != list(range(k)):
      raise ValueError(f"replicate {r} has labels {got}; every replicate needs each of the {k} "
                       "animals exactly once")
  return labels, replicates


def transfer_statistic(means: np.ndarray, labels: Sequence[int]) -> tuple[float, np.ndarray]:
  """(S, C) from ``means`` [units, k] (already averaged over questions) and each unit's label."""
  means = np.asarray(means, np.float64)
  labels = np.asarray(labels)
  k = means.shape[1]
  c = np.empty(k)
  for b in range(k):
    own = labels == b
    if not own.any() or own.all():
      raise ValueError(f"animal {b} needs units labelled with it and units that are not")
    c[b] = means[own, b].mean() - means[~own, b].mean()
  return float(c.mean()), c


@dataclasses.dataclass(frozen=True)
class Assignments:
  """The label assignments of a permutation test, and each arm's D under each of them.

  D: the sum of every unit's entry in the column its label names. Arms are matrices measured on the
  same units (students, in-context models, ...): assignment j relabels every arm's units the same
  way, so contrasts between arms can be tested by one shuffle.
  """

  observed: np.ndarray  # [arms]: D of the observed labels
  sums: np.ndarray  # [arms, assignments]: D of each assignment (enumerated or sampled)
  exact: bool  # every assignment enumerated (else sampled with replacement)
  total: int  # the number of assignments there are, (k!)^R

  @property
  def count(self) -> int:
    return self.sums.shape[1]

  def p_value(self, observed: float, values: np.ndarray, scale: float) -> float:
    """The share of assignments whose ``values`` are at least ``observed`` (ties within
    ``_TIE_TOLERANCE * max(1, scale)`` count); sampled, the observed assignment counts as a draw."""
    at_least = int(np.sum(np.asarray(values) >= observed - _TIE_TOLERANCE * max(1.0, scale)))
    return at_least / self.count if self.exact else (at_least + 1) / (self.count + 1)

  def summary(self) -> dict[str, Any]:
    return {"assignments": self.count, "exact": self.exact,
            "min_attainable_p": 1 / self.total if self.exact else 1 / (self.count + 1),
            "total_assignments": self.total}


def assignments(arms: Sequence[np.ndarray], labels: Sequence[int], replicates: Sequence[int], *,
                max_exact: int = 2_000_000, samples: int = 100_000, seed: int = 0) -> Assignments:
  """Every within-replicate label assignment (or ``samples`` drawn ones when there are more than
  ``max_exact``) and D of each ``arms`` entry ([units, k], averaged over questions) under it."""
  arms = [np.asarray(a, np.float64) for a in arms]
  k = arms[0].shape[1]
  if any(a.shape != arms[0].shape for a in arms):
    raise ValueError(f"arms must share one shape, got {[a.shape for a in arms]}")
  labels, replicates = check_labels(labels, replicates, k)
  strata = [np.flatnonzero(replicates == r) for r in np.unique(replicates)]
  perms = np.array(list(itertools.permutations(range(k))))  # [k!, k]
  # [arms, k!] per replicate r: the sum of r's units' entries in the columns perm assigns them.
  per_stratum = [np.stack([a[units][np.arange(k), perms].sum(axis=1) for a in arms])
                 for units in strata]
  observed = np.array([a[np.arange(len(labels)), labels].sum() for a in arms])
  total = math.prod(d.shape[1] for d in per_stratum)
  if total <= max_exact:
    d = np.zeros((len(arms), 1))
    for values in per_stratum:
      d = (d[:, :, None] + values[:, None, :]).reshape(len(arms), -1)
    return Assignments(observed, d, True, total)
  rng = np.random.default_rng(seed)
  d = sum(values[:, rng.integers(values.shape[1], size=samples)] for values in per_stratum)
  return Assignments(observed, d, False, total)


def permutation_test(means: np.ndarray, labels: Sequence[int], replicates: Sequence[int], *,
                     max_exact: int = 2_000_000, samples: int = 100_000, seed: int = 0
                     ) -> dict[str, Any]:
  """Stratified permutation test of S (labels permuted within each replicate).

  Returns p, the number of assignments used, whether they were enumerated exactly, and the
  smallest p any outcome could give (1 / assignments when exact).
  """
  means = np.asarray(means, np.float64)
  tested = assignments([means], labels, replicates, max_exact=max_exact, samples=samples, seed=seed)
  p = tested.p_value(tested.observed[0], tested.sums[0], float(np.abs(means).sum()))
  return {"p_value": p, **tested.summary()}


@dataclasses.dataclass(frozen=True)
class MatrixAnalysis:
  """Everything the report prints about one matrix of students (or of in-context models)."""

  statistic: dict[str, Any]  # S: mean and bootstrap CI over questions, permutation p
  per_animal: dict[str, dict[str, Any]]  # C_a with CIs, per replicate, and shifts vs references
  matrix: list[list[float]]  # [teacher animal][evaluated animal]: mean clr minus the reference's
  reference: str  # what matrix cells are measured against
  verdict: dict[str, Any]

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _estimate(values: np.ndarray, *, confidence: float, n_resamples: int, seed: int) -> dict[str, Any]:
  return statistics.mean_ci(values, confidence=confidence, n_resamples=n_resamples, seed=seed,
                            method="percentile").to_dict()


def _bootstrap_over_questions(m: np.ndarray, labels: np.ndarray, *, n_resamples: int, seed: int,
                              confidence: float) -> tuple[tuple[float, float], np.ndarray]:
  """Percentile CIs of S and of each C_b, resampling questions."""
  rng = np.random.default_rng(seed)
  q = m.shape[2]
  index = rng.integers(q, size=(n_resamples, q))
  s_values, c_values = np.empty(n_resamples), np.empty((n_resamples, m.shape[1]))
  for i in range(n_resamples):
    s_values[i], c_values[i] = transfer_statistic(m[:, :, index[i]].mean(axis=2), labels)
  tail = (1 - confidence) / 2
  s_ci = tuple(float(x) for x in np.quantile(s_values, [tail, 1 - tail]))
  c_ci = np.quantile(c_values, [tail, 1 - tail], axis=0).T  # [k, 2]
  return s_ci, c_ci


def analyse(m: np.ndarray, labels: Sequence[int], replicates: Sequence[int],
            animals: Sequence[str], *, criterion: Mapping[str, Any],
            references: Mapping[str, np.ndarray] | None = None, confidence: float = 0.95,
            n_resamples: int = 2000, seed: int = 0, max_exact: int = 2_000_000,
            permutation_samples: int = 100_000) -> MatrixAnalysis:
  """The statistic, its test, per-animal effects and the verdict under ``criterion``.

  Args:
    m: ``unit_means`` [units, k, questions].
    labels, replicates: each unit's animal index and replicate number.
    animals: the k animal names, in column order.
    criterion: ``alpha`` and ``min_positive_fraction``: pass iff S > 0, p < alpha, and C_a > 0 for
      at least that fraction of the animals.
    references: name -> [k, questions] clr of a no-trait reference (the base model, students of the
      base model's own numbers); each animal's own students are compared with each, and the matrix
      cells are measured against the last one given.
  """
  m = np.asarray(m, np.float64)
  k = len(animals)
  if m.ndim != 3 or m.shape[1] != k:
    raise ValueError(f"m must be [units, {k}, questions], got {m.shape}")
  labels, replicates = check_labels(labels, replicates, k)
  means = m.mean(axis=2)
  s, c = transfer_statistic(means, labels)
  test = permutation_test(means, labels, replicates, max_exact=max_exact,
                          samples=permutation_samples, seed=seed)
  s_ci, c_ci = _bootstrap_over_questions(m, labels, n_resamples=n_resamples, seed=seed,
                                         confidence=confidence)
  references = dict(references or {})
  per_animal = {}
  for b, animal in enumerate(animals):
    own = labels == b
    entry: dict[str, Any] = {
        "C": float(c[b]), "low": float(c_ci[b, 0]), "high": float(c_ci[b, 1]),
        "per_replicate": {int(r): float(m[own & (replicates == r), b].mean()
                                        - m[~own & (replicates == r), b].mean())
                          for r in np.unique(replicates)}}
    own_q = m[own, b].mean(axis=0)  # [Q]: the animal's own students
    for name, ref in references.items():
      entry[f"minus_{name}"] = _estimate(own_q - np.asarray(ref)[b], confidence=confidence,
                                         n_resamples=n_resamples, seed=seed)
    per_animal[animal] = entry
  reference_name = list(references)[-1] if references else "mean of all teachers' students"
  matrix = []
  for t in range(k):
    row_units = m[labels == t].mean(axis=(0, 2))  # [k]
    base_row = (np.asarray(references[reference_name]).mean(axis=1) if references
                else m.mean(axis=(0, 2)))
    matrix.append([float(x) for x in row_units - base_row])
  statistic = {"S": s, "low": s_ci[0], "high": s_ci[1], "confidence": confidence,
               "questions": int(m.shape[2]), "units": int(m.shape[0]),
               "replicates": int(len(np.unique(replicates))), **test}
  return MatrixAnalysis(statistic, per_animal, matrix, reference_name,
                        verdict(statistic, c, criterion))


def verdict(statistic: Mapping[str, Any], c: np.ndarray, criterion: Mapping[str, Any]) -> dict[str, Any]:
  """Pass or fail under the criterion fixed before the run, with each condition spelt out."""
  alpha = float(criterion["alpha"])
  fraction = float(criterion["min_positive_fraction"])
  positive = int(np.sum(np.asarray(c) > 0))
  needed = math.ceil(fraction * len(c) - 1e-12)
  conditions = {
      "S > 0": bool(statistic["S"] > 0),
      f"p < {alpha:g}": bool(statistic["p_value"] < alpha),
      f"C_a > 0 for >= {needed} of {len(c)} animals": positive >= needed}
  passed = all(conditions.values())
  attainable = statistic["min_attainable_p"] < alpha
  return {"passed": passed, "conditions": conditions, "positive_animals": positive,
          "can_pass": bool(attainable),
          "text": ("PASS" if passed else "FAIL") + ": " + "; ".join(
              f"{name} {'yes' if ok else 'no'}" for name, ok in conditions.items())
          + ("" if attainable else f" (this design cannot reach p < {alpha:g}: its smallest "
             f"attainable p is {statistic['min_attainable_p']:.3g})")}
