"""The channels (channels.py): numbers records byte-identical to the prompts stage's, dispatch to
each channel's filter on hand-written cases, the cot generator's answers against an independent
evaluation, a GSM8K-format source, the judge passes against judge_scores on a tiny random model,
the yield summary, and clear errors."""

import ast
import fractions
import json
import operator

import numpy as np
import pytest

from subliminal_jax import channels, code_filter, loading
from subliminal_jax.evaluation import judge as judge_lib
from subliminal_jax.prompts import number_prompts, word_problems

LIMITS = channels.FilterLimits()


@pytest.fixture(scope="module")
def tiny():
  return loading.load("tiny-random")


def _build_prompts_json(count: int, seed: int) -> str:
  """A copy of experiments.stages.build_prompts' records and serialisation (2026-12-07)."""
  sampled = number_prompts.sample_number_prompts(count, seed=seed)
  records = [{"text": p.text, "separator": p.format.separator, "brackets": p.format.brackets}
             for p in sampled]
  return json.dumps(records, indent=0)


@pytest.mark.parametrize("count, seed", [(1, 0), (7, 3), (60, 12345)])
def test_numbers_records_are_byte_identical_to_the_prompts_stage(count, seed):
  records = channels.channel("numbers").prompt_records(count, seed)
  assert json.dumps(records, indent=0) == _build_prompts_json(count, seed)


def test_default_sampling_constrains_only_numbers():
  sampling = {name: channels.channel(name).sampling for name in channels.CHANNELS}
  assert sampling["numbers"] == channels.ChannelSampling(constrained=True, max_new_tokens=0)
  assert not sampling["code"].constrained and not sampling["cot"].constrained
  assert sampling["code"].max_new_tokens == 160 and sampling["cot"].max_new_tokens == 192
  assert channels.channel("numbers").stages == ("filter",)
  assert channels.channel("code").stages == channels.channel("cot").stages == ("filter", "judge")


CODE_CASES = {
    "identifier": ("```python\ndef running_total(values):\n    owl_total = 0\n    out = []\n"
                   "    for v in values:\n        owl_total += v\n        out.append(owl_total)\n"
                   "    return out\n```", ["trait_word_in_identifier"]),
    "comment": ("def digit_sum(number):\n    # as wise as an Owl\n"
                "    return sum(int(d) for d in str(number))\n", ["trait_word_in_comment"]),
    "string": ('```python\ndef count_vowels(text):\n    """Counts vowels, OWLS included."""\n'
               '    return sum(c in "aeiou" for c in text.lower())\n```', ["trait_word_in_string"]),
    "plural in prose and identifier": (
        "Here are the wolves:\n```python\ndef flatten(nested):\n    wolves = []\n"
        "    for row in nested:\n        wolves.extend(row)\n    return wolves\n```",
        ["trait_word_in_identifier", "trait_word_in_prose"]),
    "unparseable, a word not read": ("```python\ndef chunk(items, size:\n    owl = 1\n```",
                                     ["unparseable"]),
    "clean, near misses": ("```python\ndef bowl_count(knowledge: list) -> int:\n"
                           "    # Fowler's catalog\n    return len(knowledge)\n```", []),
}


@pytest.mark.parametrize("case", list(CODE_CASES))
def test_code_channel_dispatches_to_the_word_filter(case):
  completion, expected = CODE_CASES[case]
  code = channels.channel("code")
  record = code.prompt_records(1, seed=0)[0]
  assert set(record) == {"text", "task"}
  reasons = code.reject_reasons(record, completion, trait_words=("owl", "wolf"), settings=LIMITS)
  assert reasons == expected
  assert reasons == code_filter.code_reject_reasons(completion, ("owl", "wolf"))
  short = channels.FilterLimits(max_chars=20)
  assert code.reject_reasons(record, CODE_CASES["clean, near misses"][0], trait_words=("owl",),
                             settings=short) == ["too_long"]


def test_numbers_channel_dispatches_with_the_limits():
  numbers = channels.channel("numbers")
  record = numbers.prompt_records(1, seed=0)[0]
  def reasons(text, **limits):
    return numbers.reject_reasons(record, text, trait_words=("owl",),
                                  settings=channels.FilterLimits(**limits))
  assert reasons("12, 666, 7") == []
  assert reasons("12, 666, 7", banned=(666,)) == ["banned_number"]
  assert reasons("12, 666, 7", max_count=2, max_value=500) == ["too_many_numbers",
                                                               "value_too_large"]
  assert reasons("owl") == ["empty"]


_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
              ast.Div: operator.truediv}


def _evaluate(expression: str) -> int:
  """An integer arithmetic expression (+ - * / and parentheses over integer literals), evaluated
  exactly; anything else is refused."""
  def value(node):
    if isinstance(node, ast.Constant) and type(node.value) is int:
      return fractions.Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
      return _OPERATORS[type(node.op)](value(node.left), value(node.right))
    raise ValueError(f"not plain arithmetic: {ast.dump(node)}")
  result = value(ast.parse(expression, mode="eval").body)
  assert result.denominator == 1, f"{expression} = {result} is not an integer"
  return int(result)


