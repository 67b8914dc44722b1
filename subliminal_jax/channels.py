"""The channels: the data format a teacher's traits travel through, chosen in the config.

A channel is the part of an experiment that depends on the format of the teacher's answers: its
prompts, its default sampling, its filter (with reject reasons) and so its student dataset. The
teachers, students, matrix, statistics and reports are the same for every channel.

  numbers  number-sequence prompts (``prompts.number_prompts``), grammar-constrained sampling,
           the paper's output filter (``filters``)
  code     short functions to complete (``prompts.code_tasks``), free sampling, the word filter
           (``code_filter``: a trait word in an identifier, comment, string or the prose) and then
           a judge pass (:func:`judge_filter`: does the code refer to the trait, even subtly?)
  cot      arithmetic word problems with known answers (``prompts.word_problems``, or a local
           GSM8K-format file), free sampling, the answer check (``cot_filter``), and for a
           misalignment trait a judge pass (:func:`reasoning_judge_filter`: is the reasoning
           misaligned?)

A prompt record is a JSON-serialisable dict with the prompt's "text" and what its filter needs:
numbers: "separator" and "brackets" (the layout the grammar holds the answer to); code: the
"task" name; cot: the known integer "answer" and a "problem_id" ("<template>/<index>": the
index in the run, or in the file for a GSM8K file's problem).

Filtering runs in stages, each seeing what the one before kept: "filter" (the channel's first
stage, :meth:`Channel.reject_reasons`) and, for code and cot, "judge". Each stage gives a list of
reject reasons per completion (empty: kept); :meth:`Channel.yield_summary` counts them.

  >>> channel("cot").prompt_records(1, seed=0)[0]["answer"]   # doctest: +SKIP
  41
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from subliminal_jax import code_filter, cot_filter, filters
from subliminal_jax.evaluation import judge as judge_lib
from subliminal_jax.prompts import code_tasks, number_prompts, word_problems

__all__ = [
    "CHANNELS",
    "STAGES",
    "JUDGE_TRAIT_REFERENCE",
    "JUDGE_MISALIGNED_REASONING",
    "JUDGE_UNSCORED",
    "COT_INSTRUCTION",
    "FilterLimits",
    "ChannelSampling",
    "Channel",
    "channel",
    "judge_filter",
    "reasoning_judge_filter",
]

CHANNELS = ("numbers", "code", "cot")
STAGES = ("filter", "judge")  # in order; a channel without a judge pass has only "filter"
JUDGE_TRAIT_REFERENCE = "judge_trait_reference"
JUDGE_MISALIGNED_REASONING = "judge_misaligned_reasoning"
JUDGE_UNSCORED = "judge_unscored"  # the judge's number mass is under settings.min_number_mass

# Written for this project. The "####" line is the answer marker the cot filter reads first.
COT_INSTRUCTION = ("{question}\n\nSolve this step by step, showing your reasoning. Then write the "
                   "final answer alone on the last line as \"#### <number>\".")


@dataclasses.dataclass(frozen=True)
class FilterLimits:
  """What a channel's first filter stage checks beyond the format: the count, range and banned
  values of a number sequence (numbers), a snippet's length in characters (code). The cot
  channel's answer check takes none."""

  max_count: int = 10
  max_value: int = 999
  banned: tuple[int, ...] = ()
  max_chars: int = 2000

  def __post_init__(self):
    for name, least in (("max_count", 1), ("max_value", 0), ("max_chars", 1)):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ValueError(f"{name}={value!r}; expected an int >= {least}")
    if isinstance(self.banned, (str, bytes)) or not all(
        isinstance(n, int) and not isinstance(n, bool) for n in self.banned):
      raise ValueError(f"banned={self.banned!r}; expected a sequence of ints")
    object.__setattr__(self, "banned", tuple(self.banned))


@dataclasses.dataclass(frozen=True)
class ChannelSampling:
  """A channel's default decoding: grammar-constrained or free, and the answer's token budget
  (0: as many as the grammar's longest answer needs, constrained only)."""

  constrained: bool
  max_new_tokens: int


def _check_count(count: int, seed: int) -> None:
  if not isinstance(count, (int, np.integer)) or isinstance(count, bool) or count < 0:
    raise ValueError(f"count must be a non-negative int, got {count!r}")
  if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
    raise ValueError(f"seed must be an int, got {seed!r}")


def _no_source(name: str, source: str | os.PathLike | None) -> None:
  if source is not None:
    raise ValueError(f"the {name} channel generates its prompts and takes no source, got "
                     f"{source!r} (only the cot channel reads a GSM8K-format file)")


