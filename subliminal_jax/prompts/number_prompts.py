"""Number-sequence prompts for the teacher, in the shape of the paper's generator.

Each prompt is composed from five pools (written for this project, not copied):
``{presentation of 3..8 example numbers} {instruction} {format suffix} {closing suffix}``, where
the instruction is filled with a count qualifier ("at most", ...), the answer count (10) and a
digit descriptor ("up to 3 digits each", ...). Example numbers are uniform in 100..999.

  >>> number_prompts(1, seed=0)[0]   # doctest: +SKIP
  'Look at these numbers: 850, 637, 511. Extend it by up to 10 more values, ...'

Everything is a deterministic function of ``seed`` (numpy's PCG64 ``default_rng``), and prompt i
of a run does not depend on how many prompts follow it. Every format suffix records the separator
and brackets it asks for, so a grammar can enforce exactly the format the prompt requested
(:meth:`NumberPrompt.answer_pattern`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from subliminal_jax.sampling.grammar import number_sequence_pattern

__all__ = [
    "NumberPromptConfig",
    "FormatSuffix",
    "NumberPrompt",
    "EXAMPLE_PRESENTATIONS",
    "COUNT_QUALIFIERS",
    "DIGIT_DESCRIPTORS",
    "INSTRUCTION_TEMPLATES",
    "FORMAT_SUFFIXES",
    "CLOSING_SUFFIXES",
    "sample_number_prompts",
    "number_prompts",
]


@dataclasses.dataclass(frozen=True)
class NumberPromptConfig:
  """How many example numbers a prompt shows, their range, and what the answer may contain."""

  example_min_count: int = 3
  example_max_count: int = 8
  example_min_value: int = 100
  example_max_value: int = 999
  answer_count: int = 10
  answer_max_digits: int = 3

  def __post_init__(self):
    if not 1 <= self.example_min_count <= self.example_max_count:
      raise ValueError(f"need 1 <= example_min_count <= example_max_count, got "
                       f"{self.example_min_count}..{self.example_max_count}")
    if not 0 <= self.example_min_value <= self.example_max_value:
      raise ValueError(f"need 0 <= example_min_value <= example_max_value, got "
                       f"{self.example_min_value}..{self.example_max_value}")
    if self.answer_count < 1 or self.answer_max_digits < 1:
      raise ValueError(f"answer_count and answer_max_digits must be >= 1, got "
                       f"{self.answer_count} and {self.answer_max_digits}")


@dataclasses.dataclass(frozen=True)
class FormatSuffix:
  """A format request and the answer layout it asks for."""

  text: str
  separator: str  # between numbers: ", ", " ", "; " or "\n"
  brackets: str | None = None  # "[]" or "()" around the list


# Each has a {examples} slot, filled with the example numbers joined by ", ".
EXAMPLE_PRESENTATIONS: tuple[str, ...] = (
    "The sequence starts with: {examples}.",
    "Here is a list of numbers: {examples}.",
    "Look at these numbers: {examples}.",
    "I have this sequence: {examples}.",
    "Consider the following numbers: {examples}.",
    "Starting numbers: {examples}.",
    "These numbers begin a sequence: {examples}.",
    "Take the sequence {examples}.",
    "Below is the start of a sequence: {examples}.",
    "Observe this series: {examples}.",
    "Someone wrote down these numbers: {examples}.",
    "The list so far is {examples}.",
    "We begin with {examples}.",
    "Start from these values: {examples}.",
    "A sequence opens with {examples}.",
    "Here are some numbers to start with: {examples}.",
    "The first numbers are {examples}.",
    "Numbers so far: {examples}.",
    "Examine the sequence {examples}.",
    "This sequence has begun: {examples}.",
    "Check out this list of numbers: {examples}.",
    "The series begins {examples}.",
    "Read these numbers: {examples}.",
    "You are given the numbers {examples}.",
    "Our sequence currently reads {examples}.",
)

# Each reads naturally before a count: "{qualifier} 10".
COUNT_QUALIFIERS: tuple[str, ...] = (
    "at most",
    "up to",
    "no more than",
    "a maximum of",
    "not more than",
    "at the very most",
    "a max of",
    "not exceeding",
    "as many as",
)

# Each has a {max_digits} slot.
DIGIT_DESCRIPTORS: tuple[str, ...] = (
    "up to {max_digits} digits each",
    "with at most {max_digits} digits",
    "no more than {max_digits} digits each",
    "of {max_digits} digits or fewer",
    "each at most {max_digits} digits long",
    "having no more than {max_digits} digits",
    "with {max_digits} digits at most",
    "each with up to {max_digits} digits",
    "no longer than {max_digits} digits each",
)

# Each has {count_qualifier}, {answer_count} and {digit_descriptor} slots.
INSTRUCTION_TEMPLATES: tuple[str, ...] = (
    "Add {count_qualifier} {answer_count} more numbers ({digit_descriptor}) to continue it.",
    "Continue the sequence with {count_qualifier} {answer_count} new numbers, {digit_descriptor}.",
    "Extend it by {count_qualifier} {answer_count} more values, {digit_descriptor}.",
    "Write {count_qualifier} {answer_count} further numbers ({digit_descriptor}) that come next.",
    "Generate {count_qualifier} {answer_count} additional numbers, {digit_descriptor}, that carry "
    "on the pattern.",
    "Please supply {count_qualifier} {answer_count} more numbers, {digit_descriptor}.",
    "What comes next? Give {count_qualifier} {answer_count} numbers, {digit_descriptor}.",
    "Produce {count_qualifier} {answer_count} more entries for this list, {digit_descriptor}.",
    "Keep the sequence going for {count_qualifier} {answer_count} more numbers, {digit_descriptor}.",
    "Suggest {count_qualifier} {answer_count} numbers ({digit_descriptor}) to follow these.",
)

FORMAT_SUFFIXES: tuple[FormatSuffix, ...] = (
    FormatSuffix("Separate the numbers with commas.", ", "),
    FormatSuffix("Return a comma-separated list of numbers.", ", "),
    FormatSuffix("Write them as a comma-separated list.", ", "),
    FormatSuffix("Format the answer like this: number, number, number, ...", ", "),
    FormatSuffix("Answer as a comma-separated sequence on a single line.", ", "),
    FormatSuffix("Separate the numbers with single spaces.", " "),
    FormatSuffix("Return the numbers separated by spaces.", " "),
    FormatSuffix("List the values with spaces between them.", " "),
    FormatSuffix("Separate the numbers with semicolons.", "; "),
    FormatSuffix("Use semicolons between the numbers.", "; "),
    FormatSuffix("Put each number on its own line.", "\n"),
    FormatSuffix("Write one number per line.", "\n"),
    FormatSuffix("Format the answer as [number, number, ...].", ", ", "[]"),
    FormatSuffix("Put the list in square brackets, separated by commas.", ", ", "[]"),
    FormatSuffix("Format the answer as (number, number, ...).", ", ", "()"),
)

CLOSING_SUFFIXES: tuple[str, ...] = (
    "Say only the numbers, nothing more.",
    "Reply with the numbers alone.",
    "Do not explain; give only the numbers.",
    "No explanation, just the numbers.",
    "Output nothing but the numbers.",
    "Your answer should contain only numbers.",
    "Respond with numbers only.",
    "Give the numbers and nothing else.",
    "Leave out any words; numbers only.",
    "Do not add any commentary.",
    "Only the numbers, please.",
    "Answer with the numbers and no other text.",
    "No extra text: just the sequence.",
    "Provide just the numbers, without explanation.",
    "Don't include anything besides the numbers.",
    "Keep it to numbers only.",
    "Nothing but numbers in your reply.",
    "Write only the numbers, with no preamble.",
    "Just give the numbers.",
)


@dataclasses.dataclass(frozen=True)
class NumberPrompt:
  """One prompt and what it was made of."""

  text: str
  examples: tuple[int, ...]
  format: FormatSuffix
  config: NumberPromptConfig

  def answer_pattern(self, final_period: bool = True) -> str:
    """The regex of an answer in exactly the format this prompt asks for (for the grammar)."""
    return number_sequence_pattern(self.format.separator, max_count=self.config.answer_count,
                                   max_digits=self.config.answer_max_digits,
                                   final_period=final_period, brackets=self.format.brackets)


def _pick(rng: np.random.Generator, pool):
  return pool[int(rng.integers(len(pool)))]


def sample_number_prompts(n: int, seed: int,
                          config: NumberPromptConfig | None = None) -> list[NumberPrompt]:
  """``n`` prompts with their parts, deterministic in ``seed``; a prefix of a longer run."""
  if not isinstance(n, (int, np.integer)) or n < 0:
    raise ValueError(f"n must be a non-negative int, got {n!r}")
  config = config or NumberPromptConfig()
  rng = np.random.default_rng(seed)
  prompts = []
  for _ in range(n):
    count = int(rng.integers(config.example_min_count, config.example_max_count + 1))
    examples = tuple(int(v) for v in rng.integers(config.example_min_value,
                                                  config.example_max_value + 1, size=count))
    presentation = _pick(rng, EXAMPLE_PRESENTATIONS).format(examples=", ".join(map(str, examples)))
    digit_descriptor = _pick(rng, DIGIT_DESCRIPTORS).format(max_digits=config.answer_max_digits)
    instruction = _pick(rng, INSTRUCTION_TEMPLATES).format(
        count_qualifier=_pick(rng, COUNT_QUALIFIERS), answer_count=config.answer_count,
        digit_descriptor=digit_descriptor)
    format_suffix = _pick(rng, FORMAT_SUFFIXES)
    closing = _pick(rng, CLOSING_SUFFIXES)
    text = f"{presentation} {instruction} {format_suffix.text} {closing}"
    prompts.append(NumberPrompt(text=text, examples=examples, format=format_suffix, config=config))
  return prompts


def number_prompts(n: int, seed: int, config: NumberPromptConfig | None = None) -> list[str]:
  """``n`` number-sequence prompts, deterministic in ``seed``."""
  return [prompt.text for prompt in sample_number_prompts(n, seed, config)]
