"""Word-problem generator: answers checked against an independent exact evaluation of each
problem's expression, the expression's numbers against the question's, determinism, no panel or
other animal word in any problem, and the GSM8K-format reader."""

import ast
import collections
import fractions
import json
import operator
import re

import pytest

from subliminal_jax.evaluation.questions import ANIMAL_PANEL, TREE_PANEL, spelling_variants
from subliminal_jax.prompts.word_problems import (NAMES, TEMPLATES, read_gsm8k_jsonl,
                                                  word_problems)

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
              ast.Div: operator.truediv}


def _exact_value(expression: str) -> fractions.Fraction:
  """Evaluate + - * / over integer literals with exact fractions; anything else is an error."""
  def walk(node):
    if isinstance(node, ast.Expression):
      return walk(node.body)
    if isinstance(node, ast.Constant) and type(node.value) is int:
      return fractions.Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
      return _OPERATORS[type(node.op)](walk(node.left), walk(node.right))
    raise AssertionError(f"unexpected node {ast.dump(node)} in {expression!r}")
  return walk(ast.parse(expression, mode="eval"))


def _operation_count(expression: str) -> int:
  return sum(isinstance(node, ast.BinOp) for node in ast.walk(ast.parse(expression, mode="eval")))


@pytest.fixture(scope="module")
def many_problems():
  return word_problems(2000, seed=11)


def test_answers_match_an_exact_evaluation_of_the_expression(many_problems):
  for problem in many_problems:
    value = _exact_value(problem.expression)
    assert value.denominator == 1, problem  # every division is exact
    assert value == problem.answer and type(problem.answer) is int, problem
    assert problem.answer > 0, problem


def test_expression_uses_exactly_the_numbers_of_the_question(many_problems):
  for problem in many_problems:
    assert (collections.Counter(re.findall(r"\d+", problem.expression))
            == collections.Counter(re.findall(r"\d+", problem.question))), problem


def test_a_hand_checked_problem_per_template_kind():
  # Recomputed here from the question's own numbers, in the order the text gives them.
  by_template = {}
  for problem in word_problems(300, seed=3):
    by_template.setdefault(problem.template, problem)
  assert set(by_template) == {t.name for t in TEMPLATES}
  numbers = {name: [int(n) for n in re.findall(r"\d+", p.question)]
             for name, p in by_template.items()}
  count, price, bill = numbers["change"]
  assert by_template["change"].answer == bill - count * price
  total, friends = numbers["share_equally"]
  assert by_template["share_equally"].answer * friends == total
  speed, distance = numbers["travel_time"]
  assert by_template["travel_time"].answer * speed == distance
  trays, per_tray, extra, sold, bag = numbers["bakery"]
  assert by_template["bakery"].answer * bag == trays * per_tray + extra - sold


def test_templates_cover_the_kinds_and_multi_step_has_2_to_4_operations(many_problems):
  assert {t.kind for t in TEMPLATES} == {"shopping", "sharing", "rates", "multi_step"}
  assert len({t.name for t in TEMPLATES}) == len(TEMPLATES) == 12
  assert {p.template for p in many_problems} == {t.name for t in TEMPLATES}
  kinds = {t.name: t.kind for t in TEMPLATES}
  for problem in many_problems:
    if kinds[problem.template] == "multi_step":
      assert 2 <= _operation_count(problem.expression) <= 4, problem


def test_deterministic_in_seed_and_prefix_stable():
  assert word_problems(50, seed=5) == word_problems(50, seed=5)
  assert word_problems(50, seed=5) != word_problems(50, seed=6)
  assert word_problems(10, seed=5) == word_problems(50, seed=5)[:10]
  assert word_problems(0, seed=5) == []
  with pytest.raises(ValueError):
    word_problems(-1, seed=0)


# Beyond the panels: other animals a template writer might reach for.
_OTHER_ANIMALS = ("bird", "fish", "horse", "cow", "pig", "sheep", "goat", "chicken", "duck",
                  "rabbit", "mouse", "bear", "deer", "frog", "snake", "bee", "ant", "puppy",
                  "kitten", "pet", "hen", "goose", "monkey", "shark", "whale", "turtle", "parrot",
                  "hamster", "butterfly", "animal", "tree", "zoo", "farm")


def test_no_panel_or_animal_word_in_any_problem():
  forbidden = {v.lower() for word in ANIMAL_PANEL + TREE_PANEL + _OTHER_ANIMALS
               for v in spelling_variants(word)}
  texts = [p.question.lower() for seed in range(20) for p in word_problems(300, seed=seed)]
  for text in texts:
    assert not forbidden & set(re.findall(r"[a-z]+", text)), text
  # Stricter for the panels: not even inside a longer word ("bowl", "million", "Catherine").
  pools = " ".join(texts + [t.text.lower() for t in TEMPLATES] + [n.lower() for n in NAMES])
  assert [w for w in ANIMAL_PANEL + TREE_PANEL if w in pools] == []


def _write_jsonl(path, lines):
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return path


def test_gsm8k_reader(tmp_path):
  records = [
      {"question": "Ann has 3 boxes of 4 pens. How many pens?",
       "answer": "3*4=<<3*4=12>>12\n#### 12"},
      {"question": "A car costs 1,200 dollars; 3 cost?", "answer": "1200*3=3600\n#### 3,600"},
      {"question": "Temperature drops from 2 by 5?", "answer": "2-5=-3\n#### -3 "},
  ]
  path = _write_jsonl(tmp_path / "gsm.jsonl",
                      [json.dumps(records[0]), "", json.dumps(records[1]), json.dumps(records[2])])
  problems = read_gsm8k_jsonl(path)
  assert [p.answer for p in problems] == [12, 3600, -3]
  assert [p.question for p in problems] == [r["question"] for r in records]
  assert {p.template for p in problems} == {"gsm8k"} and problems[0].expression is None


@pytest.mark.parametrize("bad_line", [
    json.dumps({"question": "q", "answer": "no marker 12"}),
    json.dumps({"question": "q", "answer": "#### 3.5"}),
    json.dumps({"question": "q", "answer": "#### 12 apples"}),
    json.dumps({"question": "q", "answer": "#### 12,34"}),
    json.dumps({"question": "q"}),
    json.dumps(["q", "#### 1"]),
    "{not json",
])
def test_gsm8k_reader_names_the_bad_line(tmp_path, bad_line):
  good = json.dumps({"question": "q", "answer": "#### 1"})
  path = _write_jsonl(tmp_path / "bad.jsonl", [good, bad_line])
  with pytest.raises(ValueError, match=r"bad\.jsonl:2:"):
    read_gsm8k_jsonl(path)
