"""Panel teacher forcing after a long in-context history: whole prompts vs the shared prefix.

The signature experiment (issue 23) scores a panel after each of 20 questions, each question
preceded by the same history of a teacher's number sequences (up to the 8k context). The
whole-prompt path (``continuation_logprobs_many(..., shared_prefix_min=None)``) prefills every
(question) prompt in full; the shared-prefix path (the default) prefills the history once, in
chunks, then runs the questions and their panel tries packed in rows after it. Both run here in
one process on the SmolLM2-135M shape with random weights and random token ids (one member, no
adapters): a history of ``--history_tokens``, ``--questions`` questions of 15-30 tokens, and
``--continuations`` panel variants of 1-3 tokens with a word-boundary set. Each path is timed on
a second call (the first compiles; compile time is first minus second); the two results must agree
(their largest difference is reported, beside the largest log-probability's size). One JSON line with ``--json``:

  nice -n 19 python -m benchmarks.long_context_eval --json --history_tokens=2048 --layers=30
"""

from __future__ import annotations

import os
import time

import numpy as np
from absl import app, flags

from benchmarks import engines
from subliminal_jax import compilation_cache

FLAGS = flags.FLAGS
flags.DEFINE_integer("history_tokens", 2048, "Tokens of the history shared by every question.")
flags.DEFINE_integer("questions", 20, "Questions after the history.")
flags.DEFINE_integer("continuations", 60, "Panel variants scored after each question.")
flags.DEFINE_integer("layers", 30, "Decoder layers of the SmolLM2 shape (30 = SmolLM2-135M).")
flags.DEFINE_bool("whole", True, "Also time the whole-prompt path (the old one).")
flags.DEFINE_bool("json", False, "Print one JSON line instead of a table.")


def _workload(vocab: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  history = rng.integers(100, vocab - 100, FLAGS.history_tokens).tolist()
  prompts = [history + rng.integers(100, vocab - 100, int(n)).tolist()
             for n in rng.integers(15, 31, FLAGS.questions)]
  # Panel-like variants: a few first tokens shared by several variants (a trie, not a list).
  firsts = rng.integers(100, vocab - 100, max(1, FLAGS.continuations // 3))
  continuations = {(int(rng.choice(firsts)),) + tuple(rng.integers(100, vocab - 100, int(n)))
                   for n in rng.integers(0, 3, FLAGS.continuations)}
  return prompts, sorted(continuations), rng.random(vocab) < 0.5


def _timed(run) -> tuple[float, float, np.ndarray]:
  """(steady seconds, compile seconds, result) of a second call after a first."""
  start = time.perf_counter()
  run()
  first = time.perf_counter() - start
  start = time.perf_counter()
  result = run()
  steady = time.perf_counter() - start
  return steady, first - steady, result


def main(argv) -> None:
  del argv
  compilation_cache.enable_from_flags()
  import jax
  from subliminal_jax.evaluation import trait_metrics

  model = engines.random_model(engines.smollm2_shape(layers=FLAGS.layers))
  prompts, continuations, boundary = _workload(model.config.vocab_size)

  def run(shared_prefix_min):
    return trait_metrics.continuation_logprobs_many(
        [model], [prompts], continuations, pad_id=0, boundary=boundary,
        shared_prefix_min=shared_prefix_min)

  shared_s, shared_compile_s, shared = _timed(lambda: run(trait_metrics.SHARED_PREFIX_MIN))
  result = dict(
      benchmark="long_context_eval", device=str(jax.devices()[0].device_kind),
      layers=FLAGS.layers, history_tokens=FLAGS.history_tokens, questions=FLAGS.questions,
      continuations=len(continuations), shared_seconds=round(shared_s, 2),
      shared_compile_s=round(shared_compile_s, 2))
  if FLAGS.whole:
    whole_s, whole_compile_s, whole = _timed(lambda: run(None))
    result.update(whole_seconds=round(whole_s, 2), whole_compile_s=round(whole_compile_s, 2),
                  speedup=round(whole_s / shared_s, 2),
                  max_abs_difference=float(np.abs(whole - shared).max()),
                  max_abs_logprob=float(np.abs(whole).max()))
  result.update(cpu_count=os.cpu_count(), load_average=round(os.getloadavg()[0], 2))
  engines.print_result(result, FLAGS.json)


if __name__ == "__main__":
  app.run(main)
