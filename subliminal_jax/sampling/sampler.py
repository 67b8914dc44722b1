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

``sample_many`` samples K members that are one base model with different LoRA adapters (or none)
in ONE program: the same prefill and decode loop under ``jax.vmap`` over the members' stacked
adapters and inputs, the base not mapped (stored once, read once per step for all K), one loop
predicate for all members. Member k gets what ``sample`` gives it alone, up to float rounding.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from subliminal_jax import lora, padding, sharding
from subliminal_jax.models.transformer import KVCache
from subliminal_jax.sampling import divergence as divergence_lib
from subliminal_jax.sampling import logit_processors as lp

__all__ = ["SampleOutput", "sample", "sample_many", "prefill", "prompt_bucket_length", "DEFAULT_PROMPT_BUCKET"]

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
  mask_divergent: bool


def prompt_bucket_length(length: int, bucket: int = DEFAULT_PROMPT_BUCKET) -> int:
  """``length`` rounded up to a multiple of ``bucket``."""
  return padding.round_up(length, bucket)


# --------------------------------------------------------------------------------------------
# The jitted program's inputs and loop state. Optional parts are None when their setting is off,
# so every field exists under every setting and the traced program branches on `is None`.


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Grammar:
  transitions: jax.Array  # int32 [states, vocab]: next state, -1 = not allowed
  accepting: jax.Array  # bool [states]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Inputs:
  """Device inputs of one sampling call."""

  ids: jax.Array  # int32 [B, P] left-padded prompts
  mask: jax.Array  # bool [B, P]
  seed: jax.Array  # uint32 []
  sample_ids: jax.Array  # uint32 [B]
  temperature: jax.Array  # float32 [] (1 when greedy: unused)
  top_p: jax.Array  # float32 []
  min_p: jax.Array  # float32 []
  allowed_vocab: jax.Array | None = None  # bool [V]: False at banned ids
  grammar: _Grammar | None = None
  grammar_start: jax.Array | None = None  # int32 [B]: each row's first DFA state, with a grammar
  ref_ids: jax.Array | None = None  # the reference's own prompts, with a reference model
  ref_mask: jax.Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Divergence:
  """Per-row divergence fields: of one step ``[B]``, or recorded for every step ``[B, N]``."""

  divergent: jax.Array  # bool
  kl_raw: jax.Array  # float32
  kl_allowed: jax.Array  # float32


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Choice:
  """One step's token choice for every row ``[B]`` (pad_id / 0 in rows that had ended)."""

  token: jax.Array  # int32
  logprob: jax.Array  # float32, under the processed distribution
  model_logprob: jax.Array  # float32, under the raw model distribution
  live: jax.Array  # bool: the row had not ended before this step
  forced: jax.Array  # bool: the hard masks left the live row no token
  done: jax.Array  # bool: ended at or before this step
  grammar_state: jax.Array | None  # int32: the DFA state after the token, with a grammar
  divergence: _Divergence | None  # with a reference model
  masked: jax.Array | None  # bool: the teacher's divergent argmax was banned (mask_divergent)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Reference:
  """The reference model's side of the loop state."""

  cache: KVCache
  divergence: _Divergence  # [B, N]
  num_masked: jax.Array  # int32 [B]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _State:
  """The ``while_loop`` carry: what has been generated so far and what the next step needs."""

  step: jax.Array  # int32 []: tokens chosen so far (the next column to write)
  tokens: jax.Array  # int32 [B, N]
  logprobs: jax.Array  # float32 [B, N]
  model_logprobs: jax.Array  # float32 [B, N]
  lengths: jax.Array  # int32 [B]
  forced: jax.Array  # bool [B]
  done: jax.Array  # bool [B]
  last_token: jax.Array  # int32 [B]: fed to the next decode step
  cache: KVCache
  grammar_state: jax.Array | None  # int32 [B], with a grammar
  reference: _Reference | None  # with a reference model


# --------------------------------------------------------------------------------------------
# The jitted program


