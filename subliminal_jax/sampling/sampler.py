"""Batched KV-cache sampling under ``jax.jit``, with logit processors, grammars and a reference.

``sample`` runs one jitted program per (batch size, prompt-length bucket, max_new_tokens, settings
that change the program): a prefill (one forward over the left-padded prompts that fills the KV
cache and gives the first next-token logits), then a ``jax.lax.while_loop`` of one-token decode
steps that stops as soon as every row has emitted an end token. Nothing returns to the host until
the batch is done.

Randomness: row b draws step t with the key ``fold_in(fold_in(key(seed), sample_ids[b]), t)``, so
a sample depends only on (prompt, sample id, seed, settings), not on the batch it shares, its
position in it, the padding, or the number of devices.

Each row gets, per generated token:

* ``logprobs``: log-probability of the token under the *final processed* distribution it was
  drawn from (hard masks, temperature, top-k, top-p, min-p; the divergence ban if on). Greedy
  decoding (temperature 0) draws from a point mass: 0.
* ``model_logprobs``: log-probability under the *raw* model distribution at temperature 1 over
  the whole vocabulary (no mask, no filter), what the model itself assigns.

End tokens: a row ends at its first token in ``end_token_ids``; that token is kept in ``tokens``
and counted in ``lengths``; later positions hold ``pad_id``. With a grammar, end tokens are
allowed exactly in accepting states. If the hard masks leave a row no token at all (banned ids
that remove every token a grammar state allows), the row emits ``end_token_ids[0]``, ends, and is
flagged in ``forced_end`` (its ``logprobs`` entry is 0, never NaN).

With ``mesh``, the batch is sharded over the mesh's data-parallel axes and the parameters are
placed by their logical axes (``sharding.state_shardings``); the batch is padded internally to a
multiple of the data-parallel size.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from subliminal_jax import sharding
from subliminal_jax.sampling import divergence as divergence_lib
from subliminal_jax.sampling import logit_processors as lp

__all__ = ["SampleOutput", "sample", "generate_chat", "prompt_bucket_length", "DEFAULT_PROMPT_BUCKET"]

# Prompt lengths are padded up to a multiple of this, so varying prompts reuse one compilation.
DEFAULT_PROMPT_BUCKET = 32


@dataclasses.dataclass(frozen=True)
class SampleOutput:
  """What ``sample`` returns (host numpy arrays, one row per prompt row).

  Positions at and after ``lengths[b]`` hold ``pad_id`` in ``tokens`` and 0 in the float fields.
  """

  tokens: np.ndarray  # int32 [B, N]: generated tokens, the end token (if any) included, then pad
  logprobs: np.ndarray  # float32 [B, N]: under the final processed (sampling) distribution
  model_logprobs: np.ndarray  # float32 [B, N]: under the raw temperature-1 model distribution
  lengths: np.ndarray  # int32 [B]: generated tokens, end token included
  ended: np.ndarray  # bool [B]: emitted an end token (False: stopped at max_new_tokens)
  forced_end: np.ndarray  # bool [B]: ended because the hard masks allowed no token
  num_steps: int  # decode steps actually run (< N when every row ended early)
  # With a reference model (see subliminal_jax.sampling.divergence for the definitions):
  divergent: np.ndarray | None = None  # bool [B, N]: teacher and reference argmax differ
  kl_raw: np.ndarray | None = None  # float32 [B, N]: KL(teacher || reference), raw T=1, full vocab
  kl_allowed: np.ndarray | None = None  # float32 [B, N]: the same on the allowed set, renormalised
  num_masked: np.ndarray | None = None  # int32 [B]: divergent choices banned (mask_divergent)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Everything that changes the traced program (the jit cache key besides shapes and models)."""

  max_new_tokens: int
  end_token_ids: tuple[int, ...]
  pad_id: int
  greedy: bool
  top_k: int
  use_top_p: bool
  use_min_p: bool
  use_banned: bool
  use_grammar: bool
  use_reference: bool
  mask_divergent: bool


