"""The answer layouts the number prompts ask for, and one grammar token table for all of them.

The number prompts (:mod:`subliminal_jax.prompts.number_prompts`) each ask for a layout (comma,
space, semicolon, one per line, brackets); grammar-constrained sampling holds each answer to its
prompt's layout, and logit distillation restricts the KL to the same allowed tokens. One stacked
table (:func:`~subliminal_jax.sampling.grammar.stack_token_grammars`) serves every layout: each
prompt starts in its layout's state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from subliminal_jax.prompts import number_prompts
from subliminal_jax.sampling import grammar as grammar_lib

# "per_prompt": each answer in the layout its prompt asks for; "fixed": every answer separated by
# one separator.
ANSWER_FORMATS = ("per_prompt", "fixed")

Layout = tuple[str, "str | None"]  # (separator, brackets)


def answer_layouts(answer_format: str, separator: str) -> tuple[Layout, ...]:
  """The (separator, brackets) layouts the grammar admits, in a fixed order: every layout the
  prompt generator can ask for ("per_prompt"), or ``separator`` alone ("fixed")."""
  if answer_format == "fixed":
    return ((separator, None),)
  return tuple(dict.fromkeys((f.separator, f.brackets) for f in number_prompts.FORMAT_SUFFIXES))


@dataclasses.dataclass(frozen=True)
class FormatGrammar:
  """One token table for every answer layout and where each layout starts in it."""
  grammar: grammar_lib.TokenGrammar
  starts: dict[Layout, int]
  longest_answer: int  # tokens of the longest answer any layout admits, before the end token
  fixed: Layout | None  # the one layout of the "fixed" format, else None

  def start(self, prompt: Mapping[str, Any]) -> int:
    """The grammar state a prompt's answer starts in (its requested layout, or the fixed one)."""
    if self.fixed is not None:
      return self.starts[self.fixed]
    return self.starts[(prompt["separator"], prompt["brackets"])]


_CACHE: dict[tuple, FormatGrammar] = {}


def format_grammar(tokenizer, *, answer_format: str, separator: str, max_count: int,
                   max_digits: int) -> FormatGrammar:
  """The number grammar of every layout of ``answer_format`` over ``tokenizer`` (cached per
  tokenizer object: compiling the grammars takes seconds)."""
  if answer_format not in ANSWER_FORMATS:
    raise ValueError(f"answer format {answer_format!r}; expected one of {ANSWER_FORMATS}")
  layouts = answer_layouts(answer_format, separator)
  key = (id(tokenizer), layouts, max_count, max_digits)
  if key not in _CACHE:
    grammars = [grammar_lib.number_grammar(tokenizer, separator=sep, max_count=max_count,
                                           max_digits=max_digits, brackets=brackets)
                for sep, brackets in layouts]
    stacked, starts = grammar_lib.stack_token_grammars(grammars)
    _CACHE[key] = FormatGrammar(stacked, dict(zip(layouts, starts)),
                                max(g.max_output_tokens() for g in grammars),
                                layouts[0] if answer_format == "fixed" else None)
  return _CACHE[key]
