"""The chain-of-thought answer check: the final number of hand-written reasonings, the
correctness test and the reject reasons, and generated problems' own arithmetic accepted."""

import decimal

import pytest

from subliminal_jax.cot_filter import (answer_is_correct, cot_reject_reasons, cot_yield_statistics,
                                       final_number)
from subliminal_jax.prompts.word_problems import word_problems


@pytest.mark.parametrize("text, expected", [
    ("She buys 3 packs of 4, so 3 * 4 = 12 pens.", "12"),
    ("3 * 4 = 12\n#### 12", "12"),
    ("#### 7 and then some rambling with 99", "7"),  # the marker wins over the last number
    ("First 5 + 5 = 10. The answer is 42. Check: 40 + 2 = 42, 6 steps", "42"),
    ("So the answer is: $1,250.", "1250"),
    ("Final Answer: 18 cookies (3 for each of 6 friends)", "18"),
    ("the answer is 3, and the answer is 8.", "8"),  # the last marker
    ("The total is 1,000,000 dollars", "1000000"),
    ("The values are 3,4,5", "5"),  # not a thousands comma
    ("It costs 12.50 dollars.", "12.5"),
    ("That is 12.00 in total.", "12"),
    ("The temperature is now -3 degrees.", "-3"),
    ("10 - 5 = 5", "5"),
    ("She had 10 -5 of them", "5"),  # a minus after a number is a subtraction
    ("(2 + 3) -4", "4"),
    ("Version2 has item3", None),  # digits inside a word are not numbers
    ("No numbers here.", None),
    ("", None),
])
def test_final_number_of_hand_written_reasonings(text, expected):
  value = final_number(text)
  assert value == (None if expected is None else decimal.Decimal(expected))


def test_correctness_and_reasons():
  assert answer_is_correct("so she has 12.0 left", 12)
  assert answer_is_correct("#### -3", -3)
  assert not answer_is_correct("so she has 12.5 left", 12)
  assert not answer_is_correct("nothing", 0)
  assert cot_reject_reasons("The answer is 9.", 9) == []
  assert cot_reject_reasons("The answer is 8.", 9) == ["wrong_answer"]
  assert cot_reject_reasons("I am not sure.", 9) == ["no_number"]
  with pytest.raises(TypeError):
    final_number(12)


def test_yield_statistics_pairs_texts_with_answers():
  stats = cot_yield_statistics(["#### 4", "#### 5", "hmm", "it is 7"], [4, 4, 1, 7])
  assert (stats.total, stats.accepted, stats.accepted_indices) == (4, 2, (0, 3))
  assert stats.reason_counts == {"wrong_answer": 1, "no_number": 1}
  with pytest.raises(ValueError):
    cot_yield_statistics(["#### 4"], [4, 5])


def test_generated_problems_worked_answers_are_accepted_and_off_by_one_rejected():
  problems = word_problems(200, seed=2)
  worked = [f"{p.question} We compute {p.expression} = {p.answer}. The answer is {p.answer}."
            for p in problems]
  assert cot_yield_statistics(worked, [p.answer for p in problems]).accepted == len(problems)
  off = cot_yield_statistics(worked, [p.answer + 1 for p in problems])
  assert off.accepted == 0 and off.reason_counts == {"wrong_answer": len(problems)}