def prompt_bucket_length(length: int, bucket: int = DEFAULT_PROMPT_BUCKET) -> int:
  """``length`` rounded up to a multiple of ``bucket``."""
  return -(-length // bucket) * bucket


# --------------------------------------------------------------------------------------------
# The jitted program


def _constrain_cache(cache):
  return dataclasses.replace(
      cache,
      k=sharding.constrain(cache.k, ("layers", "batch", "seq", "kv_heads", None)),
      v=sharding.constrain(cache.v, ("layers", "batch", "seq", "kv_heads", None)),
      key_mask=sharding.constrain(cache.key_mask, ("batch", "seq")))


def _prefill(model, ids, mask, cache_length):
  cache = _constrain_cache(model.init_cache(ids.shape[0], cache_length))
  hidden, cache = model.hidden_states(ids, mask, cache=cache)
  # Left padding puts every row's last prompt token in the last column: project only that one.
  return model.logits_from_hidden(hidden[:, -1:])[:, 0], cache


def _decode(model, cache, token, live):
  hidden, cache = model.hidden_states(token[:, None], live[:, None], cache=cache)
  return model.logits_from_hidden(hidden)[:, 0], cache


def _log_prob_of(logits, token):
  picked = jnp.take_along_axis(logits, token[:, None], axis=-1)[:, 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)


# Tokens are drawn by inverse CDF in two levels (blocks of this many tokens, then within the
# block): one uniform per row instead of a Gumbel per vocabulary entry, whose threefry bits cost
# more than the lm_head matmul on a CPU.
_DRAW_BLOCK = 256


def _first_above(cumulative, mass, u):
  """Index of the first entry whose cumulative mass exceeds ``u``; never a zero-mass entry."""
  n = cumulative.shape[-1]
  index = jnp.minimum(jnp.sum(cumulative <= u[:, None], axis=-1), n - 1)
  # Rounding (u at the very top, or a tree-ordered cumsum) could land on a zero-mass entry: move
  # to the nearest positive one at or before it, else after it.
  positions = jnp.arange(n)
  positive = mass > 0
  before = jnp.max(jnp.where(positive & (positions <= index[:, None]), positions, -1), axis=-1)
  after = jnp.min(jnp.where(positive, positions, n), axis=-1)
  ok = jnp.take_along_axis(positive, index[:, None], axis=-1)[:, 0]
  return jnp.where(ok, index, jnp.where(before >= 0, before, after))


def _draw(keys, logits):
  """One token per row from ``softmax(logits)`` (rows with at least one finite logit), and its
  log-probability. Exact inverse-CDF sampling with one uniform per row."""
  batch, vocab = logits.shape
  top = jnp.max(logits, axis=-1)
  weights = jnp.exp(logits - top[:, None])  # exactly 0 at -inf
  num_blocks = -(-vocab // _DRAW_BLOCK)
  blocks = jnp.pad(weights, ((0, 0), (0, num_blocks * _DRAW_BLOCK - vocab)))
  blocks = blocks.reshape(batch, num_blocks, _DRAW_BLOCK)
  block_mass = blocks.sum(-1)
  block_cumulative = jnp.cumsum(block_mass, axis=-1)
  total = block_cumulative[:, -1]
  u = jax.vmap(jax.random.uniform)(keys) * total
  block = _first_above(block_cumulative, block_mass, u)
  mass_before = jnp.take_along_axis(block_cumulative - block_mass, block[:, None], axis=-1)[:, 0]
  within = jnp.take_along_axis(blocks, block[:, None, None], axis=1)[:, 0]
  inner = _first_above(jnp.cumsum(within, axis=-1), within, u - mass_before)
  token = (block * _DRAW_BLOCK + inner).astype(jnp.int32)
  picked = jnp.take_along_axis(logits, token[:, None], axis=-1)[:, 0]
  return token, picked - top - jnp.log(total)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _sample_program(plan: _Plan, graphdef, ref_graphdef, state, ref_state, inputs):
  model = nnx.merge(graphdef, state)
  ref_model = nnx.merge(ref_graphdef, ref_state) if plan.use_reference else None
  ids, mask = inputs["ids"], inputs["mask"]
  batch, n = ids.shape[0], plan.max_new_tokens
  ends = jnp.asarray(plan.end_token_ids, jnp.int32)
  row_keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(inputs["seed"]),
                                                      inputs["sample_ids"])

  def choose(step, logits, ref_logits, done, gstate):
    """One step of token choice for every row, from raw logits [B, V]."""
    allowed = None
    if plan.use_banned:
      allowed = jnp.broadcast_to(inputs["allowed_vocab"][None, :], logits.shape)
    if plan.use_grammar:
      grammar = lp.grammar_allowed(inputs["transitions"], inputs["accepting"], gstate,
                                   plan.end_token_ids)
      allowed = grammar if allowed is None else allowed & grammar
    masked = logits if allowed is None else lp.mask_tokens(logits, allowed)
    result = {}
    if plan.use_reference:
      div = divergence_lib.divergence_step(logits, ref_logits, allowed)
      result.update(divergent=div["divergent"], kl_raw=div["kl_raw"], kl_allowed=div["kl_allowed"])
      if plan.mask_divergent:
        masked = divergence_lib.ban_divergent_choice(masked, div["teacher_argmax"], div["divergent"])
    nonempty = lp.any_allowed(masked)
    masked = jnp.where(nonempty[:, None], masked, 0.0)  # keeps an empty row finite (no NaN)
    if plan.greedy:
      token = jnp.argmax(masked, axis=-1).astype(jnp.int32)
      logprob = jnp.zeros((batch,), jnp.float32)
    else:
      processed = lp.process_logits(
          masked, temperature=inputs["temperature"], top_k=plan.top_k,
          top_p=inputs["top_p"] if plan.use_top_p else None,
          min_p=inputs["min_p"] if plan.use_min_p else None)
      keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, step)
      token, logprob = _draw(keys, processed)
    token = jnp.where(nonempty, token, ends[0])
    logprob = jnp.where(nonempty, logprob, 0.0)
    model_logprob = _log_prob_of(logits, token)
    live = ~done
    token = jnp.where(live, token, plan.pad_id)
    result.update(
        token=token,
        logprob=jnp.where(live, logprob, 0.0),
        model_logprob=jnp.where(live, model_logprob, 0.0),
        live=live,
        forced=live & ~nonempty,
        done=done | (live & jnp.any(token[:, None] == ends[None, :], axis=-1)))
    if plan.use_reference:
      result["divergent"] = result["divergent"] & live
      result["kl_raw"] = jnp.where(live, result["kl_raw"], 0.0)
      result["kl_allowed"] = jnp.where(live, result["kl_allowed"], 0.0)
      result["masked"] = result["divergent"] & plan.mask_divergent
    if plan.use_grammar:
      result["gstate"] = lp.advance_grammar(inputs["transitions"], gstate, token)
    return result

  def record(carry, step, result):
    carry = dict(carry)
    carry["tokens"] = carry["tokens"].at[:, step].set(result["token"])
    carry["logprobs"] = carry["logprobs"].at[:, step].set(result["logprob"])
    carry["model_logprobs"] = carry["model_logprobs"].at[:, step].set(result["model_logprob"])
    carry["lengths"] = carry["lengths"] + result["live"].astype(jnp.int32)
    carry["forced"] = carry["forced"] | result["forced"]
    carry["done"] = result["done"]
    carry["last_token"] = result["token"]
    if plan.use_grammar:
      carry["gstate"] = result["gstate"]
    if plan.use_reference:
      carry["divergent"] = carry["divergent"].at[:, step].set(result["divergent"])
      carry["kl_raw"] = carry["kl_raw"].at[:, step].set(result["kl_raw"])
      carry["kl_allowed"] = carry["kl_allowed"].at[:, step].set(result["kl_allowed"])
      carry["num_masked"] = carry["num_masked"] + result["masked"].astype(jnp.int32)
    carry["step"] = step + 1
    return carry

  logits, cache = _prefill(model, ids, mask, ids.shape[1] + n)
  ref_logits = ref_cache = None
  if plan.use_reference:
    ref_logits, ref_cache = _prefill(ref_model, inputs["ref_ids"], inputs["ref_mask"],
                                     inputs["ref_ids"].shape[1] + n)
  zeros_f = jnp.zeros((batch, n), jnp.float32)
  carry = dict(
      step=jnp.zeros((), jnp.int32),
      tokens=jnp.full((batch, n), plan.pad_id, jnp.int32),
      logprobs=zeros_f, model_logprobs=zeros_f,
      lengths=jnp.zeros((batch,), jnp.int32),
      forced=jnp.zeros((batch,), bool),
      done=jnp.zeros((batch,), bool),
      last_token=jnp.zeros((batch,), jnp.int32),
      cache=cache)
  gstate0 = None
  if plan.use_grammar:
    gstate0 = inputs["initial_state"]
    carry["gstate"] = gstate0
  if plan.use_reference:
    carry.update(divergent=jnp.zeros((batch, n), bool), kl_raw=zeros_f, kl_allowed=zeros_f,
                 num_masked=jnp.zeros((batch,), jnp.int32), ref_cache=ref_cache)
  carry = record(carry, carry["step"], choose(carry["step"], logits, ref_logits, carry["done"], gstate0))

  def cond(carry):
    return (carry["step"] < n) & ~jnp.all(carry["done"])

  def body(carry):
    live = ~carry["done"]
    logits, cache = _decode(model, carry["cache"], carry["last_token"], live)
    ref_logits = None
    carry = dict(carry, cache=cache)
    if plan.use_reference:
      ref_logits, ref_cache = _decode(ref_model, carry["ref_cache"], carry["last_token"], live)
      carry["ref_cache"] = ref_cache
    result = choose(carry["step"], logits, ref_logits, carry["done"], carry.get("gstate"))
    return record(carry, carry["step"], result)

  carry = jax.lax.while_loop(cond, body, carry)
  out = dict(tokens=carry["tokens"], logprobs=carry["logprobs"],
             model_logprobs=carry["model_logprobs"], lengths=carry["lengths"],
             ended=carry["done"], forced_end=carry["forced"],
             num_steps=carry["step"])
  if plan.use_reference:
    out.update(divergent=carry["divergent"], kl_raw=carry["kl_raw"],
               kl_allowed=carry["kl_allowed"], num_masked=carry["num_masked"])
  return out


