"""The sampler and teacher forcing of an older checkout beside this one's, interleaved in one run.

Measures the profile-guided changes to the decode loop (KV cache in the layer scan's carry,
heads-first; a typed loop state) and to teacher forcing (the prefill projects only each prompt's
last position to the vocabulary) on the SmolLM2-135M shape with random weights, alternating the
old and new engines round by round so load on a shared machine hits both alike; the best round
of each counts. Both sample the same tokens (checked). Make the older checkout with

  git worktree add /tmp/before 817d507
  python -m benchmarks.engine_before_after --before_tree=/tmp/before --json

Only ``models/transformer.py``, ``sampling/sampler.py`` and ``evaluation/trait_metrics.py`` are
taken from the older tree; everything they import comes from this checkout.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from types import ModuleType

import numpy as np
from absl import app, flags
from flax import nnx

from benchmarks import engines
from benchmarks import flops as flops_lib
from subliminal_jax import compilation_cache
from subliminal_jax.evaluation import trait_metrics
from subliminal_jax.sampling import sampler

FLAGS = flags.FLAGS
flags.DEFINE_string("before_tree", None, "An older checkout of this repository (git worktree).")
flags.DEFINE_integer("layers", 30, "Decoder layers of the SmolLM2 shape (30 = SmolLM2-135M).")
flags.DEFINE_integer("rounds", 3, "Alternating old/new rounds; the best of each counts.")
engines.define_sampling_flags(sample_batch=64)
flags.DEFINE_bool("json", False, "Print one JSON line instead of a table.")


def _load(name: str, path: str) -> ModuleType:
  if not os.path.exists(path):
    raise FileNotFoundError(f"--before_tree has no {path}: expected a checkout of this repository")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


def main(argv) -> None:
  del argv
  if not FLAGS.before_tree:
    raise app.UsageError("give --before_tree, an older checkout (git worktree add DIR COMMIT)")
  compilation_cache.enable_from_flags()
  package = os.path.join(FLAGS.before_tree, "subliminal_jax")
  old_transformer = _load("before_transformer", os.path.join(package, "models", "transformer.py"))
  old_sampler = _load("before_sampler", os.path.join(package, "sampling", "sampler.py"))
  old_metrics = _load("before_trait_metrics", os.path.join(package, "evaluation", "trait_metrics.py"))
  old_metrics.KVCache = old_transformer.KVCache  # its cache type, not this checkout's

  config = engines.smollm2_shape(layers=FLAGS.layers)
  new_model = engines.random_model(config)
  old_model = old_transformer.Transformer(config, rngs=nnx.Rngs(0))
  nnx.update(old_model, nnx.state(new_model))  # the same weights
  work = engines.SamplingWorkload(new_model, FLAGS.sample_batch, FLAGS.prompt_tokens)
  cache_length = work.prompt_length + FLAGS.new_tokens
  mask = np.ones_like(work.ids, bool)
  evaluation = engines.EvaluationWorkload(new_model, 16, FLAGS.prompt_tokens, 48)

  def sample(engine, model, new_tokens):
    start = time.perf_counter()
    out = engine.sample(model, work.ids, mask, max_new_tokens=new_tokens, seed=0, temperature=1.0,
                        grammar=work.grammar, end_token_ids=(engines.END_ID,),
                        cache_length=cache_length)
    return time.perf_counter() - start, out

  def evaluate(metrics, model):
    start = time.perf_counter()
    metrics.continuation_logprobs(model, evaluation.prompt_ids, evaluation.continuations, pad_id=0,
                                  boundary=evaluation.boundary)
    return time.perf_counter() - start

  cases = {"before": (old_sampler, old_model, old_metrics),
           "after": (sampler, new_model, trait_metrics)}
  times = {case: {"prefill": [], "full": [], "eval": []} for case in cases}
  outputs = {}
  for engine, model, metrics in cases.values():  # compile both first
    sample(engine, model, 1)
    sample(engine, model, FLAGS.new_tokens)
    evaluate(metrics, model)
  for _ in range(FLAGS.rounds):
    for case, (engine, model, metrics) in cases.items():
      times[case]["prefill"].append(sample(engine, model, 1)[0])
      seconds, outputs[case] = sample(engine, model, FLAGS.new_tokens)
      times[case]["full"].append(seconds)
      times[case]["eval"].append(evaluate(metrics, model))
  if not np.array_equal(outputs["before"].tokens, outputs["after"].tokens):
    raise AssertionError("the two samplers drew different tokens from the same weights and seed")

  result = {"benchmark": "engine_before_after", "layers": FLAGS.layers, "batch": FLAGS.sample_batch,
            "load_average": os.getloadavg()[0], "decode_steps": outputs["after"].num_steps - 1}
  for case in cases:
    prefill, full, seconds = (min(times[case][k]) for k in ("prefill", "full", "eval"))
    steps = outputs[case].num_steps - 1
    result[case] = {
        "prefill_s": prefill, "decode_step_s": (full - prefill) / steps, "eval_s": seconds,
        "decode_flops_per_s": (flops_lib.forward_flops(config, FLAGS.sample_batch) * steps
                               / (full - prefill)),
        "eval_flops_per_s": evaluation.flops / seconds}
  result["decode_speedup"] = result["before"]["decode_step_s"] / result["after"]["decode_step_s"]
  result["eval_speedup"] = result["before"]["eval_s"] / result["after"]["eval_s"]
  engines.print_result(result, FLAGS.json)


if __name__ == "__main__":
  app.run(main)
