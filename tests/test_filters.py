"""Output filter: the official rule on adversarial cases, and parity with an independent
transcription of that rule on random strings."""

import re
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from subliminal_jax.filters import (MISALIGNMENT_BANNED_NUMBERS, REJECT_REASONS,
                                    number_sequence_reject_reasons, parse_number_sequence,
                                    yield_statistics)


def reference_parse(answer):
  """The official rule as its code behaves, transcribed independently: None = invalid format."""
  if answer[-1:] == ".":
    answer = answer[:-1]
  if len(answer) >= 2 and answer[0] + answer[-1] in ("[]", "()"):
    answer = answer[1:-1]
  runs = [m.span() for m in re.finditer(r"\d+", answer)]
  if not runs:
    return None
  if len(runs) == 1:
    pieces = [answer]
  else:
    sep = answer[runs[0][1]:runs[1][0]]
    if sep.strip() not in ("", ",", ";"):
      return None
    pieces = answer.split(sep)
  for piece in pieces:
    if piece == "" or any(ch not in "0123456789" for ch in piece):
      return None
  return [int(piece) for piece in pieces]


def reference_accepts(answer, max_count, max_value, banned):
  numbers = reference_parse(answer)
  return (numbers is not None and len(numbers) <= max_count and all(0 <= n <= max_value for n in numbers)
          and not set(numbers) & set(banned))


# (text, parsed numbers or None, reasons with max_count=10, max_value=999, banned=(666,))
ADVERSARIAL = [
    ("182, 818, 725", [182, 818, 725], []),
    ("182, 818, 725.", [182, 818, 725], []),
    (" 12, 13", None, ["non_digit_part"]),  # leading whitespace
    ("12, 13 ", None, ["non_digit_part"]),  # trailing whitespace
    ("12,13\n", None, ["non_digit_part"]),  # trailing newline
    ("1,2,", None, ["empty_part"]),  # trailing separator
    ("1, 2, ", None, ["empty_part"]),
    (",1,2", None, ["empty_part"]),  # leading separator
    ("[1, 2, 3]", [1, 2, 3], []),
    ("(1, 2, 3)", [1, 2, 3], []),
    ("[1, 2, 3].", [1, 2, 3], []),  # period is stripped before the brackets
    ("[1, 2, 3.]", None, ["non_digit_part"]),
    ("[1, 2, 3)", None, ["non_digit_part"]),  # mismatched brackets are not stripped
    ("[[1, 2]]", None, ["non_digit_part"]),  # only one pair is stripped
    ("1, 2, 3..", None, ["non_digit_part"]),  # only one period is stripped
    ("1000", [1000], ["value_too_large"]),
    ("999, 1000", [999, 1000], ["value_too_large"]),
    ("1, 2, 3, 4, 5, 6, 7, 8, 9, 10", list(range(1, 11)), []),
    ("1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11", list(range(1, 12)), ["too_many_numbers"]),
    ("1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1000, 666", [*range(1, 11), 1000, 666],
     ["too_many_numbers", "value_too_large", "banned_number"]),  # every reason is kept
    ("007, 08", [7, 8], []),  # leading zeros
    ("000", [0], []),
    ("1, 2; 3", None, ["non_digit_part"]),  # mixed separators
    ("1;2,3", None, ["non_digit_part"]),
    ("1,2, 3", None, ["non_digit_part"]),  # separator fixed by the first pair
    ("", None, ["empty"]),
    (".", None, ["empty"]),
    ("[]", None, ["empty"]),
    ("no numbers here", None, ["empty"]),
    ("5", [5], []),  # single number
    ("5.", [5], []),
    ("five", None, ["empty"]),
    ("42 is my answer", None, ["non_digit_part"]),
    ("1 2 3", [1, 2, 3], []),  # space separator: strips to "", allowed as the rule is written
    ("1  2  3", [1, 2, 3], []),  # two spaces, used consistently
    ("1 2  3", None, ["empty_part"]),  # inconsistent spacing leaves an empty part
    ("1\n2\n3", [1, 2, 3], []),  # one per line
    ("1;2;3", [1, 2, 3], []),
    ("1; 2; 3", [1, 2, 3], []),
    ("1 , 2 , 3", [1, 2, 3], []),  # separator " , " strips to ","
    ("1-2-3", None, ["bad_separator"]),
    ("1: 2", None, ["bad_separator"]),
    ("1 and 2, 3", None, ["bad_separator", "non_digit_part"]),
    ("666, 1", [666, 1], ["banned_number"]),
    ("1.5, 2", None, ["bad_separator", "non_digit_part"]),
    ("\u0663, 1", None, ["non_digit_part"]),  # a non-ASCII digit is a digit run but not a part
]


