"""Each engine's FLOP rate as a share of this machine's measured peak, all in one run.

The peak is measured here, not taken from a datasheet: XLA matmuls at the model's own weight
shapes (``flops.matmul_peak``) at the training step's row count, right before and right after
each engine (the larger of the two: on a shared machine load comes and goes, and the peak next to
a figure is its fair yardstick). Every engine runs the SmolLM2-135M shape with random weights (see
``benchmarks/engines.py``):

* training: one AdamW step of full finetuning (6N FLOPs/token) and of LoRA r8 on every projection
  (4N + 6 x adapters), batch x length tokens;
* sampling: grammar-constrained, temperature 1, ``--sample_batch`` prompts of ``--prompt_tokens``
  tokens, up to ``--new_tokens`` new. The prefill is timed alone (``max_new_tokens=1``, same cache
  length) and the decode steps are the rest of a full run. Decode FLOPs count every row of every
  step (finished rows are computed too); it is also set against the memory-bandwidth bound: each
  step reads every weight and the whole KV cache once;
* evaluation: trait_metrics' teacher-forced log-probabilities of short continuations.

Shares are FLOP/s divided by the peak; ``load_average`` (1 minute) is recorded beside each figure.

  nice -n 10 python -m benchmarks.peak_share --json
"""

from __future__ import annotations

import os
import statistics
import time

from absl import app, flags

from benchmarks import engines
from benchmarks import flops as flops_lib
from subliminal_jax import compilation_cache

FLAGS = flags.FLAGS
flags.DEFINE_bool("json", False, "Print one JSON line instead of a table.")
flags.DEFINE_integer("layers", 30, "Decoder layers of the SmolLM2 shape (30 = SmolLM2-135M).")
engines.define_workload_flags(train_batch=8, train_steps=3, sample_batch=64)
flags.DEFINE_integer("eval_prompts", 16, "Prompts of the teacher-forcing workload.")
flags.DEFINE_integer("eval_continuations", 48, "Continuations (1-3 tokens) scored after each.")
flags.DEFINE_integer("repeats", 2, "Timed repeats of each sampling and evaluation run.")
flags.DEFINE_list("engines", ["train_full", "train_lora", "sampling", "evaluation"],
                  "Which engines to run (train_full, train_lora, sampling, evaluation).")


def _load() -> float:
  return round(os.getloadavg()[0], 2)


def _peak(config, rows: int) -> dict:
  result = flops_lib.matmul_peak(config, rows)
  result["load_average"] = _load()
  return result


def _train(config, lora_rank: int) -> dict:
  workload = engines.TrainWorkload(config, FLAGS.train_batch, FLAGS.train_length, lora_rank)
  first = flops_lib.best_time(workload.step, 1)
  times = []
  for _ in range(FLAGS.train_steps):
    times.append(flops_lib.best_time(workload.step, 1))
  seconds = statistics.median(times)
  return {"tokens": workload.tokens, "step_s": seconds, "compile_s": first - min(times),
          "tokens_per_s": workload.tokens / seconds, "flops_per_s": workload.flops / seconds,
          "step_times_s": times, "load_average": _load()}


def _sampling(config, model) -> dict:
  workload = engines.SamplingWorkload(model, FLAGS.sample_batch, FLAGS.prompt_tokens)
  cache_length = workload.prompt_length + FLAGS.new_tokens
  runs = {}
  for new_tokens in (1, FLAGS.new_tokens):
    first = workload.run(new_tokens, cache_length)  # compiles
    timed = [workload.run(new_tokens, cache_length) for _ in range(FLAGS.repeats)]
    runs[new_tokens] = (first, min(timed, key=lambda r: r.seconds))
  prefill = runs[1][1]
  full = runs[FLAGS.new_tokens][1]
  decode_steps = full.num_steps - 1
  decode_s = full.seconds - prefill.seconds
  batch = workload.batch
  prefill_flops = flops_lib.forward_flops(config, batch * workload.prompt_length, batch)
  step_flops = flops_lib.forward_flops(config, batch)
  # Bytes a decode step must read at least: every weight once, and the KV cache at its length.
  weight_bytes = config.num_params * 4
  cache_bytes = (2 * config.num_layers * batch * config.num_kv_heads * cache_length
                 * config.head_dim * 4)
  return {
      "batch": batch, "prompt_length": workload.prompt_length, "cache_length": cache_length,
      "compile_s": runs[FLAGS.new_tokens][0].seconds - full.seconds,
      "prefill_s": prefill.seconds, "prefill_flops_per_s": prefill_flops / prefill.seconds,
      "decode_steps": decode_steps, "decode_s": decode_s,
      "decode_step_s": decode_s / max(decode_steps, 1),
      "decode_flops_per_s": step_flops * decode_steps / decode_s,
      "decode_bytes_per_step": weight_bytes + cache_bytes,
      "new_tokens": full.new_tokens, "new_tokens_per_s": full.new_tokens / full.seconds,
      "rows_grammatical": full.grammatical, "load_average": _load()}