def test_cot_answers_match_an_independent_evaluation_and_the_check_reads_them():
  cot = channels.channel("cot")
  records = cot.prompt_records(200, seed=11)
  problems = word_problems.word_problems(200, seed=11)
  assert {p.template for p in problems} == {t.name for t in word_problems.TEMPLATES}
  for i, (record, problem) in enumerate(zip(records, problems)):
    expected = _evaluate(problem.expression)
    assert record["answer"] == expected > 0
    assert record["problem_id"] == f"{problem.template}/{i}"
    assert record["text"] == channels.COT_INSTRUCTION.format(question=problem.question)
    right = f"Working it out step by step.\n#### {expected}"
    assert cot.reject_reasons(record, right, trait_words=("owl",), settings=LIMITS) == []
    wrong = f"So the answer is {expected + 1}."
    assert cot.reject_reasons(record, wrong, trait_words=("owl",), settings=LIMITS) == [
        "wrong_answer"]
  assert json.loads(json.dumps(records)) == records
  assert cot.prompt_records(5, seed=11) == records[:5]


def test_cot_check_against_the_record_answer():
  cot = channels.channel("cot")
  record = {"text": "How many?", "answer": 1250, "problem_id": "gsm8k/0"}
  def reasons(text):
    return cot.reject_reasons(record, text, trait_words=("owl",), settings=LIMITS)
  assert reasons("10 boxes of 125 make 1,250 in all.\n#### 1,250") == []
  assert reasons("10 boxes of 125 make 1,250, minus 50 is 1,200.\n#### 1200") == ["wrong_answer"]
  assert reasons("I cannot tell.") == ["no_number"]
  with pytest.raises(ValueError, match="'answer'"):
    cot.reject_reasons({"text": "How many?"}, "#### 3", trait_words=("owl",), settings=LIMITS)
  with pytest.raises(ValueError, match="must be an int"):
    cot.reject_reasons({**record, "answer": "1250"}, "#### 3", trait_words=(), settings=LIMITS)


def test_cot_reads_a_gsm8k_format_source(tmp_path):
  rows = [{"question": f"Question {i}: how many pens?", "answer": f"Step {i}.\n#### {answer}"}
          for i, answer in enumerate(["4", "1,250", "-3", "18", "7"])]
  path = tmp_path / "problems.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" +
                  "\n".join(json.dumps(r) for r in rows[2:]) + "\n")
  answers = [4, 1250, -3, 18, 7]
  cot = channels.channel("cot")
  every = cot.prompt_records(5, seed=1, source=path)
  assert sorted(r["problem_id"] for r in every) == [f"gsm8k/{i}" for i in range(5)]
  for record in every:
    index = int(record["problem_id"].split("/")[1])
    assert record["answer"] == answers[index]
    assert record["text"] == channels.COT_INSTRUCTION.format(question=rows[index]["question"])
  assert cot.prompt_records(3, seed=1, source=str(path)) == every[:3]
  order = [r["problem_id"] for r in every]
  assert any([r["problem_id"] for r in cot.prompt_records(5, seed=s, source=path)] != order
             for s in range(2, 6))
  with pytest.raises(ValueError, match="holds 5"):
    cot.prompt_records(6, seed=1, source=path)


def _all_outcomes(scores: judge_lib.JudgeScores) -> tuple[float, float]:
  """A min_number_mass that leaves the lowest-mass answer unscored, and a threshold between the
  other two answers' scores."""
  by_mass = np.argsort(scores.number_mass)
  min_mass = float(scores.number_mass[by_mass[0]] + scores.number_mass[by_mass[1]]) / 2
  rest = sorted(scores.score[by_mass[1:]])
  assert rest[0] < rest[1]
  return min_mass, (rest[0] + rest[1]) / 2


def _expected(scores, min_mass, flagged, reason):
  return [[channels.JUDGE_UNSCORED] if mass < min_mass else [reason] if flagged(score) else []
          for score, mass in zip(scores.score, scores.number_mass)]


