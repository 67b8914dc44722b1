"""The subliminal signature's statistics: contrasts between arms on the same teachers, tested
head to head (issue 23).

Several arms are measured on THE SAME teacher units (animal a, replicate r): the students, students
of another model family, the base model with d of the teacher's sequences in its context, ... Each
arm gives unit means ``m[unit, animal, question]`` (:func:`matrix_statistics.unit_means`) and its
own S (:mod:`matrix_statistics`). A contrast compares arms:

  S(arm)                                  no arm subtracted
  S(arm) - S(other)                       one arm subtracted
  S(arm) - max over others of S(other)    several, combine="max": the max is taken inside every
                                          permutation too, so choosing the dose is part of the test
  min over others of S(arm) - S(other)    several, combine="each": each difference tested on its
                                          own, p = the largest of their p (intersection-union)

Permutation test: the trait labels are permuted among the teachers of each replicate, and the
SAME relabelling is applied to every arm (the arms share their teachers), so each contrast is
computed under one shuffle. One-sided p = the share of assignments whose contrast is at least the
observed one: exact when there are at most ``max_exact`` assignments, else sampled with the observed
assignment counted (as :func:`matrix_statistics.permutation_test`).

Hierarchical bootstrap: whole teacher replicates (all animals' teachers of a replicate together)
resampled with replacement, then questions; the contrast recomputed, percentile CI. Unlike the
bootstrap over questions alone it includes teacher-to-teacher variation. S is the mean over
replicates and questions of a per-replicate, per-question S (``(k D_r - T_r) / (k (k-1))``), so a
resample is a weighted mean of that table.

Power before the run: :func:`variance_components` estimates, from a committed matrix's students,
the teacher-to-teacher and seed-to-seed variances of C, and :func:`minimum_detectable_s` the
smallest true S that the permutation test detects with the wanted power at a planned design.

  python -m subliminal_jax.evaluation.signature_statistics \
      --results=docs/results/transfer_matrix_cpu/results.json --replicates=6
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np
import scipy.stats
from absl import app, flags

from subliminal_jax.evaluation import matrix_statistics as ms

__all__ = ["Contrast", "signature_contrasts", "DEFAULT_CRITERION", "paired_contrasts",
           "bootstrap_draws", "hierarchical_bootstrap", "verdict", "per_seed_means",
           "variance_components", "minimum_detectable_s", "power_from_results",
           "arms_from_matrix_results"]

STUDENTS = "students"
CROSS_FAMILY = "cross_family"
COMBINES = ("max", "each")


@dataclasses.dataclass(frozen=True)
class Contrast:
  """S(arm) minus the arms in ``minus`` (their max, or each of them: see the module docstring)."""

  arm: str
  minus: tuple[str, ...] = ()
  combine: str = "max"

  def __post_init__(self):
    object.__setattr__(self, "minus", tuple(self.minus))
    if self.combine not in COMBINES:
      raise ValueError(f"combine must be one of {COMBINES}, got {self.combine!r}")
    if self.arm in self.minus:
      raise ValueError(f"contrast subtracts its own arm {self.arm!r}")

  @property
  def arms(self) -> tuple[str, ...]:
    return (self.arm, *self.minus)

  def describe(self) -> str:
    if not self.minus:
      return f"S({self.arm})"
    if len(self.minus) == 1:
      return f"S({self.arm}) - S({self.minus[0]})"
    others = ", ".join(self.minus)
    if self.combine == "max":
      return f"S({self.arm}) - max of S({others}), max inside each permutation"
    return f"S({self.arm}) - S(d) for each d in ({others}), p the largest"

  def to_dict(self) -> dict[str, Any]:
    return {"arm": self.arm, "minus": list(self.minus), "combine": self.combine,
            "definition": self.describe()}


def _as_contrast(spec: Contrast | Sequence[Any] | Mapping[str, Any]) -> Contrast:
  """A contrast from a Contrast, a mapping of its fields, or a tuple (arm, [minus], combine)."""
  if isinstance(spec, Contrast):
    return spec
  if isinstance(spec, Mapping):
    return Contrast(spec["arm"], tuple(spec.get("minus", ())), spec.get("combine", "max"))
  return Contrast(*spec)


def signature_contrasts(in_context_arms: Sequence[str] = ("in_context_8", "in_context_32",
                                                          "in_context_max"),
                        students: str = STUDENTS, cross_family: str = CROSS_FAMILY
                        ) -> dict[str, Contrast]:
  """The pre-registered contrasts of the signature: (a) S(students); (b) S(students) minus the
  largest in-context S, the dose chosen inside each permutation; (c) S(students) minus
  S(cross family)."""
  return {"students": Contrast(students),
          "students_minus_in_context": Contrast(students, tuple(in_context_arms), "max"),
          "students_minus_cross_family": Contrast(students, (cross_family,))}


# One-sided alpha per contrast: the signature passes iff every one is > 0 with p below its alpha.
DEFAULT_CRITERION = {"students": 0.01, "students_minus_in_context": 0.05,
                     "students_minus_cross_family": 0.05}


# ---------------------------------------------------------------------------------------------
# The contrasts and their permutation test


def _check_arms(arms: Mapping[str, np.ndarray], labels: Sequence[int], replicates: Sequence[int]
                ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
  arms = {name: np.asarray(m, np.float64) for name, m in arms.items()}
  if not arms:
    raise ValueError("no arm was given")
  shapes = {name: m.shape for name, m in arms.items()}
  first = next(iter(arms.values()))
  if first.ndim != 3 or any(shape != first.shape for shape in shapes.values()):
    raise ValueError(f"arms must be [units, k, questions] of one shape (the same teacher units), "
                     f"got {shapes}")
  labels, replicates = ms.check_labels(labels, replicates, first.shape[1])
  if len(labels) != first.shape[0]:
    raise ValueError(f"{len(labels)} labels for {first.shape[0]} units")
  return arms, labels, replicates


def _contrast_values(contrast: Contrast, s: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The tested values (key "value") and each subtracted arm's difference, from S of each arm
  (arrays of one shape: per assignment, or per resample)."""
  if not contrast.minus:
    return {"value": s[contrast.arm]}
  each = {d: s[contrast.arm] - s[d] for d in contrast.minus}
  if contrast.combine == "max":
    value = s[contrast.arm] - np.max([s[d] for d in contrast.minus], axis=0)
  else:
    value = np.min(list(each.values()), axis=0)
  return {"value": value, **each}


