"""MNIST auxiliary-logit ensembles: seconds per epoch and achieved matmul GFLOP/s, by compute dtype.

Times one jitted epoch of the teachers (cross-entropy on MNIST) and of the students (KL on uniform
noise against the teachers) for ensembles of the default MLP, after a first (compiling) call, on
fewer steps than a full epoch. FLOPs count the matmuls only: forward 2*P, backward 2*P for weight
gradients plus 2*(P - first layer) for input gradients (the input needs none), P = weights per
example. One JSON line per configuration with ``--json``:

  python -m benchmarks.mnist_aux_throughput --json --models=25 --students_per_model=4
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from subliminal_jax import compilation_cache
from subliminal_jax.experiments import mnist_ensemble as ensemble
from subliminal_jax.models import mlp
from subliminal_jax.training.optimizers import make_optimizer

FLAGS = flags.FLAGS
flags.DEFINE_bool("json", False, "Print JSON lines instead of a table.")
flags.DEFINE_integer("models", 25, "Teachers (N).")
flags.DEFINE_integer("students_per_model", 4, "Student variants (K = N * this).")
flags.DEFINE_integer("steps", 10, "Steps timed per epoch call.")
flags.DEFINE_integer("batch", 1024, "Batch size.")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes to time.")


def _flops_per_example(cfg: mlp.MLPConfig, forward_only: bool = False) -> int:
  sizes = cfg.layer_sizes
  weights = [a * b for a, b in zip(sizes[:-1], sizes[1:])]
  if forward_only:
    return 2 * sum(weights)
  return 2 * sum(weights) + 2 * sum(weights) + 2 * sum(weights[1:])


def _time(fn, *args) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def main(argv):
  del argv
  compilation_cache.enable_from_flags()
  n, k, b, steps = FLAGS.models, FLAGS.models * FLAGS.students_per_model, FLAGS.batch, FLAGS.steps
  examples = steps * b
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (examples, 784), dtype=np.uint8))
  labels = jnp.asarray(rng.integers(0, 10, (examples,), dtype=np.int32))
  optimizer = make_optimizer("adam", 3e-4, max_grad_norm=None)
  results = []
  for dtype in FLAGS.dtypes:
    cfg = mlp.MLPConfig(compute_dtype=dtype)
    graphdef, teachers = mlp.init_ensemble(cfg, mlp.model_keys(0, n))
    layout = ensemble.Layout.for_sizes(n, b)
    teacher_epoch = ensemble.make_classifier_epoch(
        graphdef, optimizer, num_classes=10, num_examples=examples, batch_size=b, layout=layout)
    # The state is donated: a fresh one for every call.
    seconds = _time(lambda: teacher_epoch(layout.new_state(teachers, optimizer), jax.random.key(0),
                                          images, labels))
    flops = _flops_per_example(cfg) * n * examples
    results.append({"phase": "teachers", "dtype": dtype, "models": n, "steps": steps,
                    "seconds_per_step": seconds / steps, "gflops": flops / seconds / 1e9})

    index = jnp.arange(k) % n
    students = mlp.take_models(teachers, index)
    mask = jnp.broadcast_to(jnp.arange(cfg.num_outputs) >= 10, (k, cfg.num_outputs))
    layout = ensemble.Layout.for_sizes(k, b)
    distill_epoch = ensemble.make_distill_epoch(
        graphdef, optimizer, loss="kl", inputs="uniform", num_examples=examples, batch_size=b,
        input_size=784, layout=layout)
    record = jnp.zeros((steps,), bool).at[-1].set(True)
    seconds = _time(lambda: distill_epoch(
        layout.new_state(students, optimizer), jax.random.key(1), teachers, index, mask, images,
        students, students, record))
    flops = (_flops_per_example(cfg) * k + _flops_per_example(cfg, True) * n) * examples
    results.append({"phase": "students", "dtype": dtype, "models": k, "steps": steps,
                    "seconds_per_step": seconds / steps, "gflops": flops / seconds / 1e9})
  for r in results:
    if FLAGS.json:
      print(json.dumps(r))
    else:
      print(f"{r['phase']:9s} {r['dtype']:9s} models={r['models']:4d} "
            f"{r['seconds_per_step'] * 1000:8.1f} ms/step {r['gflops']:7.1f} GFLOP/s")


if __name__ == "__main__":
  app.run(main)
