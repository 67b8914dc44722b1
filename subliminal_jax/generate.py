"""Chat generation: render user prompts with the chat template, sample in fixed-shape batches, decode.

Library: :func:`generate_chat`. Command line::

  python -m subliminal_jax.generate --model=smollm2 --prompt="Name your favorite animal." \\
      [--system=...] [--template_default] [--format=numbers] [--n=4] [--temperature=1.0] \\
      [--max_new_tokens=64] [--seed=0]

``--format=numbers`` constrains the answer with the paper's number-sequence grammar
(``number_sequence_pattern()``: 1-10 numbers of up to 3 digits separated by ", ", optional final
period). The system turn is explicit: ``--system`` sets it, ``--template_default`` keeps the
template's own default (SmolLM2: "You are a helpful AI assistant named SmolLM..."), neither means
no system turn at all.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from absl import app, flags
from tqdm import tqdm

from subliminal_jax import compilation_cache
from subliminal_jax.sampling import logit_processors as lp
from subliminal_jax.sampling import sampler
from subliminal_jax.training import progress as progress_lib

__all__ = ["generate_chat", "grammar_token_texts", "number_grammar"]


def grammar_token_texts(tokenizer) -> list[str]:
  """``tokenizer.token_texts()`` with special tokens blanked, as the grammar compiler expects
  (their literal text, e.g. "<|im_end|>", is not what they contribute to the output)."""
  special = getattr(tokenizer, "special_ids", frozenset())
  return [("" if i in special else text) for i, text in enumerate(tokenizer.token_texts())]


def number_grammar(tokenizer, **pattern_kwargs):
  """The paper's number-sequence grammar over ``tokenizer``'s vocabulary."""
  from subliminal_jax.sampling import grammar as grammar_lib
  return grammar_lib.compile_token_grammar(grammar_lib.number_sequence_pattern(**pattern_kwargs),
                                           grammar_token_texts(tokenizer))


def _model_and_tokenizer(loaded_or_pair):
  if isinstance(loaded_or_pair, (tuple, list)):
    if len(loaded_or_pair) != 2:
      raise ValueError("pass a Loaded or a (model, tokenizer) pair")
    return loaded_or_pair
  if hasattr(loaded_or_pair, "model") and hasattr(loaded_or_pair, "tokenizer"):
    return loaded_or_pair.model, loaded_or_pair.tokenizer
  raise ValueError(f"expected a Loaded or a (model, tokenizer) pair, got {type(loaded_or_pair).__name__}")


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  width = max(len(r) for r in rows)
  ids = np.full((len(rows), width), pad_id, np.int32)
  mask = np.zeros((len(rows), width), bool)
  for i, row in enumerate(rows):
    ids[i, width - len(row):] = row
    mask[i, width - len(row):] = True
  return ids, mask


def generate_chat(loaded_or_pair, user_prompts: Sequence[str], *, system: str | None = None,
                  template_default: bool = False, n_per_prompt: int = 1, batch_size: int = 64,
                  seed: int = 0, max_new_tokens: int = 128, banned_words: Sequence[str] = (),
                  banned_token_ids: Sequence[int] = (), end_token_ids: Sequence[int] | None = None,
                  reference_system: str | None = None, reference_template_default: bool = False,
                  sample_id_offset: int = 0, return_details: bool = False, progress: bool = True,
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
    system, template_default: the system turn (see ``Tokenizer.render_chat``).
    banned_words: every token whose text contains one of these (case-insensitive) is banned.
    end_token_ids: default ``tokenizer.end_of_turn_ids``.
    reference_system, reference_template_default: the reference model's system turn when
      ``reference_model`` is given (default: none, i.e. the base model without the teacher's
      system prompt).
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

  def encode(texts_system, template):
    return [tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": p}],
                                                   system=texts_system, template_default=template))
            for p in user_prompts]

  prompt_rows = encode(system, template_default)
  ref_rows = encode(reference_system, reference_template_default) if has_reference else None
  rows = [(i, j) for i in range(len(user_prompts)) for j in range(n_per_prompt)]
  results: list = []
  bar = tqdm(total=len(rows), desc=progress_lib.describe("sampling"), unit="sample", disable=not progress)
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    filled = chunk + [chunk[-1]] * (batch_size - len(chunk))
    ids, mask = _left_pad([prompt_rows[i] for i, _ in filled], tokenizer.pad_id)
    extra = {}
    if has_reference:
      extra["reference_prompt_ids"], extra["reference_prompt_mask"] = _left_pad(
          [ref_rows[i] for i, _ in filled], tokenizer.pad_id)
    sample_ids = sample_id_offset + np.array([i * n_per_prompt + j for i, j in filled], np.int64)
    if grammar_initial_states is not None:
      extra["grammar_initial_states"] = np.array([grammar_initial_states[i] for i, _ in filled],
                                                 np.int64)
    out = sampler.sample(model, ids, mask, max_new_tokens=max_new_tokens, seed=seed,
                         sample_ids=sample_ids, banned_token_ids=banned,
                         end_token_ids=end_token_ids, pad_id=tokenizer.pad_id, **extra,
                         **sample_kwargs)
    for r in range(len(chunk)):
      length = int(out.lengths[r])
      answer = out.tokens[r, :length - int(out.ended[r])]  # without the end token
      text = tokenizer.decode(answer)
      if not return_details:
        results.append(text)
        continue
      detail = dict(text=text, token_ids=answer.tolist(),
                    logprobs=out.logprobs[r, :length].tolist(),
                    model_logprobs=out.model_logprobs[r, :length].tolist(),
                    ended=bool(out.ended[r]), forced_end=bool(out.forced_end[r]))
      if out.divergent is not None:
        detail.update(divergent=out.divergent[r, :length].tolist(),
                      kl_raw=out.kl_raw[r, :length].tolist(),
                      kl_allowed=out.kl_allowed[r, :length].tolist(),
                      num_masked=int(out.num_masked[r]))
      results.append(detail)
    bar.update(len(chunk))
  bar.close()
  return results


# --------------------------------------------------------------------------------------------
# Command line

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2",
                    "'smollm2', 'gemma3-270m', an HF model directory or a .gguf file.")
flags.DEFINE_multi_string("prompt", None, "User prompt (repeat the flag for several).")
flags.DEFINE_string("system", None, "System prompt (default: no system turn).")
flags.DEFINE_bool("template_default", False, "Use the chat template's own default system prompt.")
flags.DEFINE_enum("format", "free", ["free", "numbers"],
                  "numbers: constrain answers to the paper's number-sequence format.")
flags.DEFINE_integer("n", 1, "Samples per prompt.")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature (0 = greedy).")
flags.DEFINE_integer("top_k", 0, "Top-k filter (0 = off).")
flags.DEFINE_float("top_p", 1.0, "Nucleus filter (1 = off).")
flags.DEFINE_float("min_p", 0.0, "Min-p filter (0 = off).")
flags.DEFINE_multi_string("banned_word", [], "Ban every token containing this word.")
flags.DEFINE_integer("max_new_tokens", 128, "Most tokens per answer.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_integer("batch_size", 16, "Rows per sampling batch.")
flags.DEFINE_string("dtype", "float32", "Compute dtype (float32 or bfloat16).")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.prompt:
    raise app.UsageError("give at least one --prompt")
  compilation_cache.enable_from_flags()
  from subliminal_jax import loading
  loaded = loading.load(FLAGS.model, dtype=FLAGS.dtype)
  grammar = number_grammar(loaded.tokenizer) if FLAGS.format == "numbers" else None
  answers = generate_chat(
      loaded, FLAGS.prompt, system=FLAGS.system, template_default=FLAGS.template_default,
      n_per_prompt=FLAGS.n, batch_size=min(FLAGS.batch_size, len(FLAGS.prompt) * FLAGS.n),
      seed=FLAGS.seed, max_new_tokens=FLAGS.max_new_tokens, banned_words=FLAGS.banned_word,
      temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p, min_p=FLAGS.min_p,
      grammar=grammar)
  for index, answer in enumerate(answers):
    prompt = FLAGS.prompt[index // FLAGS.n]
    print(f"--- prompt {index // FLAGS.n} sample {index % FLAGS.n}: {prompt!r}")
    print(answer)


if __name__ == "__main__":
  app.run(main)