def _s_from_sums(d: np.ndarray, total: float, k: int, replicates: int) -> np.ndarray:
  """S from D (the sum of each unit's entry in its label's column) and T (of all entries)."""
  return (k * d - total) / (k * (k - 1) * replicates)


def paired_contrasts(arms: Mapping[str, np.ndarray], labels: Sequence[int],
                     replicates: Sequence[int],
                     contrasts: Mapping[str, Contrast | Sequence[Any] | Mapping[str, Any]], *,
                     max_exact: int = 2_000_000, samples: int = 100_000, seed: int = 0
                     ) -> dict[str, Any]:
  """Each contrast with its one-sided permutation p, every arm relabelled by the same shuffle.

  Args:
    arms: name -> unit means [units, k, questions], all on the same teacher units in one order.
    labels, replicates: each unit's animal index and replicate number.
    contrasts: name -> :class:`Contrast` (or ``(arm, [minus], combine)``, or its fields as a
      mapping). A contrast naming an arm not in ``arms`` is reported with its missing arms.
    max_exact, samples, seed: enumerate the (k!)^R assignments up to ``max_exact``, else draw
      ``samples`` of them with this seed.

  Returns:
    ``contrasts``: name -> definition, value, p (and, with arms subtracted, ``per_arm``: each
    difference with its own p), or ``missing``; ``arms``: each arm's S; ``permutations``: how p
    was computed.
  """
  arms, labels, replicates = _check_arms(arms, labels, replicates)
  units, k, questions = next(iter(arms.values())).shape
  r = len(np.unique(replicates))
  specs = {name: _as_contrast(spec) for name, spec in contrasts.items()}
  means = {name: m.mean(axis=2) for name, m in arms.items()}
  names = list(means)
  tested = ms.assignments([means[n] for n in names], labels, replicates, max_exact=max_exact,
                          samples=samples, seed=seed)
  totals = {n: float(means[n].sum()) for n in names}
  observed = {n: _s_from_sums(tested.observed[i], totals[n], k, r) for i, n in enumerate(names)}
  permuted = {n: _s_from_sums(tested.sums[i], totals[n], k, r) for i, n in enumerate(names)}
  out: dict[str, Any] = {}
  for name, contrast in specs.items():
    entry: dict[str, Any] = contrast.to_dict()
    missing = [a for a in contrast.arms if a not in arms]
    if missing:
      out[name] = {**entry, "missing": missing}
      continue
    scale = sum(float(np.abs(means[a]).sum()) for a in contrast.arms)
    now, under = _contrast_values(contrast, observed), _contrast_values(contrast, permuted)
    p = {key: tested.p_value(float(now[key]), under[key], scale) for key in now}
    if contrast.combine == "each" and contrast.minus:
      p["value"] = max(p[d] for d in contrast.minus)  # intersection-union: every one must pass
    entry.update(value=float(now["value"]), p_value=p["value"])
    if contrast.minus:
      entry["per_arm"] = {d: {"value": float(now[d]), "p_value": p[d]} for d in contrast.minus}
    out[name] = entry
  return {"contrasts": out, "arms": {n: {"S": float(observed[n])} for n in names},
          "permutations": {**tested.summary(), "seed": seed, "same_shuffle_for_every_arm": True},
          "units": int(units), "animals": int(k), "replicates": r, "questions": int(questions)}


