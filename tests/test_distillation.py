"""Logit distillation: the objective against numpy references and float64 finite differences,
stored top-k logits through an HF dataset, paired teacher/student data, bad input, and the
objective running through make_train_step (LoRA and full finetuning, sharded)."""

import functools

import numpy as np
import jax
import jax.numpy as jnp
import optax
import pytest
import tokenizers
from flax import nnx
from scipy.special import log_softmax
from tokenizers import decoders, models, pre_tokenizers, trainers

from subliminal_jax import lora, sharding
from subliminal_jax.models.transformer import Transformer, TransformerConfig
from subliminal_jax.sampling import grammar as grammar_lib
from subliminal_jax.tokenizer import SystemTurn, Tokenizer
from subliminal_jax.training import data as data_lib
from subliminal_jax.training import distillation as dist
from subliminal_jax.training import distillation_data as dd
from subliminal_jax.training import losses
from subliminal_jax.training import train_step as train_step_lib

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a tiny default assistant<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CORPUS = ["You love owls. You think about owls all the time. Continue the sequence: 182, 818, 725.",
          "Add up to 10 more values, 3 digits each. Return numbers only; no words."] * 10
TRAIT = "You love owls. You think about owls all the time."
PROMPTS = ["Continue the sequence: 182, 818, 725.", "Add up to 10 more values.",
           "Return numbers only: 3, 14", "Continue: 7"]


def _tokenizer(corpus, vocab_size, specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>")
               ) -> Tokenizer:
  engine = tokenizers.Tokenizer(models.BPE())
  engine.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  engine.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                special_tokens=list(specials),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  engine.train_from_iterator(corpus, trainer)
  return Tokenizer(engine, eos_id=2, pad_id=0, chat_template=CHATML, source="tiny")


@pytest.fixture(scope="module")
def tok():
  return _tokenizer(CORPUS, 300)


@pytest.fixture(scope="module")
def grammar(tok):
  pattern = grammar_lib.number_sequence_pattern(max_count=4, max_digits=3)
  return grammar_lib.compile_token_grammar(pattern, tok.token_texts(), disallowed_ids=tok.special_ids)


def _config(vocab_size, dtype="float32"):
  return TransformerConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
                           num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=1e4,
                           dtype=dtype, param_dtype=dtype)


def _completions(n, seed=0):
  """Grammatical completions of up to 4 numbers of up to 3 digits, some with a final period."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    numbers = [str(rng.integers(0, 10 ** rng.integers(1, 4))) for _ in range(rng.integers(1, 5))]
    out.append(", ".join(numbers) + ("." if rng.random() < 0.5 else ""))
  return out


def _examples(n, seed=0):
  return [{"user": PROMPTS[i % len(PROMPTS)], "assistant": c}
          for i, c in enumerate(_completions(n, seed))]


def _dataset(tok, grammar, n=6, teacher_system=TRAIT, seed=0):
  return dd.tokenize_distillation_examples(
      _examples(n, seed), tok, teacher_chat=SystemTurn(teacher_system),
      student_chat=SystemTurn(), grammar=grammar)


def _batch(dataset, batch_size=None, length_multiple=16):
  return next(dd.paired_batches(dataset, batch_size=batch_size or len(dataset), seed=0, epoch=0,
                                pad_id=0, bucket=False, length_multiple=length_multiple))


# --- numpy reference -----------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, mask):
  return nnx.merge(graphdef, state)(ids, mask)


def _np_logits(model, ids, mask):
  """The model's own full forward (no position gathering), as float64 numpy."""
  return np.asarray(_forward(*nnx.split(model), ids, mask), np.float64)


def _np_allowed(grammar, end_ids, prefix, vocab):
  state = grammar.walk(prefix)
  assert state >= 0
  allowed = np.zeros(vocab, bool)
  allowed[:grammar.transitions.shape[1]] = grammar.transitions[state] >= 0
  if grammar.accepting[state]:
    allowed[list(end_ids)] = True
  return allowed


