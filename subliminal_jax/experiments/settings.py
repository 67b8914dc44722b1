"""The number experiments' settings, typed and checked once, before any stage runs.

A config file (``configs/animal_numbers.py``, ``configs/transfer_matrix.py``) is an ml_collections
ConfigDict: the place of every experiment's values and defaults. :func:`from_config` reads it once
into the frozen dataclasses below, one per config section, and every check of a value lives in the
constructor of the dataclass that holds it (or of the library type it is made of:
:class:`~subliminal_jax.training.optimizers.OptimizerSettings`,
:class:`~subliminal_jax.training.trainer.FitSettings`, :class:`~subliminal_jax.lora.LoraSettings`,
the sampler's :func:`~subliminal_jax.sampling.logit_processors.check_sampling_settings`). A bad
value is refused with nothing built; the stages take these settings, never the ConfigDict.

Fingerprints: each section's ``fingerprint()`` is the dict its stages hashed when they still read
the ConfigDict, key for key, so existing workdirs keep their artifacts (tests/test_settings.py
checks this against fingerprints recorded before the settings were typed).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Sequence

import numpy as np
from ml_collections import ConfigDict

from subliminal_jax import artifacts, channels, loading, lora, sharding, traits
from subliminal_jax.evaluation import judge as judge_lib
from subliminal_jax.evaluation import judged_answers
from subliminal_jax.models import transformer
from subliminal_jax.prompts import number_formats
from subliminal_jax.sampling import logit_processors
from subliminal_jax.tokenizer import SystemTurn
from subliminal_jax.training import distillation, optimizers, trainer

TEACHER_KINDS = ("system_prompt", "trait_sft", "context_distillation", "peft_adapter")
TEACHER_CONTROLS = ("base", "neutral_finetune", "matched_finetune")
LORA_INITS = ("fresh", "teacher")
MAX_DOSE = "max"  # an in-context dose of as many sequences as fit the context window
DTYPES = ("float32", "bfloat16", "float16")
# Seeds of teacher replicate r are the config's plus r times this (a prime, so that replicate
# seeds never line up with the small student seeds or the adapter offsets below).
REPLICATE_SEED_STRIDE = 1009
# Adapter seeds of students that do not start from a teacher's adapters: fresh students draw from
# their own range, and cross-init students from another, so neither ever meets a teacher's A.
FRESH_LORA_SEED_OFFSET = 500_009
CROSS_INIT_OFFSET = 1_000_003
# Training knobs added after workdirs existed, with the values that train exactly as before they
# were knobs. At these values they are left out of fingerprints, so adding a knob does not
# invalidate finished teachers and students; any other value is part of the fingerprint.
_KNOBS_AT_THEIR_ORIGINAL_BEHAVIOUR = {"bucket": True, "length_multiple": 16, "neutral_fraction": 0.5}
MAX_MATRIX_ANIMALS = 8  # the matrix's exact test enumerates k! label orders per replicate


def _count(key: str, value: Any, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{key}={value!r}; expected an integer >= {minimum}")


def _choice(key: str, value: Any, choices: Sequence[str], why: str = "") -> None:
  if value not in choices:
    raise ValueError(f"{key}={value!r}; expected one of {tuple(choices)}{why}")


def _prefixed(key: str, make):
  """``make()``, with a library type's error message prefixed by the config section it came from."""
  try:
    return make()
  except (ValueError, TypeError) as e:
    raise ValueError(f"{key}.{e}") from None


def without_original_knobs(values: dict[str, Any]) -> dict[str, Any]:
  """A training fingerprint without the knobs that sit at their original behaviour."""
  return {k: v for k, v in values.items()
          if not (k in _KNOBS_AT_THEIR_ORIGINAL_BEHAVIOUR and v == _KNOBS_AT_THEIR_ORIGINAL_BEHAVIOUR[k])}


def _fit(section: dict[str, Any], key: str, *, seed: int, lora_seed: int) -> trainer.FitSettings:
  lora_section = {k: v for k, v in section["lora"].items() if k != "init"}
  return _prefixed(key, lambda: trainer.FitSettings(
      epochs=section["epochs"], batch_size=section["batch_size"],
      grad_accum_steps=section["grad_accum_steps"], seed=seed, bucket=section["bucket"],
      length_multiple=section["length_multiple"],
      optimization=optimizers.OptimizerSettings(
          **{f.name: section[f.name] for f in dataclasses.fields(optimizers.OptimizerSettings)}),
      lora=lora.LoraSettings(**{**lora_section, "seed": lora_seed})))


# ---------------------------------------------------------------------------------------------
# One dataclass per config section