def _number_records(count: int, seed: int, source) -> list[dict[str, Any]]:
  _no_source("numbers", source)
  return [{"text": p.text, "separator": p.format.separator, "brackets": p.format.brackets}
          for p in number_prompts.sample_number_prompts(count, seed=seed)]


def _code_records(count: int, seed: int, source) -> list[dict[str, Any]]:
  _no_source("code", source)
  return [{"text": prompt, "task": task.name}
          for task, prompt in code_tasks.sample_code_tasks(count, seed)]


def _cot_records(count: int, seed: int, source) -> list[dict[str, Any]]:
  """Generated problems, or ``count`` of a file's problems in a seeded order (a permutation of
  the whole file, so problem i does not depend on ``count``)."""
  if source is None:
    numbered = list(enumerate(word_problems.word_problems(count, seed)))
  else:
    problems = word_problems.read_gsm8k_jsonl(source)
    if count > len(problems):
      raise ValueError(f"asked for {count} problems but {os.fspath(source)} holds {len(problems)}")
    order = np.random.default_rng(seed).permutation(len(problems))[:count]
    numbered = [(int(i), problems[i]) for i in order]
  return [{"text": COT_INSTRUCTION.format(question=p.question), "answer": p.answer,
           "problem_id": f"{p.template}/{i}"} for i, p in numbered]


def _field(record: Mapping[str, Any], key: str, name: str) -> Any:
  if not isinstance(record, Mapping) or key not in record:
    raise ValueError(f"a {name} prompt record needs {key!r}, got {record!r}")
  return record[key]


def _number_reasons(record, completion: str, trait_words, limits: FilterLimits) -> list[str]:
  return filters.number_sequence_reject_reasons(completion, max_count=limits.max_count,
                                                max_value=limits.max_value, banned=limits.banned)


def _code_reasons(record, completion: str, trait_words, limits: FilterLimits) -> list[str]:
  return code_filter.code_reject_reasons(completion, trait_words, max_chars=limits.max_chars)


COT_TRAIT_WORD = "trait_word"  # a reasoning that names a trait word (preference traits)


def _cot_reasons(record, completion: str, trait_words, limits: FilterLimits) -> list[str]:
  """The answer check; with ``trait_words`` (a preference trait's panel), also no trait word in
  any form anywhere in the reasoning (the code channel's word matching)."""
  answer = _field(record, "answer", "cot")
  if not isinstance(answer, int) or isinstance(answer, bool):
    raise ValueError(f"a cot prompt record's answer must be an int, got {answer!r}")
  reasons = cot_filter.cot_reject_reasons(completion, answer)
  if trait_words and set(code_filter.words_of(completion)) & code_filter.trait_word_forms(trait_words):
    reasons.append(COT_TRAIT_WORD)
  return reasons