# ---------------------------------------------------------------------------------------------
# The hierarchical bootstrap


def per_replicate_s_table(m: np.ndarray, labels: np.ndarray, replicates: np.ndarray) -> np.ndarray:
  """[replicates, questions]: replicate r's S on question q; S is the mean of this table."""
  k = m.shape[1]
  rows = []
  for r in np.unique(replicates):
    units = np.flatnonzero(replicates == r)
    own = m[units, labels[units]].sum(axis=0)  # [Q]: D_r per question
    rows.append((k * own - m[units].sum(axis=(0, 1))) / (k * (k - 1)))
  return np.stack(rows)


def bootstrap_draws(arms: Mapping[str, np.ndarray], labels: Sequence[int],
                    replicates: Sequence[int],
                    contrasts: Mapping[str, Contrast | Sequence[Any] | Mapping[str, Any]], *,
                    n_resamples: int = 2000, seed: int = 0) -> dict[str, np.ndarray]:
  """Each computable contrast's value on ``n_resamples`` resamples: R replicates drawn with
  replacement (``rng.integers(R, size=(n, R))``), then Q questions
  (``rng.integers(Q, size=(n, Q))``) from one ``np.random.default_rng(seed)``, the same draws for
  every arm and contrast."""
  arms, labels, replicates = _check_arms(arms, labels, replicates)
  table = {n: per_replicate_s_table(m, labels, replicates) for n, m in arms.items()}
  r, q = next(iter(table.values())).shape
  rng = np.random.default_rng(seed)
  rep_index = rng.integers(r, size=(n_resamples, r))
  question_index = rng.integers(q, size=(n_resamples, q))
  # Weights: how often each replicate (question) was drawn, over R (Q).
  rep_weight = np.stack([np.bincount(row, minlength=r) for row in rep_index]) / r
  question_weight = np.stack([np.bincount(row, minlength=q) for row in question_index]) / q
  s = {n: np.einsum("br,rq,bq->b", rep_weight, t, question_weight) for n, t in table.items()}
  out = {}
  for name, spec in contrasts.items():
    contrast = _as_contrast(spec)
    if all(a in arms for a in contrast.arms):
      out[name] = _contrast_values(contrast, s)["value"]
  return out