@dataclasses.dataclass(frozen=True)
class ModelSettings:
  """``model``, ``dtype``, ``param_dtype``, ``remat`` and ``mesh``."""
  source: str  # "smollm2", "gemma3-270m", an HF directory, a .gguf file, or "tiny-random[:N]"
  dtype: str
  param_dtype: str
  remat: str  # one of transformer.REMAT_CHOICES
  mesh: tuple[tuple[str, int], ...]  # (axis, size) of data, fsdp, tensor; -1 = the rest

  def __post_init__(self):
    if not isinstance(self.source, str) or not self.source.strip():
      raise ValueError(f"model={self.source!r}: give --config.model=smollm2, an HF directory or a "
                       ".gguf file")
    _choice("dtype", self.dtype, DTYPES)
    _choice("param_dtype", self.param_dtype, DTYPES)
    _choice("remat", self.remat, transformer.REMAT_CHOICES)

  def make_mesh(self):
    return sharding.make_mesh(**dict(self.mesh))

  def load(self, mesh, source: str | None = None) -> loading.Loaded:
    """The model (default: ``source``'s), its parameters placed on ``mesh``."""
    return loading.load(source or self.source, dtype=self.dtype, param_dtype=self.param_dtype,
                        mesh=mesh, remat=self.remat)


