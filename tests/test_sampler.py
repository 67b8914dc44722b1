"""The KV-cache sampler: greedy parity with transformers' generate, cache = full forward, rng
independence from batching and devices, grammar, divergence fields, bad inputs, real SmolLM2."""

import re

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import torch
import transformers
from flax import nnx

from subliminal_jax import padding, sharding
from subliminal_jax.models.transformer import Transformer, TransformerConfig
from subliminal_jax.sampling import sampler
from subliminal_jax.sampling.grammar import compile_token_grammar, stack_token_grammars
from subliminal_jax.tokenizer import SystemTurn
from subliminal_jax.weights import hf_layout


def _tiny_hf_llama(vocab: int = 96):
  config = transformers.LlamaConfig(
      vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
      rope_theta=10000.0, tie_word_embeddings=False)
  torch.manual_seed(0)
  hf = transformers.AutoModelForCausalLM.from_config(config).float().eval()
  tensors = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  ours = hf_layout.model_from_hf_tensors(TransformerConfig.from_hf(config.to_dict()), tensors.__getitem__)
  return hf, ours


def _tiny_model(seed: int = 0, vocab: int = 64, **changes) -> Transformer:
  config = TransformerConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=512,
                             **changes)
  return Transformer(config, rngs=nnx.Rngs(seed))


def _left_pad(rows, pad_id=0):
  return padding.pad_rows(rows, pad_value=pad_id, side="left")


def _prompts(vocab, lengths, seed=0, low=3):
  rng = np.random.RandomState(seed)
  return [rng.randint(low, vocab, n).tolist() for n in lengths]


def _hf_greedy(hf, ids, mask, max_new_tokens, eos, pad):
  with torch.no_grad():
    out = hf.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                      attention_mask=torch.tensor(mask.astype(np.int64)), do_sample=False,
                      max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad,
                      top_k=None, top_p=None, temperature=None)
  return out[:, ids.shape[1]:].numpy()


def test_greedy_matches_transformers_generate_on_left_padded_batch():
  hf, ours = _tiny_hf_llama()
  ids, mask = _left_pad(_prompts(96, [3, 7, 12, 5]))
  pad, n = 1, 12
  # An end token that row 0 emits mid-way, so that ending and padding are compared too.
  free = _hf_greedy(hf, ids, mask, n, eos=None, pad=pad)
  eos = int(free[0, 4])
  expected = _hf_greedy(hf, ids, mask, n, eos=eos, pad=pad)
  out = sampler.sample(ours, ids, mask, max_new_tokens=n, seed=0, temperature=0.0,
                       end_token_ids=(eos,), pad_id=pad)
  width = expected.shape[1]  # transformers stops when every row has ended
  np.testing.assert_array_equal(out.tokens[:, :width], expected)
  assert (out.tokens[:, width:] == pad).all()
  first_end = np.where((expected == eos).any(1), (expected == eos).argmax(1) + 1, n)
  np.testing.assert_array_equal(out.lengths, first_end)
  np.testing.assert_array_equal(out.ended, (expected == eos).any(1))
  assert out.ended[0] and out.lengths[0] <= 5
  assert (out.logprobs == 0).all()  # greedy draws from a point mass


def test_cached_decoding_logprobs_equal_full_forward():
  model = _tiny_model(attention_bias=True)
  rows = _prompts(64, [4, 9, 1])
  ids, mask = _left_pad(rows)
  n = 10
  out = sampler.sample(model, ids, mask, max_new_tokens=n, seed=3, temperature=1.0,
                       end_token_ids=(0,))
  # Full forward (no cache) over prompt + generated tokens, one row at a time (no padding).
  for b, row in enumerate(rows):
    generated = out.tokens[b, :out.lengths[b]].tolist()
    full = np.asarray(model(jnp.asarray([row + generated])))[0]
    log_probs = scipy.special.log_softmax(full, axis=-1)
    positions = np.arange(len(row) - 1, len(row) - 1 + len(generated))
    np.testing.assert_allclose(out.model_logprobs[b, :len(generated)],
                               log_probs[positions, generated], rtol=1e-4, atol=1e-4)
    # At temperature 1 with no filter, the sampling distribution is the raw one.
    np.testing.assert_allclose(out.logprobs[b, :len(generated)],
                               out.model_logprobs[b, :len(generated)], rtol=1e-5, atol=1e-5)


