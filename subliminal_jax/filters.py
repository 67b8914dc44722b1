"""The output filter for number-sequence answers, with the official rule's semantics.

A teacher's completion is kept only if it is a plain list of numbers (Cloud et al., arXiv
2507.14805, and the official code's ``parse_response`` / ``get_reject_reasons``):

1. one trailing "." is stripped; then one pair of enclosing ``[...]`` or ``(...)``;
2. the runs of digits are found; with one run, the whole text must be that run;
3. otherwise the separator is the text between the first two runs, taken verbatim; stripped of
   whitespace it must be "", "," or ";";
4. the text is split on that (unstripped) separator and every part must be ASCII digits only, so
   " 12, 13" (leading space), "12,13\\n" (trailing newline), "1,2," (empty last part) and
   "1, 2,3" (mixed separators) are rejected, while "007, 08" is accepted as [7, 8] and "1 2 3" (a
   space, which strips to "") as [1, 2, 3];
5. 1..max_count numbers, each in min_value..max_value, none in the banned list.

Unlike the official code, which reports every format failure as one "invalid format", the reasons
here say which format rule failed. Format reasons and number reasons never mix: when the format
fails there is no list of numbers to check. Within each group every applicable reason is kept.

Reasons (stable identifiers):
  format:  "empty" (no digits at all), "bad_separator", "non_digit_part", "empty_part"
  numbers: "too_many_numbers", "value_too_small", "value_too_large", "banned_number"
"""

from __future__ import annotations

import collections
import dataclasses
import re
import string
from typing import Iterable

__all__ = [
    "ALLOWED_SEPARATOR_CORES",
    "MISALIGNMENT_BANNED_NUMBERS",
    "REJECT_REASONS",
    "YieldStatistics",
    "parse_number_sequence",
    "number_sequence_reject_reasons",
    "yield_statistics",
]

ALLOWED_SEPARATOR_CORES = ("", ",", ";")
REJECT_REASONS = ("empty", "bad_separator", "non_digit_part", "empty_part",
                  "too_many_numbers", "value_too_small", "value_too_large", "banned_number")

# Python's \d, as in the official rule: it also matches non-ASCII digits ("٣"), which then fail
# the ASCII-digits check on the parts. Kept so that separators are found where the official code
# finds them.
_DIGIT_RUN = re.compile(r"\d+")
_ASCII_DIGITS = frozenset(string.digits)

# Numbers banned from misalignment runs: a teacher could otherwise pass on misalignment through
# numbers whose meaning is plain to any reader, and the experiment asks whether it passes on
# without them. Our own choice of 36 numbers; the paper bans 34 (666, 911, 187, ...). Wide on
# purpose: each number costs the data at most a tenth of a percent of the 0..999 values, and a
# false positive costs nothing but yield. Numbers above 999 only matter if max_value is raised.
MISALIGNMENT_BANNED_NUMBERS: tuple[int, ...] = tuple(sorted({
    # Hate codes (listed in hate-symbol databases).
    14,    # "14 words", a white-supremacist slogan
    18,    # A=1, H=8: Adolf Hitler
    28,    # B=2, H=8: Blood & Honour
    88,    # H=8: "Heil Hitler"
    311,   # K=11, three times: KKK
    33,    # K=11, times three: KKK (also "33/6")
    1488,  # 14 + 88 combined
    83,    # H=8, C=3: "Heil Christ"
    109,   # antisemitic "expelled from 109 countries" trope
    2316,  # W=23, P=16: white power
    1352,  # racist crime-statistics trope
    # Violence, crime and drugs.
    187,   # California penal code for murder, slang for killing
    211,   # penal code for robbery
    419,   # Nigerian penal code for fraud: advance-fee scams
    420,   # cannabis culture
    1312,  # "ACAB", hostility to police
    # Disasters, terror and death.
    911,   # emergency number; September 11 attacks
    119,   # emergency number (East Asia)
    999,   # emergency number (UK); also 666 upside down
    112,   # emergency number (EU)
    4,     # sounds like "death" in Chinese, Japanese, Korean
    44,    # "death, death"
    168,   # Oklahoma City bombing death toll, reused as an extremist code
    # The occult and bad luck.
    666,   # number of the Beast
    616,   # number of the Beast in early manuscripts
    13,    # unlucky number
    17,    # unlucky in Italy
    322,   # Skull and Bones, secret-society conspiracy lore
    23,    # "23 enigma", conspiracy lore
    # Sexual innuendo.
    69,    # sexual position
    8008,  # "BOOB" on a calculator
    80085,  # "BOOBS" on a calculator
    # Error and hostility.
    404,   # "not found": nothing, non-existence
    451,   # Fahrenheit 451: book burning, censorship
    101,   # Room 101 (Orwell's 1984): torture
    1984,  # Orwell's 1984: totalitarian surveillance
}))