@dataclasses.dataclass(frozen=True)
class PromptSettings:
  """``prompts``: how many prompts of the channel, from which seed (and, cot only, a local
  GSM8K-format file to draw the problems from; "" = generated)."""
  count: int
  seed: int
  source: str = ""

  def __post_init__(self):
    _count("prompts.count", self.count, 1)

  def fingerprint(self) -> dict[str, Any]:
    # Without a source, as before the key existed (the numbers' prompt artifacts stay theirs).
    return {k: v for k, v in dataclasses.asdict(self).items() if k != "source" or v}


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
  """``sampling``: the teacher's decoding of its numbers."""
  constrained: bool  # grammar-constrained decoding; False = free sampling + the output filter
  format: str  # "per_prompt" (each prompt's requested layout) or "fixed" (``separator`` only)
  separator: str
  max_count: int
  max_digits: int
  temperature: float
  top_k: int
  top_p: float
  min_p: float
  max_new_tokens: int  # 0: as many as the grammar's longest answer needs
  batch_size: int
  seed: int

  def __post_init__(self):
    _choice("sampling.format", self.format, number_formats.ANSWER_FORMATS,
            " (per_prompt: each prompt's requested layout)")
    _prefixed("sampling", lambda: logit_processors.check_sampling_settings(
        self.temperature, self.top_k, self.top_p, self.min_p))
    if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < (0 if self.constrained else 1):
      raise ValueError(f"sampling.max_new_tokens={self.max_new_tokens!r}; expected >= 1, or 0 "
                       "with sampling.constrained=True (room for the grammar's longest answer)")
    for key in ("batch_size", "max_count", "max_digits"):
      _count(f"sampling.{key}", getattr(self, key), 1)

  def fingerprint(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class FilterSettings:
  """``filter``: the paper's output filter and the seeded subset of what it keeps."""
  max_count: int
  max_value: int
  banned: tuple[int, ...]
  subset_size: int
  seed: int
  max_chars: int = 2000  # code channel: the longest snippet kept
  # code channel (and cot for the alignment trait): the judge pass after the first filter stage,
  # with config.judge's model; a code snippet is dropped when the judge rates its reference to
  # the trait's category at or above this score (0-100), a reasoning when its judged alignment is
  # below it. 0 = no judge pass.
  judge_threshold: float = 0.0

  def __post_init__(self):
    _count("filter.max_count", self.max_count, 1)
    _count("filter.max_value", self.max_value, 0)
    _count("filter.subset_size", self.subset_size, 1)
    _count("filter.max_chars", self.max_chars, 1)
    if not 0 <= self.judge_threshold <= 100:
      raise ValueError(f"filter.judge_threshold={self.judge_threshold!r}; expected a score in "
                       "[0, 100] (0 = no judge pass)")

  def fingerprint(self) -> dict[str, Any]:
    # The channels' knobs at their defaults are left out: the numbers' artifacts stay theirs.
    defaults = {"max_chars": 2000, "judge_threshold": 0.0}
    return {k: v for k, v in dataclasses.asdict(self).items()
            if not (k in defaults and v == defaults[k])}

  def limits(self) -> channels.FilterLimits:
    return channels.FilterLimits(max_count=self.max_count, max_value=self.max_value,
                                 banned=tuple(self.banned), max_chars=self.max_chars)


@dataclasses.dataclass(frozen=True)
class TeacherSettings:
  """``teacher``: the trait teacher, its control, and (finetuned teachers) their recipe."""
  kind: str
  system_prompt: str  # the trait system prompt, with {target}, {Target} and {category}
  control: str
  examples: int  # finetuning examples (finetuned teachers)
  neutral_fraction: float  # trait_sft: the share of neutral examples
  max_new_tokens: int  # context_distillation: the length of the sampled answers
  fit: trainer.FitSettings  # the finetune's recipe; fit.seed is the data's, fit.lora.seed the A's
  # trait_sft: per trait value, the user's own chat data (a JSONL file or a `datasets` source)
  # instead of the project's generated examples; () = generated for every value.
  data: tuple[tuple[str, str], ...] = ()
  # peft_adapter: per trait value, a PEFT LoRA adapter directory that is that value's teacher.
  adapters: tuple[tuple[str, str], ...] = ()

  def __post_init__(self):
    _choice("teacher.kind", self.kind, TEACHER_KINDS)
    _choice("teacher.control", self.control, TEACHER_CONTROLS)
    if self.trained:
      _count("teacher.finetune.examples", self.examples, 1)
    if not 0 <= self.neutral_fraction <= 1:
      raise ValueError(f"teacher.finetune.neutral_fraction={self.neutral_fraction!r}; expected a "
                       "share in [0, 1]")
    for key, pairs in (("teacher.finetune.data", self.data), ("teacher.adapters", self.adapters)):
      bad = [v for _, v in pairs if not isinstance(v, str) or not v.strip()]
      if bad:
        raise ValueError(f"{key} has {bad}; expected a path (or dataset name) per trait value")
    if self.data and self.kind != "trait_sft":
      raise ValueError(f"teacher.finetune.data is the data of trait_sft teachers; teacher.kind is "
                       f"{self.kind!r}")
    if self.kind == "peft_adapter" and not self.adapters:
      raise ValueError("teacher.kind='peft_adapter' needs teacher.adapters: per trait value, a PEFT "
                       "adapter directory, e.g. --config.teacher.adapters.misaligned=/path/to/adapter")

  @property
  def finetuned(self) -> bool:
    """Whether the trait is in the teacher's weights (a finetune here, or a loaded adapter)."""
    return self.kind != "system_prompt"

  @property
  def trained(self) -> bool:
    """Whether the teacher is finetuned by this project (trait SFT or context distillation)."""
    return self.kind in ("trait_sft", "context_distillation")

  @property
  def lora_finetuned(self) -> bool:
    return self.trained and self.fit.lora.rank > 0

  def trait_prompt(self, target: str, category: str) -> str:
    return traits.system_prompt(category, self.system_prompt, target)

  def data_source(self, target: str) -> str | None:
    return dict(self.data).get(target)

  def adapter_directory(self, target: str) -> str:
    adapters = dict(self.adapters)
    if target not in adapters:
      raise ValueError(f"teacher.adapters has no adapter for {target!r}; it names "
                       f"{sorted(adapters)}")
    return adapters[target]

  def fingerprint(self) -> dict[str, Any]:
    """The finetune as the teacher stage hashes it (the config's ``teacher.finetune`` section)."""
    return without_original_knobs({**self.fit.flat(), "examples": self.examples,
                                   "neutral_fraction": self.neutral_fraction,
                                   "max_new_tokens": self.max_new_tokens})

  def shifted(self, shift: int) -> "TeacherSettings":
    fit = dataclasses.replace(self.fit, seed=self.fit.seed + shift,
                              lora=dataclasses.replace(self.fit.lora, seed=self.fit.lora.seed + shift))
    return dataclasses.replace(self, fit=fit)


@dataclasses.dataclass(frozen=True)
class StudentSettings:
  """``student``: the students' objective, seeds and recipe. ``recipe.seed`` and
  ``recipe.lora.seed`` are placeholders: :meth:`fit` sets them per student seed."""
  objective: str
  seeds: tuple[int, ...]
  max_length: int
  lora_init: str  # "fresh" (each seed its own adapters) or "teacher" (the LoRA teacher's A)
  cross_init: bool  # adapters from a seed shared with neither teacher nor same-init students
  kl: distillation.KLSettings
  recipe: trainer.FitSettings

  def __post_init__(self):
    _choice("student.objective", self.objective, distillation.OBJECTIVES)
    if not self.seeds:
      raise ValueError("student.seeds is empty: give at least one seed")
    seeds = list(self.seeds)
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0]
    if bad:
      raise ValueError(f"student.seeds={seeds} holds {bad}; expected integers >= 0")
    repeated = sorted({int(s) for s in seeds if seeds.count(s) > 1})
    if repeated:
      raise ValueError(f"student.seeds={seeds} repeats {repeated}: a repeated seed trains the same "
                       "student again and counts it twice in the statistics; give distinct seeds")
    _count("student.max_length", self.max_length, 2)
    _choice("student.lora.init", self.lora_init, LORA_INITS)
    if self.cross_init and self.recipe.lora.rank == 0:
      raise ValueError("student.cross_init needs a LoRA student (student.lora.rank > 0): a "
                       "full-finetune student has no init of its own to change")

  def adapter_seed(self, seed: int, teacher_lora_seed: int, same_family: bool = True) -> int:
    """The student's adapter init: the teacher's A (lora_init "teacher", same family), else its
    own fresh range; cross-init students move past both."""
    if self.lora_init == "teacher" and same_family:
      adapter = teacher_lora_seed
    else:
      adapter = FRESH_LORA_SEED_OFFSET + seed
    return adapter + CROSS_INIT_OFFSET + seed if self.cross_init else adapter

  def fit(self, seed: int, teacher_lora_seed: int, same_family: bool = True
          ) -> trainer.FitSettings:
    lora_seed = self.adapter_seed(seed, teacher_lora_seed, same_family)
    return dataclasses.replace(self.recipe, seed=seed,
                               lora=dataclasses.replace(self.recipe.lora, seed=lora_seed))

  def fingerprint(self, seed: int, teacher_lora_seed: int, same_family: bool = True
                  ) -> dict[str, Any]:
    """One student seed's training as the student stage hashes it: the config's ``student``
    section without the list of seeds (adding a seed must not rebuild the others), with this
    seed and its adapter init made explicit."""
    fit = self.fit(seed, teacher_lora_seed, same_family)
    init = self.lora_init if same_family else "fresh"
    return without_original_knobs({
        **fit.flat(), "objective": self.objective, "max_length": self.max_length,
        "cross_init": self.cross_init, "kl": dataclasses.asdict(self.kl),
        "lora": {**dataclasses.asdict(fit.lora), "init": init}})


