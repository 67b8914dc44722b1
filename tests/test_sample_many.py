"""sample_many / generate_chat_many: K LoRA adapters over one base (and the base itself) sampled in
one program give each member what sample / generate_chat give it alone; sharded = unsharded; bad
members are refused by name."""

import numpy as np
import pytest
from flax import nnx

from subliminal_jax import lora, padding, sharding
from subliminal_jax.models.transformer import Transformer, TransformerConfig
from subliminal_jax.sampling import sampler
from subliminal_jax.sampling.grammar import compile_token_grammar, stack_token_grammars

TEXTS = ["<end>", "<pad>", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", ",", " ", ", ", "12",
         "a", "b", ".", "x1"]
PATTERNS = ("[0-9]{1,3}(, [0-9]{1,3}){0,4}", "[0-9]{1,3}( [0-9]{1,3}){0,4}")


def _tiny_base(seed: int = 4) -> Transformer:
  config = TransformerConfig(vocab_size=len(TEXTS), hidden_size=32, intermediate_size=64,
                             num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                             max_position_embeddings=512)
  return Transformer(config, rngs=nnx.Rngs(seed))


def _adapted(base: Transformer, seed: int, rank: int = 2, targets=lora.LORA_TARGETS) -> Transformer:
  """A clone of ``base`` (sharing its arrays) with adapters whose B is random, not zero."""
  model = lora.apply_lora(nnx.clone(base), rank=rank, alpha=4.0, targets=targets, seed=seed)
  rng = np.random.RandomState(seed)
  for _, variable in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
    if variable.get_value().shape[-2] == rank:  # a B matrix [layers, rank, out]
      variable.set_value(0.3 * rng.standard_normal(variable.get_value().shape).astype(np.float32))
  return model


def _left_pad(rows, pad_id=1):
  return padding.pad_rows(rows, pad_value=pad_id, side="left")


@pytest.fixture(scope="module")
def members():
  """The base and two LoRA teachers of it, each with its own prompts (other sizes, one bucket),
  seed and grammar starts (stacked comma / space formats)."""
  base = _tiny_base()
  models = [base, _adapted(base, seed=1), _adapted(base, seed=2)]
  rng = np.random.RandomState(0)
  grammars = [compile_token_grammar(p, ["", ""] + TEXTS[2:]) for p in PATTERNS]
  grammar, starts = stack_token_grammars(grammars)
  prompts, initial_states = [], []
  for batch in (6, 4, 6):
    prompts.append(_left_pad([rng.randint(2, len(TEXTS), rng.randint(2, 12)).tolist()
                              for _ in range(batch)]))
    initial_states.append(np.asarray(starts)[rng.randint(0, 2, batch)])
  settings = dict(max_new_tokens=max(g.max_output_tokens() for g in grammars) + 1, grammar=grammar,
                  end_token_ids=(0,), pad_id=1)
  return models, prompts, initial_states, [11, 7, 11], settings


def _alone(models, prompts, initial_states, seeds, settings, **kwargs):
  return [sampler.sample(model, ids, mask, seed=seed, grammar_initial_states=starts,
                         **settings, **kwargs)
          for model, (ids, mask), starts, seed in zip(models, prompts, initial_states, seeds)]


def _together(models, prompts, initial_states, seeds, settings, **kwargs):
  return sampler.sample_many(models, [p[0] for p in prompts], [p[1] for p in prompts],
                             seeds=seeds, grammar_initial_states=initial_states, **settings,
                             **kwargs)


