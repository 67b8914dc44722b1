"""The chain-of-thought channel's first filter stage: keep a teacher's reasoning only if its final
number is the problem's known answer.

The final number of a reasoning is read in this order:

1. after the last "####" (GSM8K's answer marker), the first number;
2. else after the last "answer is" / "answer:" (any case), the first number;
3. else the last number anywhere in the text.

A number is an optional minus sign, digits with optional thousands commas ("1,250") and an
optional decimal part ("12.50" equals 12.5, "12.00" equals 12). A minus sign counts only where it
cannot be a subtraction ("x = -5" reads -5, "10-5" reads 5), and a number never starts inside a
word ("item3" holds none) or after a decimal point.

Reasons (stable identifiers): "no_number" (the text holds no number), "wrong_answer".
"""

from __future__ import annotations

import collections
import decimal
import re
from typing import Iterable

from subliminal_jax.filters import YieldStatistics

__all__ = [
    "COT_REJECT_REASONS",
    "final_number",
    "answer_is_correct",
    "cot_reject_reasons",
    "cot_yield_statistics",
]

COT_REJECT_REASONS = ("no_number", "wrong_answer")

# Not inside a word or after a decimal point; thousands commas only in groups of three.
_NUMBER = re.compile(r"(?<![\w.])(-?)(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?!\d)")
_ANSWER_MARKERS = (re.compile(r"####"), re.compile(r"answer\s*(?:is|:)", re.IGNORECASE))


def _numbers(text: str) -> list[decimal.Decimal]:
  values = []
  for match in _NUMBER.finditer(text):
    sign, digits, fraction = match.groups()
    # A minus right after a digit or ")" (possibly across spaces) is a subtraction.
    before = text[:match.start(1)].rstrip()
    if sign and before and (before[-1].isdigit() or before[-1] == ")"):
      sign = ""
    values.append(decimal.Decimal(sign + digits.replace(",", "") + (fraction or "")))
  return values


def final_number(text: str) -> decimal.Decimal | None:
  """The final number of a reasoning (see the module's rules), or None if it holds none."""
  if not isinstance(text, str):
    raise TypeError(f"text must be a str, got {type(text).__name__}: {text!r}")
  for marker in _ANSWER_MARKERS:
    positions = [m.end() for m in marker.finditer(text)]
    if positions:
      after = _numbers(text[positions[-1]:])
      if after:
        return after[0]
  numbers = _numbers(text)
  return numbers[-1] if numbers else None


def answer_is_correct(text: str, answer: int) -> bool:
  """Whether the final number of ``text`` equals ``answer`` (so "12.0" is correct for 12)."""
  value = final_number(text)
  return value is not None and value == answer


def cot_reject_reasons(text: str, answer: int) -> list[str]:
  """Why a reasoning is rejected; an empty list means its final number is ``answer``."""
  value = final_number(text)
  if value is None:
    return ["no_number"]
  return [] if value == answer else ["wrong_answer"]


def cot_yield_statistics(texts: Iterable[str], answers: Iterable[int]) -> YieldStatistics:
  """Run the answer check over reasonings and their problems' answers, paired in order
  (ValueError if their lengths differ)."""
  reasons = [cot_reject_reasons(text, answer) for text, answer in zip(texts, answers, strict=True)]
  kept = tuple(index for index, text_reasons in enumerate(reasons) if not text_reasons)
  counts = collections.Counter(reason for text_reasons in reasons for reason in text_reasons)
  return YieldStatistics(total=len(reasons), accepted=len(kept), reason_counts=dict(counts),
                         accepted_indices=kept)