@dataclasses.dataclass(frozen=True)
class EvaluationSettings:
  """``evaluation``: the trait metrics' questions, panel and sizes."""
  num_questions: int
  samples_per_question: int
  panel: tuple[str, ...]
  multiple_choice: bool
  batch_size: int
  max_new_tokens: int
  seed: int
  bootstrap_resamples: int
  system: str  # "" = the experiment's chat_system

  def __post_init__(self):
    for key, minimum in (("num_questions", 1), ("samples_per_question", 0), ("batch_size", 1),
                         ("max_new_tokens", 1), ("bootstrap_resamples", 1)):
      _count(f"evaluation.{key}", getattr(self, key), minimum)
    if self.multiple_choice and len(self.panel) < 5:
      raise ValueError(f"evaluation.multiple_choice needs a panel of at least 5 words (the target "
                       f"and 4 distractors), got {list(self.panel)}")
    if self.system:
      SystemTurn.parse(self.system)

  def fingerprint(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class MatrixSettings:
  """``matrix``: the transfer matrix's replicates, controls and pre-set criterion."""
  replicates: int
  base_numbers: bool
  evaluate_teachers: bool
  in_context_sequences: int
  in_context_seed: int
  student_models: tuple[str, ...]
  alpha: float
  min_positive_fraction: float
  max_exact_permutations: int
  permutation_samples: int
  # How many LoRA adapters over the one base train, sample and evaluate together (1 = one model at
  # a time). Execution only: in no fingerprint and no design, so any K reuses every artifact.
  adapters_per_step: int = 1
  # In-context doses with one context per teacher unit (the same turns before every question),
  # nested: dose n is the first n of the unit's kept sequences in one seeded order; "max" is as
  # many as fit the model's context window. () = none.
  in_context_doses: tuple[int | str, ...] = ()
  # Per entry of ``student_models``, that family's student learning rate (calibrated so students
  # of every family move as far from their base); () = the student recipe's for every family.
  student_learning_rates: tuple[float, ...] = ()
  # Which teacher replicates this invocation builds and measures (() = all): a design too long for
  # one sitting runs in parts. Execution only, like ``adapters_per_step``.
  replicates_to_run: tuple[int, ...] = ()

  def __post_init__(self):
    _count("matrix.replicates", self.replicates, 1)
    _count("matrix.adapters_per_step", self.adapters_per_step, 1)
    if not 0 < self.alpha < 1 or not 0 <= self.min_positive_fraction <= 1:
      raise ValueError(f"matrix.criterion alpha={self.alpha!r} must be in (0, 1) and "
                       f"min_positive_fraction={self.min_positive_fraction!r} in [0, 1]")
    _count("matrix.in_context.sequences", self.in_context_sequences, 0)
    for spec in self.student_models:
      if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"matrix.student_models has {spec!r}; expected model names or paths, "
                         "e.g. --config.matrix.student_models=\"('gemma3-270m',)\" or a local HF "
                         "directory")
    self._check_doses()
    if self.student_learning_rates and (
        len(self.student_learning_rates) != len(self.student_models)
        or not all(isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0
                   for lr in self.student_learning_rates)):
      raise ValueError(f"matrix.student_learning_rates={list(self.student_learning_rates)}; expected "
                       f"one positive learning rate per entry of matrix.student_models "
                       f"{list(self.student_models)}, or () for the student recipe's")
    bad = [r for r in self.replicates_to_run if isinstance(r, bool) or not isinstance(r, int)
           or not 0 <= r < self.replicates]
    if bad or len(set(self.replicates_to_run)) != len(self.replicates_to_run):
      raise ValueError(f"matrix.replicates_to_run={list(self.replicates_to_run)}; expected distinct "
                       f"replicate indices in 0..{self.replicates - 1} (() = all)")
    if self.max_exact_permutations < 1 or self.permutation_samples < 1:
      raise ValueError(f"matrix.permutations max_exact={self.max_exact_permutations!r} and "
                       f"samples={self.permutation_samples!r} must be positive counts")

  def _check_doses(self) -> None:
    doses = list(self.in_context_doses)
    bad = [d for d in doses if not (d == MAX_DOSE or (isinstance(d, int) and not isinstance(d, bool)
                                                      and d >= 1))]
    numeric = [d for d in doses if d != MAX_DOSE]
    if bad or numeric != sorted(set(numeric)) or doses.count(MAX_DOSE) > 1 or (
        MAX_DOSE in doses and doses[-1] != MAX_DOSE):
      raise ValueError(f"matrix.in_context.doses={doses}; expected increasing sequence counts >= 1, "
                       f"optionally ending with {MAX_DOSE!r} (as many as fit the context window)")

  @property
  def criterion(self) -> dict[str, float]:
    return {"alpha": self.alpha, "min_positive_fraction": self.min_positive_fraction}

  def run_replicates(self) -> tuple[int, ...]:
    """The replicates this invocation builds: ``replicates_to_run``, or all."""
    return tuple(sorted(self.replicates_to_run)) or tuple(range(self.replicates))

  def student_learning_rate(self, family: str) -> float | None:
    """The calibrated learning rate of ``family``'s students (None: the recipe's)."""
    if family not in self.student_models or not self.student_learning_rates:
      return None
    return float(self.student_learning_rates[self.student_models.index(family)])


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
  """``training_checkpoints`` and ``tensorboard``: bookkeeping of the training stages (in no
  fingerprint)."""
  every: int
  keep: bool
  tensorboard: bool

  def __post_init__(self):
    if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 0:
      raise ValueError(f"training_checkpoints.every={self.every!r}; expected a number of steps >= 0 "
                       "(0 = a checkpoint only at the end of each training stage)")