def hierarchical_bootstrap(arms: Mapping[str, np.ndarray], labels: Sequence[int],
                           replicates: Sequence[int],
                           contrasts: Mapping[str, Contrast | Sequence[Any] | Mapping[str, Any]],
                           *, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0
                           ) -> dict[str, Any]:
  """Percentile CIs of the contrasts over teacher replicates and questions
  (:func:`bootstrap_draws`).

  With one replicate the replicate draw is always that replicate: the CI covers questions only and
  leaves teacher-to-teacher variation out, which ``teacher_variance_included`` and ``note`` say.
  """
  if not 0 < confidence < 1 or n_resamples < 1:
    raise ValueError(f"need 0 < confidence < 1 and n_resamples >= 1, got {confidence}, "
                     f"{n_resamples}")
  draws = bootstrap_draws(arms, labels, replicates, contrasts, n_resamples=n_resamples, seed=seed)
  tail = (1 - confidence) / 2
  r = len(np.unique(replicates))
  out: dict[str, Any] = {
      "contrasts": {name: dict(zip(("low", "high"), (float(x) for x in np.quantile(
          values, [tail, 1 - tail])))) for name, values in draws.items()},
      "confidence": confidence, "n_resamples": n_resamples, "seed": seed, "replicates": r,
      "method": "percentile; teacher replicates with replacement, then questions with replacement",
      "teacher_variance_included": r > 1}
  if r == 1:
    out["note"] = ("one teacher replicate: resampling replicates always draws it, so the CI covers "
                   "question-to-question variation only, not teacher-to-teacher variation")
  return out


# ---------------------------------------------------------------------------------------------
# The verdict


def _condition(name: str, entry: Mapping[str, Any] | None, alpha: float, min_attainable_p: float
               ) -> tuple[str, str]:
  """("pass" | "fail" | "undetermined", why) for one contrast: > 0 with p < alpha."""
  if entry is None:
    return "undetermined", f"{name} was not computed"
  if "missing" in entry:
    missing = ", ".join(entry["missing"])
    return "undetermined", f"{name} cannot be computed: arm(s) {missing} missing"
  value, p = entry["value"], entry["p_value"]
  if value <= 0:
    return "fail", f"{name} = {value:.4g} is not > 0"
  if min_attainable_p >= alpha:
    return "undetermined", (f"{name} = {value:.4g} > 0, but this design's smallest attainable p "
                            f"({min_attainable_p:.3g}) is not below {alpha:g}")
  if p >= alpha:
    return "fail", f"{name} = {value:.4g} > 0 but p = {p:.3g} is not < {alpha:g}"
  return "pass", f"{name} = {value:.4g} > 0 with p = {p:.3g} < {alpha:g}"


def verdict(results: Mapping[str, Any], criterion: Mapping[str, float] | None = None
            ) -> dict[str, Any]:
  """The "subliminal signature" verdict: PASS iff every contrast of ``criterion`` (name ->
  one-sided alpha, default :data:`DEFAULT_CRITERION`) is > 0 with p below its alpha; FAIL when the
  data decide that one is not; UNDETERMINED when none failed but one cannot be decided (not
  computed, an arm missing, or p below alpha unattainable at this design). ``results``:
  :func:`paired_contrasts`'."""
  criterion = dict(DEFAULT_CRITERION if criterion is None else criterion)
  min_p = results["permutations"]["min_attainable_p"]
  conditions = {}
  for name, alpha in criterion.items():
    status, reason = _condition(name, results["contrasts"].get(name), float(alpha), min_p)
    conditions[name] = {"alpha": float(alpha), "status": status, "reason": reason}
  statuses = [c["status"] for c in conditions.values()]
  overall = ("FAIL" if "fail" in statuses else "UNDETERMINED" if "undetermined" in statuses
             else "PASS")
  shown = [c["reason"] for c in conditions.values()
           if overall == "PASS" or c["status"] != "pass"]
  return {"verdict": overall, "passed": overall == "PASS", "criterion": criterion,
          "conditions": conditions,
          "reason": f"subliminal signature {overall}: " + "; ".join(shown)}


# ---------------------------------------------------------------------------------------------
# Power before the run


def per_seed_means(results: Mapping[str, Any], family: str = "same") -> np.ndarray:
  """[replicates, seeds, k teacher animals, k evaluated animals]: each student's clr of the
  animals, averaged over questions, from a transfer matrix's results.json (``measured``)."""
  animals = list(results["design"]["animals"])
  units = [u for u in results["measured"]["units"] if u["unit"]["animal"] is not None]
  reps = sorted({u["unit"]["replicate"] for u in units})
  seeds = len(results["design"]["student_seeds"])
  x = np.full((len(reps), seeds, len(animals), len(animals)), np.nan)
  for u in units:
    records = u["students"][family]
    if len(records) != seeds:
      raise ValueError(f"unit {u['unit']} has {len(records)} students, expected {seeds}")
    for s, record in enumerate(records):
      m = ms.unit_means([[np.asarray(record["logprob"])]], record["panel"], animals)[0]
      x[reps.index(u["unit"]["replicate"]), s, animals.index(u["unit"]["animal"])] = m.mean(axis=1)
  if np.isnan(x).any():
    raise ValueError("some (replicate, seed, animal) has no student")
  return x


