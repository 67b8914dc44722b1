"""Regular-expression grammars for constrained decoding, compiled down to a token transition table.

A pattern is compiled in two steps:

1. :func:`compile_char_dfa`: regex -> character DFA. ``interegular`` parses the regex and builds a
   (deterministic, possibly sparse, non-minimal) FSM; we turn it into a dense table over character
   classes, drop states that are unreachable or cannot reach an accepting state, minimise it (Moore
   partition refinement) and merge character classes whose columns coincide.
2. :func:`compile_token_grammar`: character DFA -> token DFA over a tokenizer's vocabulary, by
   walking every token's decoded text through the DFA from every state at once (numpy, vectorised
   over states and tokens). The result, :class:`TokenGrammar`, is an int32 ``[num_states, vocab]``
   table; ``-1`` means the token is not allowed in that state. States from which no token sequence
   of *this* vocabulary reaches an accepting state are pruned, so a sampler that follows the table
   can never get stuck: every non-accepting state allows at least one token, and the end-of-turn
   tokens are to be allowed exactly in the ``accepting`` states.

Semantics: the whole generated text must match the pattern (``re.fullmatch``), with ``\\d``, ``\\w``
and ``\\s`` meaning their ASCII classes (as under ``re.ASCII``) and ``.`` excluding a newline.
Anchors, lookarounds, backreferences, word boundaries and inline flags are rejected with a
:class:`GrammarError` naming the construct. Tokens whose text is empty (special tokens) or
contains U+FFFD (a byte-level token holding an incomplete UTF-8 sequence) are never allowed: their
characters are not the characters they contribute to the output.

:func:`number_sequence_pattern` builds the paper's answer format, e.g.
``[0-9]{1,3}(, [0-9]{1,3}){0,9}\\.?`` for up to ten numbers of up to three digits.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Sequence

import interegular
import numpy as np
from interegular import patterns as _ire_patterns
from interegular.fsm import anything_else as _ANYTHING_ELSE

__all__ = [
    "GrammarError",
    "CharDFA",
    "TokenGrammar",
    "compile_char_dfa",
    "compile_token_grammar",
    "stack_token_grammars",
    "number_sequence_pattern",
]

# The filter accepts exactly these separators once whitespace is stripped (see filters.py).
_FILTER_SEPARATOR_CORES = ("", ",", ";")
_REGEX_METACHARACTERS = frozenset(".^$*+?{}[]\\|()")
# Upper bound on the [states x tokens] block walked at once, to bound memory (int32: 64 MiB).
_WALK_BLOCK_ELEMENTS = 1 << 24


class GrammarError(ValueError):
  """A pattern that cannot be compiled, or one that no token sequence of a vocabulary matches."""


# --------------------------------------------------------------------------------------------
# Regex -> character DFA


@dataclasses.dataclass(frozen=True, eq=False)
class CharDFA:
  """A minimal, trimmed DFA over characters.

  ``transitions[state, char_class]`` is the next state or -1 (no match possible any more). Every
  state is reachable from ``initial_state`` and can reach an accepting state. A character ``c`` is
  in class ``char_to_class[c]`` if listed there, else in ``other_class`` (-1: rejected everywhere).
  """

  transitions: np.ndarray  # int32 [num_states, num_classes]
  accepting: np.ndarray  # bool [num_states]
  initial_state: int
  char_to_class: dict[str, int]
  other_class: int
  pattern: str

  @property
  def num_states(self) -> int:
    return int(self.transitions.shape[0])

  def class_of(self, char: str) -> int:
    """The character class of ``char``, or -1 if no transition of the DFA reads it."""
    return self.char_to_class.get(char, self.other_class)

  def step(self, state: int, text: str) -> int:
    """The state after reading ``text`` from ``state``, or -1 once no match is possible."""
    for char in text:
      if state < 0:
        return -1
      char_class = self.class_of(char)
      state = -1 if char_class < 0 else int(self.transitions[state, char_class])
    return state

  def accepts(self, text: str) -> bool:
    """Whether the pattern matches the whole of ``text``."""
    state = self.step(self.initial_state, text)
    return state >= 0 and bool(self.accepting[state])


def _reject_unsupported_nodes(node, pattern: str) -> None:
  """Walk interegular's parse tree and reject what would silently change full-match semantics."""
  if isinstance(node, _ire_patterns._NonCapturing):
    kind = ("lookbehind" if node.backwards else "lookahead") + (" (negative)" if node.negate else "")
    raise GrammarError(
        f"unsupported regex construct in {pattern!r}: {kind} ((?=...), (?!...), (?<=...), (?<!...)); "
        "write the constraint into the pattern itself")
  if isinstance(node, _ire_patterns.Pattern):
    if node.added_flags or node.removed_flags:
      raise GrammarError(
          f"unsupported regex construct in {pattern!r}: inline flags ((?i), (?s), ...); "
          "spell the alternatives out (e.g. [Aa] for case-insensitivity)")
    for option in node.options:
      _reject_unsupported_nodes(option, pattern)
  elif isinstance(node, _ire_patterns._Concatenation):
    for part in node.parts:
      _reject_unsupported_nodes(part, pattern)
  elif isinstance(node, _ire_patterns._Repeated):
    _reject_unsupported_nodes(node.base, pattern)