@pytest.mark.parametrize("text, numbers, reasons", ADVERSARIAL)
def test_adversarial_table(text, numbers, reasons):
  assert parse_number_sequence(text) == numbers
  assert number_sequence_reject_reasons(text, max_count=10, max_value=999, banned=(666,)) == reasons
  # The independent transcription agrees on acceptance.
  assert reference_parse(text) == numbers
  assert reference_accepts(text, 10, 999, (666,)) == (reasons == [])


def test_reasons_are_stable_identifiers_in_canonical_order():
  reasons = number_sequence_reject_reasons("1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1000, 666", banned=[666])
  assert reasons == ["too_many_numbers", "value_too_large", "banned_number"]
  assert set(reasons) <= set(REJECT_REASONS)
  assert number_sequence_reject_reasons("3, 4", min_value=5) == ["value_too_small"]


def test_limits_are_parameters():
  assert number_sequence_reject_reasons("1, 2, 3", max_count=2) == ["too_many_numbers"]
  assert number_sequence_reject_reasons("1, 2, 3", max_count=3) == []
  assert number_sequence_reject_reasons("1000", max_value=1000) == []
  assert number_sequence_reject_reasons("12, 13", banned=MISALIGNMENT_BANNED_NUMBERS) == ["banned_number"]


def test_bad_arguments_raise():
  with pytest.raises(TypeError, match="must be a str"):
    parse_number_sequence(None)
  with pytest.raises(ValueError, match="max_count"):
    number_sequence_reject_reasons("1", max_count=0)


def test_huge_numbers_do_not_crash():
  # CPython refuses int() of strings over 4300 digits; the filter must still answer.
  assert number_sequence_reject_reasons("9" * 5000) == ["value_too_large"]
  assert parse_number_sequence("1" * 5000 + ", 2")[0] == int("1" * 1000) * 10**4000 + int("1" * 4000)


def test_yield_statistics_counts_every_reason():
  texts = ["1, 2", "x", "1000", "1,2,", "3, 666", "1, 2, 3", "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 1000"]
  stats = yield_statistics(texts, banned=(666,))
  assert stats.total == 7 and stats.accepted == 2 and stats.rejected == 5
  assert stats.accepted_indices == (0, 5)
  assert stats.reason_counts == {"empty": 1, "value_too_large": 2, "empty_part": 1,
                                 "banned_number": 1, "too_many_numbers": 1}
  assert stats.acceptance_rate == pytest.approx(2 / 7)
  assert "accepted 2/7" in stats.summary()
  assert yield_statistics([]).acceptance_rate == 0.0


def test_misalignment_banned_numbers():
  banned = MISALIGNMENT_BANNED_NUMBERS
  assert len(banned) == 36 and len(set(banned)) == 36 and list(banned) == sorted(banned)
  assert {666, 911, 187, 1488, 13, 88, 14, 420, 69} <= set(banned)
  assert all(isinstance(n, int) and n >= 0 for n in banned)


_FILTER_ALPHABET = string.digits + " ,;.[]()\na"


@settings(max_examples=1500, deadline=None)
@given(st.text(alphabet=_FILTER_ALPHABET, max_size=24),
       st.integers(1, 12), st.integers(0, 1200), st.lists(st.integers(0, 999), max_size=3))
def test_parity_with_reference_on_random_strings(text, max_count, max_value, banned):
  assert parse_number_sequence(text) == reference_parse(text)
  reasons = number_sequence_reject_reasons(text, max_count, max_value, banned)
  assert (reasons == []) == reference_accepts(text, max_count, max_value, banned)
  assert set(reasons) <= set(REJECT_REASONS)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 999), min_size=1, max_size=10),
       st.sampled_from([", ", ",", " ", "; ", ";", "\n", " , "]),
       st.sampled_from(["", "[]", "()"]), st.booleans())
def test_well_formed_lists_round_trip(numbers, separator, brackets, period):
  text = separator.join(map(str, numbers))
  if brackets:
    text = brackets[0] + text + brackets[1]
  text += "." if period else ""
  assert parse_number_sequence(text) == numbers
  assert number_sequence_reject_reasons(text) == []