def constrain_cache(cache: KVCache) -> KVCache:
  """The cache's arrays constrained to the batch's sharding (a no-op outside a mesh)."""
  return dataclasses.replace(
      cache,
      k=sharding.constrain(cache.k, ("layers", "batch", "kv_heads", "seq", None)),
      v=sharding.constrain(cache.v, ("layers", "batch", "kv_heads", "seq", None)),
      key_mask=sharding.constrain(cache.key_mask, ("batch", "seq")))


def prefill(model, ids: jax.Array, mask: jax.Array, cache_length: int
            ) -> tuple[jax.Array, KVCache]:
  """Fills a new KV cache of ``cache_length`` slots with left-padded prompts (one forward).

  Returns the raw float32 next-token logits after each prompt ``[B, V]`` and the cache, its arrays
  constrained to the batch's sharding under a mesh. Traced code: call it inside ``jax.jit`` (the
  sampler's program, teacher-forced evaluation).
  """
  cache = constrain_cache(model.init_cache(ids.shape[0], cache_length))
  hidden, cache = model.hidden_states(ids, mask, cache=cache)
  # Left padding puts every row's last prompt token in the last column: only it is projected to
  # the vocabulary (all positions would add a fifth to the prefill's FLOPs, for logits never read).
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


def _allowed_tokens(inputs: _Inputs, grammar_state, end_token_ids, shape):
  """Bool [B, V] of the hard masks (banned ids, grammar state), or None when there are none."""
  allowed = None
  if inputs.allowed_vocab is not None:
    allowed = jnp.broadcast_to(inputs.allowed_vocab[None, :], shape)
  if inputs.grammar is not None:
    grammar = lp.grammar_allowed(inputs.grammar.transitions, inputs.grammar.accepting,
                                 grammar_state, end_token_ids)
    allowed = grammar if allowed is None else allowed & grammar
  return allowed


def _choose(plan: _Plan, inputs: _Inputs, row_keys, step, logits, ref_logits, done,
            grammar_state) -> _Choice:
  """One step of token choice for every row, from raw logits [B, V]."""
  batch = logits.shape[0]
  allowed = _allowed_tokens(inputs, grammar_state, plan.end_token_ids, logits.shape)
  masked = logits if allowed is None else lp.mask_tokens(logits, allowed)
  divergence = None
  live = ~done
  if ref_logits is not None:
    div = divergence_lib.divergence_step(logits, ref_logits, allowed)
    divergence = _Divergence(divergent=div["divergent"] & live,
                             kl_raw=jnp.where(live, div["kl_raw"], 0.0),
                             kl_allowed=jnp.where(live, div["kl_allowed"], 0.0))
    if plan.mask_divergent:
      masked = divergence_lib.ban_divergent_choice(masked, div["teacher_argmax"], div["divergent"])
  nonempty = lp.any_allowed(masked)
  masked = jnp.where(nonempty[:, None], masked, 0.0)  # keeps an empty row finite (no NaN)
  if plan.greedy:
    token = jnp.argmax(masked, axis=-1).astype(jnp.int32)
    logprob = jnp.zeros((batch,), jnp.float32)
  else:
    processed = lp.process_logits(
        masked, temperature=inputs.temperature, top_k=plan.top_k,
        top_p=inputs.top_p if plan.use_top_p else None,
        min_p=inputs.min_p if plan.use_min_p else None)
    keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, step)
    token, logprob = _draw(keys, processed)
  ends = jnp.asarray(plan.end_token_ids, jnp.int32)
  token = jnp.where(nonempty, token, ends[0])
  logprob = jnp.where(nonempty, logprob, 0.0)
  model_logprob = _log_prob_of(logits, token)
  token = jnp.where(live, token, plan.pad_id)
  return _Choice(
      token=token, logprob=jnp.where(live, logprob, 0.0),
      model_logprob=jnp.where(live, model_logprob, 0.0), live=live, forced=live & ~nonempty,
      done=done | (live & jnp.any(token[:, None] == ends[None, :], axis=-1)),
      grammar_state=(None if inputs.grammar is None
                     else lp.advance_grammar(inputs.grammar.transitions, grammar_state, token)),
      divergence=divergence,
      masked=None if divergence is None else divergence.divergent & plan.mask_divergent)