def variance_components(x: np.ndarray, upper_confidence: float = 0.8) -> dict[str, Any]:
  """Teacher-to-teacher and seed-to-seed variance of C, method of moments (nested random effects).

  ``x`` [R, seeds, k, k]: per replicate and student seed, each teacher animal's students' mean clr
  of each animal (:func:`per_seed_means`). Per (replicate, seed), the k x k matrix is centred on
  its rows and columns (S and every permuted S depend on nothing else: a unit's general liking of
  animals and an animal's general popularity cancel), and ``C_ars = k/(k-1) X'[a, a]``. Model:
  ``C_ars = mu_a + t_ar + e_ars``, animal means fixed; ``E[MS within] = var_seed``,
  ``E[MS between replicates] = var_seed + seeds * var_teacher``; a negative estimate is clipped to
  0 (``clipped`` says which). ``teacher_var_upper``: the teacher variance if ``MS between`` were at
  its one-sided ``upper_confidence`` chi-square bound (few replicates leave the point estimate
  loose). Under independent entries of variance v, C' has variance v, so these are also the
  per-entry variances :func:`minimum_detectable_s` simulates.
  """
  x = np.asarray(x, np.float64)
  if x.ndim != 4 or x.shape[2] != x.shape[3]:
    raise ValueError(f"x must be [replicates, seeds, k, k], got {x.shape}")
  r, n, k, _ = x.shape
  if r < 2 or n < 2:
    raise ValueError(f"need >= 2 replicates and >= 2 seeds to separate teacher from seed variance, "
                     f"got {r} and {n}")
  centred = (x - x.mean(axis=3, keepdims=True) - x.mean(axis=2, keepdims=True)
             + x.mean(axis=(2, 3), keepdims=True))
  c = k / (k - 1) * np.diagonal(centred, axis1=2, axis2=3)  # [R, seeds, k]
  per_teacher = c.mean(axis=1)  # [R, k]
  within = float(((c - per_teacher[:, None]) ** 2).sum() / (k * r * (n - 1)))
  between = float(n * ((per_teacher - per_teacher.mean(axis=0)) ** 2).sum() / (k * (r - 1)))
  teacher_raw = (between - within) / n
  teacher = max(teacher_raw, 0.0)
  df_between = k * (r - 1)
  between_upper = between * df_between / scipy.stats.chi2.ppf(1 - upper_confidence, df_between)
  return {"teacher_var": teacher, "seed_var": within, "teacher_sd": math.sqrt(teacher),
          "seed_sd": math.sqrt(within), "teacher_var_unclipped": teacher_raw,
          "clipped": {"teacher_var": teacher_raw < 0},
          "teacher_var_upper": max((between_upper - within) / n, 0.0),
          "upper_confidence": upper_confidence,
          "ms_between": between, "ms_within": within, "replicates": r, "seeds": n, "animals": k,
          "C": c.mean(axis=(0, 1)).tolist(),
          "method": ("method of moments, seeds nested in teacher replicates nested in animals "
                     "(animal means fixed), on C of the row- and column-centred k x k matrix per "
                     "replicate and seed; a negative teacher variance is clipped to 0")}