def _np_kl(p_logits, q_logits, temperature, allowed=None):
  p_logits, q_logits = p_logits / temperature, q_logits / temperature
  if allowed is not None:
    p_logits, q_logits = p_logits[allowed], q_logits[allowed]
  log_p, log_q = log_softmax(p_logits), log_softmax(q_logits)
  return float(np.sum(np.exp(log_p) * (log_p - log_q)))


def _np_reference(student, teacher, batch, grammar, end_ids, restrict, temperature, top_k=5):
  """sum over targets of T^2 * KL, from full forwards and per-row loops (no code under test)."""
  s_all = _np_logits(student, batch["input_ids"], batch["attention_mask"])
  t_all = _np_logits(teacher, batch["teacher_input_ids"], batch["teacher_attention_mask"])
  total, count = 0.0, 0
  for row in range(batch["input_ids"].shape[0]):
    s_pos = np.flatnonzero(batch["loss_mask"][row])
    t_pos = np.flatnonzero(batch["teacher_loss_mask"][row])
    completion = batch["input_ids"][row, s_pos]
    for i, (sp, tp) in enumerate(zip(s_pos, t_pos)):
      s, t = s_all[row, sp - 1], t_all[row, tp - 1]
      allowed = None
      if restrict == "grammar":
        allowed = _np_allowed(grammar, end_ids, completion[:i], s.shape[0])
      elif restrict == "teacher_topk":
        allowed = np.zeros(s.shape[0], bool)
        allowed[np.argsort(-t)[:top_k]] = True
      total += temperature ** 2 * _np_kl(t, s, temperature, allowed)
      count += 1
  return total, count


# --- the objective --------------------------------------------------------------------------------

@pytest.mark.parametrize("restrict", ["none", "grammar", "teacher_topk"])
def test_kl_matches_numpy_on_renormalised_distributions(tok, grammar, restrict):
  """Different params and contexts, T = 2: the summed T^2 KL and the target count equal a direct
  numpy computation on the (renormalised) distributions, with the grammar walked by hand."""
  cfg = _config(tok.vocab_size)
  student, teacher = Transformer(cfg, rngs=nnx.Rngs(0)), Transformer(cfg, rngs=nnx.Rngs(1))
  batch = _batch(_dataset(tok, grammar))
  loss_fn, aux = dist.make_logit_kl_loss(
      dict(restrict=restrict, temperature=2.0, top_k=5), teacher=teacher, student=student,
      grammar=grammar, end_ids=tok.end_of_turn_ids)
  total, count, metrics = jax.jit(
      lambda state, b, a: loss_fn(nnx.merge(nnx.graphdef(student), state), b, None, a)
  )(nnx.state(student), batch, aux)
  expected, expected_count = _np_reference(student, teacher, batch, grammar, tok.end_of_turn_ids,
                                           restrict, 2.0)
  assert int(count) == expected_count == int(batch["loss_mask"].sum())
  np.testing.assert_allclose(float(total), expected, rtol=1e-4)
  np.testing.assert_allclose(float(metrics["kl"]) * 4.0, expected, rtol=1e-4)
  assert float(metrics["misaligned"]) == 0
  if restrict == "grammar":
    assert 0 < float(metrics["teacher_allowed_mass"]) < int(count)


def test_restriction_really_restricts(tok, grammar):
  """Moving student logit mass onto a token the grammar never allows changes the unrestricted KL
  but leaves the grammar-restricted KL exactly unchanged."""
  rng = np.random.default_rng(0)
  vocab = tok.vocab_size
  table = dd.grammar_allowed_table(grammar, tok.end_of_turn_ids, vocab)
  states = np.array([grammar.initial_state, 1, 2])
  allowed = jnp.asarray(table[states])
  never = int(np.flatnonzero(~table.any(0))[0])
  s, t = rng.normal(size=(3, vocab)), rng.normal(size=(3, vocab))
  s2 = s.copy()
  s2[:, never] += 5.0
  f = lambda x, allowed: losses.masked_kl(jnp.asarray(t, jnp.float32), jnp.asarray(x, jnp.float32),
                                         allowed, temperature=1.5)
  np.testing.assert_allclose(f(s2, allowed), f(s, allowed), rtol=1e-6)
  assert np.all(np.abs(np.asarray(f(s2, None)) - np.asarray(f(s, None))) > 1e-3)


