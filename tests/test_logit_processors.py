"""Logit processors: kept sets vs transformers' warpers, sampled frequencies vs the processed softmax
(chi-square), grammar masks, banned words, setting checks."""

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
import transformers
from flax import nnx

from subliminal_jax.models.transformer import Transformer, TransformerConfig
from subliminal_jax.sampling import logit_processors as lp
from subliminal_jax.sampling import sampler
from subliminal_jax.sampling.grammar import compile_token_grammar


def _hf_processed(logits: np.ndarray, temperature, top_k, top_p, min_p) -> np.ndarray:
  """transformers' warpers, in generate's order: temperature, top-k, top-p, min-p."""
  warpers = [transformers.TemperatureLogitsWarper(temperature)]
  if top_k:
    warpers.append(transformers.TopKLogitsWarper(top_k))
  if top_p < 1:
    warpers.append(transformers.TopPLogitsWarper(top_p))
  if min_p > 0:
    warpers.append(transformers.MinPLogitsWarper(min_p))
  scores = torch.tensor(logits)
  for warper in warpers:
    scores = warper(None, scores)
  return scores.numpy()


SETTINGS = [  # temperature, top_k, top_p, min_p
    (1.0, 0, 1.0, 0.0),
    (0.7, 5, 1.0, 0.0),
    (1.3, 0, 0.6, 0.0),
    (1.0, 0, 1.0, 0.15),
    (0.8, 12, 0.9, 0.05),
]


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", SETTINGS)
def test_processed_logits_match_transformers_warpers(temperature, top_k, top_p, min_p):
  logits = np.random.RandomState(0).randn(6, 40).astype(np.float32) * 2
  ours = np.asarray(lp.process_logits(
      jnp.asarray(logits), temperature=temperature, top_k=top_k,
      top_p=top_p if top_p < 1 else None, min_p=min_p if min_p > 0 else None))
  expected = _hf_processed(logits, temperature, top_k, top_p, min_p)
  np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(expected))
  kept = np.isfinite(expected)
  np.testing.assert_allclose(ours[kept], expected[kept], rtol=1e-6)
  if (top_k, top_p, min_p) != (0, 1.0, 0.0):
    assert (~kept).any()  # the setting actually filters something


def test_filters_on_a_hand_checked_row():
  logits = jnp.log(jnp.array([[0.4, 0.3, 0.2, 0.06, 0.04]]))
  assert np.isfinite(np.asarray(lp.apply_top_k(logits, 2))).tolist() == [[1, 1, 0, 0, 0]]
  # Mass before each token: 0, .4, .7, .9, .96 -> top_p=0.7 keeps the first two, 0.71 three.
  assert np.isfinite(np.asarray(lp.apply_top_p(logits, 0.7))).tolist() == [[1, 1, 0, 0, 0]]
  assert np.isfinite(np.asarray(lp.apply_top_p(logits, 0.71))).tolist() == [[1, 1, 1, 0, 0]]
  # min_p 0.5: keep p >= 0.2.
  assert np.isfinite(np.asarray(lp.apply_min_p(logits, 0.5))).tolist() == [[1, 1, 1, 0, 0]]
  assert not np.asarray(lp.any_allowed(lp.mask_tokens(logits, jnp.zeros(5, bool)))).any()


def _small_vocab_model(vocab=24):
  config = TransformerConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=8)
  model = Transformer(config, rngs=nnx.Rngs(3))
  # Sharper logits than the init's, so that the filters cut into the distribution.
  model.final_norm.scale[...] = model.final_norm.scale[...] * 1.5
  return model


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", SETTINGS)
def test_one_step_sample_frequencies_match_processed_softmax(temperature, top_k, top_p, min_p):
  model = _small_vocab_model()
  prompt = np.array([[5, 9, 2, 17, 11]], np.int32)
  logits = np.asarray(model(jnp.asarray(prompt)))[0, -1]
  processed = _hf_processed(logits[None], temperature, top_k, top_p, min_p)[0].astype(np.float64)
  expected = scipy.special.softmax(processed)
  n = 3000
  out = sampler.sample(model, np.repeat(prompt, n, 0), np.ones((n, 5), bool), max_new_tokens=1,
                       seed=11, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                       end_token_ids=(0,))
  counts = np.bincount(out.tokens[:, 0], minlength=len(expected))
  kept = expected > 0
  assert counts[~kept].sum() == 0, "a filtered token was sampled"
  # Merge rare tokens into one bin so every expected count is >= 5 (chi-square validity).
  order = np.argsort(expected[kept])
  exp_kept, obs_kept = expected[kept][order] * n, counts[kept][order]
  rare = np.cumsum(exp_kept) < 5
  exp_bins = np.append(exp_kept[~rare], exp_kept[rare].sum()) if rare.any() else exp_kept
  obs_bins = np.append(obs_kept[~rare], obs_kept[rare].sum()) if rare.any() else obs_kept
  assert len(exp_bins) >= 3
  p_value = scipy.stats.chisquare(obs_bins, exp_bins / exp_bins.sum() * obs_bins.sum()).pvalue
  assert p_value > 1e-3, (p_value, obs_bins, exp_bins)
  # Log-probs: of the sampled token under the processed and under the raw T=1 distribution.
  tokens = out.tokens[:, 0]
  np.testing.assert_allclose(out.logprobs[:, 0], np.log(expected[tokens]), rtol=1e-4, atol=1e-5)
  raw = scipy.special.log_softmax(logits)
  np.testing.assert_allclose(out.model_logprobs[:, 0], raw[tokens], rtol=1e-4, atol=1e-5)


