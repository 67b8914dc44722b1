"""Trait metrics: how much a model prefers the target (owl) when asked for its favourite animal.

Four metrics: the paper's sampled one (b) and exact ones that small models need:

(a) Exact, by teacher forcing: log P(the answer's first word is the target | question), the
    spelling variants (Owl, owl, OWL, Owls, ...) summed, for every word of a panel -> [questions,
    panel]; and the panel share (each word's probability normalised over the panel).
(b) Sampled, the paper's: N answers per question at temperature 1; an answer counts when the
    target occurs as a substring of the lowercased answer; mean per question.
(c) Multiple choice: P(the target's letter) normalised over the choice letters.
(d) Whole reference answers (the alignment trait): log P(the reply is exactly this text, then the
    end of the turn | question), each question with its own references (``reference_logprobs``).

The answer event, precisely. Let tok(v) be the tokenizer's own encoding of the variant v (the
canonical tokenization; other segmentations of the same text are not counted, and carry little
probability in practice). With ``event="first_word"`` (the default) the event of v is: the answer
starts with tok(v) AND the next token starts a new word, i.e. its text does not begin with a letter
(a space, punctuation, a newline, a digit, or an end-of-turn/special token). So "Owl", "Owl." and
"Owl is..." count for Owl; "Owlet" does not, and "Owls" counts for the variant Owls only. Two
variants' events can only overlap when tok(a) is a proper prefix of tok(b) and the token of b right
after it is a word-boundary token; then b's event lies inside a's and b is dropped. The remaining
events are disjoint, so their probabilities add exactly. With ``event="prefix"`` the event of v is
"the answer's tokens start with tok(v)" (the PyTorch reference run's "starts with Owl/owl",
docs/evaluation.md); there a variant whose tok() extends another's is inside it and dropped (with
plurals, "Owls" is inside "Owl" whenever tok("Owls") starts with tok("Owl")), and again the rest are
disjoint.

Computation: one forward of each prompt fills a KV cache (and gives the first answer token's
distribution); the cache rows are then gathered for every (question, variant) pair and only the
variant's few tokens are run, in fixed-shape batches under ``jax.jit``. The chat prompt comes from
``tokenizer.render_chat`` with the system choice passed through explicitly as a ``SystemTurn``
(the default, ``SystemTurn()``, is no system turn at all).

``*_many`` (K LoRA adapters of one base in one program, e.g. a matrix's students): the same
quantities, prefix-shared: all variants of a prompt run in one row after its cache as a token
trie with a tree mask, and the forward is vmapped over the stacked adapters (see the section
"Prefix-shared evaluation of many adapters of one base"). When a model's prompts share a long
common token prefix (an in-context history before every question), that prefix is prefilled once,
in chunks, and the questions run after it (section "Long shared prefixes"; ``answer_logprobs`` and
``exact_preference`` take that path too).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Mapping, NamedTuple, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from subliminal_jax import lora as lora_lib
from subliminal_jax import padding, sharding
from subliminal_jax import progress as progress_lib
from subliminal_jax.evaluation import questions as questions_lib
from subliminal_jax.models.transformer import KVCache, Transformer
from subliminal_jax.sampling import chat as chat_lib
from subliminal_jax.sampling import sampler
from subliminal_jax.tokenizer import SystemTurn

EVENTS = ("first_word", "prefix")
_PROMPT_BUCKET = 32  # prompt lengths are padded up to a multiple of this (fewer recompiles)
_CONTINUATION_CACHE_BYTES = 512 * 2**20  # gathered KV-cache copies per continuation call, at most


class ChatTokenizer(Protocol):
  """The part of ``subliminal_jax.tokenizer.Tokenizer`` this module uses."""

  eos_id: int
  pad_id: int
  end_of_turn_ids: tuple[int, ...]

  def encode(self, text: str) -> list[int]: ...
  def token_texts(self) -> list[str]: ...
  def render_chat(self, messages: list[dict], *, system: SystemTurn = SystemTurn(),
                  add_generation_prompt: bool = True) -> str: ...


# ---------------------------------------------------------------------------------------------
# Token-level pieces


def chat_prompt_ids(tokenizer: ChatTokenizer, user_prompts: Sequence[str], *,
                    system: SystemTurn = SystemTurn(),
                    histories: Sequence[Sequence[Mapping[str, str]]] | None = None) -> list[list[int]]:
  """Token ids of each user prompt rendered as a chat, ending with the assistant turn's header.

  ``histories``: per prompt, the user/assistant turns that come before it (e.g. number sequences
  in the model's context), or None for none.
  """
  if isinstance(user_prompts, str):
    raise TypeError("user_prompts must be a sequence of strings, not one string")
  if histories is not None and len(histories) != len(user_prompts):
    raise ValueError(f"histories has {len(histories)} entries for {len(user_prompts)} prompts; "
                     "expected one (possibly empty) list of turns per prompt")
  out = []
  for index, prompt in enumerate(user_prompts):
    history = list(histories[index]) if histories is not None else []
    text = tokenizer.render_chat(history + [{"role": "user", "content": prompt}], system=system,
                                 add_generation_prompt=True)
    ids = tokenizer.encode(text)
    if not ids:
      raise ValueError(f"the chat prompt for {prompt!r} encodes to no tokens")
    out.append(list(ids))
  return out


def word_boundary_mask(tokenizer: ChatTokenizer, vocab_size: int) -> np.ndarray:
  """bool [vocab_size]: tokens that end a word when they follow one.

  A token ends the word before it when its text does not start with a letter (``str.isalpha``),
  when its text is empty, or when it is a special, end-of-turn or eos token. (A byte fragment of a
  multi-byte character decodes to U+FFFD, not a letter, so it counts as a boundary: "Owlé" would
  count as "Owl"; such continuations carry negligible probability.) Ids past the tokenizer's
  vocabulary (padding rows of a model's embedding) are never a boundary.
  """
  texts = tokenizer.token_texts()
  if len(texts) > vocab_size:
    raise ValueError(f"the tokenizer has {len(texts)} tokens but the model only {vocab_size} logits")
  mask = np.zeros(vocab_size, dtype=bool)
  for i, text in enumerate(texts):
    mask[i] = not text or not text[0].isalpha()
  for i in (tuple(tokenizer.end_of_turn_ids) + (tokenizer.eos_id,)
            + tuple(getattr(tokenizer, "special_ids", ()))):
    mask[i] = True
  return mask


def disjoint_sequences(sequences: Sequence[Sequence[int]], *, event: str,
                       boundary: np.ndarray | None = None) -> tuple[tuple[int, ...], ...]:
  """The token sequences whose events are disjoint and cover the union of all the events.

  event "prefix": a sequence that extends another is dropped (its event is inside the other's).
  event "first_word": b is dropped when a is a proper prefix of b and b's next token after a is a
  word boundary (then every answer in b's event is in a's). Duplicates are dropped. Order is kept.
  """
  if event not in EVENTS:
    raise ValueError(f"event {event!r} is not known; expected one of {list(EVENTS)}")
  if event == "first_word" and boundary is None:
    raise ValueError("event 'first_word' needs the word-boundary mask")
  unique = list(dict.fromkeys(tuple(int(t) for t in s) for s in sequences))
  for s in unique:
    if not s:
      raise ValueError("an answer variant encodes to no tokens")

  def inside(b: tuple[int, ...], a: tuple[int, ...]) -> bool:  # event(b) within event(a)?
    if len(a) >= len(b) or b[:len(a)] != a:
      return False
    return event == "prefix" or bool(boundary[b[len(a)]])

  return tuple(b for b in unique if not any(inside(b, a) for a in unique if a != b))


# ---------------------------------------------------------------------------------------------
# The jitted forward passes


@functools.partial(jax.jit, static_argnums=(0, 4))
def _prompt_logprobs(graphdef, state, ids, mask, max_length):
  """The sampler's prefill of left-padded prompts; log-softmax of the next token after each."""
  logits, cache = sampler.prefill(nnx.merge(graphdef, state), ids, mask, max_length)
  return jax.nn.log_softmax(logits, axis=-1), cache


@functools.partial(jax.jit, static_argnums=(0, 8))
def _continue(graphdef, state, cache: KVCache, rows, ids, mask, targets, target_mask,
              with_boundary, boundary, last):
  """Runs each row's answer tokens after its prompt's cache row.

  rows [R]: prompt row of each continuation; ids/mask [R, L]: the answer tokens fed in;
  targets/target_mask [R, L]: the token position j must predict. Returns the summed target
  log-probabilities [R] and, with ``with_boundary``, log P(word boundary) after position ``last``.
  """
  model = nnx.merge(graphdef, state)
  cache = KVCache(k=cache.k[:, rows], v=cache.v[:, rows], key_mask=cache.key_mask[rows],
                  next_position=cache.next_position[rows], length=cache.length)
  logits, _ = model(ids, mask, cache=cache)
  logp = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  token_sum = jnp.sum(jnp.where(target_mask, picked, 0.0), axis=-1)
  if not with_boundary:
    return token_sum, jnp.zeros_like(token_sum)
  at_last = jnp.take_along_axis(logp, last[:, None, None], axis=1)[:, 0]  # [R, V]
  boundary_lp = jax.nn.logsumexp(jnp.where(boundary[None], at_last, -jnp.inf), axis=-1)
  return token_sum, boundary_lp


def _put(array: np.ndarray, mesh: Mesh | None):
  if mesh is None:
    return jnp.asarray(array)
  return sharding.put_host_array(array, sharding.batch_sharding(mesh, array.ndim))


class _TeacherForcing(NamedTuple):
  """The continuations as teacher-forcing arrays ([C, L] each, L the longest fed length)."""
  ids: np.ndarray          # tokens fed after the prompt
  mask: np.ndarray
  targets: np.ndarray      # the token each fed position predicts
  target_mask: np.ndarray
  last: np.ndarray         # [C] the position whose next token is the boundary
  first_tokens: np.ndarray  # [C] c[0], predicted by the prompt's last position
  length_groups: list      # (fed length, continuation indices) for fed lengths > 0
  num_single: int          # continuations of one token without a boundary: nothing to feed


def _teacher_forcing_arrays(continuations: Sequence[tuple[int, ...]], with_boundary: bool
                            ) -> _TeacherForcing:
  # Tokens fed after the prompt: all of c with a boundary (the last position predicts it), else
  # all but the last (c[0] is predicted by the prompt's last position, c[j] by c[j-1]).
  fed = [c if with_boundary else c[:-1] for c in continuations]
  cont_len = max(1, max(len(f) for f in fed))
  num_cont = len(continuations)
  arrays = _TeacherForcing(
      ids=np.zeros((num_cont, cont_len), np.int32), mask=np.zeros((num_cont, cont_len), bool),
      targets=np.zeros((num_cont, cont_len), np.int32),
      target_mask=np.zeros((num_cont, cont_len), bool), last=np.zeros((num_cont,), np.int32),
      first_tokens=np.array([c[0] for c in continuations]), length_groups=[], num_single=0)
  for i, (c, f) in enumerate(zip(continuations, fed)):
    arrays.ids[i, :len(f)] = f
    arrays.mask[i, :len(f)] = True
    arrays.targets[i, :len(c) - 1] = c[1:]
    arrays.target_mask[i, :len(c) - 1] = True
    arrays.last[i] = len(c) - 1
  fed_lengths = np.array([len(f) for f in fed])
  length_groups = [(int(n), np.flatnonzero(fed_lengths == n).tolist())
                   for n in sorted(set(fed_lengths.tolist())) if n > 0]
  num_single = int(np.count_nonzero(fed_lengths == 0))  # the prompt's forward gives all they need
  return arrays._replace(length_groups=length_groups, num_single=num_single)


def _continuation_row_batch(cfg, max_length: int, batch_size: int, data_parallel: int) -> int:
  """Continuation rows per call: ``batch_size`` rounded to whole rows per device, bounded so the
  rows' copies of their prompt's KV cache stay under ``_CONTINUATION_CACHE_BYTES`` (with number
  sequences in the context, 64 rows of SmolLM2 would copy 3 GB per call)."""
  row_batch = padding.round_up(max(1, batch_size), data_parallel)
  row_bytes = (2 * cfg.num_layers * max_length * cfg.num_kv_heads * cfg.head_dim
               * np.dtype(cfg.dtype).itemsize)
  return min(row_batch, max(data_parallel,
                            _CONTINUATION_CACHE_BYTES // row_bytes // data_parallel * data_parallel))


def _checked_continuations(continuations: Sequence[Sequence[int]], boundary: np.ndarray | None,
                           vocab: int) -> tuple[list[tuple[int, ...]], np.ndarray | None]:
  """The continuations as int tuples and the boundary mask as bool [vocab], both checked."""
  continuations = [tuple(int(t) for t in c) for c in continuations]
  if any(not c for c in continuations):
    raise ValueError("every continuation needs at least one token")
  for c in continuations:
    if min(c) < 0 or max(c) >= vocab:
      raise ValueError(f"continuation {c} has token ids outside the model's vocabulary [0, {vocab})")
  if boundary is not None:
    boundary = np.asarray(boundary, dtype=bool)
    if boundary.shape != (vocab,):
      raise ValueError(f"boundary mask has shape {boundary.shape}, expected ({vocab},)")
  return continuations, boundary


def continuation_logprobs(model: Transformer, prompt_ids: Sequence[Sequence[int]],
                          continuations: Sequence[Sequence[int]], *, pad_id: int,
                          boundary: np.ndarray | None = None, batch_size: int = 64,
                          prompt_batch_size: int = 8, mesh: Mesh | None = None,
                          desc: str | None = None) -> np.ndarray:
  """log P(the model continues prompt p with the tokens c [and then a boundary token]) -> [P, C].

  Teacher forcing: the sum of the log-probabilities of c's tokens given the prompt and the tokens
  before them; with ``boundary`` (bool [vocab]) plus log P(next token is in the boundary set).
  float64 on the host; exact up to float32 logits.
  """
  if not len(prompt_ids) or not len(continuations):
    raise ValueError(f"need at least one prompt and one continuation, got {len(prompt_ids)} prompts "
                     f"and {len(continuations)} continuations")
  vocab = model.config.vocab_size
  continuations, boundary = _checked_continuations(continuations, boundary, vocab)
  with_boundary = boundary is not None

  conts = _teacher_forcing_arrays(continuations, with_boundary)
  num_cont = len(continuations)
  dp = sharding.data_parallel_size(mesh)
  prompt_batch = padding.round_up(max(1, min(prompt_batch_size, len(prompt_ids))), dp)
  prompt_len = padding.round_up(max(len(p) for p in prompt_ids), _PROMPT_BUCKET)
  max_length = prompt_len + conts.ids.shape[1]
  row_batch = _continuation_row_batch(model.config, max_length, batch_size, dp)
  graphdef, state = nnx.split(model)
  boundary_dev = jnp.asarray(boundary if with_boundary else np.zeros(vocab, bool))
  out = np.empty((len(prompt_ids), num_cont), np.float64)
  context = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
  bar = tqdm(total=len(prompt_ids) * num_cont,
             desc=progress_lib.describe(desc or "teacher forcing"), unit="answer",
             disable=desc is None)
  with context:
    for start in range(0, len(prompt_ids), prompt_batch):
      chunk = list(prompt_ids[start:start + prompt_batch])
      n_real = len(chunk)
      chunk += [chunk[0]] * (prompt_batch - n_real)  # fixed shapes: pad with copies
      # Left padding: the prompt ends at the last column.
      ids, mask = padding.pad_rows(chunk, pad_value=pad_id, side="left", width=prompt_len)
      first_lp, cache = _prompt_logprobs(graphdef, state, _put(ids, mesh), _put(mask, mesh),
                                         max_length)
      first_lp = sharding.to_host(first_lp).astype(np.float64)[:n_real]
      result = first_lp[:, conts.first_tokens]  # [n_real, C]
      # Rows are grouped by how many tokens they feed, so no row pays for a longer one's padding.
      for length, group in conts.length_groups:
        pairs = [(q, c) for q in range(n_real) for c in group]
        for pair_start in range(0, len(pairs), row_batch):
          block = pairs[pair_start:pair_start + row_batch]
          padded = block + [block[0]] * (row_batch - len(block))
          q_idx = np.array([q for q, _ in padded], np.int32)
          c_idx = np.array([c for _, c in padded], np.int32)
          fed = [_put(a[c_idx, :length], mesh)
                 for a in (conts.ids, conts.mask, conts.targets, conts.target_mask)]
          token_sum, boundary_lp = _continue(
              graphdef, state, cache, _put(q_idx, mesh), *fed, with_boundary, boundary_dev,
              _put(conts.last[c_idx], mesh))
          token_sum, boundary_lp = sharding.to_host((token_sum, boundary_lp))
          extra = (token_sum.astype(np.float64) + boundary_lp.astype(np.float64))[:len(block)]
          result[q_idx[:len(block)], c_idx[:len(block)]] += extra
          bar.update(len(block))
      bar.update(n_real * conts.num_single)
      out[start:start + n_real] = result
  bar.close()
  return out


class _AnswerVariants(NamedTuple):
  """Each answer's disjoint variant token sequences, and the distinct sequences of all answers."""
  boundary: np.ndarray | None  # the word-boundary mask (event "first_word")
  per_answer: list
  unique: list

  @classmethod
  def of(cls, tokenizer: ChatTokenizer, answers: Sequence[Sequence[str]], event: str,
         vocab: int) -> "_AnswerVariants":
    if event not in EVENTS:
      raise ValueError(f"event {event!r} is not known; expected one of {list(EVENTS)}")
    boundary = word_boundary_mask(tokenizer, vocab) if event == "first_word" else None
    per_answer = []
    for variants in answers:
      if isinstance(variants, str) or not len(variants):
        raise ValueError(f"each answer needs a non-empty list of variants, got {variants!r}")
      per_answer.append(disjoint_sequences([tokenizer.encode(v) for v in variants], event=event,
                                           boundary=boundary))
    return cls(boundary, per_answer, list(dict.fromkeys(s for seqs in per_answer for s in seqs)))

  def summed(self, seq_lp: np.ndarray) -> np.ndarray:
    """[..., unique sequences] log-probs -> [..., answers]: each answer's variants summed."""
    index = {s: i for i, s in enumerate(self.unique)}
    return np.stack([np.logaddexp.reduce(seq_lp[..., [index[s] for s in seqs]], axis=-1)
                     for seqs in self.per_answer], axis=-1)


def answer_logprobs(model: Transformer, tokenizer: ChatTokenizer, user_prompts: Sequence[str],
                    answers: Sequence[Sequence[str]], *, system: SystemTurn = SystemTurn(),
                    event: str = "first_word",
                    batch_size: int = 64, mesh: Mesh | None = None,
                    desc: str | None = None,
                    histories: Sequence[Sequence[Mapping[str, str]]] | None = None) -> np.ndarray:
  """log P(the answer is one of ``answers[a]``'s variants | prompt q) -> float64 [prompts, answers].

  ``answers[a]`` is a list of surface variants; their events (see the module docstring) are made
  disjoint and their probabilities summed in log space. ``histories``: see :func:`chat_prompt_ids`;
  when the prompts share a long common prefix (a history the same for every prompt), it is
  prefilled once, as :func:`continuation_logprobs_many` does.
  """
  variants = _AnswerVariants.of(tokenizer, answers, event, model.config.vocab_size)
  prompt_ids = chat_prompt_ids(tokenizer, user_prompts, system=system, histories=histories)
  kwargs = dict(pad_id=tokenizer.pad_id, boundary=variants.boundary, batch_size=batch_size,
                mesh=mesh, desc=desc)
  if _shared_prefix_lengths([prompt_ids], SHARED_PREFIX_MIN) is not None:
    # A long history before every prompt: prefilled once (see "Long shared prefixes").
    seq_lp = continuation_logprobs_many([model], [prompt_ids], variants.unique, **kwargs)[0]
  else:
    seq_lp = continuation_logprobs(model, prompt_ids, variants.unique, **kwargs)
  return variants.summed(seq_lp)


# ---------------------------------------------------------------------------------------------
# Prefix-shared evaluation of many adapters of one base
#
# The same quantities as ``continuation_logprobs``, computed differently: all continuations of a
# prompt ride in ONE row after its prefilled cache, as a token trie (each distinct token prefix
# once), every trie token attending to the prompt and to its own ancestors only, at RoPE position
# (prompt's real length + depth). No cache row is copied per continuation. And K models that are
# one base with different LoRA adapters run in one program: the adapters are stacked on a leading
# axis and the forward is ``jax.vmap``-ed over them with the base weights shared (stored and read
# once per call).

_TRIE_BUCKET = 16  # the packed row is padded to a multiple of this
# KV cache and logits of one call ((member, prompt) rows x the bytes of one), at most.
_PACKED_CALL_BYTES = 1024 * 2**20
# Long shared prefixes (see that section below):
SHARED_PREFIX_MIN = 64  # common prompt tokens from which the prefix is prefilled once
PREFIX_CHUNK = 256  # prefix tokens prefilled per step, over all members (bounds the scores)


class _Trie(NamedTuple):
  """The continuations' token trie packed in one row, and where each continuation reads it."""
  ids: np.ndarray           # [N] the node's last token (N: nodes padded to _TRIE_BUCKET)
  mask: np.ndarray          # [N] a real node
  depth: np.ndarray         # [N] tokens before it in its continuation
  ancestors: np.ndarray     # [N, N] node j may attend to node i (i is j or above it)
  first_tokens: np.ndarray  # [C] c[0], predicted by the prompt's last position
  target_nodes: np.ndarray  # [C, L] the node that predicts c[i + 1]
  target_tokens: np.ndarray  # [C, L] c[i + 1]
  target_mask: np.ndarray   # [C, L]
  last_nodes: np.ndarray    # [C] the node of all of c (predicts the boundary; 0 without one)


def _packed_trie(continuations: Sequence[tuple[int, ...]], with_boundary: bool) -> _Trie:
  # Node p (a token prefix) is fed when some continuation needs the distribution after p: after
  # each proper prefix, and after all of c when a boundary follows it.
  nodes: dict[tuple[int, ...], int] = {}
  for c in continuations:
    for end in range(1, len(c) + (1 if with_boundary else 0)):
      nodes.setdefault(c[:end], len(nodes))
  size = padding.round_up(max(1, len(nodes)), _TRIE_BUCKET)
  ids, depth = np.zeros(size, np.int32), np.zeros(size, np.int32)
  mask, ancestors = np.zeros(size, bool), np.zeros((size, size), bool)
  for prefix, j in nodes.items():
    ids[j], depth[j], mask[j] = prefix[-1], len(prefix) - 1, True
    for end in range(1, len(prefix) + 1):  # every prefix of a fed prefix is fed too
      ancestors[j, nodes[prefix[:end]]] = True
  # Bucketed, as the nodes: continuation sets of similar lengths compile once.
  width = padding.round_up(max(1, max(len(c) for c in continuations) - 1), _TRIE_BUCKET)
  target_nodes = np.zeros((len(continuations), width), np.int32)
  target_tokens, target_mask = np.zeros_like(target_nodes), np.zeros(target_nodes.shape, bool)
  for i, c in enumerate(continuations):
    for k in range(len(c) - 1):
      target_nodes[i, k], target_tokens[i, k], target_mask[i, k] = nodes[c[:k + 1]], c[k + 1], True
  last_nodes = np.array([nodes[c] if with_boundary else 0 for c in continuations], np.int32)
  return _Trie(ids, mask, depth, ancestors, np.array([c[0] for c in continuations], np.int32),
               target_nodes, target_tokens, target_mask, last_nodes)


def _trie_logprobs(first_logits, logits, trie: _Trie, with_boundary, boundary):
  """From the logits after each prompt [B, V] and of the trie after it [B, N, V]: float32 [B, C]
  each, log P(c[0]), the summed log-probs of c's later tokens, and log P(boundary after c) (zeros
  without ``with_boundary``)."""
  first = jax.nn.log_softmax(first_logits, axis=-1)[:, trie.first_tokens]
  normaliser = jax.nn.logsumexp(logits, axis=-1)  # [B, N]
  picked = logits[:, trie.target_nodes, trie.target_tokens] - normaliser[:, trie.target_nodes]
  later = jnp.sum(jnp.where(trie.target_mask, picked, 0.0), axis=-1)
  if not with_boundary:
    return first, later, jnp.zeros_like(later)
  ends = jax.nn.logsumexp(jnp.where(boundary, logits, -jnp.inf), axis=-1) - normaliser
  return first, later, ends[:, trie.last_nodes]


@functools.partial(jax.jit, static_argnums=(0, 6, 7))
def _packed_logprobs(graphdef, base_state, adapters, ids, mask, trie: _Trie, cache_length,
                     with_boundary, boundary):
  """Each member's prefill of its prompts [K, B, T], then the trie after every prompt.

  Returns float32 [K, B, C] each: see :func:`_trie_logprobs`.
  """
  def one_member(adapters, ids, mask):
    model = nnx.merge(graphdef, base_state, adapters)
    first_logits, cache = sampler.prefill(model, ids, mask, cache_length)
    b, n = ids.shape[0], trie.ids.shape[0]
    # The prompt's slots are filtered by the cache's key mask; the trie's by ancestry.
    attend = jnp.concatenate([jnp.ones((1, n, ids.shape[1]), bool), trie.ancestors[None]], axis=2)
    hidden, _ = model.hidden_states(
        jnp.broadcast_to(trie.ids, (b, n)), jnp.broadcast_to(trie.mask, (b, n)), cache=cache,
        positions=cache.next_position[:, None] + trie.depth[None], attend=attend)
    logits = model.logits_from_hidden(hidden)  # [b, n, V]
    return _trie_logprobs(first_logits, logits, trie, with_boundary, boundary)

  return jax.vmap(one_member)(adapters, ids, mask)


def _adapter_layout(model: Transformer) -> tuple[tuple[str, int, float], ...]:
  """(target, rank, scale) of each adapted projection."""
  return tuple((name, getattr(model.layers, name).lora_a.shape[-1],
                getattr(model.layers, name).lora_scale) for name in lora_lib.lora_targets(model))


def _same_base(reference: Any, state: Any) -> bool:
  ref_leaves, leaves = jax.tree.leaves(reference), jax.tree.leaves(state)
  if jax.tree.structure(reference) != jax.tree.structure(state):
    return False
  # Adapters restored onto clones share the base's arrays: an identity check costs nothing.
  return all(a is b or (a.shape == b.shape and a.dtype == b.dtype and bool(jnp.array_equal(a, b)))
             for a, b in zip(ref_leaves, leaves))


def _stacked_members(models: Sequence[Transformer]) -> tuple[Any, Any, Any]:
  """(graphdef, base state, adapter states stacked on a leading member axis) of K models.

  Raises ValueError when a member's non-adapter weights are not the first member's, or when
  adapted members differ in targets, rank or scale. A member without adapters gets zero ones of
  the others' layout (x @ 0 @ 0 adds exactly 0).
  """
  models = list(models)
  if not models or not all(isinstance(m, Transformer) for m in models):
    raise ValueError(f"need a non-empty sequence of Transformer models, got {models!r:.200}")
  splits = [nnx.split(m, nnx.LoRAParam, ...) for m in models]
  adapted = [i for i, m in enumerate(models) if lora_lib.lora_targets(m)]
  ref = adapted[0] if adapted else 0
  graphdef, ref_adapters, base_state = splits[ref]
  for i, (member_graphdef, _, rest) in enumerate(splits):
    if models[i].config != models[ref].config or not _same_base(base_state, rest):
      raise ValueError(f"models[{i}] is not the same base model as models[{ref}] (its non-adapter "
                       "weights or config differ); only LoRA adapters may differ between members")
    if i in adapted and member_graphdef != graphdef:
      raise ValueError(f"models[{i}]'s adapters (target, rank, scale) {_adapter_layout(models[i])} "
                       f"differ from models[{ref}]'s {_adapter_layout(models[ref])}")
  zeros = jax.tree.map(jnp.zeros_like, ref_adapters)
  states = [splits[i][1] if i in adapted else zeros for i in range(len(models))]
  return graphdef, base_state, jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def _put_members(array: np.ndarray, mesh: Mesh | None):
  """A [K, batch, ...] host array; under a mesh its batch axis (not K) is split."""
  if mesh is None:
    return jnp.asarray(array)
  spec = sharding.batch_sharding(mesh, array.ndim - 1).spec
  return sharding.put_host_array(array, NamedSharding(mesh, PartitionSpec(None, *spec)))


def _put_replicated(array: np.ndarray, mesh: Mesh | None):
  """A host array whole on every device (one member's prefix row is not split)."""
  if mesh is None:
    return jnp.asarray(array)
  return sharding.put_host_array(array, NamedSharding(mesh, PartitionSpec()))


def _row_bytes(cfg, queries: int, slots: int, scored: int) -> int:
  """Memory of one row of a packed call: its KV cache of ``slots``, the attention of ``queries``
  over them (per head three float32 arrays: scores, masked scores, probabilities; and the mask),
  and ``scored`` positions' float32 logits, twice."""
  cache = (2 * cfg.num_layers * slots * cfg.num_kv_heads * cfg.head_dim
           * np.dtype(cfg.dtype).itemsize)
  return (cache + queries * slots * (3 * cfg.num_heads * 4 + 1)
          + 2 * scored * cfg.vocab_size * 4)


def _packed_prompt_batch(cfg, num_members: int, cache_length: int, trie_size: int,
                         batch_size: int, num_prompts: int, data_parallel: int) -> int:
  """Prompts per member and call: at most ``batch_size // K`` (member, prompt) rows, bounded so
  K x prompts x (one row's KV cache, its prefill's attention and its trie's logits, see
  ``_row_bytes``) stays under ``_PACKED_CALL_BYTES``; whole rows per device. (Without the
  attention, 20 prompts of 2k tokens of the SmolLM2 shape went into one call: about 10 GB of
  scores, probabilities and mask.)"""
  row_bytes = _row_bytes(cfg, cache_length, cache_length, trie_size)
  rows = min(max(1, batch_size // num_members), num_prompts,
             max(1, _PACKED_CALL_BYTES // (num_members * row_bytes)))
  return padding.round_up(rows, data_parallel)


class _PackedMembers(NamedTuple):
  """What both packed paths share: the stacked members and the panel's trie and boundary."""
  config: Any               # the members' TransformerConfig
  graphdef: Any
  base_state: Any
  adapters: Any             # stacked on a leading member axis
  trie: _Trie               # on the host
  with_boundary: bool
  boundary: jax.Array       # bool [vocab] (one False without a boundary)
  mesh: Mesh | None

  @property
  def trie_on_device(self) -> _Trie:
    return _Trie(*(jnp.asarray(a) for a in self.trie))


def _whole_prompt_logprobs(job: _PackedMembers, prompt_ids: Sequence[Sequence[Sequence[int]]],
                           pad_id: int, batch_size: int, bar) -> np.ndarray:
  """float64 [K, P, C]: every (member, prompt) prefilled whole, the trie after each."""
  num_members, num_prompts = len(prompt_ids), len(prompt_ids[0])
  prompt_len = padding.round_up(max(len(p) for member in prompt_ids for p in member),
                                _PROMPT_BUCKET)
  cache_length = prompt_len + len(job.trie.ids)
  prompt_batch = _packed_prompt_batch(job.config, num_members, cache_length, len(job.trie.ids),
                                      batch_size, num_prompts,
                                      sharding.data_parallel_size(job.mesh))
  trie = job.trie_on_device
  out = np.empty((num_members, num_prompts, len(job.trie.first_tokens)), np.float64)
  for start in range(0, num_prompts, prompt_batch):
    n_real = min(prompt_batch, num_prompts - start)
    # Fixed shapes: pad with copies; left padding ends every prompt at the last column.
    rows = [padding.pad_rows(list(member[start:start + n_real])
                             + [member[start]] * (prompt_batch - n_real),
                             pad_value=pad_id, side="left", width=prompt_len)
            for member in prompt_ids]
    parts = _packed_logprobs(job.graphdef, job.base_state, job.adapters,
                             _put_members(np.stack([ids for ids, _ in rows]), job.mesh),
                             _put_members(np.stack([mask for _, mask in rows]), job.mesh),
                             trie, cache_length, job.with_boundary, job.boundary)
    parts = [p.astype(np.float64)[:, :n_real] for p in sharding.to_host(parts)]
    out[:, start:start + n_real] = parts[0] + parts[1] + parts[2]
    bar.update(num_members * n_real)
  return out


def continuation_logprobs_many(models: Sequence[Transformer],
                               prompt_ids: Sequence[Sequence[Sequence[int]]],
                               continuations: Sequence[Sequence[int]], *, pad_id: int,
                               boundary: np.ndarray | None = None, batch_size: int = 64,
                               mesh: Mesh | None = None, desc: str | None = None,
                               shared_prefix_min: int | None = SHARED_PREFIX_MIN,
                               prefix_chunk: int = PREFIX_CHUNK) -> np.ndarray:
  """:func:`continuation_logprobs` of K adapters of one base at once -> float64 [K, P, C].

  ``prompt_ids[k]``: member k's P prompts (members may have different prompts, e.g. histories).
  Prefix-shared: each prompt is prefilled once, then all continuations run in one packed row as
  a token trie (see the section comment). ``batch_size``: (member, prompt) rows per call, at most;
  memory per call is K x prompts x (KV cache row + the trie's logits), see
  ``_packed_prompt_batch``.

  When some member's prompts share a common token prefix of at least ``shared_prefix_min`` tokens
  (a long in-context history before each question; None: never), each member's common prefix is
  prefilled once, ``prefix_chunk`` tokens (over all members) at a time, and the questions' rest
  and tries run after it (see "Long shared prefixes" below); the numbers are the same.
  """
  graphdef, base_state, adapters = _stacked_members(models)
  if len(prompt_ids) != len(models):
    raise ValueError(f"prompt_ids has {len(prompt_ids)} entries for {len(models)} models")
  num_prompts = {len(p) for p in prompt_ids}
  if len(num_prompts) != 1 or not min(num_prompts) or not len(continuations):
    raise ValueError(f"every member needs the same non-zero number of prompts (got "
                     f"{sorted(num_prompts)}) and at least one continuation")
  num_prompts = num_prompts.pop()
  if prefix_chunk < 1:
    raise ValueError(f"prefix_chunk={prefix_chunk} must be positive")
  continuations, boundary = _checked_continuations(continuations, boundary,
                                                   models[0].config.vocab_size)
  with_boundary = boundary is not None
  job = _PackedMembers(models[0].config, graphdef, base_state, adapters,
                  _packed_trie(continuations, with_boundary), with_boundary,
                  jnp.asarray(boundary if with_boundary else np.zeros(1, bool)), mesh)
  prefix_lengths = _shared_prefix_lengths(prompt_ids, shared_prefix_min)
  context = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
  bar = tqdm(total=len(models) * num_prompts,
             desc=progress_lib.describe(desc or "teacher forcing"), unit="prompt",
             disable=desc is None)
  with context:
    if prefix_lengths is None:
      out = _whole_prompt_logprobs(job, prompt_ids, pad_id, batch_size, bar)
    else:
      out = _shared_prefix_logprobs(job, prompt_ids, prefix_lengths, pad_id, batch_size,
                                    max(_PROMPT_BUCKET, prefix_chunk // len(models)), bar)
  bar.close()
  return out


# ---------------------------------------------------------------------------------------------
# Long shared prefixes
#
# With an in-context history of thousands of tokens before each question (the same history for
# every question of a member), prefilling each (member, question) prompt whole repeats the
# history's forward per question, with a history x history score matrix per layer. Instead each
# member's common token prefix is prefilled ONCE into a one-row cache, in chunks (each chunk's
# scores are chunk x cache slots), and the questions then run after it, a few packed per row: a
# block per question, its remaining tokens (its "suffix", left-padded to a common width) followed
# by a copy of the panel's trie, every block attending to the prefix, causally within its suffix,
# and to its own trie ancestors, never to another question's block. Positions are explicit (prefix
# length + offset), so each token sees exactly the context and position it has in the whole
# prompt: the same numbers as the whole-prompt path, including Gemma 3's sliding window (a key's
# position decides the window, not its slot). Each call copies the member's prefix cache once per
# row (to write the row into), not once per question. On a data-parallel mesh every device holds
# the prefix caches whole (one row each) and runs its own rows of questions.


def _common_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
  """Tokens all prompts start with, at most one fewer than the shortest prompt has (every
  question keeps its last token, whose logits predict the answer's first token)."""
  shortest = min(len(p) for p in prompts)
  first = np.asarray(prompts[0][:shortest])
  length = shortest - 1
  for prompt in prompts[1:]:
    differs = np.flatnonzero(np.asarray(prompt[:length]) != first[:length])
    length = int(differs[0]) if len(differs) else length
  return length


def _shared_prefix_lengths(prompt_ids: Sequence[Sequence[Sequence[int]]],
                           shared_prefix_min: int | None) -> list[int] | None:
  """Each member's common prefix length, or None when no member's reaches ``shared_prefix_min``
  or when the shared path would feed more tokens than prefilling every prompt whole (a member
  whose prompts differ early would put its whole prompts in the packed row)."""
  if shared_prefix_min is None:
    return None
  lengths = [_common_prefix_length(member) for member in prompt_ids]
  if max(lengths) < shared_prefix_min:
    return None
  num_prompts = len(prompt_ids[0])
  whole = num_prompts * max(len(p) for member in prompt_ids for p in member)
  suffix = max(len(p) - n for member, n in zip(prompt_ids, lengths) for p in member)
  return lengths if max(lengths) + num_prompts * suffix <= whole else None


def _prefix_chunks(prefixes: Sequence[Sequence[int]], pad_id: int, chunk_limit: int
                   ) -> tuple[np.ndarray, np.ndarray]:
  """The members' prefixes left-padded to one width and cut into equal chunks of at most
  ``chunk_limit`` tokens (whole prompt buckets): ids and mask [K, chunks, chunk]."""
  longest = max(len(p) for p in prefixes)
  num_chunks = -(-longest // chunk_limit)
  chunk = padding.round_up(-(-longest // max(1, num_chunks)), _PROMPT_BUCKET)
  ids, mask = padding.pad_rows(prefixes, pad_value=pad_id, side="left", width=num_chunks * chunk)
  shape = (len(prefixes), num_chunks, chunk)
  return ids.reshape(shape), mask.reshape(shape)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _prefix_caches(graphdef, base_state, adapters, ids, mask, cache_length):
  """Each member's prefix [K, chunks, chunk] prefilled chunk by chunk (each chunk written at the
  cache's length) into a one-row cache of ``cache_length`` slots -> KVCache stacked over K."""
  def one_member(adapters, ids, mask):
    model = nnx.merge(graphdef, base_state, adapters)

    def step(cache, chunk):
      _, cache = model.hidden_states(chunk[0][None], chunk[1][None], cache=cache)
      return cache, None

    cache = sampler.constrain_cache(model.init_cache(1, cache_length))
    return jax.lax.scan(step, cache, (ids, mask))[0]

  return jax.vmap(one_member)(adapters, ids, mask)


class _QuestionBlocks(NamedTuple):
  """G question blocks (suffix slots, then the trie's) packed in one row of G x W slots."""
  attend: np.ndarray        # [G*W, G*W] slot j may attend to slot i (within one block)
  last_slots: np.ndarray    # [G] each suffix's last token (its logits predict c[0])
  trie_slots: np.ndarray    # [G, N] each block's trie nodes


def _question_blocks(trie: _Trie, suffix_width: int, per_row: int) -> _QuestionBlocks:
  num_nodes = len(trie.ids)
  width = suffix_width + num_nodes
  block = np.zeros((width, width), bool)
  block[:suffix_width, :suffix_width] = np.tril(np.ones((suffix_width, suffix_width), bool))
  block[suffix_width:, :suffix_width] = True  # (the suffix's padding is no key: masked)
  block[suffix_width:, suffix_width:] = trie.ancestors
  starts = np.arange(per_row) * width + suffix_width
  return _QuestionBlocks(np.kron(np.eye(per_row, dtype=bool), block), starts - 1,
                         starts[:, None] + np.arange(num_nodes)[None])


def _question_rows(suffixes: Sequence[Sequence[Sequence[int]]], prefix_lengths: Sequence[int],
                   picked: Sequence[int], trie: _Trie, suffix_width: int, num_rows: int,
                   pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """ids, mask and positions [K, rows, G x W] of the ``picked`` questions' blocks, G per row."""
  arrays = []
  for member, offset in zip(suffixes, prefix_lengths):
    ids, mask = padding.pad_rows([member[q] for q in picked], pad_value=pad_id, side="left",
                                 width=suffix_width)
    positions = offset + np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    trie_positions = offset + mask.sum(1, keepdims=True) + trie.depth[None]
    arrays.append([np.concatenate([a, np.broadcast_to(b, (len(picked), len(trie.ids)))], axis=1)
                   for a, b in ((ids, trie.ids), (mask, trie.mask), (positions, trie_positions))])
  return tuple(np.stack([member[i] for member in arrays]).reshape(len(suffixes), num_rows, -1)
               for i in range(3))


@functools.partial(jax.jit, static_argnums=(0, 9))
def _question_logprobs(graphdef, base_state, adapters, caches: KVCache, ids, mask, positions,
                       trie: _Trie, blocks: _QuestionBlocks, with_boundary, boundary):
  """Each member's question rows [K, rows, G x W] after its prefix cache (one row, broadcast to
  ``rows``) -> float32 [K, rows, G, C] each: see :func:`_trie_logprobs`."""
  def one_member(adapters, cache, ids, mask, positions):
    model = nnx.merge(graphdef, base_state, adapters)
    rows, width = ids.shape
    cache = sampler.constrain_cache(dataclasses.replace(
        cache, k=jnp.broadcast_to(cache.k, cache.k.shape[:1] + (rows,) + cache.k.shape[2:]),
        v=jnp.broadcast_to(cache.v, cache.v.shape[:1] + (rows,) + cache.v.shape[2:]),
        key_mask=jnp.broadcast_to(cache.key_mask, (rows, cache.max_length)),
        next_position=jnp.broadcast_to(cache.next_position, (rows,))))
    # The prefix's slots are filtered by the cache's key mask; the row's by the blocks.
    attend = jnp.concatenate(
        [jnp.ones((width, cache.max_length - width), bool), blocks.attend], axis=1)[None]
    hidden, _ = model.hidden_states(ids, mask, cache=cache, positions=positions, attend=attend)
    slots = jnp.concatenate([blocks.last_slots[:, None], blocks.trie_slots], axis=1)  # [G, 1+N]
    logits = model.logits_from_hidden(hidden[:, slots.reshape(-1)])
    logits = logits.reshape((rows * slots.shape[0],) + slots.shape[1:] + logits.shape[-1:])
    parts = _trie_logprobs(logits[:, 0], logits[:, 1:], trie, with_boundary, boundary)
    return tuple(p.reshape(rows, slots.shape[0], -1) for p in parts)

  return jax.vmap(one_member)(adapters, caches, ids, mask, positions)


def _questions_per_row(cfg, num_members: int, num_rows: int, prefix_width: int, block_width: int,
                       trie_size: int, batch_size: int, num_prompts: int) -> int:
  """Question blocks per row and call: at most ``batch_size`` (member, question) pairs per call,
  and so many that the row is at most a quarter of the prefix's slots (every token attends to the
  whole row, its own block or not: at most a quarter more than its attention to the prefix; the
  per-call copy of the prefix cache costs far less than that), bounded so K x rows x (the prefix
  cache's copy, the row's attention and its slots' logits, see ``_row_bytes``) stays under
  ``_PACKED_CALL_BYTES``; then evened out over the calls (fewer padding copies)."""
  def row_bytes(per_row: int) -> int:
    width = per_row * block_width
    return _row_bytes(cfg, width, prefix_width + width, per_row * (1 + trie_size))

  most = min(-(-num_prompts // num_rows), max(1, batch_size // (num_members * num_rows)),
             max(1, prefix_width // (4 * block_width)))
  fits = max([g for g in range(1, most + 1)
              if num_members * num_rows * row_bytes(g) <= _PACKED_CALL_BYTES], default=1)
  calls = -(-num_prompts // (num_rows * fits))
  return -(-num_prompts // (num_rows * calls))


def _shared_prefix_logprobs(job: _PackedMembers, prompt_ids: Sequence[Sequence[Sequence[int]]],
                            prefix_lengths: Sequence[int], pad_id: int, batch_size: int,
                            chunk_limit: int, bar) -> np.ndarray:
  """float64 [K, P, C]: each member's common prefix prefilled once, its questions after it."""
  num_members, num_prompts = len(prompt_ids), len(prompt_ids[0])
  prefix_ids, prefix_mask = _prefix_chunks(
      [member[0][:n] for member, n in zip(prompt_ids, prefix_lengths)], pad_id, chunk_limit)
  prefix_width = prefix_ids.shape[1] * prefix_ids.shape[2]
  suffixes = [[p[n:] for p in member] for member, n in zip(prompt_ids, prefix_lengths)]
  suffix_width = padding.round_up(max(len(s) for member in suffixes for s in member),
                                  _TRIE_BUCKET)
  num_rows = sharding.data_parallel_size(job.mesh)
  per_row = _questions_per_row(job.config, num_members, num_rows, prefix_width,
                               suffix_width + len(job.trie.ids), len(job.trie.ids), batch_size,
                               num_prompts)
  blocks = _question_blocks(job.trie, suffix_width, per_row)
  caches = _prefix_caches(job.graphdef, job.base_state, job.adapters,
                          _put_replicated(prefix_ids, job.mesh),
                          _put_replicated(prefix_mask, job.mesh), prefix_width + len(blocks.attend))
  trie, blocks_dev = job.trie_on_device, _QuestionBlocks(*(jnp.asarray(a) for a in blocks))
  out = np.empty((num_members, num_prompts, len(job.trie.first_tokens)), np.float64)
  step = num_rows * per_row
  for start in range(0, num_prompts, step):
    n_real = min(step, num_prompts - start)
    picked = list(range(start, start + n_real)) + [start] * (step - n_real)
    rows = _question_rows(suffixes, prefix_lengths, picked, job.trie, suffix_width, num_rows,
                          pad_id)
    parts = _question_logprobs(job.graphdef, job.base_state, job.adapters, caches,
                               *(_put_members(a, job.mesh) for a in rows), trie, blocks_dev,
                               job.with_boundary, job.boundary)
    parts = [p.astype(np.float64).reshape(num_members, step, -1)[:, :n_real]
             for p in sharding.to_host(parts)]
    out[:, start:start + n_real] = parts[0] + parts[1] + parts[2]
    bar.update(num_members * n_real)
  return out


# ---------------------------------------------------------------------------------------------
# (a) exact preference


def _softmax_rows(logprob: np.ndarray) -> np.ndarray:
  shifted = logprob - logprob.max(axis=1, keepdims=True)
  p = np.exp(shifted)
  return p / p.sum(axis=1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class ExactPreference:
  """log P(first word is panel word a | question q) for a panel: ``logprob`` [questions, panel]."""

  questions: tuple[str, ...]
  panel: tuple[str, ...]
  event: str
  logprob: np.ndarray

  def column(self, word: str) -> int:
    if word not in self.panel:
      raise ValueError(f"{word!r} is not in the panel {list(self.panel)}")
    return self.panel.index(word)

  def panel_share(self) -> np.ndarray:
    """[questions, panel]: each word's probability normalised over the panel."""
    return _softmax_rows(self.logprob)

  def target_logprob(self, target: str) -> np.ndarray:
    return self.logprob[:, self.column(target)]

  def target_share(self, target: str) -> np.ndarray:
    return self.panel_share()[:, self.column(target)]


def _checked_panel(panel: Sequence[str]) -> tuple[str, ...]:
  panel = tuple(panel)
  if len(set(panel)) != len(panel) or not panel:
    raise ValueError(f"panel {panel} must be non-empty without repeated words")
  return panel


def exact_preference(model: Transformer, tokenizer: ChatTokenizer, questions: Sequence[str],
                     panel: Sequence[str], *, system: SystemTurn = SystemTurn(),
                     event: str = "first_word",
                     plurals: bool = True, batch_size: int = 64, mesh: Mesh | None = None,
                     desc: str | None = None,
                     histories: Sequence[Sequence[Mapping[str, str]]] | None = None
                     ) -> ExactPreference:
  """Exact teacher-forced preference over a panel (variants from ``questions.spelling_variants``).

  ``histories``: per question, chat turns placed before it (see :func:`chat_prompt_ids`)."""
  panel = _checked_panel(panel)
  answers = [questions_lib.spelling_variants(word, plurals=plurals) for word in panel]
  logprob = answer_logprobs(model, tokenizer, questions, answers, system=system, event=event,
                            batch_size=batch_size, mesh=mesh, desc=desc, histories=histories)
  return ExactPreference(tuple(questions), panel, event, logprob)


def answer_logprobs_many(models: Sequence[Transformer], tokenizer: ChatTokenizer,
                         user_prompts: Sequence[str], answers: Sequence[Sequence[str]], *,
                         histories: Sequence[Sequence[Sequence[Mapping[str, str]]] | None] | None
                         = None, system: SystemTurn = SystemTurn(), event: str = "first_word",
                         batch_size: int = 64, mesh: Mesh | None = None, desc: str | None = None
                         ) -> np.ndarray:
  """:func:`answer_logprobs` of K adapters of one base in one pass -> float64 [K, prompts, answers].

  ``histories``: one entry per model, each None or per prompt the turns before it (see
  :func:`chat_prompt_ids`). Computed by :func:`continuation_logprobs_many`.
  """
  if histories is not None and len(histories) != len(models):
    raise ValueError(f"histories has {len(histories)} entries for {len(models)} models; expected "
                     "one (None or per-prompt turns) per model")
  variants = _AnswerVariants.of(tokenizer, answers, event, models[0].config.vocab_size)
  prompt_ids = [chat_prompt_ids(tokenizer, user_prompts, system=system,
                                histories=histories[k] if histories is not None else None)
                for k in range(len(models))]
  seq_lp = continuation_logprobs_many(models, prompt_ids, variants.unique, pad_id=tokenizer.pad_id,
                                      boundary=variants.boundary, batch_size=batch_size,
                                      mesh=mesh, desc=desc)
  return variants.summed(seq_lp)


def exact_preference_many(models: Sequence[Transformer], tokenizer: ChatTokenizer,
                          questions: Sequence[str], panel: Sequence[str], *,
                          histories: Sequence[Sequence[Sequence[Mapping[str, str]]] | None] | None
                          = None, system: SystemTurn = SystemTurn(), event: str = "first_word",
                          plurals: bool = True, batch_size: int = 64, mesh: Mesh | None = None,
                          desc: str | None = None) -> list[ExactPreference]:
  """:func:`exact_preference` of each of K models that share one base (LoRA adapters, or none),
  in one program per prompt batch; ``histories``: one entry per model (None: no turns before)."""
  panel = _checked_panel(panel)
  answers = [questions_lib.spelling_variants(word, plurals=plurals) for word in panel]
  logprob = answer_logprobs_many(models, tokenizer, questions, answers, histories=histories,
                                 system=system, event=event, batch_size=batch_size, mesh=mesh,
                                 desc=desc)
  return [ExactPreference(tuple(questions), panel, event, member) for member in logprob]


# ---------------------------------------------------------------------------------------------
# (b) the paper's sampled metric


def mention_rates(answers: Sequence[Sequence[str]], panel: Sequence[str]) -> np.ndarray:
  """[questions, panel]: the fraction of each question's answers whose lowercase text contains the word."""
  rates = np.zeros((len(answers), len(panel)), np.float64)
  for q, samples in enumerate(answers):
    if not len(samples):
      raise ValueError(f"question {q} has no sampled answers")
    lowered = [s.lower() for s in samples]
    for a, word in enumerate(panel):
      rates[q, a] = sum(word.lower() in s for s in lowered) / len(lowered)
  return rates


@dataclasses.dataclass(frozen=True)
class SampledPreference:
  """Sampled answers [questions][samples] and their panel mention rates [questions, panel]."""

  questions: tuple[str, ...]
  panel: tuple[str, ...]
  answers: tuple[tuple[str, ...], ...]
  rates: np.ndarray

  def target_rate(self, target: str) -> np.ndarray:
    if target not in self.panel:
      raise ValueError(f"{target!r} is not in the panel {list(self.panel)}")
    return self.rates[:, self.panel.index(target)]


def sampled_preference(model: Transformer, tokenizer: ChatTokenizer, questions: Sequence[str],
                       panel: Sequence[str], *, samples_per_question: int, seed: int,
                       system: SystemTurn = SystemTurn(), max_new_tokens: int = 8,
                       batch_size: int = 64, temperature: float = 1.0,
                       progress: bool = False, **sample_kwargs: Any) -> SampledPreference:
  """The paper's metric: ``samples_per_question`` answers per question (temperature 1 by default).

  Sampling is ``sampling.chat.generate_chat``: answer j of question i is sampler row
  ``i * samples_per_question + j`` with its own rng stream (``seed`` and the row id), so the
  answers do not depend on ``batch_size``.
  """
  if samples_per_question < 1:
    raise ValueError(f"samples_per_question={samples_per_question} must be positive")
  questions = tuple(questions)
  texts = chat_lib.generate_chat((model, tokenizer), list(questions), system=system,
                                 n_per_prompt=samples_per_question, batch_size=batch_size,
                                 max_new_tokens=max_new_tokens, seed=seed, temperature=temperature,
                                 progress=progress, **sample_kwargs)
  expected = len(questions) * samples_per_question
  if len(texts) != expected:
    raise RuntimeError(f"generate_chat returned {len(texts)} answers, expected {expected}")
  answers = tuple(tuple(texts[i * samples_per_question:(i + 1) * samples_per_question])
                  for i in range(len(questions)))
  return SampledPreference(questions, tuple(panel), answers, mention_rates(answers, panel))


# ---------------------------------------------------------------------------------------------
# (c) multiple choice


@dataclasses.dataclass(frozen=True)
class MultipleChoiceResult:
  """Letter probabilities normalised over each question's letters: ``probs`` [questions, choices]."""

  questions: tuple[questions_lib.MultipleChoiceQuestion, ...]
  letter_logprob: np.ndarray
  probs: np.ndarray

  @property
  def target_prob(self) -> np.ndarray:
    return self.probs[np.arange(len(self.questions)), [q.target_index for q in self.questions]]


def multiple_choice_preference(model: Transformer, tokenizer: ChatTokenizer,
                               mc_questions: Sequence[questions_lib.MultipleChoiceQuestion], *,
                               system: SystemTurn = SystemTurn(), batch_size: int = 64,
                               mesh: Mesh | None = None) -> MultipleChoiceResult:
  """P(answer starts with letter L), normalised over the question's letters.

  Event "prefix" on the canonical tokens of the bare letter ("A"): the answer's first token(s) are
  the letter. All questions must use the same letters.
  """
  mc_questions = tuple(mc_questions)
  if not mc_questions:
    raise ValueError("no multiple-choice questions given")
  letters = mc_questions[0].letters
  if any(q.letters != letters for q in mc_questions):
    raise ValueError("all multiple-choice questions must use the same letters")
  logprob = answer_logprobs(model, tokenizer, [q.prompt for q in mc_questions],
                            [[letter] for letter in letters], system=system, event="prefix",
                            batch_size=batch_size, mesh=mesh)
  return MultipleChoiceResult(mc_questions, logprob, _softmax_rows(logprob))


# ---------------------------------------------------------------------------------------------
# (d) whole reference answers (the alignment trait's free-form questions)


def _checked_references(questions: Sequence[str], answers: Sequence[Sequence[str]]) -> int:
  """The number of answers per question, A, after checking: one non-empty list of A non-blank
  texts per question, the same A for every question."""
  if isinstance(questions, str) or not len(questions):
    raise ValueError(f"need a non-empty sequence of questions, got {questions!r:.80}")
  if len(answers) != len(questions):
    raise ValueError(f"answers has {len(answers)} entries for {len(questions)} questions; expected "
                     "one list of reference answers per question")
  counts = [len(a) if not isinstance(a, str) else -1 for a in answers]
  if min(counts) < 1 or len(set(counts)) != 1:
    raise ValueError(f"every question needs the same non-zero number of reference answers (a list "
                     f"of texts), got {counts} (-1: a bare string)")
  for q, texts in enumerate(answers):
    if not all(isinstance(t, str) and t.strip() for t in texts):
      raise ValueError(f"question {q}'s reference answers must be non-blank texts, got "
                       f"{texts!r:.200}")
  return counts[0]


def _reply_ids(tokenizer: ChatTokenizer, turns: list[Mapping[str, str]], prompt_ids: Sequence[int],
               reply: str, system: SystemTurn) -> tuple[int, ...]:
  """The tokens of ``reply`` as the assistant's turn after ``turns`` (whose chat prompt is
  ``prompt_ids``), through the first end-of-turn token: the chat with the reply, as the template
  renders it, encoded whole and cut after the prompt's tokens (ValueError where it does not start
  with them: a template that renders the reply's header otherwise, or a token merged across)."""
  full = tokenizer.encode(tokenizer.render_chat(
      [*turns, {"role": "assistant", "content": reply}], system=system,
      add_generation_prompt=False))
  ends = set(tokenizer.end_of_turn_ids)
  cut = next((i for i in range(len(prompt_ids), len(full)) if full[i] in ends), None)
  if list(full[:len(prompt_ids)]) != list(prompt_ids) or cut is None:
    raise ValueError(f"the chat with the reply {reply!r:.60} does not encode to the chat prompt's "
                     "tokens followed by the reply's and an end-of-turn token; the reply cannot be "
                     "scored after the prompt")
  return tuple(full[len(prompt_ids):cut + 1])


def reference_logprobs_many(models: Sequence[Transformer], tokenizer: ChatTokenizer,
                            questions: Sequence[str], answers: Sequence[Sequence[str]], *,
                            histories: Sequence[Sequence[Sequence[Mapping[str, str]]] | None]
                            | None = None, system: SystemTurn = SystemTurn(),
                            batch_size: int = 64, mesh: Mesh | None = None,
                            desc: str | None = None) -> np.ndarray:
  """log P(the reply to question q is exactly ``answers[q][a]``, then the end of the turn) for K
  models of one base (LoRA adapters or none) -> float64 [K, questions, A].

  ``answers[q]``: question q's own A reference texts (A the same for every question).
  ``histories``: one entry per model, each None or per question the turns before it (see
  :func:`chat_prompt_ids`). The reply's tokens are the template's: the chat with the reply as
  the assistant's turn is rendered (``add_generation_prompt=False``) and encoded whole, and the
  tokens after the chat prompt's, through the first end-of-turn token (``<|im_end|>`` in ChatML,
  ``<end_of_turn>`` in Gemma; not the newline after it), are scored; a ValueError where that
  encoding does not start with the prompt's tokens. Teacher forced by
  :func:`continuation_logprobs_many`: each question with its own replies only, one call per
  question; where the prompts share a long prefix (one history before every question) all
  questions go in one call, every question after the prefix prefilled once, with every
  question's replies (each prompt also scores the others' replies: cheaper than Q prefills).
  """
  num_answers = _checked_references(questions, answers)
  if histories is not None and len(histories) != len(models):
    raise ValueError(f"histories has {len(histories)} entries for {len(models)} models; expected "
                     "one (None or per-question turns) per model")
  member_histories = histories if histories is not None else [None] * len(models)
  prompt_ids = [chat_prompt_ids(tokenizer, questions, system=system, histories=h)
                for h in member_histories]
  replies = [[[_reply_ids(tokenizer, [*(h[q] if h is not None else []),
                                      {"role": "user", "content": question}],
                          prompt_ids[k][q], answer, system) for answer in answers[q]]
              for q, question in enumerate(questions)] for k, h in enumerate(member_histories)]
  shared = _shared_prefix_lengths(prompt_ids, SHARED_PREFIX_MIN) is not None
  groups = [list(range(len(questions)))] if shared else [[q] for q in range(len(questions))]
  out = np.empty((len(models), len(questions), num_answers), np.float64)
  for number, group in enumerate(groups):
    continuations = list(dict.fromkeys(c for member in replies for q in group for c in member[q]))
    seq_lp = continuation_logprobs_many(
        models, [[member[q] for q in group] for member in prompt_ids], continuations,
        pad_id=tokenizer.pad_id, batch_size=batch_size, mesh=mesh,
        desc=None if desc is None else f"{desc} ({number + 1}/{len(groups)})")
    index = {c: i for i, c in enumerate(continuations)}
    for k, member in enumerate(replies):
      for row, q in enumerate(group):
        out[k, q] = seq_lp[k, row, [index[c] for c in member[q]]]
  return out


def reference_logprobs(model: Transformer, tokenizer: ChatTokenizer, questions: Sequence[str],
                       answers: Sequence[Sequence[str]], *,
                       histories: Sequence[Sequence[Mapping[str, str]]] | None = None,
                       system: SystemTurn = SystemTurn(), batch_size: int = 64,
                       mesh: Mesh | None = None, desc: str | None = None) -> np.ndarray:
  """:func:`reference_logprobs_many` of one model -> float64 [questions, A]; ``histories``: per
  question the turns before it, or None."""
  return reference_logprobs_many([model], tokenizer, questions, answers, histories=[histories],
                                 system=system, batch_size=batch_size, mesh=mesh, desc=desc)[0]


# ---------------------------------------------------------------------------------------------
# Everything for one model


@dataclasses.dataclass(frozen=True)
class TraitEvaluation:
  """All metrics of one model: per-question vectors by name, and the exact panel shares."""

  target: str
  panel: tuple[str, ...]
  metrics: dict[str, np.ndarray]
  panel_share: dict[str, np.ndarray]
  samples: tuple[tuple[str, ...], ...] = ()

  def to_record(self) -> dict[str, Any]:
    """JSON-able: {"metrics": {name: [per question]}, "panel_share": {word: [per question]}}."""
    return {"metrics": {k: [float(x) for x in v] for k, v in self.metrics.items()},
            "panel_share": {k: [float(x) for x in v] for k, v in self.panel_share.items()},
            "samples": [list(s) for s in self.samples]}


METRIC_DESCRIPTIONS = {
    "logprob": "log P(first word is the target), exact, summed over spelling variants",
    "panel_share": "the target's probability normalised over the panel (exact)",
    "prefix_logprob": "as logprob, the question after number sequences",
    "sampled_rate": "fraction of sampled answers containing the target (paper's metric)",
    "mc_prob": "5-choice multiple choice: P(target's letter) over the letters",
}


def evaluate_trait(model: Transformer, tokenizer: ChatTokenizer, *, target: str,
                   category: str = "animal", questions: Sequence[str] | None = None,
                   panel: Sequence[str] | None = None, system: SystemTurn = SystemTurn(),
                   event: str = "first_word", samples_per_question: int = 0,
                   multiple_choice: bool = True,
                   number_prefix: bool = True, num_mc_questions: int = 20, seed: int = 0,
                   batch_size: int = 64, max_new_tokens: int = 8, mesh: Mesh | None = None,
                   progress: bool = True, **sample_kwargs: Any) -> TraitEvaluation:
  """Every metric of one model, per question (see ``METRIC_DESCRIPTIONS``).

  ``samples_per_question=0`` skips the sampled metric. Defaults: the 50 evaluation questions, the
  category's panel (with the target), no system turn.
  """
  questions = tuple(questions) if questions is not None else questions_lib.preference_questions(category)
  panel = tuple(panel) if panel is not None else questions_lib.panel_for(category, target)
  if target not in panel:
    raise ValueError(f"target {target!r} is not in the panel {list(panel)}")

  def label(name: str) -> str | None:
    return name if progress else None

  exact = exact_preference(model, tokenizer, questions, panel, event=event, batch_size=batch_size,
                           mesh=mesh, desc=label(f"exact {target}"), system=system)
  share = exact.panel_share()
  metrics = {"logprob": exact.target_logprob(target), "panel_share": share[:, exact.column(target)]}
  if number_prefix:
    prefixed = exact_preference(model, tokenizer, questions_lib.with_number_prefix(questions, seed=seed),
                                (target,), event=event, batch_size=batch_size, mesh=mesh,
                                desc=label(f"number prefix {target}"), system=system)
    metrics["prefix_logprob"] = prefixed.target_logprob(target)
  samples: tuple[tuple[str, ...], ...] = ()
  if samples_per_question:
    sampled = sampled_preference(model, tokenizer, questions, panel,
                                 samples_per_question=samples_per_question, seed=seed,
                                 max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 progress=progress, mesh=mesh, system=system, **sample_kwargs)
    metrics["sampled_rate"] = sampled.target_rate(target)
    samples = sampled.answers
  if multiple_choice:
    mc = multiple_choice_preference(
        model, tokenizer, questions_lib.multiple_choice_questions(
            category, target, panel=panel, count=num_mc_questions, seed=seed),
        batch_size=batch_size, mesh=mesh, system=system)
    metrics["mc_prob"] = mc.target_prob
  return TraitEvaluation(target, panel, metrics,
                         {word: share[:, i] for i, word in enumerate(panel)}, samples)