def _record(state: _State, choice: _Choice) -> _State:
  """``state`` after one step's choice: its column written, the per-row counters advanced."""
  step = state.step
  reference = state.reference
  if reference is not None:
    recorded = jax.tree.map(lambda all_steps, now: all_steps.at[:, step].set(now),
                            reference.divergence, choice.divergence)
    reference = dataclasses.replace(reference, divergence=recorded,
                                    num_masked=reference.num_masked + choice.masked.astype(jnp.int32))
  return dataclasses.replace(
      state, step=step + 1,
      tokens=state.tokens.at[:, step].set(choice.token),
      logprobs=state.logprobs.at[:, step].set(choice.logprob),
      model_logprobs=state.model_logprobs.at[:, step].set(choice.model_logprob),
      lengths=state.lengths + choice.live.astype(jnp.int32),
      forced=state.forced | choice.forced, done=choice.done, last_token=choice.token,
      grammar_state=choice.grammar_state, reference=reference)


def _initial_state(plan: _Plan, inputs: _Inputs, cache: KVCache, ref_cache: KVCache | None
                   ) -> _State:
  """Nothing generated yet: pad tokens, zero logprobs and counters, no row done."""
  batch, n = inputs.ids.shape[0], plan.max_new_tokens
  zeros = jnp.zeros((batch, n), jnp.float32)
  reference = None
  if ref_cache is not None:
    reference = _Reference(
        cache=ref_cache, num_masked=jnp.zeros((batch,), jnp.int32),
        divergence=_Divergence(divergent=jnp.zeros((batch, n), bool), kl_raw=zeros,
                               kl_allowed=zeros))
  return _State(
      step=jnp.zeros((), jnp.int32), tokens=jnp.full((batch, n), plan.pad_id, jnp.int32),
      logprobs=zeros, model_logprobs=zeros, lengths=jnp.zeros((batch,), jnp.int32),
      forced=jnp.zeros((batch,), bool), done=jnp.zeros((batch,), bool),
      last_token=jnp.zeros((batch,), jnp.int32), cache=cache,
      grammar_state=inputs.grammar_start,
      reference=reference)


def _decode_program(plan: _Plan, model, ref_model, inputs: _Inputs, members_axis: str | None = None
                    ) -> dict[str, jax.Array]:
  """Prefill, the first token, then one-token decode steps until every row ended or N tokens.

  Traced code. ``members_axis``: the name of a ``jax.vmap`` axis over members (``sample_many``):
  the loop then runs until every member's rows ended, one loop for all (a member whose rows all
  ended steps on with pad tokens, which changes none of its outputs).
  """
  row_keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(inputs.seed),
                                                     inputs.sample_ids)
  choose = functools.partial(_choose, plan, inputs, row_keys)
  cache_length = inputs.ids.shape[1] + plan.max_new_tokens
  logits, cache = prefill(model, inputs.ids, inputs.mask, cache_length)
  ref_logits = ref_cache = None
  if ref_model is not None:
    ref_logits, ref_cache = prefill(ref_model, inputs.ref_ids, inputs.ref_mask,
                                    inputs.ref_ids.shape[1] + plan.max_new_tokens)
  loop = _initial_state(plan, inputs, cache, ref_cache)
  loop = _record(loop, choose(loop.step, logits, ref_logits, loop.done, loop.grammar_state))

  def cond(loop: _State):
    all_done = jnp.all(loop.done)
    if members_axis is not None:
      # One predicate for all members (a collective over the vmap axis): a per-member one would
      # make vmap select between every member's old and new carry, KV caches included, each step.
      all_done = jax.lax.pmin(all_done.astype(jnp.int32), members_axis) > 0
    return (loop.step < plan.max_new_tokens) & ~all_done

  def body(loop: _State) -> _State:
    live = ~loop.done
    logits, cache = _decode(model, loop.cache, loop.last_token, live)
    loop = dataclasses.replace(loop, cache=cache)
    ref_logits = None
    if ref_model is not None:
      ref_logits, ref_cache = _decode(ref_model, loop.reference.cache, loop.last_token, live)
      loop = dataclasses.replace(loop, reference=dataclasses.replace(loop.reference, cache=ref_cache))
    return _record(loop, choose(loop.step, logits, ref_logits, loop.done, loop.grammar_state))

  loop = jax.lax.while_loop(cond, body, loop)
  # A row's length counts the steps it was live, so the steps a member's own loop would have run
  # (until its last row ended, or N) are its longest row's length.
  num_steps = loop.step if members_axis is None else jnp.max(loop.lengths)
  out = dict(tokens=loop.tokens, logprobs=loop.logprobs, model_logprobs=loop.model_logprobs,
             lengths=loop.lengths, ended=loop.done, forced_end=loop.forced, num_steps=num_steps)
  if loop.reference is not None:
    out.update(divergent=loop.reference.divergence.divergent,
               kl_raw=loop.reference.divergence.kl_raw,
               kl_allowed=loop.reference.divergence.kl_allowed,
               num_masked=loop.reference.num_masked)
  return out


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _sample_program(plan: _Plan, graphdef, ref_graphdef, state, ref_state, inputs: _Inputs
                    ) -> dict[str, jax.Array]:
  """The program of ``sample``: one model (and an optional reference)."""
  model = nnx.merge(graphdef, state)
  ref_model = None if ref_graphdef is None else nnx.merge(ref_graphdef, ref_state)
  return _decode_program(plan, model, ref_model, inputs)


