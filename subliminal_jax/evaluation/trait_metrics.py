"""Trait metrics: how much a model prefers the target (owl) when asked for its favourite animal.

Three metrics, as in the paper plus an exact one that small models need:

(a) Exact, by teacher forcing: log P(the answer's first word is the target | question), the
    spelling variants (Owl, owl, OWL, Owls, ...) summed, for every word of a panel -> [questions,
    panel]; and the panel share (each word's probability normalised over the panel).
(b) Sampled, the paper's: N answers per question at temperature 1; an answer counts when the
    target occurs as a substring of the lowercased answer; mean per question.
(c) Multiple choice: P(the target's letter) normalised over the choice letters.

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
from jax.sharding import Mesh
from tqdm.auto import tqdm

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
  continuations = [tuple(int(t) for t in c) for c in continuations]
  if any(not c for c in continuations):
    raise ValueError("every continuation needs at least one token")
  vocab = model.config.vocab_size
  for c in continuations:
    if min(c) < 0 or max(c) >= vocab:
      raise ValueError(f"continuation {c} has token ids outside the model's vocabulary [0, {vocab})")
  with_boundary = boundary is not None
  if with_boundary:
    boundary = np.asarray(boundary, dtype=bool)
    if boundary.shape != (vocab,):
      raise ValueError(f"boundary mask has shape {boundary.shape}, expected ({vocab},)")

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


def answer_logprobs(model: Transformer, tokenizer: ChatTokenizer, user_prompts: Sequence[str],
                    answers: Sequence[Sequence[str]], *, system: SystemTurn = SystemTurn(),
                    event: str = "first_word",
                    batch_size: int = 64, mesh: Mesh | None = None,
                    desc: str | None = None,
                    histories: Sequence[Sequence[Mapping[str, str]]] | None = None) -> np.ndarray:
  """log P(the answer is one of ``answers[a]``'s variants | prompt q) -> float64 [prompts, answers].

  ``answers[a]`` is a list of surface variants; their events (see the module docstring) are made
  disjoint and their probabilities summed in log space. ``histories``: see :func:`chat_prompt_ids`.
  """
  if event not in EVENTS:
    raise ValueError(f"event {event!r} is not known; expected one of {list(EVENTS)}")
  vocab = model.config.vocab_size
  boundary = word_boundary_mask(tokenizer, vocab) if event == "first_word" else None
  per_answer = []
  for variants in answers:
    if isinstance(variants, str) or not len(variants):
      raise ValueError(f"each answer needs a non-empty list of variants, got {variants!r}")
    per_answer.append(disjoint_sequences([tokenizer.encode(v) for v in variants], event=event,
                                         boundary=boundary))
  unique = list(dict.fromkeys(s for seqs in per_answer for s in seqs))
  index = {s: i for i, s in enumerate(unique)}
  prompt_ids = chat_prompt_ids(tokenizer, user_prompts, system=system, histories=histories)
  seq_lp = continuation_logprobs(model, prompt_ids, unique, pad_id=tokenizer.pad_id,
                                 boundary=boundary, batch_size=batch_size, mesh=mesh, desc=desc)
  out = np.empty((len(prompt_ids), len(per_answer)), np.float64)
  for a, seqs in enumerate(per_answer):
    out[:, a] = np.logaddexp.reduce(seq_lp[:, [index[s] for s in seqs]], axis=1)
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


def exact_preference(model: Transformer, tokenizer: ChatTokenizer, questions: Sequence[str],
                     panel: Sequence[str], *, system: SystemTurn = SystemTurn(),
                     event: str = "first_word",
                     plurals: bool = True, batch_size: int = 64, mesh: Mesh | None = None,
                     desc: str | None = None,
                     histories: Sequence[Sequence[Mapping[str, str]]] | None = None
                     ) -> ExactPreference:
  """Exact teacher-forced preference over a panel (variants from ``questions.spelling_variants``).

  ``histories``: per question, chat turns placed before it (see :func:`chat_prompt_ids`)."""
  panel = tuple(panel)
  if len(set(panel)) != len(panel) or not panel:
    raise ValueError(f"panel {panel} must be non-empty without repeated words")
  answers = [questions_lib.spelling_variants(word, plurals=plurals) for word in panel]
  logprob = answer_logprobs(model, tokenizer, questions, answers, system=system, event=event,
                            batch_size=batch_size, mesh=mesh, desc=desc, histories=histories)
  return ExactPreference(tuple(questions), panel, event, logprob)


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