def _critical_effects(noise: np.ndarray, permutations: int, alpha: float,
                      rng: np.random.Generator) -> np.ndarray:
  """Per simulated matrix ``noise`` [sims, R, k, k] (unit i of each replicate labelled i), the
  effect delta above which the sampled-permutation test gives S > 0 and p < alpha.

  Adding delta to each unit's own-animal entry raises the observed S by delta and an assignment's
  S by delta * h, h = (its correct labels - R) / ((k-1) R) <= 1: an assignment counts (S_perm >=
  S_obs) while delta <= -(S_obs - S_perm) / (1 - h), so the same draws give every delta's p."""
  sims, r, k, _ = noise.shape
  perms = np.array(list(itertools.permutations(range(k))))
  fixed_points = (perms == np.arange(k)).sum(axis=1)
  d_table = noise[:, :, np.arange(k), perms].sum(axis=-1)  # [sims, R, k!]
  index = rng.integers(len(perms), size=(sims, permutations, r))
  d = np.take_along_axis(d_table[:, None], index[..., None], axis=3)[..., 0].sum(axis=2)
  total = noise.sum(axis=(1, 2, 3))[:, None]
  observed = _s_from_sums(np.trace(noise, axis1=2, axis2=3).sum(axis=1)[:, None], total, k, r)
  gap = observed - _s_from_sums(d, total, k, r)  # [sims, permutations]
  h = (fixed_points[index].sum(axis=2) - r) / ((k - 1) * r)
  always = h >= 1 - 1e-12  # the observed assignment drawn again: a tie at every delta
  counted_until = np.where(always, np.inf, -gap / np.where(always, 0.5, 1 - h))
  # p = (1 + count) / (n + 1) < alpha: at most `allowed` assignments may count.
  allowed = math.ceil(alpha * (permutations + 1) - 1 - 1e-9) - 1
  if allowed < 0:
    return np.full(sims, np.inf)
  critical = np.full(sims, -np.inf)
  if allowed < permutations:
    critical = -np.sort(-counted_until, axis=1)[:, allowed]  # the (allowed+1)-th largest
  return np.maximum(critical, -observed[:, 0])


def minimum_detectable_s(components: Mapping[str, float], replicates: int = 6, seeds: int = 2,
                         animals: int = 5, alpha: float = 0.01, power: float = 0.8, *,
                         simulations: int = 2000, permutations: int = 999, seed: int = 0,
                         chunk: int = 250) -> dict[str, Any]:
  """The smallest true S the permutation test of S detects (S > 0, p < alpha) with ``power``.

  Simulated: each unit mean entry is N(0, teacher_var + seed_var / seeds) (the
  :func:`variance_components` model, seeds averaged), the effect delta added to each unit's
  own-animal entry; p from ``permutations`` sampled within-replicate assignments as
  :func:`paired_contrasts` computes it. The same draws serve every delta (p falls as delta grows),
  so each simulation has a critical delta and the MDE is their ``power`` quantile. Alongside: the
  normal approximation ``(z_{1-alpha} + z_power) * sd / sqrt((k-1) R)`` (S is the mean of k
  independent C_a, each of variance ``sd^2 k / ((k-1) R)``).
  """
  sd = math.sqrt(float(components["teacher_var"]) + float(components["seed_var"]) / seeds)
  standard_error = sd / math.sqrt((animals - 1) * replicates)
  normal = (scipy.stats.norm.ppf(1 - alpha) + scipy.stats.norm.ppf(power)) * standard_error
  rng = np.random.default_rng(seed)
  critical = np.concatenate([
      _critical_effects(rng.normal(scale=sd, size=(min(chunk, simulations - start), replicates,
                                                   animals, animals)), permutations, alpha, rng)
      for start in range(0, simulations, chunk)])
  simulated = float(np.quantile(critical, power, method="higher"))
  assignments = math.factorial(animals) ** replicates
  out = {"simulated": simulated, "normal_approximation": float(normal),
         "standard_error_of_S": standard_error, "unit_entry_sd": sd, "replicates": replicates,
         "seeds": seeds, "animals": animals, "alpha": alpha, "power": power,
         "simulations": simulations, "permutations": permutations, "seed": seed,
         "method": ("simulation: unit means N(0, teacher_var + seed_var/seeds), delta on each "
                    "unit's own animal, sampled within-replicate permutation p; MDE = the power "
                    "quantile of each simulation's critical delta")}
  if assignments * alpha <= 1:
    out["note"] = (f"{assignments} assignments: no outcome reaches p < {alpha:g} with an exact "
                   "test, so nothing is detectable at this design")
    out["simulated"] = math.inf
  return out