_MEMBERS_AXIS = "members"
# The fields of _Inputs that differ between members of sample_many (mapped by its vmap); the
# others are settings, shared.
_MEMBER_FIELDS = ("ids", "mask", "seed", "sample_ids", "grammar_start")


@functools.partial(jax.jit, static_argnums=(0, 1))
def _sample_many_program(plan: _Plan, graphdef, adapters, base, inputs: _Inputs
                         ) -> dict[str, jax.Array]:
  """The program of ``sample_many``: ``_decode_program`` under ``jax.vmap`` over the members'
  stacked adapters and inputs ``[K, ...]``; the base is not mapped (stored and read once)."""
  def member(adapter, member_inputs):
    return _decode_program(plan, nnx.merge(graphdef, adapter, base), None, member_inputs,
                           members_axis=_MEMBERS_AXIS)
  in_axes = _Inputs(**{field.name: 0 if field.name in _MEMBER_FIELDS else None
                       for field in dataclasses.fields(_Inputs)})
  return jax.vmap(member, in_axes=(0, in_axes), axis_name=_MEMBERS_AXIS)(adapters, inputs)


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


def _checked_prompts(ids, mask, name: str, vocab: int) -> tuple[np.ndarray, np.ndarray]:
  """(ids, bool mask) as numpy, checked: left-padded, token ids inside the vocabulary."""
  ids = np.asarray(ids)
  mask = np.asarray(mask).astype(bool)
  _check_left_padded(ids, mask, name)
  out_of_vocab = ids[mask & ((ids < 0) | (ids >= vocab))]
  if out_of_vocab.size:
    raise ValueError(f"{name} token ids {out_of_vocab[:5].tolist()} are outside [0, {vocab})")
  return ids, mask


def _pad_left(ids: np.ndarray, mask: np.ndarray, length: int, pad_id: int):
  extra = length - ids.shape[1]
  if extra < 0:  # only padding columns can be dropped (checked by the caller)
    return ids[:, -extra:], mask[:, -extra:]
  return (np.pad(ids, ((0, 0), (extra, 0)), constant_values=pad_id),
          np.pad(mask, ((0, 0), (extra, 0)), constant_values=False))


def _fit_prompt(ids, mask, *, name, max_new_tokens, bucket, cache_length, max_positions, pad_id):
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


def _check_settings(model, *, max_new_tokens, seed, prompt_bucket, end_token_ids, pad_id,
                    reference_model, mask_divergent, reference_prompt_ids, reference_prompt_mask,
                    cache_length) -> tuple[tuple[int, ...], int]:
  """Raises ValueError naming the first bad setting; returns (end_token_ids, pad_id) as ints."""
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
  if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
    raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
  if not isinstance(prompt_bucket, (int, np.integer)) or prompt_bucket < 1:
    raise ValueError(f"prompt_bucket must be an int >= 1, got {prompt_bucket!r}")
  if cache_length is not None and (not isinstance(cache_length, (int, np.integer)) or cache_length < 1):
    raise ValueError(f"cache_length must be a positive int or None, got {cache_length!r}")
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
  return end_token_ids, pad_id