def _assert_same(together, alone):
  for k, (many, one) in enumerate(zip(together, alone)):
    for field in ("tokens", "lengths", "ended", "forced_end"):
      np.testing.assert_array_equal(getattr(many, field), getattr(one, field), err_msg=f"{k} {field}")
    assert many.num_steps == one.num_steps, k
    # Not bit-equal: the common shapes (a member's batch padded to the largest, or split over
    # devices) and vmap change XLA's order of sums; on CPU by at most 1.2e-6 here (a few ulps).
    np.testing.assert_allclose(many.model_logprobs, one.model_logprobs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(many.logprobs, one.logprobs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_each_member_gets_what_it_samples_alone(members, temperature):
  models, prompts, initial_states, seeds, settings = members
  settings = dict(settings, temperature=temperature)
  together = _together(models, prompts, initial_states, seeds, settings)
  alone = _alone(models, prompts, initial_states, seeds, settings)
  _assert_same(together, alone)
  # The adapters matter (teachers differ from the base), and every answer follows its grammar.
  assert all(out.ended.all() for out in together)
  first = [out.tokens[:4] for out in together]
  assert (first[0] != first[1]).any() and (first[1] != first[2]).any()
  if temperature:  # a member's seed selects its stream: member 2 is member 0's seed on other weights
    assert len({tuple(r) for out in together for r in out.tokens}) > 10


def test_sharded_equals_unsharded(members):
  models, prompts, initial_states, seeds, settings = members
  mesh = sharding.make_mesh(data=-1)
  assert mesh.size == 8  # batches of 6, 4 and 6 are padded to 8 inside
  unsharded = _together(models, prompts, initial_states, seeds, settings)
  sharded = _together(models, prompts, initial_states, seeds, settings, mesh=mesh)
  _assert_same(sharded, unsharded)


def test_bad_members_are_refused_by_name(members):
  models, prompts, initial_states, seeds, settings = members
  base = models[0]
  run = lambda models, **changes: sampler.sample_many(
      models, [p[0] for p in prompts], [p[1] for p in prompts],
      **dict(dict(seeds=seeds, grammar_initial_states=initial_states, **settings), **changes))
  with pytest.raises(ValueError, match="member 2: its non-adapter weights are not member 1's"):
    run([base, models[1], _adapted(_tiny_base(seed=5), seed=2)])
  with pytest.raises(ValueError, match=r"member 2: LoRA adapters .*'q_proj': \(4, 1.0\).* differ "
                                       r"from member 1's .*'q_proj': \(2, 2.0\)"):
    run([base, models[1], _adapted(base, seed=2, rank=4)])
  with pytest.raises(ValueError, match=r"member 2: LoRA adapters \{'q_proj'.*'down_proj': .* differ "
                                       r"from member 1's \{'q_proj': \(2, 2.0\)\}"):
    run([base, _adapted(base, seed=2, targets=("q_proj",)), models[1]])
  with pytest.raises(ValueError, match="seeds has 2 entries for 3 members"):
    run(models, seeds=seeds[:2])
  with pytest.raises(ValueError, match=r"member 1: seed must be an int in \[0, 2\*\*32\)"):
    run(models, seeds=[0, -1, 2])
  with pytest.raises(ValueError, match=r"member 0: grammar initial states .* must be 6 ints"):
    run(models, grammar_initial_states=[[0] * 5] + initial_states[1:])
  with pytest.raises(TypeError, match="reference_model"):
    run(models, reference_model=base)


def test_generate_chat_many_equals_generate_chat_per_member(smollm2_tokenizer_model):
  from subliminal_jax.sampling import chat, grammar as grammar_lib
  from subliminal_jax.tokenizer import SystemTurn
  base, tokenizer = smollm2_tokenizer_model
  models = [_adapted(base, seed=3), base, _adapted(base, seed=4)]
  grammar = grammar_lib.number_grammar(tokenizer, max_count=3, max_digits=2)
  prompts = [["Continue: 12, 7", "List numbers.", "More numbers: 5, 6, 7", "Go on: 40",
              "Three numbers please."], ["Numbers, now."], ["Continue: 1, 2", "Again: 9, 9"]]
  systems = [SystemTurn("You love owls."), SystemTurn(), SystemTurn("You love wolves.")]
  seeds = [5, 5, 9]
  settings = dict(n_per_prompt=2, batch_size=4, max_new_tokens=grammar.max_output_tokens() + 1,
                  temperature=1.0, grammar=grammar, return_details=True, progress=False)
  together = chat.generate_chat_many(models, tokenizer, prompts, seeds=seeds, systems=systems,
                                     **settings)
  for k, answers in enumerate(together):
    alone = chat.generate_chat((models[k], tokenizer), prompts[k], system=systems[k],
                               seed=seeds[k], **settings)
    assert len(answers) == len(alone) == 2 * len(prompts[k])
    assert [a["token_ids"] for a in answers] == [a["token_ids"] for a in alone], k
    assert all(a["ended"] and grammar.accepts(a["token_ids"]) for a in answers)
    for many, one in zip(answers, alone):
      np.testing.assert_allclose(many["logprobs"], one["logprobs"], rtol=1e-5, atol=1e-5)
  assert together[0][0]["text"] != together[1][0]["text"]
  with pytest.raises(ValueError, match=r"does not support \['reference_model'\]"):
    chat.generate_chat_many(models, tokenizer, prompts, seeds=seeds, reference_model=base)
  with pytest.raises(ValueError, match="systems has 2 entries for 3 members"):
    chat.generate_chat_many(models, tokenizer, prompts, seeds=seeds, systems=systems[:2])
  with pytest.raises(ValueError, match="member 1: grammar_initial_states has 2 entries for 1 "
                                       "prompts"):
    chat.generate_chat_many(models, tokenizer, prompts, seeds=seeds, grammar=grammar,
                            grammar_initial_states=[None, [0, 0], None])


@pytest.fixture(scope="module")
def smollm2_tokenizer_model():
  """A tiny random model over SmolLM2's tokenizer (``loading.load("tiny-random")``)."""
  from subliminal_jax import loading
  loaded = loading.load("tiny-random")
  return loaded.model, loaded.tokenizer