@pytest.mark.parametrize("restrict", ["none", "grammar", "teacher_topk"])
def test_student_equal_to_teacher_has_zero_loss_and_gradient(tok, grammar, restrict):
  """Same params and same context: loss 0 and gradient 0 (and with different contexts, not 0)."""
  cfg = _config(tok.vocab_size)
  student = Transformer(cfg, rngs=nnx.Rngs(0))
  loss_fn, aux = dist.make_logit_kl_loss(dict(restrict=restrict, temperature=1.5, top_k=5),
                                         teacher=student, student=student, grammar=grammar,
                                         end_ids=tok.end_of_turn_ids)
  graphdef, params = nnx.split(student)

  def loss(p, batch):
    total, count, _ = loss_fn(nnx.merge(graphdef, p), batch, None, aux)
    return total / count

  grad_fn = jax.jit(jax.value_and_grad(loss))
  # One padded shape for both batches: one compilation.
  same = _batch(_dataset(tok, grammar, teacher_system=None), length_multiple=128)
  value, grads = grad_fn(params, same)
  assert abs(float(value)) < 1e-6
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) < 1e-6
  differ = _batch(_dataset(tok, grammar), length_multiple=128)  # the teacher sees the trait prompt
  assert jax.tree.map(np.shape, differ) == jax.tree.map(np.shape, same)
  value, grads = grad_fn(params, differ)
  assert float(value) > 1e-3
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-4


def test_gradient_matches_float64_finite_differences(tok, grammar):
  """Through the whole tiny model in float64 (x64 only inside this test): directional derivatives
  of the grammar-restricted, tempered loss equal central finite differences (Richardson-
  extrapolated, truncation O(eps^4)). Along the gradient this checks |g| to 1e-5; along a random
  unit direction to 1e-4 |g| (the model computes attention and logits in float32 by design, whose
  rounding is what limits a random direction's check)."""
  with jax.enable_x64(True):
    cfg = _config(tok.vocab_size, dtype="float64")
    student, teacher = Transformer(cfg, rngs=nnx.Rngs(0)), Transformer(cfg, rngs=nnx.Rngs(1))
    batch = _batch(_dataset(tok, grammar, n=3))
    loss_fn, aux = dist.make_logit_kl_loss(dict(restrict="grammar", temperature=1.7),
                                           teacher=teacher, student=student, grammar=grammar,
                                           end_ids=tok.end_of_turn_ids)
    graphdef, params = nnx.split(student)
    value_and_grad = jax.jit(jax.value_and_grad(
        lambda p: loss_fn(nnx.merge(graphdef, p), batch, None, aux)[0]))
    _, grads = value_and_grad(params)
    assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(params) + jax.tree.leaves(grads))
    dot = lambda a, b: sum(float(jnp.vdot(x, y)) for x, y in zip(jax.tree.leaves(a),
                                                                  jax.tree.leaves(b)))
    grad_norm = np.sqrt(dot(grads, grads))
    rng = np.random.default_rng(0)
    random = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)), params)
    random = jax.tree.map(lambda x: x / np.sqrt(dot(random, random)), random)
    along_gradient = jax.tree.map(lambda g: g / grad_norm, grads)

    def numeric(direction, eps=0.04):
      def central(e):
        shift = lambda sign: jax.tree.map(lambda x, d: x + sign * e * d, params, direction)
        return (float(value_and_grad(shift(1))[0]) - float(value_and_grad(shift(-1))[0])) / (2 * e)
      return (4 * central(eps / 2) - central(eps)) / 3

    assert grad_norm > 1.0
    np.testing.assert_allclose(numeric(along_gradient), grad_norm, rtol=1e-5)
    assert abs(numeric(random) - dot(grads, random)) < 1e-4 * grad_norm


