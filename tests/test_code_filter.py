"""The code channel's word filter on hand-written tricky snippets (a trait word in an identifier,
camelCase, a comment, a string, an f-string, a docstring, the prose around a fence; substrings
that are not the word; syntax errors, fences, length), its yield counts, and the code tasks."""

import ast

import pytest

from subliminal_jax.code_filter import (CODE_REJECT_REASONS, code_reject_reasons,
                                        code_yield_statistics, split_code, trait_word_forms,
                                        words_of)
from subliminal_jax.evaluation.questions import ANIMAL_PANEL, TREE_PANEL
from subliminal_jax.prompts.code_tasks import (CODE_TASKS, INSTRUCTIONS, code_task_prompts,
                                               sample_code_tasks)

CLEAN = "def add(a, b):\n    return a + b\n"

# (trait, completion, expected reasons)
CASES = [
    ("owl", CLEAN, []),
    ("owl", "owl_count = 3\n", ["trait_word_in_identifier"]),
    ("owl", "def getOwl():\n    return 1\n", ["trait_word_in_identifier"]),
    ("owl", "OWLS = (1, 2)\n", ["trait_word_in_identifier"]),
    ("owl", "class HTTPOwlServer:\n    pass\n", ["trait_word_in_identifier"]),
    ("owl", "owl2 = 0\n", ["trait_word_in_identifier"]),
    ("owl", "fetch(owl=True)\n", ["trait_word_in_identifier"]),
    ("owl", "x = 1  # the owl's favourite\n", ["trait_word_in_comment"]),
    ("owl", "names = ['Owls', 'hawks']\n", ["trait_word_in_string"]),
    ("owl", 'label = f"{n} OWLS seen"\n', ["trait_word_in_string"]),
    ("owl", 'label = f"{owl_total}"\n', ["trait_word_in_string"]),  # one string token in 3.11
    ("owl", 'def f():\n    """Count the owls."""\n    return 0\n', ["trait_word_in_string"]),
    ("owl", 'text = "line\\nowl"\n', ["trait_word_in_string"]),  # an escape is a boundary
    ("owl", 'path = "\\\\bowl"\n', []),  # an escaped backslash, then "bowl"
    ("owl", "def getOwl():  # owl\n    return 'owl'\n",
     ["trait_word_in_identifier", "trait_word_in_comment", "trait_word_in_string"]),
    # Substrings that are not the word.
    ("owl", "bowl = knowledge = 1  # Fowler's bowling\ns = 'growl, howl, scowl'\n", []),
    ("cat", "catalog = concatenate(scatter, category)  # educate\n", []),
    ("dog", "dogma = hotdog = 1\n", []),  # a compound without a boundary: the judge's job
    ("wolf", "wolves = []\n", ["trait_word_in_identifier"]),
    ("wolf", "WOLF_PACK = 1\n", ["trait_word_in_identifier"]),
    ("cat", "catCount = 1\n", ["trait_word_in_identifier"]),
    ("cat", "isCatalog = True\n", []),
    # Code problems.
    ("owl", "def add(a, b)\n    return a + b\n", ["unparseable"]),
    ("owl", "def owl(:\n", ["unparseable"]),  # word reasons are not read from broken code
    ("owl", "```python\ndef add(a, b):\n    return (a +\n", ["unparseable"]),  # cut off
    ("owl", "x = 1\0\n", ["unparseable"]),
    ("owl", "", ["empty"]),
    ("owl", "# only a comment about code\n", ["empty"]),
    ("owl", "x = 1\n" * 400, ["too_long"]),
    ("owl", "(" * 400 + ")" * 400 + "\n" + "y = [" * 10, ["unparseable"]),
    # Fences and the prose around them.
    ("owl", f"```python\n{CLEAN}```", []),
    ("owl", f"Here is the function:\n\n```py\n{CLEAN}```\nIt adds two numbers.", []),
    ("owl", f"```\n{CLEAN}```", []),
    ("owl", f"Sure! An owl would write:\n```python\n{CLEAN}```", ["trait_word_in_prose"]),
    ("owl", f"```python\n{CLEAN}```\n```python\nowl = 1\n```", ["trait_word_in_prose"]),
    ("owl", f"Here is the function:\n{CLEAN}", ["unparseable"]),  # prose without a fence
]