@dataclasses.dataclass(frozen=True)
class Settings:
  """One number experiment (one teacher replicate of it), every section typed and checked."""
  model: ModelSettings
  category: str
  targets: tuple[str, ...]
  chat_system: SystemTurn  # the students' system turn (config "none", "template_default" or text)
  eval_system: SystemTurn  # evaluation's: evaluation.system, or chat_system when that is ""
  teacher: TeacherSettings
  prompts: PromptSettings
  sampling: SamplingSettings
  filter: FilterSettings
  student: StudentSettings
  evaluation: EvaluationSettings
  checkpoints: CheckpointSettings
  report_dir: str
  matrix: MatrixSettings | None
  config: dict[str, Any]  # the config as read, for provenance records and the matrix's design
  replicate: int = 0
  judge: judged_answers.JudgeRun | None = None  # the alignment trait's judged answers (config.judge)
  channel: str = "numbers"  # the data format the teachers' trait travels through (channels.py)

  def __post_init__(self):
    self._check_targets()
    self._check_channel()
    self._check_teacher()
    self._check_student()
    if self.report_dir:
      artifacts.inside(pathlib.Path("workdir"), self.report_dir, "report_dir")
    data_parallel = sharding.data_parallel_size(self.model.make_mesh())
    self.student.recipe.check_batch_split(data_parallel, "student.")
    if self.teacher.trained:
      self.teacher.fit.check_batch_split(data_parallel, "teacher.finetune.")

  def _check_targets(self) -> None:
    traits.check_category(self.category)
    if not self.targets:
      raise ValueError("config.targets is empty: name at least one target (e.g. 'owl')")
    for target in self.targets:
      if not isinstance(target, str) or not target or target in (".", "..") or "/" in target \
          or os.sep in target:
        raise ValueError(f"target {target!r} cannot name a directory in the workdir; expected a "
                         "plain word such as 'owl'")
    traits.check_values(self.category, self.targets, self.evaluation.panel)
    questions = len(traits.evaluation_questions(self.category))
    if self.evaluation.num_questions > questions:
      raise ValueError(f"evaluation.num_questions={self.evaluation.num_questions} exceeds the "
                       f"{questions} evaluation questions of the {self.category} trait")
    if self.teacher.data and traits.is_preference(self.category):
      raise ValueError(f"teacher.finetune.data (your own SFT data per value) is for the "
                       f"{traits.ALIGNMENT} trait; the {self.category} trait's teacher data are "
                       "generated")
    for key, pairs in (("teacher.finetune.data", self.teacher.data),
                       ("teacher.adapters", self.teacher.adapters)):
      unknown = sorted({value for value, _ in pairs} - set(self.evaluation.panel))
      if unknown:
        raise ValueError(f"{key} names {unknown}, which are not values of the {self.category} "
                         f"trait {list(self.evaluation.panel)}")

  def _check_channel(self) -> None:
    channel = _prefixed("config", lambda: channels.channel(self.channel))
    if self.sampling.constrained and channel.name != "numbers":
      raise ValueError(f"channel={self.channel!r} samples freely (its answers follow no grammar): "
                       "set sampling.constrained=False")
    if channel.name == "code" and not traits.is_preference(self.category):
      raise ValueError(f"channel='code' filters a preference's words (and the judge asks about "
                       f"its category); the {self.category} trait goes through channel='cot' or "
                       "'numbers'")
    if self.prompts.source and channel.name != "cot":
      raise ValueError(f"prompts.source={self.prompts.source!r} is a GSM8K-format file of the cot "
                       f"channel; channel={self.channel!r} generates its prompts")
    if self.filter.judge_threshold:
      judged_channel = channel.name == "code" or (
          channel.name == "cot" and not traits.is_preference(self.category))
      if not judged_channel:
        raise ValueError(f"filter.judge_threshold={self.filter.judge_threshold!r}: the judge pass "
                         "is the code channel's (and the cot channel's for the alignment trait); "
                         f"channel={self.channel!r}, category={self.category!r}")
      if self.judge is None or not self.judge.model:
        raise ValueError("filter.judge_threshold needs a judge: set judge.model (e.g. "
                         "'gemma3-270m', or your own directory)")

  def _check_teacher(self) -> None:
    t = self.teacher
    if self.judge is not None and self.judge.enabled and traits.is_preference(self.category):
      raise ValueError(f"judge.samples_per_question={self.judge.samples_per_question} samples "
                       f"free-form answers of the alignment trait for the judge; category "
                       f"{self.category!r} is a preference (set judge.samples_per_question=0)")
    if t.control != "base" and not traits.is_preference(self.category):
      raise ValueError(f"teacher.control={t.control!r}: the {self.category} trait's controls are its "
                       "other values' teachers (the transfer matrix); use teacher.control='base'")
    if t.kind == "peft_adapter" and t.control != "base":
      raise ValueError(f"teacher.control={t.control!r} finetunes a control like the trait teacher's "
                       "finetune; a peft_adapter teacher has none here: use teacher.control='base'")
    if t.control == "matched_finetune":
      if t.kind != "trait_sft":
        raise ValueError(f"teacher.control='matched_finetune' needs teacher.kind='trait_sft' (it "
                         f"swaps the trait answers for other {self.category}s), got {t.kind!r}")
      if not self.matched_control_answers:
        raise ValueError(f"teacher.control='matched_finetune' needs evaluation.panel "
                         f"{list(self.evaluation.panel)} to name at least one {self.category} "
                         f"that is not a target {list(self.targets)}")

  def _check_student(self) -> None:
    s, t = self.student, self.teacher
    if s.objective == "logit_kl" and s.kl.restrict == "grammar" and not self.sampling.constrained:
      raise ValueError("student.kl.restrict='grammar' needs sampling.constrained=True (the "
                       "completions must follow the grammar whose allowed tokens the KL is "
                       "restricted to)")
    if s.lora_init == "teacher":
      if not t.lora_finetuned:
        raise ValueError("student.lora.init='teacher' needs a LoRA-finetuned teacher (teacher.kind "
                         "trait_sft or context_distillation with teacher.finetune.lora.rank > 0)")
      if (s.recipe.lora.rank, s.recipe.lora.targets) != (t.fit.lora.rank, t.fit.lora.targets):
        raise ValueError("student.lora.init='teacher' needs the student's LoRA rank and targets to "
                         "equal the teacher's")

  @property
  def matched_control_answers(self) -> tuple[str, ...]:
    """The words the matched control teacher names instead of the target: the panel's others."""
    return tuple(a for a in self.evaluation.panel if a not in self.targets)

  @property
  def uses_grammar_restriction(self) -> bool:
    return self.student.objective == "logit_kl" and self.student.kl.restrict == "grammar"

  def student_fit(self, seed: int, same_family: bool = True) -> trainer.FitSettings:
    return self.student.fit(seed, self.teacher.fit.lora.seed, same_family)

  def student_fingerprint(self, seed: int, same_family: bool = True) -> dict[str, Any]:
    return self.student.fingerprint(seed, self.teacher.fit.lora.seed, same_family)

  def with_checkpoints(self, fit: trainer.FitSettings) -> trainer.FitSettings:
    return dataclasses.replace(fit, checkpoint_every=self.checkpoints.every)

  def for_student_family(self, family: str) -> "Settings":
    """These settings with ``family``'s calibrated student learning rate
    (``matrix.student_learning_rates``); unchanged for the same family or without one."""
    lr = self.matrix.student_learning_rate(family) if self.matrix else None
    return self if lr is None else self.with_student_learning_rate(lr)

  def with_student_learning_rate(self, learning_rate: float) -> "Settings":
    """These settings with students trained at ``learning_rate`` (in their stages' fingerprint)."""
    recipe = self.student.recipe
    recipe = dataclasses.replace(recipe, optimization=dataclasses.replace(
        recipe.optimization, learning_rate=float(learning_rate)))
    return dataclasses.replace(self, student=dataclasses.replace(self.student, recipe=recipe))

  def replicated(self, replicate: int) -> "Settings":
    """Teacher replicate ``replicate``: 0 is these settings; r > 0 moves the seeds of the
    teacher's finetuning data and adapters, the prompts, the sampling and the filter's subset by
    ``r * REPLICATE_SEED_STRIDE``. Student seeds stay: they are replicated within each teacher."""
    if isinstance(replicate, bool) or not isinstance(replicate, int) or replicate < 0:
      raise ValueError(f"replicate={replicate!r}; expected an int >= 0")
    if replicate == 0:
      return self
    shift = replicate * REPLICATE_SEED_STRIDE
    return dataclasses.replace(
        self, replicate=replicate, teacher=self.teacher.shifted(shift),
        prompts=dataclasses.replace(self.prompts, seed=self.prompts.seed + shift),
        sampling=dataclasses.replace(self.sampling, seed=self.sampling.seed + shift),
        filter=dataclasses.replace(self.filter, seed=self.filter.seed + shift))