def _parse(pattern: str):
  if not isinstance(pattern, str):
    raise GrammarError(f"pattern must be a str, got {type(pattern).__name__}: {pattern!r}")
  try:
    # Python's own parser first: its syntax errors say what and where ("unterminated character
    # set at position 0"); interegular's often carry no message.
    re.compile(pattern)
  except re.error as error:
    raise GrammarError(f"invalid regex syntax in {pattern!r}: {error}") from None
  try:
    parsed = interegular.parse_pattern(pattern)
  except interegular.Unsupported as error:
    detail = str(error)
    if detail in ("'^'", "'$'"):
      detail = f"anchor {detail} (the grammar always matches the whole output; drop the anchor)"
    raise GrammarError(f"unsupported regex construct in {pattern!r}: {detail}") from None
  except (interegular.InvalidSyntax, ValueError) as error:
    raise GrammarError(f"invalid regex syntax in {pattern!r}: {error}") from None
  _reject_unsupported_nodes(parsed, pattern)
  return parsed


def _trim(table: np.ndarray, accepting: np.ndarray, initial: int) -> np.ndarray:
  """Boolean mask of states reachable from ``initial`` that can reach an accepting state."""
  num_states = table.shape[0]
  successors = [np.unique(row[row >= 0]) for row in table]
  reachable = np.zeros(num_states, bool)
  reachable[initial] = True
  stack = [initial]
  while stack:
    for nxt in successors[stack.pop()]:
      if not reachable[nxt]:
        reachable[nxt] = True
        stack.append(int(nxt))
  predecessors: list[list[int]] = [[] for _ in range(num_states)]
  for state, succ in enumerate(successors):
    for nxt in succ:
      predecessors[nxt].append(state)
  live = accepting.copy()
  stack = [int(s) for s in np.flatnonzero(accepting)]
  while stack:
    for prev in predecessors[stack.pop()]:
      if not live[prev]:
        live[prev] = True
        stack.append(prev)
  return reachable & live


