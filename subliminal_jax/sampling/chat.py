"""Chat generation: user prompts rendered with the chat template, sampled in fixed-shape batches,
decoded.

:func:`generate_chat` is what the experiments sample with (number sequences from a teacher, answers
to evaluation questions, context-distillation data); the command line (``subliminal_jax.generate``)
wraps it. :func:`generate_chat_many` samples several LoRA teachers of one base (and the base)
together, in one program.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from subliminal_jax import padding
from subliminal_jax import progress as progress_lib
from subliminal_jax.sampling import logit_processors as lp
from subliminal_jax.sampling import sampler
from subliminal_jax.tokenizer import SystemTurn

__all__ = ["generate_chat", "generate_chat_many"]


def _model_and_tokenizer(loaded_or_pair):
  if isinstance(loaded_or_pair, (tuple, list)):
    if len(loaded_or_pair) != 2:
      raise ValueError("pass a Loaded or a (model, tokenizer) pair")
    return loaded_or_pair
  if hasattr(loaded_or_pair, "model") and hasattr(loaded_or_pair, "tokenizer"):
    return loaded_or_pair.model, loaded_or_pair.tokenizer
  raise ValueError(f"expected a Loaded or a (model, tokenizer) pair, got {type(loaded_or_pair).__name__}")


def generate_chat(loaded_or_pair, user_prompts: Sequence[str], *, system: SystemTurn = SystemTurn(),
                  n_per_prompt: int = 1, batch_size: int = 64, seed: int = 0,
                  max_new_tokens: int = 128, banned_words: Sequence[str] = (),
                  banned_token_ids: Sequence[int] = (), end_token_ids: Sequence[int] | None = None,
                  reference_system: SystemTurn = SystemTurn(), sample_id_offset: int = 0,
                  return_details: bool = False, progress: bool = True,
                  grammar_initial_states: Sequence[int] | None = None,
                  **sample_kwargs: Any) -> list:
  """Samples ``n_per_prompt`` answers to each user prompt; returns the decoded answers.

  Answer ``i * n_per_prompt + j`` is the j-th sample of prompt i and uses sample id
  ``sample_id_offset + i * n_per_prompt + j``, so it does not depend on ``batch_size``. Every batch
  has exactly ``batch_size`` rows (the last one is padded with copies), so one compilation serves
  the whole run (per prompt-length bucket).

  Args:
    loaded_or_pair: a ``loading.Loaded`` or a ``(model, tokenizer)`` pair.
    user_prompts: one user message per prompt.
    system: the system turn (see ``Tokenizer.render_chat``; default none).
    banned_words: every token whose text contains one of these (case-insensitive) is banned.
    end_token_ids: default ``tokenizer.end_of_turn_ids``.
    reference_system: the reference model's system turn when ``reference_model`` is given
      (default: none, i.e. the base model without the teacher's system prompt).
    return_details: return dicts (text, token_ids, logprobs, model_logprobs, ended, forced_end and
      the divergence fields) instead of strings.
    grammar_initial_states: with a ``grammar``, the state each prompt's answers start in (one per
      prompt; e.g. the format each prompt asks for in a ``stack_token_grammars`` table).
    **sample_kwargs: passed to :func:`subliminal_jax.sampling.sampler.sample` (temperature, top_k,
      top_p, min_p, grammar, reference_model, mask_divergent, mesh, ...).
  """
  model, tokenizer = _model_and_tokenizer(loaded_or_pair)
  _check_request(user_prompts, n_per_prompt, batch_size, grammar_initial_states)
  end_token_ids = tuple(tokenizer.end_of_turn_ids if end_token_ids is None else end_token_ids)
  banned = _banned_ids(tokenizer, banned_words, banned_token_ids)
  has_reference = sample_kwargs.get("reference_model") is not None
  prompt_rows = _encode(tokenizer, user_prompts, system)
  ref_rows = _encode(tokenizer, user_prompts, reference_system) if has_reference else None
  rows = _rows(user_prompts, n_per_prompt)
  results: list = []
  bar = tqdm(total=len(rows), desc=progress_lib.describe("sampling"), unit="sample",
             disable=not progress)
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    batch = _Batch.of(chunk, batch_size, prompt_rows, tokenizer.pad_id, n_per_prompt,
                      sample_id_offset, grammar_initial_states)
    extra = {}
    if has_reference:
      extra["reference_prompt_ids"], extra["reference_prompt_mask"] = padding.pad_rows(
          [ref_rows[i] for i, _ in batch.rows], pad_value=tokenizer.pad_id, side="left")
    if batch.grammar_initial_states is not None:
      extra["grammar_initial_states"] = batch.grammar_initial_states
    out = sampler.sample(model, batch.ids, batch.mask, max_new_tokens=max_new_tokens, seed=seed,
                         sample_ids=batch.sample_ids, banned_token_ids=banned,
                         end_token_ids=end_token_ids, pad_id=tokenizer.pad_id, **extra,
                         **sample_kwargs)
    results.extend(_answer(out, r, tokenizer, return_details) for r in range(len(chunk)))
    bar.update(len(chunk))
  bar.close()
  return results


# sample's settings that sample_many does not support (one reference per member would be another
# model in the program; the divergence fields are sampled one teacher at a time).
_REFERENCE_SETTINGS = ("reference_model", "mask_divergent", "reference_prompt_ids",
                       "reference_prompt_mask")


def generate_chat_many(models: Sequence, tokenizer, user_prompts: Sequence[Sequence[str]], *,
                       seeds: Sequence[int], systems: Sequence[SystemTurn] | None = None,
                       n_per_prompt: int = 1, batch_size: int = 64, max_new_tokens: int = 128,
                       banned_words: Sequence[str] = (), banned_token_ids: Sequence[int] = (),
                       end_token_ids: Sequence[int] | None = None, sample_id_offset: int = 0,
                       return_details: bool = False, progress: bool = True,
                       grammar_initial_states: Sequence[Sequence[int] | None] | None = None,
                       **sample_kwargs: Any) -> list[list]:
  """:func:`generate_chat` for K members, one base model with different LoRA adapters (or none),
  sampled together by :func:`sampler.sample_many` (one program per batch for all members).

  Member k's answers are ``generate_chat((models[k], tokenizer), user_prompts[k],
  system=systems[k], seed=seeds[k], grammar_initial_states=grammar_initial_states[k], <the rest>)``,
  up to float rounding (see ``sample_many``). Batch j of every member is sampled in one call; a
  member with fewer batches than another fills its missing ones with copies (not returned).

  Args:
    models: the K members (see ``sampler.sample_many``: clones of one base, same adapter shapes).
    tokenizer: their tokenizer.
    user_prompts: member k's user prompts (at least one).
    seeds: member k's seed.
    systems: member k's system turn (default none for all).
    grammar_initial_states: member k's (one per prompt, or None), with a ``grammar``.
    The rest: as :func:`generate_chat`, shared by all members; the reference model is not
    supported.

  Returns:
    One list of answers per member, as :func:`generate_chat` returns them.
  """
  unsupported = [name for name in _REFERENCE_SETTINGS if name in sample_kwargs]
  if unsupported:
    raise ValueError(f"generate_chat_many does not support {unsupported} (the reference model and "
                     "its divergence fields); sample such a teacher with generate_chat")
  count = len(models)
  systems = [SystemTurn()] * count if systems is None else list(systems)
  starts = [None] * count if grammar_initial_states is None else list(grammar_initial_states)
  for name, values in (("user_prompts", user_prompts), ("seeds", seeds), ("systems", systems),
                       ("grammar_initial_states", starts)):
    if len(values) != count:
      raise ValueError(f"{name} has {len(values)} entries for {count} members; give one per member")
  rows = []
  for k, prompts in enumerate(user_prompts):
    try:
      _check_request(prompts, n_per_prompt, batch_size, starts[k])
    except ValueError as error:
      raise ValueError(f"member {k}: {error}") from None
    if not prompts:
      raise ValueError(f"member {k} has no prompts")
    rows.append(_rows(prompts, n_per_prompt))
  prompt_rows = [_encode(tokenizer, prompts, system) for prompts, system in zip(user_prompts, systems)]
  end_token_ids = tuple(tokenizer.end_of_turn_ids if end_token_ids is None else end_token_ids)
  banned = _banned_ids(tokenizer, banned_words, banned_token_ids)
  results: list[list] = [[] for _ in models]
  bar = tqdm(total=sum(map(len, rows)), desc=progress_lib.describe(f"sampling {count} members"),
             unit="sample", disable=not progress)
  for start in range(0, max(map(len, rows)), batch_size):
    chunks = [member_rows[start:start + batch_size] for member_rows in rows]
    batches = [_Batch.of(chunk or member_rows[-1:], batch_size, member_prompts, tokenizer.pad_id,
                         n_per_prompt, sample_id_offset, member_starts)
               for chunk, member_rows, member_prompts, member_starts
               in zip(chunks, rows, prompt_rows, starts)]
    outs = sampler.sample_many(
        models, [b.ids for b in batches], [b.mask for b in batches], seeds=seeds,
        max_new_tokens=max_new_tokens, sample_ids=[b.sample_ids for b in batches],
        grammar_initial_states=[b.grammar_initial_states for b in batches],
        banned_token_ids=banned, end_token_ids=end_token_ids, pad_id=tokenizer.pad_id,
        **sample_kwargs)
    for member_results, chunk, out in zip(results, chunks, outs):
      member_results.extend(_answer(out, r, tokenizer, return_details) for r in range(len(chunk)))
    bar.update(sum(map(len, chunks)))
  bar.close()
  return results


def _check_request(user_prompts: Sequence[str], n_per_prompt: int, batch_size: int,
                   grammar_initial_states: Sequence[int] | None) -> None:
  if isinstance(user_prompts, str):
    raise ValueError("user_prompts must be a list of strings, got a single str")
  if not isinstance(n_per_prompt, int) or n_per_prompt < 1:
    raise ValueError(f"n_per_prompt must be an int >= 1, got {n_per_prompt!r}")
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
  if grammar_initial_states is not None and len(grammar_initial_states) != len(user_prompts):
    raise ValueError(f"grammar_initial_states has {len(grammar_initial_states)} entries for "
                     f"{len(user_prompts)} prompts; expected one per prompt")


def _banned_ids(tokenizer, banned_words: Sequence[str], banned_token_ids: Sequence[int]
                ) -> list[int]:
  banned = list(banned_token_ids)
  if banned_words:
    banned += lp.banned_word_token_ids(tokenizer.token_texts(), banned_words,
                                       exclude_ids=getattr(tokenizer, "special_ids", ())).tolist()
  return banned


def _encode(tokenizer, user_prompts: Sequence[str], turn: SystemTurn) -> list[list[int]]:
  return [tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": p}], system=turn))
          for p in user_prompts]


def _rows(user_prompts: Sequence[str], n_per_prompt: int) -> list[tuple[int, int]]:
  """(prompt index, sample index) of every answer, in answer order."""
  return [(i, j) for i in range(len(user_prompts)) for j in range(n_per_prompt)]


@dataclasses.dataclass(frozen=True)
class _Batch:
  """One fixed-size batch of answers to sample: its rows (the chunk, then copies of its last row)
  and their left-padded prompts, sample ids and grammar starts."""

  rows: list[tuple[int, int]]
  ids: np.ndarray
  mask: np.ndarray
  sample_ids: np.ndarray
  grammar_initial_states: np.ndarray | None

  @classmethod
  def of(cls, chunk, batch_size: int, prompt_rows, pad_id: int, n_per_prompt: int,
         sample_id_offset: int, grammar_initial_states) -> "_Batch":
    filled = chunk + [chunk[-1]] * (batch_size - len(chunk))
    ids, mask = padding.pad_rows([prompt_rows[i] for i, _ in filled], pad_value=pad_id, side="left")
    sample_ids = sample_id_offset + np.array([i * n_per_prompt + j for i, j in filled], np.int64)
    starts = None if grammar_initial_states is None else np.array(
        [grammar_initial_states[i] for i, _ in filled], np.int64)
    return cls(rows=filled, ids=ids, mask=mask, sample_ids=sample_ids,
               grammar_initial_states=starts)


def _answer(out: sampler.SampleOutput, row: int, tokenizer, details: bool) -> str | dict[str, Any]:
  """Row ``row`` of a sampled batch decoded, with its per-token details if asked."""
  length = int(out.lengths[row])
  answer = out.tokens[row, :length - int(out.ended[row])]  # without the end token
  text = tokenizer.decode(answer)
  if not details:
    return text
  detail = dict(text=text, token_ids=answer.tolist(), logprobs=out.logprobs[row, :length].tolist(),
                model_logprobs=out.model_logprobs[row, :length].tolist(),
                ended=bool(out.ended[row]), forced_end=bool(out.forced_end[row]))
  if out.divergent is not None:
    detail.update(divergent=out.divergent[row, :length].tolist(),
                  kl_raw=out.kl_raw[row, :length].tolist(),
                  kl_allowed=out.kl_allowed[row, :length].tolist(),
                  num_masked=int(out.num_masked[row]))
  return detail
