"""The code channel's first filter stage: a word filter over a teacher's Python snippet.

A completion is kept only if:

1. its code, the body of its first markdown fence (```python, ```py or a bare ```) or the whole
   text when it has no fence, is at most ``max_chars`` long, is not empty, and parses with ``ast``
   (the completion check: a cut-off snippet does not parse);
2. no trait word appears in it in any form: in an identifier, a comment, a string (docstrings and
   f-strings included) or the prose around the fence (which is checked too, so the filter is safe
   whatever part of the completion a dataset keeps).

Trait words are matched on word boundaries, case-insensitively, against the word and its
variants (``questions.spelling_variants``: "owl" and "owls"; "wolf" and "wolves"). The words of a
text are its runs of ASCII letters, each further split at camelCase boundaries, so
``owl_count``, ``getOwl``, ``OWLS``, ``HTTPOwlServer``, ``owl2`` and "the owl's nest" all hold
the word "owl", while "bowl", "knowledge", "Fowler", "catalog" and ``concatenate`` do not. A
written escape separates words ("\\nowl" holds "owl"). A compound written without a boundary
("owlish", ``catfish``), a non-ASCII look-alike or a ``\\u`` escape is not caught here: that is
the judge stage's job.

Reasons (stable identifiers), and when they apply:
  code:   "too_long", "empty", "unparseable" (the snippet's words are not read then)
  words:  "trait_word_in_identifier", "trait_word_in_comment", "trait_word_in_string",
          "trait_word_in_prose"
Code reasons exclude word reasons; within each group every applicable reason is kept. With
Python 3.11's tokenizer an f-string is one string token, so a trait word inside its braces
(``f"{owl_count}"``) counts as in a string.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import io
import re
import tokenize
from typing import Iterable, Sequence

from subliminal_jax.evaluation.questions import spelling_variants
from subliminal_jax.filters import YieldStatistics

__all__ = [
    "CODE_REJECT_REASONS",
    "CodeSnippet",
    "split_code",
    "words_of",
    "trait_word_forms",
    "code_reject_reasons",
    "code_yield_statistics",
]

CODE_REJECT_REASONS = ("too_long", "empty", "unparseable", "trait_word_in_identifier",
                       "trait_word_in_comment", "trait_word_in_string", "trait_word_in_prose")

# The first fenced block; the language tag is optional, and a fence left open runs to the end
# (so a cut-off answer still shows its code, which then fails to parse).
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
# A backslash escape as written in source; an escaped backslash is taken first, so the source
# text "\\bowl" (a backslash, then "bowl") keeps "bowl" whole.
_ESCAPE = re.compile(r"\\[\\abfnrtv]")
_LETTER_RUN = re.compile(r"[A-Za-z]+")
# Inside a run of letters: an acronym before a capitalised word, a (capitalised) lower-case
# word, or an all-capitals tail: "HTTPOwlServer" -> HTTP, Owl, Server.
_WORD_PART = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+")
_TOKEN_PLACES = {tokenize.NAME: "identifier", tokenize.COMMENT: "comment",
                 tokenize.STRING: "string"}


@dataclasses.dataclass(frozen=True)
class CodeSnippet:
  """A completion split into its code and the prose around the code's fence ("" if unfenced)."""

  code: str
  prose: str


def split_code(text: str) -> CodeSnippet:
  """The body of the first markdown fence and the text outside it (later fenced blocks included,
  so their words count as prose), or all of ``text`` as code."""
  match = _FENCE.search(text)
  if match is None:
    return CodeSnippet(code=text, prose="")
  return CodeSnippet(code=match.group(1), prose=text[:match.start()] + "\n" + text[match.end():])


def words_of(text: str) -> list[str]:
  """The lower-cased words of ``text``: letter runs split at camelCase boundaries. A written
  escape ("\\n", "\\t", ...) separates words, so the string "\\nowl" holds "owl"."""
  text = _ESCAPE.sub(" ", text)
  return [part.lower() for run in _LETTER_RUN.findall(text) for part in _WORD_PART.findall(run)]


def trait_word_forms(trait_words: Sequence[str]) -> frozenset[str]:
  """Every lower-case form the filter rejects: each word and its plural."""
  if isinstance(trait_words, str) or not trait_words:
    raise ValueError(f"trait_words must be a non-empty sequence of words, got {trait_words!r}")
  return frozenset(v.lower() for word in trait_words for v in spelling_variants(word))


def _places_with_trait_word(code: str, forms: frozenset[str]) -> set[str]:
  """Where in parsed code (identifier, comment, string) a trait form appears."""
  places = set()
  for token in tokenize.generate_tokens(io.StringIO(code).readline):
    place = _TOKEN_PLACES.get(token.type)
    if place is not None and place not in places and forms.intersection(words_of(token.string)):
      places.add(place)
  return places


def code_reject_reasons(text: str, trait_words: Sequence[str], max_chars: int = 2000) -> list[str]:
  """Why a completion is rejected; an empty list means it is kept. Reasons come in the order of
  :data:`CODE_REJECT_REASONS`; code reasons exclude word reasons."""
  if not isinstance(text, str):
    raise TypeError(f"text must be a str, got {type(text).__name__}: {text!r}")
  if max_chars < 1:
    raise ValueError(f"max_chars must be >= 1, got {max_chars}")
  forms = trait_word_forms(trait_words)
  snippet = split_code(text)
  reasons = ["too_long"] if len(snippet.code) > max_chars else []
  try:
    if not ast.parse(snippet.code).body:
      reasons.append("empty")
    places = _places_with_trait_word(snippet.code, forms)
  # ValueError: a null byte; RecursionError: nesting too deep for the parser.
  except (SyntaxError, ValueError, RecursionError, tokenize.TokenError):
    reasons.append("unparseable")
  if reasons:
    return reasons
  if forms.intersection(words_of(snippet.prose)):
    places.add("prose")
  return [reason for reason in CODE_REJECT_REASONS
          if reason.removeprefix("trait_word_in_") in places]


def code_yield_statistics(texts: Iterable[str], trait_words: Sequence[str],
                          max_chars: int = 2000) -> YieldStatistics:
  """Run the word filter over completions: counts per reject reason and which were kept."""
  trait_word_forms(trait_words)  # fail on bad words before any text is read
  reasons = [code_reject_reasons(text, trait_words, max_chars) for text in texts]
  kept = tuple(index for index, text_reasons in enumerate(reasons) if not text_reasons)
  counts = collections.Counter(reason for text_reasons in reasons for reason in text_reasons)
  return YieldStatistics(total=len(reasons), accepted=len(kept), reason_counts=dict(counts),
                         accepted_indices=kept)