def _sample_ids(sample_ids, batch: int) -> np.ndarray:
  if sample_ids is None:
    return np.arange(batch, dtype=np.uint32)
  sample_ids = np.asarray(sample_ids)
  if sample_ids.shape != (batch,) or not np.issubdtype(sample_ids.dtype, np.integer):
    raise ValueError(f"sample_ids must be ints of shape ({batch},), got {sample_ids.dtype} "
                     f"{sample_ids.shape}")
  if sample_ids.size and (sample_ids.min() < 0 or sample_ids.max() >= 2**32):
    raise ValueError("sample_ids must be in [0, 2**32)")
  return sample_ids.astype(np.uint32)


def _grammar_input(grammar, vocab: int) -> _Grammar:
  """The grammar's table as host arrays, widened to the model's vocabulary."""
  transitions = np.asarray(grammar.transitions, np.int32)
  if transitions.ndim != 2 or transitions.shape[1] > vocab:
    raise ValueError(f"grammar table has shape {transitions.shape}; expected [states, vocab] with "
                     f"vocab <= the model's {vocab}")
  if transitions.shape[1] < vocab:  # model rows past the tokenizer's vocabulary: never allowed
    transitions = np.pad(transitions, ((0, 0), (0, vocab - transitions.shape[1])),
                         constant_values=-1)
  return _Grammar(transitions=transitions, accepting=np.asarray(grammar.accepting, bool))


def _grammar_start(grammar, initial_states, batch: int) -> np.ndarray | None:
  """Each row's first grammar state: ``initial_states`` [B] (rows following different grammars
  of a stacked table) or the grammar's own initial state."""
  if grammar is None:
    if initial_states is not None:
      raise ValueError("grammar_initial_states given without a grammar")
    return None
  num_states = np.shape(grammar.transitions)[0]
  starts = np.asarray(grammar.initial_state if initial_states is None else initial_states)
  starts = np.broadcast_to(starts, (batch,)) if starts.ndim == 0 else starts
  if starts.shape != (batch,) or not np.issubdtype(starts.dtype, np.integer) or (
      starts.min() < 0 or starts.max() >= num_states):
    raise ValueError(f"grammar initial states {starts.tolist()[:8]} must be {batch} ints, states "
                     f"of the grammar's {num_states}-state table")
  return starts.astype(np.int32)


_BATCH_FIELDS = ("ids", "mask", "sample_ids", "grammar_start", "ref_ids", "ref_mask")


def _pad_batch(inputs: _Inputs, padded_batch: int) -> _Inputs:
  """``inputs`` with ``padded_batch`` rows: the extra rows repeat row 0 (dropped from the output)."""
  batch = inputs.ids.shape[0]
  if padded_batch == batch:
    return inputs
  return dataclasses.replace(inputs, **{
      name: np.concatenate([value, np.repeat(value[:1], padded_batch - batch, 0)], 0)
      for name in _BATCH_FIELDS if (value := getattr(inputs, name)) is not None})


def _execute(program, inputs: _Inputs, mesh: Mesh | None, batch_axis: int = 0) -> dict[str, np.ndarray]:
  """``program(inputs)`` on the host's or the mesh's devices (the batch fields split over the
  data-parallel axes along ``batch_axis``, the rest replicated); its outputs on the host."""
  if mesh is None:
    return sharding.to_host(program(inputs))
  replicated = NamedSharding(mesh, PartitionSpec())

  def batch_split(ndim: int) -> NamedSharding:
    spec = sharding.batch_sharding(mesh, ndim - batch_axis).spec
    return NamedSharding(mesh, PartitionSpec(*(None,) * batch_axis, *spec))
  batch_fields = {name: sharding.put_host_array(np.asarray(value), batch_split(np.ndim(value)))
                  for name in _BATCH_FIELDS if (value := getattr(inputs, name)) is not None}
  inputs = jax.device_put(dataclasses.replace(inputs, **{n: None for n in batch_fields}),
                          replicated)
  inputs = dataclasses.replace(inputs, **batch_fields)
  with jax.set_mesh(mesh):
    return sharding.to_host(program(inputs))