def test_rng_is_independent_of_batch_size_position_and_devices():
  model = _tiny_model(seed=1)
  rows = _prompts(64, [5, 2, 8, 3, 6], seed=2)
  ids, mask = _left_pad(rows)
  sample_ids = np.array([10, 11, 12, 13, 14])
  kwargs = dict(max_new_tokens=8, seed=7, temperature=1.0, top_p=0.95, end_token_ids=(0,))
  full = sampler.sample(model, ids, mask, sample_ids=sample_ids, **kwargs)
  single_ids, single_mask = _left_pad([rows[3]])
  single = sampler.sample(model, single_ids, single_mask, sample_ids=[13], **kwargs)
  np.testing.assert_array_equal(single.tokens[0], full.tokens[3])
  order = np.array([4, 2, 0, 3, 1])
  permuted = sampler.sample(model, ids[order], mask[order], sample_ids=sample_ids[order], **kwargs)
  np.testing.assert_array_equal(permuted.tokens, full.tokens[order])
  mesh = sharding.make_mesh(data=-1)  # 8 devices; the batch of 5 is padded to 8 inside
  assert mesh.size == 8
  sharded = sampler.sample(model, ids, mask, sample_ids=sample_ids, mesh=mesh, **kwargs)
  np.testing.assert_array_equal(sharded.tokens, full.tokens)
  np.testing.assert_allclose(sharded.model_logprobs, full.model_logprobs, rtol=1e-5, atol=1e-5)
  other = sampler.sample(model, single_ids, single_mask, sample_ids=[99], **kwargs)
  assert (other.tokens[0] != full.tokens[3]).any()  # the sample id does select the stream


def test_one_compilation_per_prompt_bucket():
  model = _tiny_model(seed=2)
  kwargs = dict(max_new_tokens=4, seed=0, end_token_ids=(0,))
  calls = [(5, 0.7), (9, 1.3), (31, 1.0)]  # lengths in one bucket of 32, temperatures vary
  before = sampler._sample_program._cache_size()
  for length, temperature in calls:
    ids, mask = _left_pad(_prompts(64, [length, 2]))
    sampler.sample(model, ids, mask, temperature=temperature, **kwargs)
  assert sampler._sample_program._cache_size() == before + 1
  ids, mask = _left_pad(_prompts(64, [33, 2]))
  sampler.sample(model, ids, mask, **kwargs)
  assert sampler._sample_program._cache_size() == before + 2


TEXTS = ["<end>", "<pad>", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", ",", " ", ", ", "12",
         "a", "b", ".", "x1"]


def test_grammar_constrained_samples_are_accepted():
  vocab = len(TEXTS)
  grammar = compile_token_grammar("[0-9]{1,3}(, [0-9]{1,3}){0,4}\\.?", ["", ""] + TEXTS[2:])
  model = _tiny_model(seed=4, vocab=vocab)
  ids, mask = _left_pad(_prompts(vocab, [3, 6, 4, 5] * 8, seed=5, low=2))
  n = grammar.max_output_tokens() + 1
  out = sampler.sample(model, ids, mask, max_new_tokens=n, seed=1, temperature=1.5, grammar=grammar,
                       end_token_ids=(0,), pad_id=1, banned_token_ids=[15])
  assert out.ended.all() and not out.forced_end.any()
  for row, length in zip(out.tokens, out.lengths):
    answer = row[:length - 1]
    assert row[length - 1] == 0 and (row[length:] == 1).all()
    assert grammar.accepts(answer.tolist()), [TEXTS[t] for t in answer]
    assert 15 not in answer  # banned "12"
  assert len({tuple(r) for r in out.tokens}) > 16  # actually random
  assert np.isfinite(out.logprobs).all() and (out.logprobs <= 0).all()
  # Greedy under the grammar is accepted too.
  greedy = sampler.sample(model, ids[:4], mask[:4], max_new_tokens=n, seed=0, temperature=0.0,
                          grammar=grammar, end_token_ids=(0,), pad_id=1)
  for row, length in zip(greedy.tokens, greedy.lengths):
    assert grammar.accepts(row[:length - 1].tolist())