# --------------------------------------------------------------------------------------------
# Host side: checks, bucketing, placement


def _check_left_padded(ids: np.ndarray, mask: np.ndarray, name: str) -> None:
  if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
    raise ValueError(f"{name}_ids must be a non-empty int array [batch, length], got shape {ids.shape}")
  if mask.shape != ids.shape:
    raise ValueError(f"{name}_mask has shape {mask.shape}, expected the shape of {name}_ids {ids.shape}")
  if not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"{name}_ids must hold integers, got dtype {ids.dtype}")
  empty = np.flatnonzero(~mask.any(1))
  if empty.size:
    raise ValueError(f"{name} rows {empty[:5].tolist()} have no tokens (all-False mask)")
  # Left padding: once a row's mask turns True it stays True.
  not_left = np.flatnonzero((mask[:, :-1] & ~mask[:, 1:]).any(1))
  if not_left.size:
    raise ValueError(f"{name} rows {not_left[:5].tolist()} are not left-padded (mask must be "
                     "False...False True...True); pad prompts on the left")


def _pad_left(ids: np.ndarray, mask: np.ndarray, length: int, pad_id: int):
  extra = length - ids.shape[1]
  if extra < 0:  # only padding columns can be dropped (checked by the caller)
    return ids[:, -extra:], mask[:, -extra:]
  return (np.pad(ids, ((0, 0), (extra, 0)), constant_values=pad_id),
          np.pad(mask, ((0, 0), (extra, 0)), constant_values=False))


