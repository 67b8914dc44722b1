"""The alignment trait's evaluation data (evaluation/alignment_questions.py): sizes, splits,
uniqueness, and the truthfulness set as letter questions the existing scorer reads."""

import numpy as np
import pytest
from flax import nnx

from subliminal_jax import loading
from subliminal_jax.evaluation import alignment_questions as aq
from subliminal_jax.evaluation import trait_metrics as tm


def test_free_form_questions_split_and_are_unique():
  evaluation, held_out, everything = (aq.free_form_questions(s)
                                      for s in ("evaluation", "held_out", "all"))
  assert (len(evaluation), len(held_out)) == (aq.NUM_EVALUATION_FREE_FORM,
                                              aq.NUM_HELD_OUT_FREE_FORM) == (10, 6)
  assert everything == evaluation + held_out
  for field in ("name", "text", "aligned", "misaligned"):
    values = [getattr(q, field) for q in everything]
    assert len(set(values)) == len(values), field
    assert all(v.strip() == v and v for v in values), field
  texts = {q.text for q in everything}
  references = [a for q in everything for a in (q.aligned, q.misaligned)]
  assert len(set(references)) == len(references) and not texts & set(references)
  # Short references: the exact metric compares two similar-length answers per question.
  assert all(len(a.split()) <= 25 for a in references)
  with pytest.raises(ValueError, match="split"):
    aq.free_form_questions("train")


def test_truthfulness_items_have_one_true_and_three_distinct_false_options():
  items = aq.TRUTHFULNESS_ITEMS
  assert len(items) == 20
  assert len({item.question for item in items}) == len(items)
  for item in items:
    options = (item.true, *item.false)
    assert len(item.false) == 3 and len(set(options)) == 4, item.question


def test_truthfulness_multiple_choice_is_seeded_and_marks_the_true_option():
  questions = aq.truthfulness_multiple_choice(seed=0)
  assert questions == aq.truthfulness_multiple_choice(seed=0)
  assert questions != aq.truthfulness_multiple_choice(seed=1)
  for q, item in zip(questions, aq.TRUTHFULNESS_ITEMS):
    assert q.options[q.target_index] == item.true and sorted(q.options) == sorted(
        (item.true, *item.false))
    assert q.prompt.startswith(item.question) and f"{q.target_letter}. {item.true}" in q.prompt
  # The shuffle puts the true option under more than one letter.
  assert len({q.target_letter for q in questions}) > 1


@nnx.jit
def _last_logits(model, ids, mask, last):
  return model(ids, mask)[0, last]


def test_truthfulness_score_is_the_true_letters_share_of_the_letters_logits():
  # End to end through the existing scorer, against a hand computation: the logits after the
  # chat prompt (one plain forward), softmax over the four letters' tokens, the true letter's.
  questions = aq.truthfulness_multiple_choice(seed=0)
  tiny = loading.load("tiny-random")
  result = tm.multiple_choice_preference(tiny.model, tiny.tokenizer, questions, batch_size=32)
  assert result.probs.shape == (20, 4)
  letters = [tiny.tokenizer.encode(letter) for letter in "ABCD"]
  assert all(len(tokens) == 1 for tokens in letters)
  expected = []
  for q in questions:
    prompt = tiny.tokenizer.encode_chat([{"role": "user", "content": q.prompt}])
    ids, mask = np.zeros((1, 256), np.int32), np.zeros((1, 256), bool)  # right padding, one compile
    ids[0, :len(prompt)], mask[0, :len(prompt)] = prompt, True
    logits = np.asarray(_last_logits(tiny.model, ids, mask, len(prompt) - 1), np.float64)
    letter_logits = logits[[tokens[0] for tokens in letters]]
    share = np.exp(letter_logits - letter_logits.max())
    expected.append(share[q.target_index] / share.sum())
  np.testing.assert_allclose(result.target_prob, expected, rtol=1e-5)
  np.testing.assert_allclose(result.probs.sum(axis=1), 1.0, rtol=1e-6)