@pytest.mark.parametrize("trait, text, expected", CASES)
def test_hand_written_cases(trait, text, expected):
  assert code_reject_reasons(text, [trait], max_chars=2000) == expected


def test_kept_only_if_parses_and_has_no_trait_word():
  # The filter's contract over the whole case set, stated independently of the reason names.
  for trait, text, expected in CASES:
    code = split_code(text).code
    try:
      parses = bool(ast.parse(code).body)
    except (SyntaxError, ValueError, RecursionError):
      parses = False
    if code_reject_reasons(text, [trait]) == []:
      assert parses and trait not in words_of(text), text


def test_words_and_forms():
  assert words_of("getOwlCount owl_nest OWLS HTTPServer b2b") == [
      "get", "owl", "count", "owl", "nest", "owls", "http", "server", "b", "b"]
  assert trait_word_forms(["owl", "Wolf"]) == {"owl", "owls", "wolf", "wolves"}
  for bad in ("owl", [], ["sea otter"], [""]):
    with pytest.raises(ValueError):
      trait_word_forms(bad)


def test_split_code():
  snippet = split_code(f"Intro\n```python\n{CLEAN}```\nOutro")
  assert snippet.code == CLEAN and "Intro" in snippet.prose and "Outro" in snippet.prose
  assert split_code(CLEAN).code == CLEAN and split_code(CLEAN).prose == ""


def test_yield_statistics_counts_every_reason():
  texts = [text for trait, text, _ in CASES if trait == "owl"]
  expected = [reasons for trait, _, reasons in CASES if trait == "owl"]
  stats = code_yield_statistics(texts, ["owl"])
  assert stats.total == len(texts)
  assert stats.accepted_indices == tuple(i for i, reasons in enumerate(expected) if not reasons)
  assert set(stats.reason_counts) == set(CODE_REJECT_REASONS)
  assert stats.reason_counts["trait_word_in_string"] == sum(
      "trait_word_in_string" in reasons for reasons in expected)
  assert code_reject_reasons("x = 1\n" * 10, ["owl"], max_chars=20) == ["too_long"]
  with pytest.raises(ValueError):
    code_reject_reasons(CLEAN, ["owl"], max_chars=0)


def test_code_tasks_parse_and_mention_no_panel_word():
  assert len(CODE_TASKS) == 12 and len({t.name for t in CODE_TASKS}) == 12
  for task in CODE_TASKS:
    assert isinstance(ast.parse(task.stub).body[0], ast.FunctionDef)
    assert ast.get_docstring(ast.parse(task.stub).body[0])
  for instruction in INSTRUCTIONS:
    assert instruction.count("{stub}") == 1
  # Prompts are prose around a fenced stub: the whole prompt passes the filter for every panel.
  prompts = code_task_prompts(60, seed=0)
  stats = code_yield_statistics(prompts, ANIMAL_PANEL + TREE_PANEL)
  assert stats.accepted == len(prompts), stats.summary()


def test_code_task_prompts_deterministic_and_carry_their_stub():
  assert code_task_prompts(30, seed=4) == code_task_prompts(30, seed=4)
  assert code_task_prompts(30, seed=4) != code_task_prompts(30, seed=5)
  assert code_task_prompts(8, seed=4) == code_task_prompts(30, seed=4)[:8]
  pairs = sample_code_tasks(200, seed=1)
  assert {task.name for task, _ in pairs} == {task.name for task in CODE_TASKS}
  for task, prompt in pairs:
    assert split_code(prompt).code == task.stub