def _minimise(table: np.ndarray, accepting: np.ndarray, initial: int):
  """Moore partition refinement of a trimmed DFA (-1 = dead). Returns (table, accepting) with the
  initial state numbered 0 and the others in breadth-first order, so the result is canonical."""
  block = accepting.astype(np.int64)
  num_blocks = len(np.unique(block))
  while True:
    successor_blocks = np.where(table >= 0, block[np.maximum(table, 0)], -1)
    signature = np.concatenate([block[:, None], successor_blocks], axis=1)
    _, new_block = np.unique(signature, axis=0, return_inverse=True)
    new_block = new_block.reshape(-1)
    new_num_blocks = int(new_block.max()) + 1
    block = new_block
    if new_num_blocks == num_blocks:
      break
    num_blocks = new_num_blocks
  representative = np.zeros(num_blocks, np.int64)
  representative[block] = np.arange(len(block))  # any member will do: they are equivalent
  # Breadth-first renumbering from the initial block.
  order = [int(block[initial])]
  seen = {order[0]}
  position = 0
  while position < len(order):
    row = table[representative[order[position]]]
    for nxt_block in block[row[row >= 0]]:
      if int(nxt_block) not in seen:
        seen.add(int(nxt_block))
        order.append(int(nxt_block))
    position += 1
  new_id_of_block = np.empty(num_blocks, np.int64)
  new_id_of_block[order] = np.arange(num_blocks)
  rows = table[representative[order]]
  new_table = np.where(rows >= 0, new_id_of_block[block[np.maximum(rows, 0)]], -1).astype(np.int32)
  new_accepting = accepting[representative[order]]
  return new_table, new_accepting


def compile_char_dfa(pattern: str) -> CharDFA:
  """Compile ``pattern`` (Python regex syntax, full-match semantics) into a minimal character DFA.

  Raises :class:`GrammarError` for unsupported constructs, invalid syntax, or a pattern that
  matches no string at all.
  """
  parsed = _parse(pattern)
  try:
    fsm = parsed.to_fsm()
  except interegular.Unsupported as error:
    raise GrammarError(f"unsupported regex construct in {pattern!r}: {error}") from None
  except Exception as error:  # interegular raises bare Exceptions for some constructs
    raise GrammarError(f"cannot compile regex {pattern!r}: {error}") from None
  states = sorted(fsm.states)
  state_index = {state: i for i, state in enumerate(states)}
  # interegular numbers its character classes in set-iteration order, which follows Python's
  # per-process string hashing; ordering them by their characters instead makes the compiled
  # tables identical in every process (the processes of a multi-host run must agree).
  keys = sorted(fsm.alphabet.by_transition,
                key=lambda k: sorted((1, "") if symbol is _ANYTHING_ELSE else (0, symbol)
                                     for symbol in fsm.alphabet.by_transition[k]))
  key_index = {key: i for i, key in enumerate(keys)}
  table = np.full((len(states), len(keys)), -1, np.int32)
  for state, row in fsm.map.items():
    for key, nxt in row.items():
      table[state_index[state], key_index[key]] = state_index[nxt]
  accepting = np.array([state in fsm.finals for state in states], bool)
  initial = state_index[fsm.initial]

  keep = _trim(table, accepting, initial)
  if not keep[initial]:
    raise GrammarError(f"pattern {pattern!r} matches no string at all")
  new_id = np.cumsum(keep) - 1
  table = np.where(table >= 0, np.where(keep[np.maximum(table, 0)], new_id[np.maximum(table, 0)], -1), -1)
  table, accepting, initial = table[keep], accepting[keep], int(new_id[initial])
  table, accepting = _minimise(table, accepting, initial)

  # Merge character classes with identical columns; a class that is dead everywhere becomes -1.
  columns, column_of_key = np.unique(table.T, axis=0, return_inverse=True)
  column_of_key = column_of_key.reshape(-1)
  live_columns = np.flatnonzero((columns >= 0).any(axis=1))
  class_of_column = np.full(len(columns), -1, np.int64)
  class_of_column[live_columns] = np.arange(len(live_columns))
  table = np.ascontiguousarray(columns[live_columns].T.astype(np.int32))
  class_of_symbol = {
      symbol: int(class_of_column[column_of_key[key_index[key]]])
      for key, symbols in fsm.alphabet.by_transition.items() for symbol in symbols}
  other_class = class_of_symbol.pop(_ANYTHING_ELSE, -1)
  # Characters that behave like "anything else" need no entry (class_of falls back to it).
  char_to_class = {c: k for c, k in class_of_symbol.items() if k != other_class}
  return CharDFA(transitions=table, accepting=accepting, initial_state=0,
                 char_to_class=char_to_class, other_class=other_class, pattern=pattern)


# --------------------------------------------------------------------------------------------
# Character DFA -> token DFA