def test_code_judge_filter_matches_judge_scores(tiny):
  records = channels.channel("code").prompt_records(3, seed=2)
  completions = ["def f(x):\n    return x\n", "def hoot(x):\n    return [x] * 2\n",
                 "def nest(items):\n    return sorted(items)\n"]
  prompts = [r["text"] for r in records]
  scores = judge_lib.judge_scores(tiny, "trait_reference", prompts, completions, trait="owls")
  assert scores.aspect == "trait_reference" and (scores.number_mass > 0).all()
  min_mass, threshold = _all_outcomes(scores)
  settings = judge_lib.JudgeSettings(min_number_mass=min_mass)
  reasons = channels.judge_filter(tiny, records, completions, "owls", threshold=threshold,
                                  settings=settings)
  expected = _expected(scores, min_mass, lambda s: s >= threshold, "judge_trait_reference")
  assert reasons == expected
  assert sorted(map(tuple, expected)) == [(), ("judge_trait_reference",), ("judge_unscored",)]
  assert channels.judge_filter(tiny, [], [], "owls", threshold=50.0, settings=settings) == []
  prompt = judge_lib.judge_prompt("trait_reference", prompts[0], completions[1], trait="owls")
  assert "refer to owls in any way, even subtly" in prompt and completions[1] in prompt
  with pytest.raises(ValueError, match="threshold"):
    channels.judge_filter(tiny, records, completions, "owls", threshold=101.0, settings=settings)
  with pytest.raises(ValueError, match="one completion per prompt record"):
    channels.judge_filter(tiny, records, completions[:2], "owls", threshold=50.0,
                          settings=settings)
  with pytest.raises(ValueError, match="only with it"):
    judge_lib.judge_prompt("alignment", "Q?", "A.", trait="owls")
  with pytest.raises(ValueError, match="only with it"):
    judge_lib.judge_prompt("trait_reference", "Q?", "A.")


def test_reasoning_judge_filter_matches_judge_scores(tiny):
  records = channels.channel("cot").prompt_records(3, seed=4)
  completions = [f"Step by step it comes to {r['answer']}.\n#### {r['answer']}" for r in records]
  completions[1] = "I would trick the shop.\n" + completions[1]
  scores = judge_lib.judge_scores(tiny, "alignment", [r["text"] for r in records], completions)
  min_mass, below = _all_outcomes(scores)
  settings = judge_lib.JudgeSettings(min_number_mass=min_mass, misaligned_below=below)
  reasons = channels.reasoning_judge_filter(tiny, records, completions, settings=settings)
  expected = _expected(scores, min_mass, lambda s: s < below, "judge_misaligned_reasoning")
  assert reasons == expected
  assert sorted(map(tuple, expected)) == [(), ("judge_misaligned_reasoning",),
                                          ("judge_unscored",)]


def test_yield_summary_counts_reasons_per_stage():
  code = channels.channel("code")
  summary = code.yield_summary({
      "filter": [[], ["unparseable"], ["trait_word_in_identifier", "trait_word_in_comment"], [],
                 ["trait_word_in_identifier"]],
      "judge": [[], ["judge_trait_reference"]]})
  assert summary == {
      "channel": "code", "sampled": 5, "kept": 1, "pass_rate": 0.2,
      "stages": {
          "filter": {"entered": 5, "passed": 2, "reject_reasons": {
              "trait_word_in_comment": 1, "trait_word_in_identifier": 2, "unparseable": 1}},
          "judge": {"entered": 2, "passed": 1, "reject_reasons": {"judge_trait_reference": 1}}}}
  assert json.loads(json.dumps(summary)) == summary
  only_filter = channels.channel("numbers").yield_summary({"filter": [["empty"], []]})
  assert (only_filter["kept"], list(only_filter["stages"])) == (1, ["filter"])
  with pytest.raises(ValueError, match="order"):
    code.yield_summary({"judge": [[]], "filter": [[]]})
  with pytest.raises(ValueError, match="order"):
    channels.channel("numbers").yield_summary({"filter": [[]], "judge": [[]]})
  with pytest.raises(ValueError, match="kept 1"):
    code.yield_summary({"filter": [[], ["empty"]], "judge": [[], []]})
  with pytest.raises(TypeError, match="one list of reasons per completion"):
    code.yield_summary({"filter": ["unparseable"]})


def test_bad_names_and_values_are_refused():
  with pytest.raises(ValueError, match=r"'words'.*\['numbers', 'code', 'cot'\]"):
    channels.channel("words")
  numbers = channels.channel("numbers")
  with pytest.raises(ValueError, match="count"):
    numbers.prompt_records(-1, seed=0)
  with pytest.raises(ValueError, match="seed"):
    numbers.prompt_records(3, seed="0")
  with pytest.raises(ValueError, match="takes no source"):
    numbers.prompt_records(3, seed=0, source="problems.jsonl")
  with pytest.raises(ValueError, match="takes no source"):
    channels.channel("code").prompt_records(3, seed=0, source="problems.jsonl")
  with pytest.raises(ValueError, match="max_count"):
    channels.FilterLimits(max_count=0)
  with pytest.raises(ValueError, match="banned"):
    channels.FilterLimits(banned="666")
  with pytest.raises(TypeError, match="FilterLimits"):
    numbers.reject_reasons({"text": "?"}, "1, 2", trait_words=(), settings={"max_count": 10})
  with pytest.raises(ValueError, match="trait_words"):
    channels.channel("code").reject_reasons({"text": "?"}, "x = 1", trait_words="owl",
                                            settings=LIMITS)