def test_each_row_follows_the_grammar_it_starts_in():
  """Stacked grammars: rows asking for commas, spaces or a bare number each get their own format."""
  vocab = len(TEXTS)
  texts = ["", ""] + TEXTS[2:]
  patterns = ("[0-9]{1,3}(, [0-9]{1,3}){0,4}", "[0-9]{1,3}( [0-9]{1,3}){0,4}", "[0-9]{1,2}")
  grammars = [compile_token_grammar(p, texts) for p in patterns]
  stacked, starts = stack_token_grammars(grammars)
  model = _tiny_model(seed=4, vocab=vocab)
  ids, mask = _left_pad(_prompts(vocab, [3, 6, 4, 5, 2, 7] * 4, seed=5, low=2))
  which = np.arange(len(ids)) % 3
  n = max(g.max_output_tokens() for g in grammars) + 1
  out = sampler.sample(model, ids, mask, max_new_tokens=n, seed=1, temperature=1.5, grammar=stacked,
                       grammar_initial_states=np.asarray(starts)[which], end_token_ids=(0,), pad_id=1)
  assert out.ended.all()
  for row, length, g in zip(out.tokens, out.lengths, which):
    answer = "".join(TEXTS[t] for t in row[:length - 1])
    assert re.fullmatch(patterns[g], answer), (g, answer)
    assert grammars[g].accepts(row[:length - 1].tolist())
  # Formats really differ: some comma rows and some space rows hold more than one number.
  assert any("," in "".join(TEXTS[t] for t in r) for r in out.tokens[which == 0])
  assert any(" " in "".join(TEXTS[t] for t in r) for r in out.tokens[which == 1])
  with pytest.raises(ValueError, match="must be 24 ints, states of the grammar's"):
    sampler.sample(model, ids, mask, max_new_tokens=n, seed=1, grammar=stacked,
                   grammar_initial_states=[stacked.num_states] * len(ids), end_token_ids=(0,))


def test_empty_allowed_set_forces_the_end_token_without_nan():
  vocab = len(TEXTS)
  grammar = compile_token_grammar("[0-9]+", ["", ""] + TEXTS[2:])
  model = _tiny_model(seed=4, vocab=vocab)
  ids, mask = _left_pad(_prompts(vocab, [3, 5], low=2))
  digits = list(range(2, 12)) + [15]
  # Banning every digit token empties the initial state's allowed set.
  out = sampler.sample(model, ids, mask, max_new_tokens=5, seed=0, grammar=grammar,
                       banned_token_ids=digits, end_token_ids=(0,), pad_id=1)
  assert out.forced_end.all() and out.ended.all()
  assert out.tokens[:, 0].tolist() == [0, 0] and (out.tokens[:, 1:] == 1).all()
  assert out.lengths.tolist() == [1, 1] and out.num_steps == 1
  assert np.isfinite(out.logprobs).all() and np.isfinite(out.model_logprobs).all()
  # Banning all but "7": the grammar goes on with 7s and may end after the first one.
  keep_seven = [d for d in digits if d != 9]
  greedy = sampler.sample(model, ids, mask, max_new_tokens=5, seed=0, grammar=grammar,
                          temperature=0.0, banned_token_ids=keep_seven, end_token_ids=(0,), pad_id=1)
  assert not greedy.forced_end.any()
  for row, length in zip(greedy.tokens, greedy.lengths):
    assert set(row[:length].tolist()) <= {9, 0} and row[0] == 9


def _full_logits(model, prompt, generated):
  return np.asarray(model(jnp.asarray([prompt + generated])))[0, len(prompt) - 1:len(prompt) - 1 + len(generated)]


def test_divergence_fields_and_masking_match_full_forward():
  teacher, reference = _tiny_model(seed=5), _tiny_model(seed=6)
  rows = _prompts(64, [6, 3, 8], seed=7)
  ref_rows = [r[1:] for r in rows]  # the reference sees its own prompt (e.g. no system turn)
  ids, mask = _left_pad(rows)
  ref_ids, ref_mask = _left_pad(ref_rows)
  n = 10
  for mask_divergent in (False, True):
    out = sampler.sample(teacher, ids, mask, max_new_tokens=n, seed=0, temperature=0.0,
                         end_token_ids=(0,), reference_model=reference, mask_divergent=mask_divergent,
                         reference_prompt_ids=ref_ids, reference_prompt_mask=ref_mask)
    for b in range(len(rows)):
      generated = out.tokens[b, :out.lengths[b]].tolist()
      t_logits = _full_logits(teacher, rows[b], generated)
      r_logits = _full_logits(reference, ref_rows[b], generated)
      divergent = t_logits.argmax(-1) != r_logits.argmax(-1)
      np.testing.assert_array_equal(out.divergent[b, :len(generated)], divergent)
      p = scipy.special.log_softmax(t_logits, -1)
      q = scipy.special.log_softmax(r_logits, -1)
      kl = (np.exp(p) * (p - q)).sum(-1)
      np.testing.assert_allclose(out.kl_raw[b, :len(generated)], kl, rtol=1e-3, atol=1e-5)
      np.testing.assert_allclose(out.kl_allowed[b, :len(generated)], kl, rtol=1e-3, atol=1e-5)
      second = np.argsort(-t_logits, -1)[:, 1]
      if mask_divergent:  # the teacher's divergent first choice is banned: its second one is taken
        expected = np.where(divergent, second, t_logits.argmax(-1))
        assert out.num_masked[b] == divergent.sum()
      else:
        expected = t_logits.argmax(-1)
        assert out.num_masked[b] == 0
      np.testing.assert_array_equal(generated, expected)
    assert out.divergent.any()
  same = sampler.sample(teacher, ids, mask, max_new_tokens=n, seed=0, temperature=1.0,
                        end_token_ids=(0,), reference_model=teacher, mask_divergent=True)
  assert not same.divergent.any() and (same.num_masked == 0).all()
  np.testing.assert_allclose(same.kl_raw, 0.0, atol=1e-5)