@dataclasses.dataclass(frozen=True, eq=False)
class TokenGrammar:
  """A grammar as a token-level DFA over a fixed vocabulary.

  ``transitions[state, token]`` is the state after emitting ``token`` in ``state``, or -1 if the
  token is not allowed there. End-of-turn tokens are not in the table: a sampler allows them
  exactly in ``accepting`` states. Every non-accepting state allows at least one token.
  """

  transitions: np.ndarray  # int32 [num_states, vocab]; -1 = token not allowed in that state
  accepting: np.ndarray  # bool [num_states]
  initial_state: int
  pattern: str

  @property
  def num_states(self) -> int:
    return int(self.transitions.shape[0])

  @property
  def vocab_size(self) -> int:
    return int(self.transitions.shape[1])

  def max_output_tokens(self) -> int | None:
    """The most tokens an accepted output can have (before its end token); None if unbounded.

    A sampler whose ``max_new_tokens`` is at least this plus one can always finish the grammar.
    """
    successors = [np.unique(row[row >= 0]) for row in self.transitions]
    # Kahn's topological order over the state graph (all states are reachable from the initial
    # one); a cycle means outputs of unbounded length.
    indegree = np.zeros(self.num_states, np.int64)
    for succ in successors:
      indegree[succ] += 1
    order = [int(s) for s in np.flatnonzero(indegree == 0)]
    for state in order:
      for nxt in successors[state]:
        indegree[nxt] -= 1
        if indegree[nxt] == 0:
          order.append(int(nxt))
    if len(order) < self.num_states:
      return None
    longest = np.zeros(self.num_states, np.int64)  # most tokens from a state to the end
    for state in reversed(order):
      if len(successors[state]):
        longest[state] = 1 + longest[successors[state]].max()
    return int(longest[self.initial_state])

  def allowed(self, state: int) -> np.ndarray:
    """Boolean mask [vocab] of the tokens allowed in ``state``."""
    return self.transitions[state] >= 0

  def walk(self, token_ids: Sequence[int], state: int | None = None) -> int:
    """The state after emitting ``token_ids`` (from the initial state by default), or -1 as soon
    as a token is not allowed."""
    state = self.initial_state if state is None else state
    for token in token_ids:
      if state < 0:
        return -1
      state = int(self.transitions[state, int(token)])
    return state

  def accepts(self, token_ids: Sequence[int]) -> bool:
    """Whether emitting ``token_ids`` and then an end token is a complete, grammatical output."""
    state = self.walk(token_ids)
    return state >= 0 and bool(self.accepting[state])


def _token_char_classes(dfa: CharDFA, token_texts: Sequence[str], dead_class: int):
  """Per-token character classes as one flat int array plus offsets and lengths."""
  lengths = np.fromiter((len(t) for t in token_texts), np.int64, count=len(token_texts))
  joined = "".join(token_texts)
  codepoints = np.frombuffer(joined.encode("utf-32-le", errors="surrogatepass"), np.uint32)
  unique, inverse = np.unique(codepoints, return_inverse=True)
  unique_classes = np.empty(len(unique), np.int32)
  for i, codepoint in enumerate(unique):
    char = chr(int(codepoint))
    cls = -1 if char == "\ufffd" else dfa.class_of(char)
    unique_classes[i] = dead_class if cls < 0 else cls
  classes = unique_classes[inverse.reshape(-1)]
  offsets = np.zeros(len(token_texts), np.int64)
  np.cumsum(lengths[:-1], out=offsets[1:])
  return classes, offsets, lengths