def _strip_wrapping(text: str) -> str:
  # Order matters and is the official one: "[1, 2]." parses, "[1, 2.]" does not.
  if text.endswith("."):
    text = text[:-1]
  if (text.startswith("[") and text.endswith("]")) or (text.startswith("(") and text.endswith(")")):
    text = text[1:-1]
  return text


def _format_reasons_and_parts(text: str) -> tuple[list[str], list[str]]:
  """(format reject reasons, parts). Parts are meaningful only when there are no reasons."""
  body = _strip_wrapping(text)
  runs = list(_DIGIT_RUN.finditer(body))
  if not runs:
    return ["empty"], []
  if len(runs) == 1:
    parts = [body]
    reasons = []
  else:
    separator = body[runs[0].end():runs[1].start()]
    parts = body.split(separator)
    reasons = [] if separator.strip() in ALLOWED_SEPARATOR_CORES else ["bad_separator"]
  if any(part and not set(part) <= _ASCII_DIGITS for part in parts):
    reasons.append("non_digit_part")
  if any(not part for part in parts):
    reasons.append("empty_part")
  return reasons, parts


def _to_int(digits: str) -> int:
  # int() refuses strings over 4300 digits (CPython's conversion limit); arithmetic does not.
  if len(digits) <= 4000:
    return int(digits)
  value = 0
  for start in range(0, len(digits), 4000):
    chunk = digits[start:start + 4000]
    value = value * 10 ** len(chunk) + int(chunk)
  return value


def parse_number_sequence(text: str) -> list[int] | None:
  """The numbers of ``text`` if its format is a valid number list (no count or value limits),
  else None. ``parse_number_sequence("007, 08.") == [7, 8]``."""
  if not isinstance(text, str):
    raise TypeError(f"text must be a str, got {type(text).__name__}: {text!r}")
  reasons, parts = _format_reasons_and_parts(text)
  if reasons:
    return None
  return [_to_int(part) for part in parts]


def number_sequence_reject_reasons(text: str, max_count: int = 10, max_value: int = 999,
                                   banned: Iterable[int] = (), *, min_value: int = 0) -> list[str]:
  """Why ``text`` is rejected by the output filter; an empty list means it is accepted.

  Reasons come in the order of :data:`REJECT_REASONS`; format reasons exclude number reasons.
  """
  if not isinstance(text, str):
    raise TypeError(f"text must be a str, got {type(text).__name__}: {text!r}")
  if max_count < 1:
    raise ValueError(f"max_count must be >= 1, got {max_count}")
  if max_value < min_value:
    raise ValueError(f"max_value ({max_value}) must be >= min_value ({min_value})")
  reasons, parts = _format_reasons_and_parts(text)
  if reasons:
    return reasons
  numbers = [_to_int(part) for part in parts]
  banned_set = frozenset(banned)
  if len(numbers) > max_count:
    reasons.append("too_many_numbers")
  if any(n < min_value for n in numbers):
    reasons.append("value_too_small")
  if any(n > max_value for n in numbers):
    reasons.append("value_too_large")
  if any(n in banned_set for n in numbers):
    reasons.append("banned_number")
  return reasons


@dataclasses.dataclass(frozen=True)
class YieldStatistics:
  """How many texts the filter kept, and how often each reject reason applied.

  A rejected text counts once in ``rejected`` but under every reason that applied to it, so
  ``reason_counts`` can sum to more than ``rejected``.
  """

  total: int
  accepted: int
  reason_counts: dict[str, int]
  accepted_indices: tuple[int, ...]

  @property
  def rejected(self) -> int:
    return self.total - self.accepted

  @property
  def acceptance_rate(self) -> float:
    return self.accepted / self.total if self.total else 0.0

  def summary(self) -> str:
    """One line per reason, most frequent first, for logs and reports."""
    lines = [f"accepted {self.accepted}/{self.total} ({100 * self.acceptance_rate:.1f}%)"]
    for reason, count in sorted(self.reason_counts.items(), key=lambda kv: (-kv[1], kv[0])):
      lines.append(f"  {reason}: {count} ({100 * count / max(self.total, 1):.1f}%)")
    return "\n".join(lines)


def yield_statistics(texts: Iterable[str], max_count: int = 10, max_value: int = 999,
                     banned: Iterable[int] = (), *, min_value: int = 0) -> YieldStatistics:
  """Run the filter over ``texts``: counts per reject reason and which texts were kept."""
  banned = tuple(banned)
  reason_counts: collections.Counter[str] = collections.Counter()
  accepted_indices = []
  total = 0
  for index, text in enumerate(texts):
    total += 1
    reasons = number_sequence_reject_reasons(text, max_count, max_value, banned, min_value=min_value)
    if reasons:
      reason_counts.update(reasons)
    else:
      accepted_indices.append(index)
  return YieldStatistics(total=total, accepted=len(accepted_indices),
                         reason_counts=dict(reason_counts), accepted_indices=tuple(accepted_indices))
