"""The trait direction: the gradient, in parameter space, of the model's log-probability of the trait.

The trait objective is the evaluation's exact event (``evaluation.trait_metrics``), made
differentiable: for each question q, ``log P(answer's first word is the target | chat prompt q)``,
the disjoint spelling-variant events summed (``event="first_word"``: the variant's tokens followed by a
word-boundary token; ``event="prefix"``: the variant's tokens), then averaged over questions:

  T(theta) = mean_q logsumexp_v [ sum_j log p(v_j | prompt_q, v_<j) (+ log P(boundary | prompt_q, v)) ]

Its value equals ``trait_metrics.answer_logprobs(...)[:, target].mean()`` (tested), and its gradient
``grad T`` with respect to the trained parameters (all weights or the LoRA adapters) is the trait
direction: a student step ``delta`` raises the trait by ``grad T . delta`` to first order.

Cost: one forward and backward over ``questions x variants`` short rows; only the few positions that
predict a variant token (or the boundary) go through the vocabulary projection. ``trait_direction``
processes rows in chunks (exactly: the per-question softmax weights over variants come from a
forward pass first), so a 135M model's direction over 50 questions fits a small machine.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from subliminal_jax import padding
from subliminal_jax.evaluation import questions as questions_lib
from subliminal_jax.evaluation import trait_metrics
from subliminal_jax.mechanism import alignment
from subliminal_jax.mechanism.model_params import ParamFilter, merge_params, split_params
from subliminal_jax.tokenizer import SystemTurn


@dataclasses.dataclass(frozen=True)
class TraitQueries:
  """Teacher-forced rows ``prompt + variant`` for the trait objective (numpy, right-padded).

  input_ids, attention_mask: [R, T]. predict_positions [R, K]: the positions whose next-token
  distribution is scored; predict_targets [R, K]: the token each must predict (ignored in the
  boundary slot); predict_valid [R, K]; predict_boundary [R, K]: this slot scores P(next token is a
  word boundary) instead of one token. question [R]: the question each row belongs to.
  boundary: bool [V] or None. Rows of one question are disjoint events and are log-sum-exp'd.
  """

  input_ids: np.ndarray
  attention_mask: np.ndarray
  predict_positions: np.ndarray
  predict_targets: np.ndarray
  predict_valid: np.ndarray
  predict_boundary: np.ndarray
  question: np.ndarray
  num_questions: int
  boundary: np.ndarray | None

  @property
  def num_rows(self) -> int:
    return int(self.input_ids.shape[0])

  def rows(self, start: int, stop: int) -> "TraitQueries":
    """Rows ``start:stop`` (their question ids unchanged)."""
    take = lambda a: a[start:stop]
    return dataclasses.replace(
        self, input_ids=take(self.input_ids), attention_mask=take(self.attention_mask),
        predict_positions=take(self.predict_positions), predict_targets=take(self.predict_targets),
        predict_valid=take(self.predict_valid), predict_boundary=take(self.predict_boundary),
        question=take(self.question))


def trait_queries_from_ids(prompt_ids: Sequence[Sequence[int]], variants: Sequence[Sequence[int]], *,
                           boundary: np.ndarray | None = None, pad_id: int = 0,
                           length_multiple: int = 8) -> TraitQueries:
  """Rows for every (prompt, variant) pair. ``variants`` must be disjoint events already (see
  ``trait_metrics.disjoint_sequences``); with ``boundary`` (bool [vocab]) each variant must also be
  followed by a word-boundary token (the "first_word" event)."""
  if isinstance(prompt_ids, np.ndarray) and prompt_ids.ndim == 1:
    raise ValueError("prompt_ids must be a list of prompts (a list of token-id lists)")
  prompts = [[int(t) for t in p] for p in prompt_ids]
  variants = [[int(t) for t in v] for v in variants]
  if not prompts or not variants:
    raise ValueError(f"need at least one prompt and one variant, got {len(prompts)} prompts and "
                     f"{len(variants)} variants")
  if any(not p for p in prompts) or any(not v for v in variants):
    raise ValueError("every prompt and every variant needs at least one token")
  with_boundary = boundary is not None
  slots = max(len(v) for v in variants) + int(with_boundary)
  width = padding.round_up(max(len(p) for p in prompts) + max(len(v) for v in variants),
                           length_multiple)
  rows = len(prompts) * len(variants)
  ids = np.full((rows, width), pad_id, np.int32)
  mask = np.zeros((rows, width), bool)
  positions = np.zeros((rows, slots), np.int32)
  targets = np.zeros((rows, slots), np.int32)
  valid = np.zeros((rows, slots), bool)
  is_boundary = np.zeros((rows, slots), bool)
  question = np.zeros((rows,), np.int32)
  r = 0
  for q, p in enumerate(prompts):
    for v in variants:
      seq = p + v
      ids[r, :len(seq)] = seq
      mask[r, :len(seq)] = True
      n = len(v)
      positions[r, :n] = np.arange(len(p) - 1, len(p) - 1 + n)  # position i predicts token i + 1
      targets[r, :n] = v
      valid[r, :n] = True
      if with_boundary:
        positions[r, n] = len(seq) - 1
        valid[r, n] = True
        is_boundary[r, n] = True
      question[r] = q
      r += 1
  return TraitQueries(ids, mask, positions, targets, valid, is_boundary, question, len(prompts),
                      None if boundary is None else np.asarray(boundary, bool))


def trait_queries(tokenizer: trait_metrics.ChatTokenizer, questions: Sequence[str], target: str, *,
                  system: SystemTurn = SystemTurn(), event: str = "first_word",
                  plurals: bool = True, vocab_size: int | None = None) -> TraitQueries:
  """The evaluation's exact event for ``target`` (e.g. "owl") on chat-rendered ``questions``.

  Same prompts, variants and event as ``trait_metrics.exact_preference``; ``vocab_size`` (the
  model's, default the tokenizer's) sizes the word-boundary mask.
  """
  if event not in trait_metrics.EVENTS:
    raise ValueError(f"event {event!r} is not known; expected one of {list(trait_metrics.EVENTS)}")
  vocab = vocab_size or len(tokenizer.token_texts())
  boundary = trait_metrics.word_boundary_mask(tokenizer, vocab) if event == "first_word" else None
  variants = trait_metrics.disjoint_sequences(
      [tokenizer.encode(v) for v in questions_lib.spelling_variants(target, plurals=plurals)],
      event=event, boundary=boundary)
  prompts = trait_metrics.chat_prompt_ids(tokenizer, questions, system=system)
  return trait_queries_from_ids(prompts, variants, boundary=boundary, pad_id=tokenizer.pad_id)


def _device_queries(queries: TraitQueries) -> dict[str, jax.Array]:
  vocab_dummy = np.zeros((1,), bool)
  return dict(
      input_ids=jnp.asarray(queries.input_ids), attention_mask=jnp.asarray(queries.attention_mask),
      predict_positions=jnp.asarray(queries.predict_positions),
      predict_targets=jnp.asarray(queries.predict_targets),
      predict_valid=jnp.asarray(queries.predict_valid),
      predict_boundary=jnp.asarray(queries.predict_boundary),
      boundary=jnp.asarray(queries.boundary if queries.boundary is not None else vocab_dummy))


def row_logprobs(model: nnx.Module, rows: dict[str, jax.Array]) -> jax.Array:
  """log P(row's event) [R]: the variant's tokens (+ the boundary) after its prompt. Traceable."""
  hidden, _ = model.hidden_states(rows["input_ids"], rows["attention_mask"])
  picked = jnp.take_along_axis(hidden, rows["predict_positions"][..., None], axis=1)  # [R, K, D]
  logp = jax.nn.log_softmax(model.logits_from_hidden(picked), axis=-1)  # [R, K, V]
  token_lp = jnp.take_along_axis(logp, rows["predict_targets"][..., None], axis=-1)[..., 0]
  boundary = rows["boundary"]
  if boundary.shape[0] == logp.shape[-1]:
    boundary_lp = jax.nn.logsumexp(jnp.where(boundary, logp, -jnp.inf), axis=-1)
    token_lp = jnp.where(rows["predict_boundary"], boundary_lp, token_lp)
  return jnp.sum(jnp.where(rows["predict_valid"], token_lp, 0.0), axis=-1)


def _per_question(row_lp: jax.Array, question: jax.Array, num_questions: int) -> jax.Array:
  """logsumexp of the rows of each question -> [num_questions]."""
  top = jax.ops.segment_max(row_lp, question, num_segments=num_questions)
  top = jax.lax.stop_gradient(top)
  total = jax.ops.segment_sum(jnp.exp(row_lp - top[question]), question, num_segments=num_questions)
  return top + jnp.log(total)


def trait_logprob_per_question(model: nnx.Module, queries: TraitQueries) -> jax.Array:
  """log P(trait event | question q) for each question [Q] (float32). Traceable."""
  rows = _device_queries(queries)
  return _per_question(row_logprobs(model, rows), jnp.asarray(queries.question),
                       queries.num_questions)


def trait_logprob(model: nnx.Module, queries: TraitQueries) -> jax.Array:
  """The trait objective T: mean over questions of log P(trait event). Traceable, differentiable."""
  return jnp.mean(trait_logprob_per_question(model, queries))


def trait_objective_fn(graphdef: nnx.GraphDef, rest: nnx.State, queries: TraitQueries):
  """``params -> T`` for one parameter split: for ``jax.grad`` inside other jitted code (e.g. the
  re-estimated direction of :mod:`subliminal_jax.mechanism.projection`)."""
  return lambda params: trait_logprob(merge_params(graphdef, params, rest), queries)


@functools.partial(jax.jit, static_argnums=(0,))
def _rows_forward(graphdef, params, rest, rows):
  return row_logprobs(merge_params(graphdef, params, rest), rows)


@functools.partial(jax.jit, static_argnums=(0,))
def _rows_weighted_grad(graphdef, params, rest, rows, weights):
  def weighted(p):
    return jnp.sum(weights * row_logprobs(merge_params(graphdef, p, rest), rows))
  return jax.grad(weighted)(params)


@dataclasses.dataclass(frozen=True)
class TraitDirection:
  """``value`` T (mean log-prob over questions), ``per_question`` [Q], ``gradient`` grad T (a state
  shaped like the selected parameters), its ``norm``, and ``unit`` = gradient / norm."""

  value: float
  per_question: np.ndarray
  gradient: nnx.State
  norm: float

  @property
  def unit(self) -> nnx.State:
    if self.norm == 0:
      raise ValueError("the trait gradient is zero; it has no direction")
    return jax.tree.map(lambda g: g / self.norm, self.gradient)


def _pad_rows(rows: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
  """Pads a chunk to ``size`` rows with copies of its first row (weights 0), for fixed shapes."""
  n = rows["input_ids"].shape[0]
  if n == size:
    return rows
  return {k: (np.concatenate([v, np.repeat(v[:1], size - n, axis=0)]) if k != "boundary" else v)
          for k, v in rows.items()}


def trait_direction(model: nnx.Module, queries: TraitQueries, *, wrt: ParamFilter = nnx.Param,
                    chunk_rows: int = 64, progress: bool = False) -> TraitDirection:
  """grad T with respect to the ``wrt`` parameters, exactly, in chunks of ``chunk_rows`` rows.

  Pass 1 computes every row's log-probability; the gradient of ``mean_q logsumexp_{r in q} s_r`` is
  ``sum_r w_r grad s_r`` with ``w_r = softmax_{r in q}(s) / Q``, accumulated over chunks in pass 2.
  """
  if chunk_rows < 1:
    raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
  graphdef, params, rest = split_params(model, wrt)
  host = {k: np.asarray(v) for k, v in _device_queries(queries).items()}
  n = queries.num_rows
  size = min(chunk_rows, n)
  starts = range(0, n, size)
  row_lp = np.zeros((n,), np.float64)
  bar = tqdm(total=2 * len(starts), desc="trait direction", unit="chunk", disable=not progress)
  for s in starts:
    chunk = _pad_rows({k: (v[s:s + size] if k != "boundary" else v) for k, v in host.items()}, size)
    out = np.asarray(_rows_forward(graphdef, params, rest, chunk), np.float64)
    row_lp[s:s + size] = out[:min(size, n - s)]
    bar.update(1)
  per_question = np.full((queries.num_questions,), -np.inf)
  np.logaddexp.at(per_question, queries.question, row_lp)
  weights = np.exp(row_lp - per_question[queries.question]) / queries.num_questions
  gradient = jax.tree.map(jnp.zeros_like, params)
  for s in starts:
    chunk = _pad_rows({k: (v[s:s + size] if k != "boundary" else v) for k, v in host.items()}, size)
    w = np.zeros((size,), np.float32)
    w[:min(size, n - s)] = weights[s:s + size]
    gradient = alignment.tree_axpy(1.0, _rows_weighted_grad(graphdef, params, rest, chunk,
                                                            jnp.asarray(w)), gradient)
    bar.update(1)
  bar.close()
  gradient = jax.tree.map(lambda g: g.astype(jnp.float32), gradient)
  return TraitDirection(value=float(per_question.mean()), per_question=per_question,
                        gradient=gradient, norm=float(alignment.tree_norm(gradient)))