def _output(out: dict[str, np.ndarray], batch: int) -> SampleOutput:
  """The first ``batch`` rows of a program's host outputs."""
  fields = {k: np.asarray(v)[:batch] for k, v in out.items() if k != "num_steps"}
  return SampleOutput(num_steps=int(out["num_steps"]), **fields)


def _run(plan: _Plan, inputs: _Inputs, model, reference_model, mesh: Mesh | None) -> SampleOutput:
  """Places the inputs (batch padded to the data-parallel size), runs the program, returns the
  batch's rows on the host."""
  batch = inputs.ids.shape[0]
  inputs = _pad_batch(inputs, padding.round_up(batch, sharding.data_parallel_size(mesh)))
  graphdef, state = _split_model(model, mesh)
  ref_graphdef = ref_state = None
  if reference_model is not None:
    ref_graphdef, ref_state = _split_model(reference_model, mesh)
  out = _execute(lambda inputs: _sample_program(plan, graphdef, ref_graphdef, state, ref_state,
                                                inputs), inputs, mesh)
  return _output(out, batch)


def _prompt_inputs(model, prompt_ids, prompt_mask, *, seed, sample_ids, grammar,
                   grammar_initial_states, banned_token_ids, temperature, top_p, min_p, fit
                   ) -> _Inputs:
  """The checked, bucketed device inputs of one model's prompts (no reference fields)."""
  vocab = _model_vocab(model)
  ids, mask = fit(*_checked_prompts(prompt_ids, prompt_mask, "prompt", vocab),
                  name="prompt", max_positions=int(model.config.max_position_embeddings))
  batch = ids.shape[0]
  banned = np.asarray(list(banned_token_ids), np.int64)
  return _Inputs(
      ids=ids.astype(np.int32), mask=mask, seed=np.uint32(seed), sample_ids=_sample_ids(sample_ids, batch),
      temperature=np.float32(temperature or 1.0), top_p=np.float32(top_p), min_p=np.float32(min_p),
      allowed_vocab=lp.banned_token_mask(vocab, banned) if banned.size else None,
      grammar=None if grammar is None else _grammar_input(grammar, vocab),
      grammar_start=_grammar_start(grammar, grammar_initial_states, batch))


def _plan(*, max_new_tokens, end_token_ids, pad_id, temperature, top_k, top_p, min_p,
          mask_divergent) -> _Plan:
  return _Plan(max_new_tokens=int(max_new_tokens), end_token_ids=end_token_ids, pad_id=pad_id,
               greedy=temperature == 0, top_k=int(top_k), use_top_p=top_p < 1.0,
               use_min_p=min_p > 0.0, mask_divergent=bool(mask_divergent))


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
  lp.check_sampling_settings(temperature, top_k, top_p, min_p)
  end_token_ids, pad_id = _check_settings(
      model, max_new_tokens=max_new_tokens, seed=seed, prompt_bucket=prompt_bucket,
      end_token_ids=end_token_ids, pad_id=pad_id, reference_model=reference_model,
      mask_divergent=mask_divergent, reference_prompt_ids=reference_prompt_ids,
      reference_prompt_mask=reference_prompt_mask, cache_length=cache_length)
  fit = functools.partial(_fit_prompt, max_new_tokens=max_new_tokens, bucket=prompt_bucket,
                          cache_length=cache_length, pad_id=pad_id)
  inputs = _prompt_inputs(
      model, prompt_ids, prompt_mask, seed=seed, sample_ids=sample_ids, grammar=grammar,
      grammar_initial_states=grammar_initial_states, banned_token_ids=banned_token_ids,
      temperature=temperature, top_p=top_p, min_p=min_p, fit=fit)
  if reference_model is not None:
    ref_ids, ref_mask = inputs.ids, inputs.mask
    if reference_prompt_ids is not None:
      ref_ids, ref_mask = _checked_prompts(reference_prompt_ids, reference_prompt_mask,
                                           "reference_prompt", _model_vocab(model))
      if ref_ids.shape[0] != inputs.ids.shape[0]:
        raise ValueError(f"reference_prompt_ids has {ref_ids.shape[0]} rows, prompt_ids "
                         f"{inputs.ids.shape[0]}")
      ref_ids, ref_mask = fit(ref_ids, ref_mask, name="reference_prompt",
                              max_positions=int(reference_model.config.max_position_embeddings))
    inputs = dataclasses.replace(inputs, ref_ids=ref_ids.astype(np.int32), ref_mask=ref_mask)
  plan = _plan(max_new_tokens=max_new_tokens, end_token_ids=end_token_ids, pad_id=pad_id,
               temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
               mask_divergent=mask_divergent)
  return _run(plan, inputs, model, reference_model, mesh)



