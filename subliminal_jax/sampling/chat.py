"""Chat generation: user prompts rendered with the chat template, sampled in fixed-shape batches,
decoded.

:func:`generate_chat` is what the experiments sample with (number sequences from a teacher, answers
to evaluation questions, context-distillation data); the command line (``subliminal_jax.generate``)
wraps it.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from subliminal_jax import padding
from subliminal_jax import progress as progress_lib
from subliminal_jax.sampling import logit_processors as lp
from subliminal_jax.sampling import sampler
from subliminal_jax.tokenizer import SystemTurn

__all__ = ["generate_chat"]


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
  if isinstance(user_prompts, str):
    raise ValueError("user_prompts must be a list of strings, got a single str")
  if not isinstance(n_per_prompt, int) or n_per_prompt < 1:
    raise ValueError(f"n_per_prompt must be an int >= 1, got {n_per_prompt!r}")
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
  end_token_ids = tuple(tokenizer.end_of_turn_ids if end_token_ids is None else end_token_ids)
  banned = list(banned_token_ids)
  if banned_words:
    banned += lp.banned_word_token_ids(tokenizer.token_texts(), banned_words,
                                       exclude_ids=getattr(tokenizer, "special_ids", ())).tolist()
  has_reference = sample_kwargs.get("reference_model") is not None
  if grammar_initial_states is not None and len(grammar_initial_states) != len(user_prompts):
    raise ValueError(f"grammar_initial_states has {len(grammar_initial_states)} entries for "
                     f"{len(user_prompts)} prompts; expected one per prompt")

  def encode(turn: SystemTurn) -> list[list[int]]:
    return [tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": p}], system=turn))
            for p in user_prompts]

  prompt_rows = encode(system)
  ref_rows = encode(reference_system) if has_reference else None
  rows = [(i, j) for i in range(len(user_prompts)) for j in range(n_per_prompt)]
  results: list = []
  bar = tqdm(total=len(rows), desc=progress_lib.describe("sampling"), unit="sample",
             disable=not progress)
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    filled = chunk + [chunk[-1]] * (batch_size - len(chunk))
    ids, mask = padding.pad_rows([prompt_rows[i] for i, _ in filled], pad_value=tokenizer.pad_id,
                                 side="left")
    extra = {}
    if has_reference:
      extra["reference_prompt_ids"], extra["reference_prompt_mask"] = padding.pad_rows(
          [ref_rows[i] for i, _ in filled], pad_value=tokenizer.pad_id, side="left")
    sample_ids = sample_id_offset + np.array([i * n_per_prompt + j for i, j in filled], np.int64)
    if grammar_initial_states is not None:
      extra["grammar_initial_states"] = np.array([grammar_initial_states[i] for i, _ in filled],
                                                 np.int64)
    out = sampler.sample(model, ids, mask, max_new_tokens=max_new_tokens, seed=seed,
                         sample_ids=sample_ids, banned_token_ids=banned,
                         end_token_ids=end_token_ids, pad_id=tokenizer.pad_id, **extra,
                         **sample_kwargs)
    results.extend(_answer(out, r, tokenizer, return_details) for r in range(len(chunk)))
    bar.update(len(chunk))
  bar.close()
  return results


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