def _evaluation(model) -> dict:
  workload = engines.EvaluationWorkload(model, FLAGS.eval_prompts, FLAGS.prompt_tokens,
                                        FLAGS.eval_continuations)
  first = workload.run()
  seconds = min(workload.run() for _ in range(FLAGS.repeats))
  return {"seconds": seconds, "compile_s": first - seconds,
          "flops_per_s": workload.flops / seconds, "load_average": _load()}


def _beside_peaks(config, rows: int, run) -> dict:
  """``run()``'s figures with the peak at ``rows`` measured right before and right after it; its
  ``peak_flops_per_s`` is the larger (on a shared machine load comes and goes: the peak measured
  next to a figure is the fair yardstick for it)."""
  before = _peak(config, rows)
  result = run()
  after = _peak(config, rows)
  result["peak_flops_per_s"] = max(before["flops_per_s"], after["flops_per_s"])
  result["peaks"] = [before, after]
  return result


def measure() -> dict:
  """Each engine beside the peak measured before and after it; every figure and the shares."""
  import jax
  config = engines.smollm2_shape(layers=FLAGS.layers)
  rows = FLAGS.train_batch * FLAGS.train_length
  result = {"benchmark": "peak_share", "device": jax.devices()[0].device_kind,
            "cpu_count": os.cpu_count(), "layers": FLAGS.layers, "params": config.num_params,
            "start": time.strftime("%Y-%m-%d %H:%M:%S")}
  shares = {}
  for engine, name, rank in (("train_full", "train_full", 0), ("train_lora", "train_lora_r8", 8)):
    if engine in FLAGS.engines:
      result[name] = _beside_peaks(config, rows, lambda: _train(config, rank))
      shares[name] = result[name]["flops_per_s"] / result[name]["peak_flops_per_s"]
  model = engines.random_model(config)
  if "sampling" in FLAGS.engines:
    sampling = result["sampling"] = _beside_peaks(config, rows, lambda: _sampling(config, model))
    sampling["peak_at_decode_rows"] = _peak(config, FLAGS.sample_batch)
    sampling["memory_bytes_per_s"] = flops_lib.memory_bandwidth()
    shares["sampling_prefill"] = sampling["prefill_flops_per_s"] / sampling["peak_flops_per_s"]
    shares["sampling_decode"] = sampling["decode_flops_per_s"] / sampling["peak_flops_per_s"]
    shares["sampling_decode_of_same_rows_matmul"] = (
        sampling["decode_flops_per_s"] / sampling["peak_at_decode_rows"]["flops_per_s"])
    shares["sampling_decode_of_bandwidth_bound"] = (
        sampling["decode_bytes_per_step"] / sampling["memory_bytes_per_s"]
        / sampling["decode_step_s"])
  if "evaluation" in FLAGS.engines:
    evaluation = result["evaluation"] = _beside_peaks(config, rows, lambda: _evaluation(model))
    shares["evaluation"] = evaluation["flops_per_s"] / evaluation["peak_flops_per_s"]
  result["share_of_peak"] = shares
  return result


def main(argv):
  del argv
  compilation_cache.enable_from_flags()
  engines.print_result(measure(), FLAGS.json)


if __name__ == "__main__":
  app.run(main)