# --------------------------------------------------------------------------------------------
# Many adapters over one base in one program


def _adapter_signature(model) -> dict[str, tuple[int, float]]:
  """``{target: (rank, scale)}`` of a model's LoRA adapters (empty without adapters)."""
  return {name: (int(linear.lora_a.get_value().shape[-1]), float(linear.lora_scale))
          for name in lora.lora_targets(model) if (linear := getattr(model.layers, name))}


def _same_arrays(a: nnx.State, b: nnx.State) -> bool:
  """Whether two states hold the same arrays: the same objects (clones of one base), else equal
  shapes, dtypes and values."""
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  return tree_a == tree_b and all(
      x is y or (x.shape == y.shape and x.dtype == y.dtype and bool(np.array_equal(x, y)))
      for x, y in zip(leaves_a, leaves_b))


def _split_members(models: Sequence, mesh: Mesh | None) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef of an adapted member, the K adapter states stacked ``[K, ...]``, the shared base
  state). A member without adapters gets zero ones (x @ 0 @ 0 adds exactly 0); a member whose
  base or adapters (targets, rank, scale) differ from the others' is refused, named."""
  signatures = [_adapter_signature(m) for m in models]
  adapted = [k for k, s in enumerate(signatures) if s]
  reference = adapted[0] if adapted else 0
  graphdef, reference_adapter, base = nnx.split(models[reference], nnx.LoRAParam, ...)
  adapters = []
  for k, (model, signature) in enumerate(zip(models, signatures)):
    if signature and signature != signatures[reference]:
      raise ValueError(f"member {k}: LoRA adapters {signature} ({{target: (rank, scale)}}) differ "
                       f"from member {reference}'s {signatures[reference]}; sample_many runs all "
                       "members in one program, so their adapters must have the same targets, "
                       "rank and scale")
    member_graphdef, adapter, member_base = nnx.split(model, nnx.LoRAParam, ...)
    if not _same_arrays(member_base, base):
      raise ValueError(f"member {k}: its non-adapter weights are not member {reference}'s; "
                       "sample_many samples adapters (or none) over one shared base model")
    if signature and member_graphdef != graphdef:
      raise ValueError(f"member {k}: its model has another structure than member {reference}'s")
    adapters.append(adapter if signature else jax.tree.map(jnp.zeros_like, reference_adapter))
  stacked = jax.tree.map(lambda *arrays: jnp.stack(arrays), *adapters)
  if mesh is not None:
    placement = sharding.state_shardings(
        sharding.add_leading_axis(stacked, sharding.ENSEMBLE_AXIS), mesh)
    stacked = jax.device_put(stacked, placement)
    base = jax.device_put(base, sharding.state_shardings(base, mesh))
  return graphdef, stacked, base


def _per_member(name: str, values, count: int) -> list:
  if values is None:
    return [None] * count
  if len(values) != count:
    raise ValueError(f"{name} has {len(values)} entries for {count} members; give one per member")
  return list(values)


def _stack_members(members: Sequence[_Inputs], pad_id: int, data_parallel: int) -> _Inputs:
  """The members' inputs as one ``[K, ...]`` input: each member's batch padded (repeating its row
  0) to the largest, rounded up to the data-parallel size; its prompts left-padded to the longest
  bucket."""
  batch = padding.round_up(max(m.ids.shape[0] for m in members), data_parallel)
  length = max(m.ids.shape[1] for m in members)
  padded = []
  for member in members:
    member = _pad_batch(member, batch)
    ids, mask = _pad_left(member.ids, member.mask, length, pad_id)
    padded.append(dataclasses.replace(member, ids=ids, mask=mask))
  return dataclasses.replace(members[0], **{
      name: np.stack([getattr(m, name) for m in padded])
      for name in _MEMBER_FIELDS if getattr(members[0], name) is not None})


