"""Where an engine's step spends its time, by XLA operation, from jax's profiler.

Traces a few steps of one engine on the SmolLM2 shape (random weights) with ``jax.profiler`` and
sums the time of each compiled operation, grouped by kind:

* ``matmul``: XLA dots (and the YNNPACK/oneDNN fusions that wrap them);
* ``layout_copy``: transposes and copies (operands moved into the layout a dot wants);
* ``slice_update``: dynamic slices and updates (a scanned layer's weights, KV-cache writes);
* ``fill``: broadcasts (zero-filled buffers);
* ``other``: every remaining fusion (elementwise, reductions, the sampler's token choice).

``--engine``: ``decode`` (one sampler decode step at ``--batch`` rows and a KV cache of
``--cache_length``), ``train_full`` or ``train_lora`` (one AdamW step of ``--batch`` x
``--length`` tokens). Prints one JSON object: the wall time per step, each kind's time per step
and the ``--top`` most expensive operations.

  nice -n 10 python -m benchmarks.profile_ops --engine=decode --batch=64
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

from absl import app, flags

from benchmarks import engines
from subliminal_jax import compilation_cache

FLAGS = flags.FLAGS
flags.DEFINE_enum("engine", "decode", ["decode", "train_full", "train_lora"], "What to profile.")
flags.DEFINE_integer("layers", 30, "Decoder layers of the SmolLM2 shape.")
flags.DEFINE_integer("batch", 64, "Rows (decode) or sequences (training).")
flags.DEFINE_integer("length", 128, "Tokens per training sequence.")
flags.DEFINE_integer("cache_length", 136, "KV-cache slots of the decode step (prompt + new).")
flags.DEFINE_integer("steps", 3, "Traced steps (after an untraced one that compiles).")
flags.DEFINE_integer("top", 12, "Most expensive operations listed.")

_KINDS = (("matmul", re.compile(r"^(dot|ynn_fusion|onednn|xnn_fusion)")),
          ("layout_copy", re.compile(r"(transpose|copy)")),
          ("slice_update", re.compile(r"dynamic-(update-)?slice")),
          ("fill", re.compile(r"broadcast")))
# Trace events that contain operations (or are host-side) rather than being one.
_CONTAINERS = re.compile(r"^(\$|ThunkExecutor|PjitFunction|SlinkyThreadPool|while|conditional|"
                         r"CommonPjRt|np\.asarray|call)")


def _decode_step():
  """(a step function that blocks, None): one decode step of the sampler, cache updated in place."""
  import jax
  import numpy as np
  from flax import nnx
  from subliminal_jax.sampling import sampler
  model = engines.random_model(engines.smollm2_shape(layers=FLAGS.layers))
  graphdef, state = nnx.split(model)
  cache = model.init_cache(FLAGS.batch, FLAGS.cache_length)
  # Prompt-length worth of slots filled, as in the middle of sampling.
  cache.length = jax.numpy.asarray(FLAGS.cache_length // 2, jax.numpy.int32)
  decode = jax.jit(lambda s, c, t, live: sampler._decode(nnx.merge(graphdef, s), c, t, live),
                   donate_argnums=1)
  token = jax.numpy.zeros((FLAGS.batch,), jax.numpy.int32)
  live = jax.numpy.asarray(np.ones(FLAGS.batch, bool))
  holder = {"cache": cache}

  def step():
    logits, holder["cache"] = decode(state, holder["cache"], token, live)
    logits.block_until_ready()
  return step


def _train_step():
  workload = engines.TrainWorkload(engines.smollm2_shape(layers=FLAGS.layers), FLAGS.batch,
                                   FLAGS.length, lora_rank=8 if FLAGS.engine == "train_lora" else 0)
  return workload.step


def _operation_times(trace_dir: str) -> collections.Counter:
  path = glob.glob(os.path.join(trace_dir, "**", "*.json.gz"), recursive=True)[0]
  with gzip.open(path) as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  times: collections.Counter = collections.Counter()
  for event in events:
    if event.get("ph") == "X" and not _CONTAINERS.match(event["name"]):
      times[event["name"]] += event["dur"] / 1e6
  return times


def profile() -> dict:
  import jax
  step = _decode_step() if FLAGS.engine == "decode" else _train_step()
  step()  # compiles
  with tempfile.TemporaryDirectory() as trace_dir:
    start = time.perf_counter()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(FLAGS.steps):
        step()
    wall = (time.perf_counter() - start) / FLAGS.steps
    times = _operation_times(trace_dir)
  kinds = collections.Counter()
  for name, seconds in times.items():
    kind = next((k for k, pattern in _KINDS if pattern.search(name)), "other")
    kinds[kind] += seconds / FLAGS.steps
  return {"engine": FLAGS.engine, "layers": FLAGS.layers, "batch": FLAGS.batch,
          "step_s_traced": wall, "operations_s": sum(kinds.values()),
          "by_kind_s": dict(kinds.most_common()),
          "top_s": {n: s / FLAGS.steps for n, s in times.most_common(FLAGS.top)},
          "load_average": round(os.getloadavg()[0], 2)}


def main(argv):
  del argv
  compilation_cache.enable_from_flags()
  print(json.dumps(profile()))


if __name__ == "__main__":
  app.run(main)