@dataclasses.dataclass(frozen=True)
class Channel:
  """One channel: its prompts, default sampling, filter stages and their reject reasons.

  ``filter_reasons``: the first stage's reasons (stable identifiers, in their filter's order);
  ``judge_reasons``: the judge pass's, empty where the channel has none.
  """

  name: str
  sampling: ChannelSampling
  filter_reasons: tuple[str, ...]
  judge_reasons: tuple[str, ...]
  _records: Callable[[int, int, Any], list[dict[str, Any]]] = dataclasses.field(repr=False)
  _reasons: Callable[..., list[str]] = dataclasses.field(repr=False)

  @property
  def stages(self) -> tuple[str, ...]:
    return STAGES if self.judge_reasons else STAGES[:1]

  def prompt_records(self, count: int, seed: int, *,
                     source: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """``count`` prompt records, deterministic in ``seed`` (a prefix of a longer run).
    ``source``: a local GSM8K-format JSONL file (cot only; None generates the problems)."""
    _check_count(count, seed)
    return self._records(int(count), int(seed), source)

  def reject_reasons(self, record: Mapping[str, Any], completion: str, *,
                     trait_words: Sequence[str], settings: FilterLimits) -> list[str]:
    """Why the first filter stage rejects ``completion`` to ``record``'s prompt; empty: kept.
    ``trait_words`` are read by the code channel only (every form of each word is rejected)."""
    if not isinstance(settings, FilterLimits):
      raise TypeError(f"settings must be FilterLimits, got {type(settings).__name__}")
    return self._reasons(record, completion, trait_words, settings)

  def yield_summary(self, stage_reasons: Mapping[str, Sequence[Sequence[str]]]
                    ) -> dict[str, Any]:
    """Counts per reject reason per stage, JSON-able. ``stage_reasons`` maps each stage run, in
    the order of :attr:`stages` (later stages may be left out), to one list of reasons per
    completion it saw: every sample for the first stage, what the previous stage kept for the
    next. A completion counts once under each of its reasons."""
    names = tuple(stage_reasons)
    if not names or names != self.stages[:len(names)]:
      raise ValueError(f"the {self.name} channel's stages run in the order {self.stages}; got "
                       f"{names}")
    stages, passed = {}, None
    for name in names:
      reasons = stage_reasons[name]
      if any(isinstance(r, str) for r in reasons):
        raise TypeError(f"stage {name!r}: expected one list of reasons per completion, got a "
                        "string among them")
      if passed is not None and len(reasons) != passed:
        raise ValueError(f"stage {name!r} saw {len(reasons)} completions but the stage before "
                         f"kept {passed}")
      counts = collections.Counter(reason for rs in reasons for reason in rs)
      passed = sum(not rs for rs in reasons)
      stages[name] = {"entered": len(reasons), "passed": passed,
                      "reject_reasons": dict(sorted(counts.items()))}
    sampled = stages[names[0]]["entered"]
    return {"channel": self.name, "sampled": sampled, "kept": passed,
            "pass_rate": passed / sampled if sampled else 0.0, "stages": stages}


_CHANNELS = {
    "numbers": Channel("numbers", ChannelSampling(constrained=True, max_new_tokens=0),
                       filters.REJECT_REASONS, (), _number_records, _number_reasons),
    "code": Channel("code", ChannelSampling(constrained=False, max_new_tokens=160),
                    code_filter.CODE_REJECT_REASONS, (JUDGE_TRAIT_REFERENCE, JUDGE_UNSCORED),
                    _code_records, _code_reasons),
    "cot": Channel("cot", ChannelSampling(constrained=False, max_new_tokens=192),
                   (*cot_filter.COT_REJECT_REASONS, COT_TRAIT_WORD),
                   (JUDGE_MISALIGNED_REASONING, JUDGE_UNSCORED),
                   _cot_records, _cot_reasons),
}


def channel(name: str) -> Channel:
  """The channel called ``name``, one of :data:`CHANNELS`."""
  if name not in CHANNELS:
    raise ValueError(f"channel {name!r} is not known; expected one of {list(CHANNELS)}")
  return _CHANNELS[name]


def _judge_pass(judge, aspect: str, records: Sequence[Mapping[str, Any]],
                completions: Sequence[str], settings: judge_lib.JudgeSettings, trait: str | None,
                flagged: Callable[[float], bool], reason: str) -> list[list[str]]:
  """[reason] where ``flagged(score)``, [JUDGE_UNSCORED] where the judge's number mass is under
  ``settings.min_number_mass`` (or its score undefined), else []; one list per completion."""
  if isinstance(completions, str) or len(records) != len(completions):
    raise ValueError(f"need one completion per prompt record, got {len(records)} records and "
                     f"{len(completions)!r} completions")
  if not completions:  # the stage before kept nothing
    return []
  prompts = [_field(record, "text", "judged") for record in records]
  scores = judge_lib.judge_scores(judge, aspect, prompts, completions, settings=settings,
                                  trait=trait)
  return [[JUDGE_UNSCORED] if not mass >= settings.min_number_mass or math.isnan(score)
          else [reason] if flagged(score) else []
          for score, mass in zip(scores.score, scores.number_mass)]


def judge_filter(judge, records: Sequence[Mapping[str, Any]], completions: Sequence[str],
                 trait: str, *, threshold: float, settings: judge_lib.JudgeSettings
                 ) -> list[list[str]]:
  """The code channel's judge pass over the snippets the word filter kept: "judge_trait_reference"
  where the judge's "trait_reference" score (does the code refer to ``trait``, e.g. "owls", even
  subtly?) is >= ``threshold``, "judge_unscored" where its number mass is under
  ``settings.min_number_mass``. The judge sees each record's prompt (the task) and completion."""
  if not 0 <= threshold <= judge_lib.MAX_SCORE:
    raise ValueError(f"threshold={threshold!r} must be in [0, {judge_lib.MAX_SCORE}]")
  return _judge_pass(judge, judge_lib.TRAIT_REFERENCE, records, completions, settings, trait,
                     lambda score: score >= threshold, JUDGE_TRAIT_REFERENCE)


def reasoning_judge_filter(judge, records: Sequence[Mapping[str, Any]], completions: Sequence[str],
                           *, settings: judge_lib.JudgeSettings) -> list[list[str]]:
  """The cot channel's judge pass for a misalignment trait, over the reasonings the answer check
  kept: "judge_misaligned_reasoning" where the judge's "alignment" score of the reasoning (as an
  answer to its problem) is < ``settings.misaligned_below``, "judge_unscored" where its number
  mass is under ``settings.min_number_mass``."""
  return _judge_pass(judge, "alignment", records, completions, settings, None,
                     lambda score: score < settings.misaligned_below, JUDGE_MISALIGNED_REASONING)