def sample_many(models: Sequence, prompt_ids: Sequence, prompt_masks: Sequence, *,
                seeds: Sequence[int], max_new_tokens: int, sample_ids: Sequence | None = None,
                temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                banned_token_ids: Sequence[int] = (), grammar=None, end_token_ids: Sequence[int],
                mesh: Mesh | None = None, pad_id: int | None = None,
                prompt_bucket: int = DEFAULT_PROMPT_BUCKET, cache_length: int | None = None,
                grammar_initial_states: Sequence | None = None) -> list[SampleOutput]:
  """``sample`` for K members, one base model with different LoRA adapters (or none), in ONE
  program: the members' adapters and inputs are stacked ``[K, ...]`` and the program runs under
  ``jax.vmap`` with the base not mapped, so it is stored once and read once per decode step for
  all K.

  Member k's output is ``sample(models[k], prompt_ids[k], prompt_masks[k], seed=seeds[k],
  sample_ids=sample_ids[k], grammar_initial_states=grammar_initial_states[k], <the settings>)``,
  up to float rounding: vmap and the common shapes (every member's prompts left-padded to the
  longest member's bucket, batches to the largest) may change the order of sums.

  Args:
    models: K Transformers: clones of one base (the same arrays, or equal ones), each with LoRA
      adapters of the same targets, rank and scale, or none (sampled as the base).
    prompt_ids, prompt_masks: member k's left-padded ``[B_k, P_k]`` prompts.
    seeds: member k's seed (row b: ``fold_in(fold_in(key(seeds[k]), sample_ids[k][b]), step)``).
    sample_ids, grammar_initial_states: one per member (or None), as ``sample`` takes them.
    The other settings are ``sample``'s, shared by all members (the reference model and the
    divergence fields are not supported here: use ``sample``).

  Returns:
    One :class:`SampleOutput` per member.
  """
  count = len(models)
  if count < 1:
    raise ValueError("sample_many needs at least one model")
  prompt_ids = _per_member("prompt_ids", prompt_ids, count)
  prompt_masks = _per_member("prompt_masks", prompt_masks, count)
  seeds = _per_member("seeds", seeds, count)
  sample_ids = _per_member("sample_ids", sample_ids, count)
  starts = _per_member("grammar_initial_states", grammar_initial_states, count)
  lp.check_sampling_settings(temperature, top_k, top_p, min_p)
  members = []
  for k, model in enumerate(models):
    try:
      end_ids, pad = _check_settings(
          model, max_new_tokens=max_new_tokens, seed=seeds[k], prompt_bucket=prompt_bucket,
          end_token_ids=end_token_ids, pad_id=pad_id, reference_model=None, mask_divergent=False,
          reference_prompt_ids=None, reference_prompt_mask=None, cache_length=cache_length)
      fit = functools.partial(_fit_prompt, max_new_tokens=max_new_tokens, bucket=prompt_bucket,
                              cache_length=cache_length, pad_id=pad)
      members.append(_prompt_inputs(
          model, prompt_ids[k], prompt_masks[k], seed=seeds[k], sample_ids=sample_ids[k],
          grammar=grammar, grammar_initial_states=starts[k], banned_token_ids=banned_token_ids,
          temperature=temperature, top_p=top_p, min_p=min_p, fit=fit))
    except ValueError as error:
      raise ValueError(f"member {k}: {error}") from None
  graphdef, adapters, base = _split_members(models, mesh)
  plan = _plan(max_new_tokens=max_new_tokens, end_token_ids=end_ids, pad_id=pad,
               temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
               mask_divergent=False)
  inputs = _stack_members(members, pad, sharding.data_parallel_size(mesh))
  out = _execute(lambda inputs: _sample_many_program(plan, graphdef, adapters, base, inputs),
                 inputs, mesh, batch_axis=1)
  return [_output({name: value[k] for name, value in out.items()}, member.ids.shape[0])
          for k, member in enumerate(members)]