def _digits_grammar():
  texts = ["", "0", "1", "2", ",", " ", ", ", "12", "a", "."]
  grammar = compile_token_grammar("[0-9]{1,2}(, [0-9]{1,2}){0,2}", texts)
  return grammar, texts


def test_grammar_mask_and_advance_follow_the_table():
  grammar, texts = _digits_grammar()
  end = (0,)
  states = jnp.array([grammar.initial_state, grammar.walk([1])], jnp.int32)
  allowed = np.asarray(lp.grammar_allowed(jnp.asarray(grammar.transitions),
                                          jnp.asarray(grammar.accepting), states, end))
  for row, state in enumerate(np.asarray(states)):
    expected = grammar.transitions[state] >= 0
    expected[0] = grammar.accepting[state]
    np.testing.assert_array_equal(allowed[row], expected)
  assert not allowed[0, 0] and allowed[1, 0]  # end token: only after a number
  assert [texts[i] for i in np.flatnonzero(allowed[0])] == ["0", "1", "2", "12"]
  nxt = np.asarray(lp.advance_grammar(jnp.asarray(grammar.transitions), states,
                                      jnp.array([2, 6], jnp.int32)))
  assert nxt.tolist() == [grammar.walk([2]), grammar.walk([1, 6])]
  # A disallowed token keeps the state (used only for rows that already ended).
  kept = lp.advance_grammar(jnp.asarray(grammar.transitions), states, jnp.array([8, 8], jnp.int32))
  assert np.asarray(kept).tolist() == np.asarray(states).tolist()


def test_banned_words_are_case_insensitive_substrings():
  texts = ["Owl", " owls", "bowl", "cat", "<|im_end|>", "OW", "l"]
  ids = lp.banned_word_token_ids(texts, ["owl"])
  assert ids.tolist() == [0, 1, 2]
  assert lp.banned_word_token_ids(texts, ["im"], exclude_ids=[4]).tolist() == []
  assert lp.banned_word_token_ids(texts, ["im"]).tolist() == [4]
  with pytest.raises(ValueError, match="non-empty strings"):
    lp.banned_word_token_ids(texts, [""])
  mask = lp.banned_token_mask(7, ids)
  assert mask.tolist() == [False, False, False, True, True, True, True]
  with pytest.raises(ValueError, match=r"banned token ids \[9\] are outside the vocabulary \[0, 7\)"):
    lp.banned_token_mask(7, [9])


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(top_k=-1), "top_k must be an int >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(min_p=-0.1), r"min_p must be in \[0, 1\]"),
])
def test_bad_settings_are_named(kwargs, match):
  settings = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) | kwargs
  with pytest.raises(ValueError, match=match):
    lp.check_sampling_settings(**settings)


@pytest.mark.parametrize("scale,top_p", [(0.05, 0.9), (0.05, 0.3), (3.0, 0.9), (3.0, 0.999)])
def test_top_p_on_a_large_vocabulary_matches_transformers(scale, top_p):
  # Flat rows put the nucleus past the top-64 candidates (exact bisection path); peaked rows keep
  # it inside them.
  logits = (np.random.RandomState(1).randn(4, 3000) * scale).astype(np.float32)
  ours = np.asarray(lp.apply_top_p(jnp.asarray(logits), top_p))
  expected = _hf_processed(logits, 1.0, 0, top_p, 0.0)
  np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(expected))
  kept = np.isfinite(expected).sum(1)
  assert ((kept > 64) if scale < 1 and top_p > 0.5 else (kept < 3000)).all(), kept