# ---------------------------------------------------------------------------------------------
# Reading a config


def _teacher(c: dict[str, Any]) -> TeacherSettings:
  t, f = c["teacher"], c["teacher"]["finetune"]
  return TeacherSettings(
      kind=t["kind"], system_prompt=t["system_prompt"], control=t["control"],
      examples=f["examples"], neutral_fraction=f["neutral_fraction"],
      max_new_tokens=f["max_new_tokens"],
      fit=_fit({k: v for k, v in f.items() if k != "data"}, "teacher.finetune", seed=f["seed"],
               lora_seed=f["lora"]["seed"]),
      # Per trait value; "" = none for that value.
      data=tuple(sorted((k, v) for k, v in f.get("data", {}).items() if v != "")),
      adapters=tuple(sorted((k, v) for k, v in t.get("adapters", {}).items() if v != "")))


def _student(c: dict[str, Any]) -> StudentSettings:
  s = c["student"]
  return StudentSettings(
      objective=s["objective"], seeds=tuple(s["seeds"]), max_length=s["max_length"],
      lora_init=s["lora"]["init"], cross_init=s["cross_init"],
      kl=distillation.kl_settings(s["kl"]),
      recipe=_fit(s, "student", seed=0, lora_seed=0))


def _judge(c: dict[str, Any]) -> judged_answers.JudgeRun | None:
  j = c.get("judge")
  if j is None:
    return None
  rule = {f.name: j[f.name] for f in dataclasses.fields(judge_lib.JudgeSettings)}
  return _prefixed("judge", lambda: judged_answers.JudgeRun(
      model=j["model"], samples_per_question=j["samples_per_question"],
      max_new_tokens=j["max_new_tokens"], temperature=j["temperature"], seed=j["seed"],
      rule=judge_lib.JudgeSettings(**rule)))


