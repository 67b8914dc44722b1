"""Logit processors: pure functions on a batch of next-token logits ``[batch, vocab]``.

They run inside the sampler's jitted decode loop and compose in a fixed order, the order of
transformers' sampling warpers, so that a setting means the same thing here and there:

1. hard masks (``mask_tokens``): banned token ids, banned words, the grammar's allowed set, the
   divergence filter's ban. Masked logits become ``-inf`` (probability exactly 0);
2. ``apply_temperature`` (``logits / T``; ``T = 0`` is greedy and handled by the sampler);
3. ``apply_top_k``: keep the k largest (ties with the k-th are kept);
4. ``apply_top_p``: keep the smallest set of most likely tokens whose mass reaches p (the token
   that crosses p is kept), computed on the distribution left by the steps before; no full sort
   (top-64 candidates, exact bisection where the nucleus is larger);
5. ``apply_min_p``: keep tokens with probability >= min_p times the most likely one's.

Top-k, top-p and min-p never remove the most likely allowed token, so only a hard mask can leave a
row with nothing allowed; ``any_allowed`` tells the sampler (which then forces an end token rather
than sampling from an all ``-inf`` row, which would give NaN).

Host-side helpers build the masks once: ``banned_word_token_ids`` (every token whose decoded text
contains a banned word, case-insensitive) and ``banned_token_mask``. The grammar helpers
(``grammar_allowed``, ``advance_grammar``) read a :class:`~subliminal_jax.sampling.grammar.
TokenGrammar` table placed on device: a per-row DFA state, end tokens allowed exactly in accepting
states, and after a token ``state = transitions[state, token]``.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "mask_tokens",
    "any_allowed",
    "apply_temperature",
    "apply_top_k",
    "apply_top_p",
    "apply_min_p",
    "process_logits",
    "grammar_allowed",
    "advance_grammar",
    "banned_word_token_ids",
    "banned_token_mask",
    "check_sampling_settings",
]


def mask_tokens(logits: jax.Array, allowed: jax.Array) -> jax.Array:
  """``-inf`` wherever ``allowed`` (bool, broadcastable to ``logits``) is False."""
  return jnp.where(allowed, logits, -jnp.inf)


def any_allowed(logits: jax.Array) -> jax.Array:
  """Per row: whether any token has a finite logit (False = empty allowed set)."""
  return jnp.any(jnp.isfinite(logits), axis=-1)


def apply_temperature(logits: jax.Array, temperature: jax.Array | float) -> jax.Array:
  """``logits / temperature`` (temperature > 0; the sampler treats 0 as greedy)."""
  return logits / jnp.asarray(temperature, logits.dtype)


def apply_top_k(logits: jax.Array, k: int) -> jax.Array:
  """Keeps the ``k`` largest logits of each row (and any tied with the k-th); k = 0 keeps all.

  ``k`` is static: it fixes the shape of ``lax.top_k``, which is much cheaper than a full sort.
  """
  if k <= 0 or k >= logits.shape[-1]:
    return logits
  kth = jax.lax.top_k(logits, k)[0][..., -1:]
  return jnp.where(logits >= kth, logits, -jnp.inf)


# Top-p first looks for the nucleus among this many most likely tokens (cheap ``lax.top_k``); only
# rows whose nucleus is larger fall back to an exact bisection over the whole vocabulary (a full
# sort of a 49k vocabulary costs far more than a decode step on a CPU).
_TOP_P_CANDIDATES = 64


def _ordered_keys(logits: jax.Array) -> jax.Array:
  """uint32 keys with the order of the float32 logits (``-inf`` smallest)."""
  bits = jax.lax.bitcast_convert_type(logits.astype(jnp.float32), jnp.int32)
  flipped = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: reverse their order
  return jax.lax.bitcast_convert_type(flipped, jnp.uint32) ^ jnp.uint32(0x80000000)


def _top_p_cutoff_by_bisection(logits: jax.Array, probs: jax.Array, top_p) -> jax.Array:
  """Per row, the smallest key K with mass(tokens with key > K) < top_p (32 exact halvings)."""
  keys = _ordered_keys(logits)
  lo = jnp.zeros(logits.shape[:-1] + (1,), jnp.uint32)  # mass above lo is 1 >= top_p (or equal)
  hi = jnp.max(keys, axis=-1, keepdims=True)  # mass above the top token is 0 < top_p

  def halve(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    below_p = jnp.sum(jnp.where(keys > mid, probs, 0.0), axis=-1, keepdims=True) < top_p
    return jnp.where(below_p, lo, mid), jnp.where(below_p, mid, hi)

  _, hi = jax.lax.fori_loop(0, 32, halve, (lo, hi))
  return keys >= hi


def apply_top_p(logits: jax.Array, top_p: jax.Array | float) -> jax.Array:
  """Nucleus filter: keeps the most likely tokens until their mass reaches ``top_p`` (in (0, 1]).

  A token is kept when the mass of the tokens strictly more likely than it is below ``top_p``
  (transformers' rule: drop the tail whose cumulative mass is <= 1 - top_p; tokens tied with the
  last kept one are kept too). Exact: the nucleus is found among the top candidates when it fits
  there, else by bisection over the vocabulary.
  """
  vocab = logits.shape[-1]
  probs = jax.nn.softmax(logits, axis=-1)
  k = min(_TOP_P_CANDIDATES, vocab)
  candidates, candidate_ids = jax.lax.top_k(logits, k)  # descending
  candidate_probs = jnp.take_along_axis(probs, candidate_ids, axis=-1)
  mass_before = jnp.cumsum(candidate_probs, axis=-1) - candidate_probs
  num_kept = jnp.maximum(jnp.sum(mass_before < top_p, axis=-1, keepdims=True), 1)
  cutoff = jnp.take_along_axis(candidates, num_kept - 1, axis=-1)
  kept = logits >= cutoff
  if k < vocab:
    # The nucleus may extend past the candidates only where all of them are kept.
    spills = num_kept[..., 0] == k
    kept = jax.lax.cond(
        jnp.any(spills),
        lambda: jnp.where(spills[..., None], _top_p_cutoff_by_bisection(logits, probs, top_p), kept),
        lambda: kept)
  return jnp.where(kept, logits, -jnp.inf)


def apply_min_p(logits: jax.Array, min_p: jax.Array | float) -> jax.Array:
  """Keeps tokens whose probability is at least ``min_p`` times the largest (min_p in [0, 1]).

  In logit space: ``logit >= max_logit + log(min_p)``, no softmax needed.
  """
  top = jnp.max(logits, axis=-1, keepdims=True)
  return jnp.where(logits >= top + jnp.log(jnp.asarray(min_p, logits.dtype)), logits, -jnp.inf)


def process_logits(logits: jax.Array, *, temperature: jax.Array | float = 1.0, top_k: int = 0,
                   top_p: jax.Array | float | None = None,
                   min_p: jax.Array | float | None = None) -> jax.Array:
  """Temperature, then top-k, top-p, min-p (``None`` skips a step), on already masked logits.

  The result is the logits of the distribution the sampler draws from: ``softmax`` of it is the
  final processed distribution.
  """
  logits = apply_temperature(logits, temperature)
  logits = apply_top_k(logits, top_k)
  if top_p is not None:
    logits = apply_top_p(logits, top_p)
  if min_p is not None:
    logits = apply_min_p(logits, min_p)
  return logits


def check_sampling_settings(temperature: float, top_k: int, top_p: float, min_p: float) -> None:
  """Raises ValueError naming the first setting outside its range."""
  if not isinstance(temperature, (int, float, np.floating, np.integer)) or not np.isfinite(temperature) \
      or temperature < 0:
    raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
  if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 0:
    raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
  if not isinstance(top_p, (int, float, np.floating, np.integer)) or not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")
  if not isinstance(min_p, (int, float, np.floating, np.integer)) or not 0 <= min_p <= 1:
    raise ValueError(f"min_p must be in [0, 1] (0 = off), got {min_p!r}")


# --------------------------------------------------------------------------------------------
# Grammar


def grammar_allowed(transitions: jax.Array, accepting: jax.Array, states: jax.Array,
                    end_token_ids: Sequence[int]) -> jax.Array:
  """Bool ``[batch, vocab]``: the tokens the grammar allows in each row's state.

  Table entries of the end tokens are ignored: an end token is allowed exactly when the row's
  state is accepting, whatever the table says.
  """
  allowed = jnp.take(transitions, states, axis=0) >= 0
  ends = jnp.asarray(tuple(end_token_ids), jnp.int32)
  return allowed.at[:, ends].set(jnp.take(accepting, states)[:, None])


def advance_grammar(transitions: jax.Array, states: jax.Array, tokens: jax.Array) -> jax.Array:
  """Each row's state after emitting its token (``transitions[state, token]``).

  A disallowed token (only ever an end token or a row that already ended) would give -1; the state
  is then kept, so later gathers stay in range.
  """
  nxt = transitions[states, tokens]
  return jnp.where(nxt >= 0, nxt, states)


# --------------------------------------------------------------------------------------------
# Host-side masks


def banned_word_token_ids(token_texts: Sequence[str], words: Iterable[str],
                          exclude_ids: Iterable[int] = ()) -> np.ndarray:
  """Ids of every token whose decoded text contains one of ``words``, case-insensitively.

  Computed once on the host from ``Tokenizer.token_texts()``. It bans single tokens only: a word
  the model spells over several tokens ("o" + "wl") is not blocked by this (a grammar is the tool
  for that). ``exclude_ids`` (e.g. the special tokens, whose literal text like "<|im_end|>" could
  contain a short word) are never banned.
  """
  words = list(words)
  for word in words:
    if not isinstance(word, str) or not word:
      raise ValueError(f"banned words must be non-empty strings, got {word!r}")
  lowered = [w.lower() for w in words]
  exclude = {int(i) for i in exclude_ids}
  return np.array([i for i, text in enumerate(token_texts)
                   if i not in exclude and any(w in text.lower() for w in lowered)], np.int32)


def banned_token_mask(vocab_size: int, banned_token_ids: Iterable[int]) -> np.ndarray:
  """Bool ``[vocab]``, True where a token is allowed (not banned). Ids must be in range."""
  ids = np.asarray(list(banned_token_ids), np.int64).reshape(-1)
  bad = ids[(ids < 0) | (ids >= vocab_size)]
  if bad.size:
    raise ValueError(f"banned token ids {bad[:5].tolist()} are outside the vocabulary [0, {vocab_size})")
  allowed = np.ones(vocab_size, bool)
  allowed[ids] = False
  return allowed