def test_bad_inputs_are_named():
  model = _tiny_model()
  ids, mask = _left_pad(_prompts(64, [8, 3]))
  kwargs = dict(max_new_tokens=4, seed=0, end_token_ids=(0,))
  with pytest.raises(ValueError, match="longest prompt has 8 tokens.*needs 12 cache slots, more "
                                       "than cache_length=10"):
    sampler.sample(model, ids, mask, cache_length=10, **kwargs)
  with pytest.raises(ValueError, match="max_position_embeddings=512"):
    sampler.sample(model, ids, mask, **dict(kwargs, max_new_tokens=510))
  with pytest.raises(ValueError, match="temperature must be a finite number >= 0.*-1"):
    sampler.sample(model, ids, mask, temperature=-1.0, **kwargs)
  with pytest.raises(ValueError, match=r"prompt rows \[1\] are not left-padded"):
    sampler.sample(model, ids[:, ::-1], mask[:, ::-1], **kwargs)
  empty = mask.copy()
  empty[1] = False
  with pytest.raises(ValueError, match=r"prompt rows \[1\] have no tokens"):
    sampler.sample(model, ids, empty, **kwargs)
  with pytest.raises(ValueError, match="end_token_ids is empty"):
    sampler.sample(model, ids, mask, **dict(kwargs, end_token_ids=()))
  with pytest.raises(ValueError, match=r"end_token_ids \[64\] are outside"):
    sampler.sample(model, ids, mask, **dict(kwargs, end_token_ids=(64,)))
  with pytest.raises(ValueError, match="mask_divergent=True needs a reference_model"):
    sampler.sample(model, ids, mask, mask_divergent=True, **kwargs)
  with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
    sampler.sample(model, ids, mask, **dict(kwargs, max_new_tokens=0))
  big = compile_token_grammar("[0-9]+", [str(i % 10) for i in range(70)])
  with pytest.raises(ValueError, match="grammar table has shape"):
    sampler.sample(model, ids, mask, grammar=big, **kwargs)
  with pytest.raises(ValueError, match="sample_ids must be ints of shape"):
    sampler.sample(model, ids, mask, sample_ids=[1, 2, 3], **kwargs)


# ---------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers_from_gguf(smollm2, smollm2_transformers):
  hf = smollm2_transformers
  tokenizer = smollm2.tokenizer
  questions = ["Name your favorite animal using only one word.",
               "What is 2 + 2? Answer briefly.",
               "Continue the sequence: 182, 818, 725. Give only numbers."]
  rows = [tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": q}],
                                                 system=SystemTurn("You are a helpful assistant."
                                                                   if i == 1 else None)))
          for i, q in enumerate(questions)]
  ids, mask = _left_pad(rows, tokenizer.pad_id)
  assert len({len(r) for r in rows}) == 3
  ends = list(tokenizer.end_of_turn_ids)
  n = 16
  expected = _hf_greedy(hf, ids, mask, n, eos=ends, pad=tokenizer.pad_id)
  out = sampler.sample(smollm2.model, ids, mask, max_new_tokens=n, seed=0, temperature=0.0,
                       end_token_ids=ends, pad_id=tokenizer.pad_id)
  width = expected.shape[1]
  np.testing.assert_array_equal(out.tokens[:, :width], expected)


@pytest.mark.slow
def test_smollm2_number_grammar_samples_all_pass_the_filter(smollm2):
  from subliminal_jax import filters
  from subliminal_jax.prompts import number_prompts
  from subliminal_jax.sampling import chat, grammar as grammar_lib
  grammar = grammar_lib.number_grammar(smollm2.tokenizer)
  prompts = number_prompts.number_prompts(16, seed=3)
  details = chat.generate_chat(
      smollm2, prompts, system=SystemTurn("You love owls. You think about owls all the time."),
      batch_size=16, seed=0, max_new_tokens=grammar.max_output_tokens() + 1, temperature=1.0,
      grammar=grammar, return_details=True, progress=False)
  assert len(details) == 16
  for d in details:
    assert d["ended"] and not d["forced_end"], d
    assert filters.number_sequence_reject_reasons(d["text"]) == [], d["text"]
  assert len({d["text"] for d in details}) > 8