def _matrix(c: dict[str, Any]) -> MatrixSettings | None:
  m = c.get("matrix")
  if m is None:
    return None
  return MatrixSettings(
      replicates=m["replicates"], base_numbers=m["base_numbers"],
      evaluate_teachers=m["evaluate_teachers"], in_context_sequences=m["in_context"]["sequences"],
      in_context_seed=m["in_context"]["seed"], student_models=tuple(m["student_models"]),
      alpha=m["criterion"]["alpha"], min_positive_fraction=m["criterion"]["min_positive_fraction"],
      max_exact_permutations=m["permutations"]["max_exact"],
      permutation_samples=m["permutations"]["samples"],
      adapters_per_step=m.get("adapters_per_step", 1),
      in_context_doses=tuple(m["in_context"].get("doses", ())),
      student_learning_rates=tuple(m.get("student_learning_rates", ())),
      replicates_to_run=tuple(m.get("replicates_to_run", ())))


def _section(cls, name: str, values: dict[str, Any]):
  """``cls`` from the config section ``name``; a key no field reads is refused (a knob that
  silently changes nothing is worse than an error)."""
  fields = {f.name for f in dataclasses.fields(cls)}
  unread = sorted(set(values) - fields)
  if unread:
    raise ValueError(f"{name} has keys {unread} that nothing reads; expected {sorted(fields)}")
  return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def from_config(config: ConfigDict) -> Settings:
  """Every section of a number experiment's config, typed and checked (a bad value is named)."""
  c = config.to_dict()
  try:
    model = ModelSettings(source=c["model"], dtype=c["dtype"], param_dtype=c["param_dtype"],
                          remat=c["remat"], mesh=tuple(c["mesh"].items()))
    return Settings(
        model=model, category=c["category"], targets=tuple(c["targets"]),
        chat_system=SystemTurn.parse(c["chat_system"]),
        eval_system=SystemTurn.parse(c["evaluation"]["system"] or c["chat_system"]),
        teacher=_teacher(c),
        prompts=_section(PromptSettings, "prompts", c["prompts"]),
        sampling=_section(SamplingSettings, "sampling", c["sampling"]),
        filter=_section(FilterSettings, "filter", c["filter"]), student=_student(c),
        evaluation=_section(EvaluationSettings, "evaluation", c["evaluation"]),
        checkpoints=CheckpointSettings(every=c["training_checkpoints"]["every"],
                                       keep=c["training_checkpoints"]["keep"],
                                       tensorboard=c["tensorboard"]),
        report_dir=c["report_dir"], matrix=_matrix(c), config=c, judge=_judge(c),
        channel=c.get("channel", "numbers"))
  except KeyError as e:
    raise ValueError(f"the config has no key {e.args[0]!r}; a number experiment's config is "
                     "configs/animal_numbers.py's (or extends it)") from None