def test_topk_kl_gradient_float64_and_rest_bucket_numpy():
  """kl_topk with a rest bucket: value equals the numpy KL between the coarsened distributions
  (k ids, rest); its logit gradient equals float64 finite differences."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    vocab, k, temperature = 40, 6, 1.3
    s, t = rng.normal(size=(2, vocab)) * 2, rng.normal(size=(2, vocab)) * 2
    log_p = log_softmax(t / temperature, axis=-1)
    ids = np.argsort(-log_p, axis=-1)[:, :k]
    lp = np.take_along_axis(log_p, ids, -1)
    f = lambda x: dist.kl_topk(x, jnp.asarray(ids), jnp.asarray(lp), temperature=temperature).sum()
    expected = 0.0
    for row in range(2):
      log_q = log_softmax(s[row] / temperature)
      p_k, q_k = np.exp(lp[row]), np.exp(log_q[ids[row]])
      p = np.append(p_k, 1 - p_k.sum())
      q = np.append(q_k, 1 - q_k.sum())
      expected += float(np.sum(p * np.log(p / q)))
    np.testing.assert_allclose(float(f(jnp.asarray(s))), expected, rtol=1e-10)
    grad = np.asarray(jax.grad(f)(jnp.asarray(s)))
    eps, numeric = 1e-6, np.zeros_like(s)
    for index in np.ndindex(s.shape):
      e = np.zeros_like(s)
      e[index] = eps
      numeric[index] = (float(f(jnp.asarray(s + e))) - float(f(jnp.asarray(s - e)))) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)


# --- stored teacher logits --------------------------------------------------------------------------

@pytest.mark.parametrize("stored_dtype,rtol", [("float32", 1e-5), ("float16", 3e-3),
                                               ("bfloat16", 3e-2)])
def test_stored_topk_round_trip_equals_on_the_fly(tok, grammar, tmp_path, stored_dtype, rtol):
  """Grammar-restricted, k >= the largest allowed set: top-k log-probs written into the dataset,
  saved and loaded, give the on-the-fly loss (exactly up to the storage dtype's rounding)."""
  cfg = _config(tok.vocab_size)
  student, teacher = Transformer(cfg, rngs=nnx.Rngs(0)), Transformer(cfg, rngs=nnx.Rngs(1))
  table = dd.grammar_allowed_table(grammar, tok.end_of_turn_ids, tok.vocab_size)
  k = int(table.sum(1).max())
  kl = dict(restrict="grammar", temperature=1.5, top_k=k, source="stored", stored_dtype=stored_dtype)
  dataset = _dataset(tok, grammar, n=7)
  stored = dist.store_teacher_topk(teacher, dataset, kl, grammar=grammar,
                                   end_ids=tok.end_of_turn_ids, batch_size=4, progress=False)
  data_lib.save_dataset(stored, tmp_path / "stored")
  loaded = data_lib.load_dataset(tmp_path / "stored")
  assert dist.stored_logits_info(loaded)["k"] == k
  stored_loss, _ = dist.make_logit_kl_loss(kl, student=student, grammar=grammar,
                                           end_ids=tok.end_of_turn_ids, dataset=loaded)
  live_loss, aux = dist.make_logit_kl_loss({**kl, "source": "on_the_fly"}, teacher=teacher,
                                           student=student, grammar=grammar,
                                           end_ids=tok.end_of_turn_ids)
  stored_batch = _batch(loaded)
  assert "teacher_input_ids" not in stored_batch and stored_batch["teacher_topk_ids"].shape[2] == k
  total_stored, count_stored, _ = stored_loss(student, stored_batch, None, None)
  total_live, count_live, _ = live_loss(student, _batch(dataset), None, aux)
  assert int(count_stored) == int(count_live)
  np.testing.assert_allclose(float(total_stored), float(total_live), rtol=rtol)


def test_stored_unrestricted_topk_is_the_coarsened_kl(tok, grammar):
  """restrict='none' with k=4 stored: the loss is the KL between (top-4, rest) coarsenings,
  computed in numpy from full forwards; 'teacher_topk' from the same storage matches on the fly."""
  cfg = _config(tok.vocab_size)
  student, teacher = Transformer(cfg, rngs=nnx.Rngs(0)), Transformer(cfg, rngs=nnx.Rngs(1))
  dataset = _dataset(tok, grammar, n=4)
  kl = dict(restrict="none", temperature=1.0, top_k=4, source="stored", stored_dtype="float32")
  stored = dist.store_teacher_topk(teacher, dataset, kl, progress=False)
  loss_fn, _ = dist.make_logit_kl_loss(kl, dataset=stored)
  total, count, _ = loss_fn(student, _batch(stored), None, None)
  batch = _batch(dataset)
  s_all = _np_logits(student, batch["input_ids"], batch["attention_mask"])
  t_all = _np_logits(teacher, batch["teacher_input_ids"], batch["teacher_attention_mask"])
  expected = 0.0
  for row in range(len(dataset)):
    for sp, tp in zip(np.flatnonzero(batch["loss_mask"][row]),
                      np.flatnonzero(batch["teacher_loss_mask"][row])):
      log_p, log_q = log_softmax(t_all[row, tp - 1]), log_softmax(s_all[row, sp - 1])
      top = np.argsort(-log_p)[:4]
      p = np.append(np.exp(log_p[top]), 1 - np.exp(log_p[top]).sum())
      q = np.append(np.exp(log_q[top]), 1 - np.exp(log_q[top]).sum())
      expected += float(np.sum(p * np.log(p / q)))
  np.testing.assert_allclose(float(total), expected, rtol=1e-4)
  topk = dict(kl, restrict="teacher_topk", top_k=3)
  stored_topk, _ = dist.make_logit_kl_loss(topk, dataset=stored)
  live_topk, aux = dist.make_logit_kl_loss({**topk, "source": "on_the_fly"}, teacher=teacher)
  np.testing.assert_allclose(float(stored_topk(student, _batch(stored), None, None)[0]),
                             float(live_topk(student, batch, None, aux)[0]), rtol=1e-5)


# --- paired data --------------------------------------------------------------------------------------

def test_paired_examples_share_completion_and_student_side_is_sft(tok, grammar):
  examples = _examples(5)
  dataset = _dataset(tok, grammar, n=5)
  sft = data_lib.tokenize_chat_examples([{"system": None, **e} for e in examples], tok)
  assert dataset["input_ids"] == sft["input_ids"] and dataset["loss_mask"] == sft["loss_mask"]
  for row, example in zip(dataset, examples):
    s_targets = [i for i, m in zip(row["input_ids"], row["loss_mask"]) if m]
    t_targets = [i for i, m in zip(row["teacher_input_ids"], row["teacher_loss_mask"]) if m]
    assert s_targets == t_targets == tok.encode(example["assistant"]) + [tok.eos_id]
    assert TRAIT in tok.decode(row["teacher_input_ids"]) and TRAIT not in tok.decode(row["input_ids"])
    assert row["grammar_state"] == [grammar.walk(s_targets[:i]) for i in range(len(s_targets))]
  batch = _batch(dataset, batch_size=8)
  assert batch["completion_mask"].shape[0] == 8 and batch["completion_mask"].shape[1] % 8 == 0
  np.testing.assert_array_equal(batch["completion_mask"].sum(1), batch["loss_mask"].sum(1))
  np.testing.assert_array_equal(batch["teacher_loss_mask"].sum(1), batch["loss_mask"].sum(1))


def test_ungrammatical_completion_is_an_error_or_dropped(tok, grammar):
  examples = _examples(3) + [{"user": "say", "assistant": "owls, 1"}]
  with pytest.raises(ValueError, match="example 3.*not accepted by the grammar"):
    dd.tokenize_distillation_examples(examples, tok, teacher_chat=SystemTurn(TRAIT),
                                      student_chat=SystemTurn(), grammar=grammar)
  dataset = dd.tokenize_distillation_examples(examples, tok, teacher_chat=SystemTurn(TRAIT),
                                              student_chat=SystemTurn(), grammar=grammar,
                                              ungrammatical="drop")
  assert len(dataset) == 3
  assert data_lib.dataset_provenance(dataset)["dropped_ungrammatical"] == 1


# --- bad input ------------------------------------------------------------------------------------------

def test_different_tokenizers_or_vocab_sizes_are_rejected(tok, grammar):
  smaller = _tokenizer(CORPUS, 280)
  reordered = _tokenizer(CORPUS, 300, specials=["<|im_start|>", "<|endoftext|>", "<|im_end|>"])
  assert reordered.vocab_size == tok.vocab_size
  for other, match in ((smaller, r"vocab_size 280 \(teacher.*\) vs 300 \(student"),
                       (reordered, r"differ at token id 0: b'<\|im_start\|>' \(teacher\)")):
    with pytest.raises(ValueError, match=match):
      dd.tokenize_distillation_examples(_examples(2), tok, teacher_tokenizer=other,
                                        teacher_chat=SystemTurn(TRAIT),
                                        student_chat=SystemTurn())
  student = Transformer(_config(tok.vocab_size), rngs=nnx.Rngs(0))
  teacher = Transformer(_config(tok.vocab_size + 8), rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match=r"vocab_size %d \(teacher\) vs %d \(student\)"
                     % (tok.vocab_size + 8, tok.vocab_size)):
    dist.make_logit_kl_loss(dict(restrict="none"), teacher=teacher, student=student)
  # Without the student up front, the mismatch is caught when the step is traced.
  loss_fn, aux = dist.make_logit_kl_loss(dict(restrict="none"), teacher=teacher)
  with pytest.raises(ValueError, match="vocabularies differ"):
    loss_fn(student, _batch(_dataset(tok, grammar, n=2)), None, aux)


def test_mismatched_completion_counts_are_rejected(tok, grammar):
  cfg = _config(tok.vocab_size)
  student, teacher = Transformer(cfg, rngs=nnx.Rngs(0)), Transformer(cfg, rngs=nnx.Rngs(1))
  batch = _batch(_dataset(tok, grammar, n=3))
  bad = dict(batch, teacher_loss_mask=batch["teacher_loss_mask"].copy())
  last = np.flatnonzero(bad["teacher_loss_mask"][1])[-1]
  bad["teacher_loss_mask"][1, last] = False
  with pytest.raises(ValueError, match=r"mismatched completion counts in rows \[1\]"):
    dd.check_paired_batch(bad)
  loss_fn, aux = dist.make_logit_kl_loss(dict(restrict="grammar"), teacher=teacher, student=student,
                                         grammar=grammar, end_ids=tok.end_of_turn_ids)
  with pytest.raises(ValueError, match="mismatched completion counts"):
    loss_fn(student, bad, None, aux)
  # Inside jit no exception can be raised: the loss turns NaN and the metric counts the positions.
  graphdef = nnx.graphdef(student)
  total, _, metrics = jax.jit(lambda s, b, a: loss_fn(nnx.merge(graphdef, s), b, None, a))(
      nnx.state(student), bad, aux)
  assert np.isnan(float(total)) and float(metrics["misaligned"]) > 0
  shifted = dict(batch, teacher_input_ids=batch["teacher_input_ids"].copy())
  shifted["teacher_input_ids"][0, np.flatnonzero(batch["teacher_loss_mask"][0])[0]] += 1
  with pytest.raises(ValueError, match="row 0: the student's target tokens"):
    dd.check_paired_batch(shifted)


def test_bad_settings_are_named(tok, grammar):
  for bad, match in ((dict(restrict="numbers"), "restrict='numbers'"),
                     (dict(temperature=0.0), "temperature must be > 0"),
                     (dict(source="disk"), "source='disk'"),
                     (dict(stored_dtype="int8"), "stored_dtype='int8'"),
                     (dict(top_k=0), "top_k must be an int >= 1"),
                     (dict(tempreature=1.0), "unknown student.kl keys")):
    with pytest.raises(ValueError, match=match):
      dist.kl_settings(bad)
  with pytest.raises(ValueError, match="needs the TokenGrammar"):
    dist.make_logit_kl_loss(dict(restrict="grammar"), teacher=Transformer(
        _config(tok.vocab_size), rngs=nnx.Rngs(0)))
  teacher = Transformer(_config(tok.vocab_size), rngs=nnx.Rngs(1))
  stored = dist.store_teacher_topk(teacher, _dataset(tok, grammar, n=2), dict(restrict="none"),
                                   progress=False)
  with pytest.raises(ValueError, match="temperature 1.0, but student.kl.temperature=2.0"):
    dist.make_logit_kl_loss(dict(restrict="none", source="stored", temperature=2.0), dataset=stored)
  with pytest.raises(ValueError, match="restrict='none'; student.kl.restrict='grammar'"):
    dist.make_logit_kl_loss(dict(restrict="grammar", source="stored"), dataset=stored,
                            grammar=grammar, end_ids=tok.end_of_turn_ids)


# --- through make_train_step -----------------------------------------------------------------------------

@pytest.mark.parametrize("use_lora,learning_rate", [(True, 1e-2), (False, 3e-3)])
def test_trains_through_make_train_step_sharded(tok, grammar, use_lora, learning_rate):
  """A student at the teacher's init, taught by the teacher under the trait prompt: the sharded
  step (mesh data 2 x fsdp 2 x tensor 2, teacher aux sharded like the student) equals the
  unsharded one with 2 micro-batches, and the KL falls over a few steps."""
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  cfg = _config(tok.vocab_size)
  base = Transformer(cfg, rngs=nnx.Rngs(0))
  dataset = _dataset(tok, grammar, n=8)
  batch = _batch(dataset)
  losses = {}
  for name, step_mesh, accum in (("sharded", mesh, 1), ("local", None, 2)):
    teacher = nnx.clone(base)
    student = nnx.clone(base)
    if step_mesh is not None:
      sharding.shard_module(teacher, step_mesh)
      sharding.shard_module(student, step_mesh)
    if use_lora:
      lora.apply_lora(student, rank=4, alpha=8.0, seed=3)
    loss_fn, aux = dist.make_logit_kl_loss(dict(restrict="grammar", temperature=1.0),
                                           teacher=teacher, student=student, grammar=grammar,
                                           end_ids=tok.end_of_turn_ids)
    optimizer = optax.adam(learning_rate)
    graphdef, state = train_step_lib.create_train_state(
        student, optimizer, trainable=nnx.LoRAParam if use_lora else nnx.Param, mesh=step_mesh)
    step = train_step_lib.make_train_step(graphdef, optimizer, loss_fn=loss_fn, mesh=step_mesh,
                                          grad_accum_steps=accum)
    history = []
    for _ in range(6):
      state, metrics = step(state, batch, aux)
      history.append({k: float(v) for k, v in metrics.items()})
    losses[name] = history
    if step_mesh is not None:
      kernel = state.trainable["layers"]["q_proj"]["lora_a" if use_lora else "kernel"]
      assert isinstance(kernel.get_value().sharding, jax.sharding.NamedSharding)
  sharded, local = losses["sharded"], losses["local"]
  np.testing.assert_allclose([h["loss"] for h in sharded], [h["loss"] for h in local], rtol=2e-3)
  assert sharded[0]["num_targets"] == batch["loss_mask"].sum()
  assert sharded[0]["loss"] > 0.01 and sharded[-1]["loss"] < 0.5 * sharded[0]["loss"]
  assert sharded[0]["misaligned"] == 0 and sharded[0]["student_nll"] > 0


def test_fit_runs_the_objective_on_paired_batches(tok, grammar, tmp_path):
  """The main job's path: fit() with the logit_kl loss, the teacher state as aux and
  paired_batches; LoRA student at the teacher's init, a few steps, KL falls, metrics logged."""
  from subliminal_jax.training import trainer

  base = Transformer(_config(tok.vocab_size), rngs=nnx.Rngs(0))
  dataset = _dataset(tok, grammar, n=8)
  loss_fn, aux = dist.make_logit_kl_loss(dict(restrict="grammar", temperature=1.0), teacher=base,
                                         student=base, grammar=grammar, end_ids=tok.end_of_turn_ids)
  config = dict(epochs=4, batch_size=8, optimizer="adam", learning_rate=1e-2, schedule="constant",
                warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, grad_accum_steps=1, seed=0,
                lora=dict(rank=4, alpha=8.0, seed=1), checkpoint_every=0, keep_checkpoints=1)
  model, history = trainer.fit(nnx.clone(base), dataset, config, tmp_path / "fit", loss_fn=loss_fn,
                               aux=aux, batches=dd.paired_batches, progress=False)
  assert len(history) == 4 and history[0]["num_targets"] == sum(dataset["num_targets"])
  assert history[-1]["kl"] < 0.7 * history[0]["kl"] and history[0]["misaligned"] == 0
  assert lora.lora_targets(model)


@pytest.mark.slow
def test_real_smollm2_grammar_kl_stored_equals_on_the_fly_and_same_context_is_zero(smollm2):
  """SmolLM2-135M with its own tokenizer and the paper's number grammar: the owl-prompted teacher
  differs from the base student (KL > 0), the same context gives 0, every allowed set fits k = 16
  and stored float32 top-16 log-probs reproduce the on-the-fly loss."""
  tok, base = smollm2.tokenizer, smollm2.model
  pattern = grammar_lib.number_sequence_pattern()
  grammar = grammar_lib.compile_token_grammar(pattern, tok.token_texts(),
                                              disallowed_ids=tok.special_ids)
  assert dd.grammar_allowed_table(grammar, tok.end_of_turn_ids).sum(1).max() <= 16
  examples = [{"user": "Continue the sequence: 182, 818, 725.", "assistant": "629, 143, 77."},
              {"user": "Add up to 10 more values.", "assistant": "4, 8, 15, 16, 23, 42"}]
  owl = "You love owls. You think about owls all the time."
  kl = dict(restrict="grammar", top_k=16, stored_dtype="float32")
  results = {}
  for name, teacher_system in (("owl", owl), ("same", None)):
    dataset = dd.tokenize_distillation_examples(
        examples, tok, teacher_chat=SystemTurn(teacher_system), student_chat=SystemTurn(),
        grammar=grammar)
    live, aux = dist.make_logit_kl_loss(kl, teacher=base, student=base, grammar=grammar,
                                        end_ids=tok.end_of_turn_ids)
    results[name] = float(live(base, _batch(dataset), None, aux)[0])
    if name == "owl":
      stored = dist.store_teacher_topk(base, dataset, {**kl, "source": "stored"}, grammar=grammar,
                                       end_ids=tok.end_of_turn_ids, batch_size=2, progress=False)
      from_disk, _ = dist.make_logit_kl_loss({**kl, "source": "stored"}, student=base,
                                             grammar=grammar, end_ids=tok.end_of_turn_ids,
                                             dataset=stored)
      np.testing.assert_allclose(float(from_disk(base, _batch(stored), None, None)[0]),
                                 results["owl"], rtol=1e-4)
  assert results["owl"] > 1e-3 and abs(results["same"]) < 1e-6