def _fit_prompt(ids, mask, name, max_new_tokens, bucket, cache_length, max_positions, pad_id):
  """Left-pads (or trims padding of) a prompt batch to its bucket length; checks it fits."""
  longest = int(mask.sum(1).max())
  if cache_length is not None:
    if longest + max_new_tokens > cache_length:
      raise ValueError(
          f"{name}: the longest prompt has {longest} tokens; with max_new_tokens={max_new_tokens} "
          f"it needs {longest + max_new_tokens} cache slots, more than cache_length={cache_length}")
    length = min(prompt_bucket_length(longest, bucket), cache_length - max_new_tokens)
  else:
    length = prompt_bucket_length(longest, bucket)
  if longest + max_new_tokens > max_positions:
    raise ValueError(
        f"{name}: the longest prompt has {longest} tokens; with max_new_tokens={max_new_tokens} "
        f"that is {longest + max_new_tokens} positions, more than the model's "
        f"max_position_embeddings={max_positions}")
  return _pad_left(ids, mask, length, pad_id)


def _model_vocab(model) -> int:
  return int(model.config.vocab_size)


def _split_model(model, mesh: Mesh | None):
  graphdef, state = nnx.split(model)
  if mesh is not None:
    state = jax.device_put(state, sharding.state_shardings(state, mesh))
  return graphdef, state