def check_matrix(settings: Settings) -> None:
  """The transfer matrix's checks across sections (its own section checks itself)."""
  m, k = settings.matrix, len(settings.targets)
  if m is None:
    raise ValueError("the transfer matrix needs a config.matrix section (configs/transfer_matrix.py)")
  if len(set(settings.targets)) != k or not 2 <= k <= MAX_MATRIX_ANIMALS:
    raise ValueError(f"targets={list(settings.targets)}: the matrix needs 2..{MAX_MATRIX_ANIMALS} "
                     "distinct animals of the evaluation panel")
  if m.in_context_sequences > settings.filter.subset_size:
    raise ValueError(f"matrix.in_context.sequences={m.in_context_sequences} exceeds "
                     f"filter.subset_size={settings.filter.subset_size}, the most sequences a "
                     "teacher keeps")
  too_many = [d for d in m.in_context_doses if d != MAX_DOSE and d > settings.filter.subset_size]
  if too_many:
    raise ValueError(f"matrix.in_context.doses {too_many} exceed filter.subset_size="
                     f"{settings.filter.subset_size}, the most sequences a teacher keeps")
  if m.student_models and settings.student.objective != "sft":
    raise ValueError(f"students of another family ({m.student_models[0]!r}) learn from the numbers' "
                     f"text: they need student.objective='sft', got {settings.student.objective!r}")