def _walk_all_tokens(dfa: CharDFA, token_texts: Sequence[str]) -> np.ndarray:
  """[num_char_states, vocab] state after each token from each state; -1 where the walk dies."""
  num_states, num_classes = dfa.transitions.shape
  sink, dead_class = num_states, num_classes
  # Extended table: an absorbing sink state, and a dead class that leads every state into it.
  extended = np.full((num_states + 1, num_classes + 1), sink, np.int32)
  extended[:num_states, :num_classes] = np.where(dfa.transitions >= 0, dfa.transitions, sink)
  classes, offsets, lengths = _token_char_classes(dfa, token_texts, dead_class)

  vocab = len(token_texts)
  result = np.empty((num_states, vocab), np.int32)
  order = np.argsort(-lengths, kind="stable")  # longest first: the live tokens form a prefix
  block = max(1, _WALK_BLOCK_ELEMENTS // (num_states + 1))
  for start in range(0, vocab, block):
    ids = order[start:start + block]
    ids_lengths = lengths[ids]
    ids_offsets = offsets[ids]
    states = np.broadcast_to(np.arange(num_states, dtype=np.int32)[:, None], (num_states, len(ids))).copy()
    max_length = int(ids_lengths[0]) if len(ids) else 0
    # Number of tokens (a prefix, lengths being sorted descending) still being read at position p.
    active_counts = np.searchsorted(-ids_lengths, -np.arange(max_length), side="left")
    for position in range(max_length):
      count = int(active_counts[position])
      step_classes = classes[ids_offsets[:count] + position]
      states[:, :count] = extended[states[:, :count], step_classes[None, :]]
    states[states == sink] = -1
    states[:, ids_lengths == 0] = -1  # empty-text tokens (specials) would not move the DFA
    result[:, ids] = states
  return result


def compile_token_grammar(pattern: str, token_texts: Sequence[str], *,
                          disallowed_ids: Iterable[int] = ()) -> TokenGrammar:
  """Compile ``pattern`` into a :class:`TokenGrammar` over a vocabulary.

  Args:
    pattern: a Python regex; the whole output must match it (``re.fullmatch``, ASCII classes).
    token_texts: the decoded text of each token id on its own (``Tokenizer.token_texts()``:
      byte-level ``Ġ`` already turned into a space). Tokens with empty text are never allowed.
    disallowed_ids: ids never allowed whatever their text, e.g. ``tokenizer.special_ids``
      (``token_texts()`` gives specials their literal text, "<|im_end|>", which a permissive
      pattern would otherwise admit). End tokens are the sampler's business, not the table's.

  Raises:
    GrammarError: unsupported or invalid pattern, or when the vocabulary cannot express it: the
      initial state allows no token ("empty allowed set"), or no token sequence reaches an
      accepting state.
  """
  if isinstance(token_texts, str) or not all(isinstance(t, str) for t in token_texts):
    raise GrammarError("token_texts must be a sequence of str (one decoded text per token id)")
  if len(token_texts) == 0:
    raise GrammarError("token_texts is empty: a grammar needs a vocabulary")
  disallowed = np.asarray(sorted(set(int(i) for i in disallowed_ids)), np.int64)
  if disallowed.size and (disallowed[0] < 0 or disallowed[-1] >= len(token_texts)):
    raise GrammarError(f"disallowed_ids must be token ids in [0, {len(token_texts)}), got "
                       f"{disallowed[0] if disallowed[0] < 0 else disallowed[-1]}")
  dfa = compile_char_dfa(pattern)
  table = _walk_all_tokens(dfa, token_texts)
  table[:, disallowed] = -1

  if not (table[dfa.initial_state] >= 0).any():
    raise GrammarError(
        f"empty allowed set: no token of this vocabulary ({len(token_texts)} tokens) can start an "
        f"output matching {pattern!r}")
  # Prune states from which this vocabulary cannot reach an accepting state (e.g. a character
  # the pattern needs that no token spells), so the sampler can never be cornered.
  keep = _trim(table, dfa.accepting, dfa.initial_state)
  if not keep[dfa.initial_state]:
    raise GrammarError(
        f"no token sequence of this vocabulary ({len(token_texts)} tokens) matches {pattern!r}")
  new_id = np.cumsum(keep) - 1
  safe = np.maximum(table, 0)
  table = np.where((table >= 0) & keep[safe], new_id[safe], -1).astype(np.int32)[keep]
  accepting = dfa.accepting[keep]
  initial = int(new_id[dfa.initial_state])
  if not (table[initial] >= 0).any():
    raise GrammarError(
        f"empty allowed set: no token of this vocabulary ({len(token_texts)} tokens) can start an "
        f"output matching {pattern!r}")
  return TokenGrammar(transitions=np.ascontiguousarray(table), accepting=accepting,
                      initial_state=initial, pattern=pattern)


def stack_token_grammars(grammars: Sequence[TokenGrammar]) -> tuple[TokenGrammar, tuple[int, ...]]:
  """Several grammars over one vocabulary as one table, side by side: ``(stacked, initial_states)``.

  Grammar i's states are renumbered by the number of states before it, so a row that starts in
  ``initial_states[i]`` follows grammar i exactly and never reaches another's states. One table
  serves a batch whose rows ask for different formats (``sampler.sample(grammar_initial_states=)``,
  and the per-position states of a distillation dataset). ``stacked.initial_state`` is the first
  grammar's; its pattern lists every pattern, joined by " | ".
  """
  grammars = tuple(grammars)
  if not grammars:
    raise GrammarError("stack_token_grammars needs at least one grammar")
  vocab = {g.vocab_size for g in grammars}
  if len(vocab) != 1:
    raise GrammarError(f"grammars over different vocabularies cannot share a table: vocab sizes "
                       f"{sorted(vocab)}")
  tables, starts, offset = [], [], 0
  for g in grammars:
    table = np.asarray(g.transitions, np.int32)
    tables.append(np.where(table >= 0, table + offset, -1).astype(np.int32))
    starts.append(offset + int(g.initial_state))
    offset += g.num_states
  stacked = TokenGrammar(transitions=np.ascontiguousarray(np.concatenate(tables)),
                         accepting=np.concatenate([np.asarray(g.accepting, bool) for g in grammars]),
                         initial_state=starts[0], pattern=" | ".join(g.pattern for g in grammars))
  return stacked, tuple(starts)


# --------------------------------------------------------------------------------------------
# The paper's answer format


def _escape(text: str) -> str:
  # Only regex metacharacters are escaped; spaces and newlines stay literal (interegular and re
  # both read them as themselves), which keeps the pattern readable.
  return "".join("\\" + c if c in _REGEX_METACHARACTERS else c for c in text)


def number_sequence_pattern(separator: str = ", ", max_count: int = 10, max_digits: int = 3,
                            final_period: bool = True, brackets: str | None = None) -> str:
  """The regex of an answer of 1..``max_count`` numbers of 1..``max_digits`` digits.

  ``separator`` goes between numbers (", ", " ", "; ", "\\n", ...); stripped of whitespace it must
  be "", "," or ";" as the output filter requires. ``final_period`` allows one trailing ".";
  ``brackets`` ("[]" or "()") encloses the list. Every string the pattern matches passes
  :func:`subliminal_jax.filters.number_sequence_reject_reasons` with ``max_count`` and
  ``max_value = 10**max_digits - 1`` (no banned list).
  """
  if not isinstance(separator, str) or not separator:
    raise ValueError(f"separator must be a non-empty str, got {separator!r}")
  if separator.strip() not in _FILTER_SEPARATOR_CORES or any(c.isdigit() for c in separator):
    raise ValueError(
        f"separator {separator!r} is not accepted by the output filter: stripped of whitespace it "
        f"must be one of {list(_FILTER_SEPARATOR_CORES)}")
  if not isinstance(max_count, int) or max_count < 1:
    raise ValueError(f"max_count must be an int >= 1, got {max_count!r}")
  if not isinstance(max_digits, int) or max_digits < 1:
    raise ValueError(f"max_digits must be an int >= 1, got {max_digits!r}")
  if brackets not in (None, "[]", "()"):
    raise ValueError(f"brackets must be None, '[]' or '()', got {brackets!r}")
  number = "[0-9]" if max_digits == 1 else f"[0-9]{{1,{max_digits}}}"
  body = number if max_count == 1 else f"{number}({_escape(separator)}{number}){{0,{max_count - 1}}}"
  if brackets:
    body = _escape(brackets[0]) + body + _escape(brackets[1])
  return body + ("\\.?" if final_period else "")