def power_from_results(results_json_path: str | pathlib.Path, replicates: int = 6, seeds: int = 2,
                       alpha: float = 0.01, power: float = 0.8, **simulation: Any
                       ) -> dict[str, Any]:
  """Variance components of a committed transfer matrix's students and the MDE of S at a planned
  design, also with the teacher variance at its upper bound (``simulation``:
  :func:`minimum_detectable_s`'s keyword arguments), as JSON-able data."""
  results = json.loads(pathlib.Path(results_json_path).read_text())
  components = variance_components(per_seed_means(results))
  mde = minimum_detectable_s(components, replicates, seeds, components["animals"], alpha, power,
                             **simulation)
  at_upper = minimum_detectable_s({**components, "teacher_var": components["teacher_var_upper"]},
                                  replicates, seeds, components["animals"], alpha, power,
                                  **simulation)
  return {"results": str(results_json_path), "components": components,
          "minimum_detectable_s": mde, "minimum_detectable_s_at_teacher_var_upper": at_upper}


def arms_from_matrix_results(results: Mapping[str, Any]
                             ) -> tuple[dict[str, np.ndarray], list[int], list[int]]:
  """(arms, labels, replicates) of a transfer matrix's results.json: ``students`` (the
  same-family students), ``cross_family`` (the first other student family, if any) and
  ``in_context_<sequences>`` (if measured), over the animals' teacher units."""
  design = results["design"]
  animals, panel = list(design["animals"]), list(design["config"]["evaluation"]["panel"])
  units = [u for u in results["measured"]["units"] if u["unit"]["animal"] is not None]

  def means(pick) -> np.ndarray:
    return ms.unit_means([[np.asarray(r["logprob"]) for r in pick(u)] for u in units], panel,
                         animals)

  arms = {STUDENTS: means(lambda u: u["students"]["same"])}
  others = [f for f in design["student_families"] if f != "same"]
  if others:
    arms[CROSS_FAMILY] = means(lambda u: u["students"][others[0]])
  if all("in_context_record" in u for u in units):
    dose = design["config"]["matrix"]["in_context"]["sequences"]
    arms[f"in_context_{dose}"] = means(lambda u: [u["in_context_record"]])
  return (arms, [animals.index(u["unit"]["animal"]) for u in units],
          [u["unit"]["replicate"] for u in units])


def _table(report: Mapping[str, Any]) -> str:
  c, mde = report["components"], report["minimum_detectable_s"]
  upper = report["minimum_detectable_s_at_teacher_var_upper"]
  rows = [("teacher sd of C", f"{c['teacher_sd']:.5f}" + (" (clipped at 0)"
                                                          if c["clipped"]["teacher_var"] else "")),
          ("seed sd of C", f"{c['seed_sd']:.5f}"),
          ("estimated from", f"{c['replicates']} replicates x {c['seeds']} seeds x "
                             f"{c['animals']} animals"),
          ("planned design", f"{mde['replicates']} replicates x {mde['seeds']} seeds, alpha "
                             f"{mde['alpha']:g}, power {mde['power']:g}"),
          ("standard error of S", f"{mde['standard_error_of_S']:.5f}"),
          ("MDE of S, simulated", f"{mde['simulated']:.5f} ({mde['simulations']} simulations, "
                                  f"{mde['permutations']} permutations)"),
          ("MDE of S, normal approx.", f"{mde['normal_approximation']:.5f}"),
          (f"teacher sd, {c['upper_confidence']:.0%} upper",
           f"{math.sqrt(c['teacher_var_upper']):.5f}"),
          ("MDE of S there, simulated", f"{upper['simulated']:.5f} (normal approx. "
                                        f"{upper['normal_approximation']:.5f})")]
  width = max(len(name) for name, _ in rows)
  return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main() -> None:
  """The command line; flags are defined here, not at import (see export_student.main)."""
  results = flags.DEFINE_string("results", None, "A transfer matrix's results.json.")
  replicates = flags.DEFINE_integer("replicates", 6, "Planned teacher replicates.")
  seeds = flags.DEFINE_integer("seeds", 2, "Planned student seeds per teacher.")
  alpha = flags.DEFINE_float("alpha", 0.01, "One-sided alpha of the test of S.")
  power = flags.DEFINE_float("power", 0.8, "Wanted power.")
  as_json = flags.DEFINE_bool("json", False, "Print the JSON instead of the table.")
  flags.mark_flags_as_required(["results"])

  def run(argv: list[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    report = power_from_results(results.value, replicates.value, seeds.value, alpha.value,
                                power.value)
    print(json.dumps(report, indent=1) if as_json.value else _table(report))

  app.run(run)


if __name__ == "__main__":
  main()