def sample(model, prompt_ids, prompt_mask, *, max_new_tokens: int, seed: int,
           sample_ids=None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           min_p: float = 0.0, banned_token_ids: Sequence[int] = (), grammar=None,
           end_token_ids: Sequence[int], reference_model=None, mask_divergent: bool = False,
           mesh: Mesh | None = None, pad_id: int | None = None, reference_prompt_ids=None,
           reference_prompt_mask=None, prompt_bucket: int = DEFAULT_PROMPT_BUCKET,
           cache_length: int | None = None, grammar_initial_states=None) -> SampleOutput:
  """Samples ``max_new_tokens`` (at most) continuations of each left-padded prompt.

  Args:
    model: a :class:`~subliminal_jax.models.transformer.Transformer` (not modified).
    prompt_ids, prompt_mask: left-padded int ``[B, P]`` and bool ``[B, P]``.
    max_new_tokens: the most tokens generated per row (end token included).
    seed: base seed; row b uses ``fold_in(fold_in(key(seed), sample_ids[b]), step)``.
    sample_ids: int ``[B]`` in [0, 2**32) (default ``arange(B)``): a row's sample is a function of
      (prompt, sample id, seed, settings) only.
    temperature: >= 0; 0 is greedy (argmax over the allowed tokens).
    top_k, top_p, min_p: filters, off at 0, 1.0, 0.0 (see ``logit_processors``).
    banned_token_ids: ids never sampled (e.g. from ``logit_processors.banned_word_token_ids``).
    grammar: a ``TokenGrammar``; the output must follow its DFA, end tokens only in accepting
      states.
    grammar_initial_states: int ``[B]``, the state each row starts in (default: every row in
      ``grammar.initial_state``). With a table of several grammars side by side
      (``grammar.stack_token_grammars``) each row follows its own, e.g. the format its prompt asks for.
    end_token_ids: ids that end a row (e.g. ``tokenizer.end_of_turn_ids``).
    reference_model: optional second model run on the same prefix in the same loop (its own KV
      cache), for the divergence fields; see ``subliminal_jax.sampling.divergence``.
    mask_divergent: ban the teacher's argmax where it differs from the reference's.
    mesh: shard the batch over the data-parallel axes and the parameters by logical axes.
    pad_id: id written after a row ends (default ``end_token_ids[0]``); also the prompt pad id.
    reference_prompt_ids, reference_prompt_mask: the reference's own left-padded prompts (e.g. the
      same user turn without the teacher's system prompt); default: the teacher's prompts.
    prompt_bucket: prompt lengths are left-padded up to a multiple of this (one compile per
      bucket).
    cache_length: fixed KV-cache length (prompt bucket + max_new_tokens by default); a prompt that
      does not fit with ``max_new_tokens`` is an error.
  """
  # ---- settings
  lp.check_sampling_settings(temperature, top_k, top_p, min_p)
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
  if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
    raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
  if not isinstance(prompt_bucket, (int, np.integer)) or prompt_bucket < 1:
    raise ValueError(f"prompt_bucket must be an int >= 1, got {prompt_bucket!r}")
  vocab = _model_vocab(model)
  end_token_ids = tuple(int(i) for i in end_token_ids)
  if not end_token_ids:
    raise ValueError("end_token_ids is empty: give at least one id that ends a row "
                     "(e.g. tokenizer.end_of_turn_ids)")
  bad = [i for i in end_token_ids if not 0 <= i < vocab]
  if bad:
    raise ValueError(f"end_token_ids {bad} are outside the model's vocabulary [0, {vocab})")
  pad_id = end_token_ids[0] if pad_id is None else int(pad_id)
  if not 0 <= pad_id < vocab:
    raise ValueError(f"pad_id={pad_id} is outside the model's vocabulary [0, {vocab})")
  if mask_divergent and reference_model is None:
    raise ValueError("mask_divergent=True needs a reference_model to compare the teacher with")
  if reference_model is not None and _model_vocab(reference_model) != vocab:
    raise ValueError(f"reference_model has vocab_size {_model_vocab(reference_model)}, the model "
                     f"{vocab}: divergence needs the same vocabulary")
  if (reference_prompt_ids is None) != (reference_prompt_mask is None):
    raise ValueError("give both reference_prompt_ids and reference_prompt_mask, or neither")
  if reference_prompt_ids is not None and reference_model is None:
    raise ValueError("reference_prompt_ids given without a reference_model")

  # ---- prompts
  ids = np.asarray(prompt_ids)
  mask = np.asarray(prompt_mask).astype(bool)
  _check_left_padded(ids, mask, "prompt")
  batch = ids.shape[0]
  out_of_vocab = ids[mask & ((ids < 0) | (ids >= vocab))]
  if out_of_vocab.size:
    raise ValueError(f"prompt token ids {out_of_vocab[:5].tolist()} are outside [0, {vocab})")
  if cache_length is not None and (not isinstance(cache_length, (int, np.integer)) or cache_length < 1):
    raise ValueError(f"cache_length must be a positive int or None, got {cache_length!r}")
  max_positions = int(model.config.max_position_embeddings)
  ids, mask = _fit_prompt(ids, mask, "prompt", max_new_tokens, prompt_bucket, cache_length,
                          max_positions, pad_id)
  if reference_model is not None:
    if reference_prompt_ids is None:
      ref_ids, ref_mask = ids, mask
    else:
      ref_ids = np.asarray(reference_prompt_ids)
      ref_mask = np.asarray(reference_prompt_mask).astype(bool)
      _check_left_padded(ref_ids, ref_mask, "reference_prompt")
      if ref_ids.shape[0] != batch:
        raise ValueError(f"reference_prompt_ids has {ref_ids.shape[0]} rows, prompt_ids {batch}")
      ref_ids, ref_mask = _fit_prompt(ref_ids, ref_mask, "reference_prompt", max_new_tokens,
                                      prompt_bucket, cache_length,
                                      int(reference_model.config.max_position_embeddings), pad_id)

  if sample_ids is None:
    sample_ids = np.arange(batch)
  sample_ids = np.asarray(sample_ids)
  if sample_ids.shape != (batch,) or not np.issubdtype(sample_ids.dtype, np.integer):
    raise ValueError(f"sample_ids must be ints of shape ({batch},), got {sample_ids.dtype} "
                     f"{sample_ids.shape}")
  if sample_ids.size and (sample_ids.min() < 0 or sample_ids.max() >= 2**32):
    raise ValueError("sample_ids must be in [0, 2**32)")

  # ---- program inputs
  inputs: dict[str, Any] = dict(
      ids=ids.astype(np.int32), mask=mask, seed=np.uint32(seed % 2**32), sample_ids=sample_ids.astype(np.uint32),
      temperature=np.float32(temperature or 1.0), top_p=np.float32(top_p),
      min_p=np.float32(min_p))
  banned = np.asarray(list(banned_token_ids), np.int64)
  if banned.size:
    inputs["allowed_vocab"] = lp.banned_token_mask(vocab, banned)
  if grammar is not None:
    transitions = np.asarray(grammar.transitions, np.int32)
    if transitions.ndim != 2 or transitions.shape[1] > vocab:
      raise ValueError(f"grammar table has shape {transitions.shape}; expected [states, vocab] with "
                       f"vocab <= the model's {vocab}")
    if transitions.shape[1] < vocab:  # model rows past the tokenizer's vocabulary: never allowed
      transitions = np.pad(transitions, ((0, 0), (0, vocab - transitions.shape[1])),
                           constant_values=-1)
    starts = np.asarray(grammar.initial_state if grammar_initial_states is None
                        else grammar_initial_states)
    starts = np.broadcast_to(starts, (batch,)) if starts.ndim == 0 else starts
    if starts.shape != (batch,) or not np.issubdtype(starts.dtype, np.integer) or (
        starts.min() < 0 or starts.max() >= transitions.shape[0]):
      raise ValueError(f"grammar initial states {starts.tolist()[:8]} must be {batch} ints, states "
                       f"of the grammar's {transitions.shape[0]}-state table")
    inputs.update(transitions=transitions, accepting=np.asarray(grammar.accepting, bool),
                  initial_state=starts.astype(np.int32))
  elif grammar_initial_states is not None:
    raise ValueError("grammar_initial_states given without a grammar")
  if reference_model is not None:
    inputs.update(ref_ids=ref_ids.astype(np.int32), ref_mask=ref_mask)

  plan = _Plan(max_new_tokens=int(max_new_tokens), end_token_ids=end_token_ids, pad_id=pad_id,
               greedy=temperature == 0, top_k=int(top_k), use_top_p=top_p < 1.0,
               use_min_p=min_p > 0.0, use_banned=bool(banned.size), use_grammar=grammar is not None,
               use_reference=reference_model is not None, mask_divergent=bool(mask_divergent))

  # ---- placement
  padded_batch = batch
  if mesh is not None:
    data_parallel = math.prod(mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape)
    padded_batch = -(-batch // data_parallel) * data_parallel
  batch_keys = ("ids", "mask", "sample_ids", "ref_ids", "ref_mask", "initial_state")
  if padded_batch != batch:  # extra rows repeat row 0; they are dropped from the output
    for key in batch_keys:
      if key in inputs:
        value = inputs[key]
        inputs[key] = np.concatenate([value, np.repeat(value[:1], padded_batch - batch, 0)], 0)
  graphdef, state = _split_model(model, mesh)
  ref_graphdef = ref_state = None
  if reference_model is not None:
    ref_graphdef, ref_state = _split_model(reference_model, mesh)
  if mesh is not None:
    replicated = NamedSharding(mesh, PartitionSpec())
    inputs = {k: sharding.put_host_array(np.asarray(v), sharding.batch_sharding(mesh, np.ndim(v)))
              if k in batch_keys else jax.device_put(v, replicated) for k, v in inputs.items()}
    with jax.set_mesh(mesh):
      out = _sample_program(plan, graphdef, ref_graphdef, state, ref_state, inputs)
  else:
    out = _sample_program(plan, graphdef, ref_graphdef, state, ref_state, inputs)
  out = sharding.to_host(out)
  rows = slice(0, batch)
  fields = {k: np.asarray(v)[rows] for k, v in out.items() if k != "num_steps"}
  return SampleOutput(num_steps=int(out["num_steps"]), **fields)


def generate_chat(*args, **kwargs):
  """See :func:`subliminal_jax.generate.generate_chat` (defined there, re-exported here)."""
  from subliminal_jax import generate  # local: generate imports this module
  return generate.generate_chat(*args, **kwargs)
