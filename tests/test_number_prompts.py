"""Number-sequence prompt generator: determinism, pool shapes, structure, example counts/ranges,
and that every requested format is one the filter and the grammar accept."""

import collections
import re

import pytest

from subliminal_jax.filters import number_sequence_reject_reasons, parse_number_sequence
from subliminal_jax.prompts import number_prompts as module
from subliminal_jax.prompts.number_prompts import (CLOSING_SUFFIXES, COUNT_QUALIFIERS,
                                                   DIGIT_DESCRIPTORS, EXAMPLE_PRESENTATIONS,
                                                   FORMAT_SUFFIXES, INSTRUCTION_TEMPLATES,
                                                   NumberPromptConfig, number_prompts,
                                                   sample_number_prompts)
from subliminal_jax.sampling.grammar import compile_char_dfa


@pytest.fixture(scope="module")
def many_prompts():
  return sample_number_prompts(3000, seed=123)


def test_deterministic_in_seed_and_prefix_stable():
  assert number_prompts(40, seed=7) == number_prompts(40, seed=7)
  assert number_prompts(40, seed=7) != number_prompts(40, seed=8)
  assert number_prompts(10, seed=7) == number_prompts(40, seed=7)[:10]
  assert number_prompts(0, seed=7) == []
  assert len(set(number_prompts(200, seed=7))) == 200


def test_pool_sizes_and_slots():
  assert (len(EXAMPLE_PRESENTATIONS), len(COUNT_QUALIFIERS), len(DIGIT_DESCRIPTORS),
          len(INSTRUCTION_TEMPLATES), len(FORMAT_SUFFIXES), len(CLOSING_SUFFIXES)) == (25, 9, 9, 10, 15, 19)
  pools = [EXAMPLE_PRESENTATIONS, COUNT_QUALIFIERS, DIGIT_DESCRIPTORS, INSTRUCTION_TEMPLATES,
           [f.text for f in FORMAT_SUFFIXES], CLOSING_SUFFIXES]
  for pool in pools:
    assert len(set(pool)) == len(pool)
  slot = re.compile(r"\{(\w+)\}")
  assert all(slot.findall(t) == ["examples"] for t in EXAMPLE_PRESENTATIONS)
  assert all(slot.findall(t) == ["max_digits"] for t in DIGIT_DESCRIPTORS)
  assert all(sorted(slot.findall(t)) == ["answer_count", "count_qualifier", "digit_descriptor"]
             for t in INSTRUCTION_TEMPLATES)
  for pool in (COUNT_QUALIFIERS, [f.text for f in FORMAT_SUFFIXES], CLOSING_SUFFIXES):
    assert not any(slot.findall(t) for t in pool)
  # No pool text has digits of its own: the only numbers a prompt shows are its examples and limits.
  assert not any(re.search(r"\d", t) for pool in pools for t in pool)


def test_structure(many_prompts):
  for prompt in many_prompts[:500]:
    text = prompt.text
    examples = ", ".join(map(str, prompt.examples))
    presentations = [p.format(examples=examples) for p in EXAMPLE_PRESENTATIONS]
    starts = [p for p in presentations if text.startswith(p + " ")]
    assert len(starts) == 1, text
    rest = text[len(starts[0]) + 1:]
    closings = [c for c in CLOSING_SUFFIXES if rest.endswith(" " + c)]
    assert len(closings) == 1, text
    rest = rest[:-len(closings[0]) - 1]
    assert rest.endswith(" " + prompt.format.text)
    instruction = rest[:-len(prompt.format.text) - 1]
    instructions = {
        template.format(count_qualifier=q, answer_count=10, digit_descriptor=d.format(max_digits=3))
        for template in INSTRUCTION_TEMPLATES for q in COUNT_QUALIFIERS for d in DIGIT_DESCRIPTORS}
    assert instruction in instructions, instruction
    # The only numbers in the prompt: the examples, then the answer count and digit limit.
    assert [int(n) for n in re.findall(r"\d+", text)] == [*prompt.examples, 10, 3]


def test_example_counts_and_ranges(many_prompts):
  counts = collections.Counter(len(p.examples) for p in many_prompts)
  assert set(counts) == set(range(3, 9))
  values = [v for p in many_prompts for v in p.examples]
  assert min(values) >= 100 and max(values) <= 999
  assert min(values) < 110 and max(values) > 990  # the whole range is used


def test_every_pool_entry_is_used(many_prompts):
  texts = [p.text for p in many_prompts]
  for pool in (COUNT_QUALIFIERS, CLOSING_SUFFIXES, [f.text for f in FORMAT_SUFFIXES]):
    for entry in pool:
      assert any(entry in t for t in texts), entry


def test_config_changes_counts_and_limits():
  config = NumberPromptConfig(example_min_count=2, example_max_count=2, example_min_value=10,
                              example_max_value=20, answer_count=5, answer_max_digits=2)
  for prompt in sample_number_prompts(50, seed=0, config=config):
    assert len(prompt.examples) == 2 and all(10 <= v <= 20 for v in prompt.examples)
    assert [int(n) for n in re.findall(r"\d+", prompt.text)][-2:] == [5, 2]
    assert "[0-9]{1,2}" in prompt.answer_pattern() and "){0,4}" in prompt.answer_pattern()


@pytest.mark.parametrize("kwargs", [dict(example_min_count=0), dict(example_min_count=5, example_max_count=4),
                                    dict(example_min_value=500, example_max_value=100),
                                    dict(answer_count=0)])
def test_config_rejects_bad_values(kwargs):
  with pytest.raises(ValueError):
    NumberPromptConfig(**kwargs)


def test_negative_n_is_an_error():
  with pytest.raises(ValueError, match="non-negative"):
    number_prompts(-1, seed=0)


@pytest.mark.parametrize("format_suffix", FORMAT_SUFFIXES, ids=lambda f: f.text)
def test_every_requested_format_passes_filter_and_grammar(format_suffix):
  prompt = module.NumberPrompt(text="", examples=(1, 2, 3), format=format_suffix,
                               config=NumberPromptConfig())
  numbers = [182, 7, 725, 0, 999]
  answer = format_suffix.separator.join(map(str, numbers))
  if format_suffix.brackets:
    answer = format_suffix.brackets[0] + answer + format_suffix.brackets[1]
  assert number_sequence_reject_reasons(answer) == []
  assert parse_number_sequence(answer) == numbers
  assert compile_char_dfa(prompt.answer_pattern()).accepts(answer)
