"""Confidence intervals for trait metrics: over questions, and over seeds and questions together.

A metric is a per-question value (log-probability, rate, choice probability). A model evaluated
once gives a vector [questions]; students trained with several seeds give a matrix
[seeds, questions] over the same questions. Seeds and questions are crossed factors, so the
hierarchical bootstrap draws both: each replicate resamples seeds with replacement, then questions
with replacement (the same question draw for every seed, since all seeds answered the same
questions), and takes the grand mean. With one seed it is the ordinary bootstrap over questions.

- :func:`mean_ci`: mean over questions, CI by ``scipy.stats.bootstrap`` (seeded).
- :func:`hierarchical_mean_ci`: mean over [seeds, questions], percentile CI.
- :func:`shift_ci`: a student minus the base, question by question (paired), CI over seeds and
  questions.
- :func:`difference_ci`: treatment minus control (each [seeds, questions], the same questions):
  seeds resampled within each group, questions resampled jointly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import scipy.stats


@dataclasses.dataclass(frozen=True)
class Estimate:
  """A point estimate with a confidence interval and the data sizes behind it."""

  mean: float
  low: float
  high: float
  confidence: float
  num_seeds: int
  num_questions: int
  method: str

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def format(self, digits: int = 3) -> str:
    return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def _as_matrix(values: Any, name: str) -> np.ndarray:
  """[seeds, questions] float64 from a vector (one seed) or a matrix; rejects empty or non-finite."""
  array = np.asarray(values, dtype=np.float64)
  if array.ndim == 1:
    array = array[None]
  if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
    raise ValueError(f"{name} must be [questions] or [seeds, questions] with at least one of each, "
                     f"got shape {np.shape(values)}")
  if not np.all(np.isfinite(array)):
    raise ValueError(f"{name} holds non-finite values ({np.count_nonzero(~np.isfinite(array))} of "
                     f"{array.size}); a metric must be finite for every question")
  return array


def _check(confidence: float, n_resamples: int) -> None:
  if not 0 < confidence < 1:
    raise ValueError(f"confidence={confidence} must be strictly between 0 and 1")
  if n_resamples < 2:
    raise ValueError(f"n_resamples={n_resamples} must be at least 2")


def _percentile(replicates: np.ndarray, confidence: float) -> tuple[float, float]:
  alpha = (1 - confidence) / 2
  low, high = np.quantile(replicates, [alpha, 1 - alpha])
  return float(low), float(high)


def mean_ci(values: Any, *, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0,
            method: str = "BCa") -> Estimate:
  """Mean over questions with a bootstrap CI over questions (``scipy.stats.bootstrap``).

  values: [questions]. With fewer than 2 questions, or all values equal, the interval is the
  mean itself (there is nothing to resample).
  """
  _check(confidence, n_resamples)
  data = _as_matrix(values, "values")
  if data.shape[0] != 1:
    raise ValueError(f"mean_ci takes one vector of per-question values, got shape {data.shape}; "
                     "use hierarchical_mean_ci for [seeds, questions]")
  data = data[0]
  mean = float(data.mean())
  if data.size < 2 or np.ptp(data) == 0:
    return Estimate(mean, mean, mean, confidence, 1, data.size, "degenerate")
  result = scipy.stats.bootstrap((data,), np.mean, confidence_level=confidence,
                                 n_resamples=n_resamples, method=method,
                                 rng=np.random.default_rng(seed))
  low, high = result.confidence_interval
  return Estimate(mean, float(low), float(high), confidence, 1, data.size, f"scipy-{method}")


def _crossed_replicates(data: np.ndarray, n_resamples: int, rng: np.random.Generator,
                        question_draws: np.ndarray | None = None) -> np.ndarray:
  """Grand means of ``n_resamples`` crossed resamples of [seeds, questions] (chunked for memory)."""
  num_seeds, num_questions = data.shape
  out = np.empty(n_resamples)
  chunk = max(1, 2_000_000 // max(1, num_seeds * num_questions))
  for start in range(0, n_resamples, chunk):
    n = min(chunk, n_resamples - start)
    seeds = rng.integers(0, num_seeds, size=(n, num_seeds))
    questions = (question_draws[start:start + n] if question_draws is not None
                 else rng.integers(0, num_questions, size=(n, num_questions)))
    picked = data[seeds[:, :, None], questions[:, None, :]]  # [n, seeds, questions]
    out[start:start + n] = picked.mean(axis=(1, 2))
  return out


def hierarchical_mean_ci(values: Any, *, confidence: float = 0.95, n_resamples: int = 2000,
                         seed: int = 0) -> Estimate:
  """Grand mean of [seeds, questions] (or [questions]) with a percentile CI over seeds and questions."""
  _check(confidence, n_resamples)
  data = _as_matrix(values, "values")
  rng = np.random.default_rng(seed)
  replicates = _crossed_replicates(data, n_resamples, rng)
  low, high = _percentile(replicates, confidence)
  return Estimate(float(data.mean()), low, high, confidence, data.shape[0], data.shape[1],
                  "hierarchical-percentile")


def shift_ci(student: Any, base: Any, *, confidence: float = 0.95, n_resamples: int = 2000,
             seed: int = 0) -> Estimate:
  """Student minus base, paired by question: student [seeds, questions] (or [questions]), base [questions]."""
  student = _as_matrix(student, "student")
  base = _as_matrix(base, "base")
  if base.shape[0] != 1 or base.shape[1] != student.shape[1]:
    raise ValueError(f"base must be one vector over the student's {student.shape[1]} questions, got "
                     f"shape {base.shape}")
  return hierarchical_mean_ci(student - base, confidence=confidence, n_resamples=n_resamples,
                              seed=seed)


def difference_ci(treatment: Any, control: Any, *, confidence: float = 0.95,
                  n_resamples: int = 2000, seed: int = 0) -> Estimate:
  """Treatment minus control, each [seeds, questions] over the same questions.

  Each replicate resamples the treatment's seeds and the control's seeds independently and one
  question draw shared by both groups (the questions are paired across groups).
  """
  _check(confidence, n_resamples)
  treatment = _as_matrix(treatment, "treatment")
  control = _as_matrix(control, "control")
  if treatment.shape[1] != control.shape[1]:
    raise ValueError(f"treatment has {treatment.shape[1]} questions and control {control.shape[1]}; "
                     "both must answer the same questions")
  rng = np.random.default_rng(seed)
  questions = rng.integers(0, treatment.shape[1], size=(n_resamples, treatment.shape[1]))
  replicates = (_crossed_replicates(treatment, n_resamples, rng, questions)
                - _crossed_replicates(control, n_resamples, rng, questions))
  low, high = _percentile(replicates, confidence)
  return Estimate(float(treatment.mean() - control.mean()), low, high, confidence,
                  min(treatment.shape[0], control.shape[0]), treatment.shape[1],
                  "hierarchical-percentile")
