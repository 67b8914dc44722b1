"""K LoRA students of one base: trained one at a time (``trainer.fit``) vs together (``fit_many``).

Workload: K students (LoRA of rank ``--lora_rank`` on every projection) of a random model of the
SmolLM2-135M shape (``--shape=small``: a narrow 4-layer model with a 4,096-token vocabulary, for a
quick look on a CPU), each on its own dataset of ``--examples`` random-token rows (lengths
between half of ``--length`` and ``--length``, the second half of each row its targets), the same
settings and steps for both. Every batch is padded to ``--length`` (``length_multiple``), so each
loop compiles one program. Both go through the real loops (bucketed batches, metrics files, a
checkpoint at the end) in temporary workdirs, in one process.

Reported: tokens/s of each at steady state (all students' tokens over the summed step times,
leaving out each run's first step, which compiles) and end to end (the wall time of all the fit
calls vs the one fit_many call: compiles, checkpoints and all), and the ratios together / one at a
time. One JSON line with --json:

  python -m benchmarks.fit_many --json --shape=small --students=4
"""

from __future__ import annotations

import tempfile
import time

from absl import app, flags

from benchmarks import engines
from subliminal_jax import compilation_cache

FLAGS = flags.FLAGS
flags.DEFINE_bool("json", False, "Print one JSON line instead of a table.")
flags.DEFINE_enum("shape", "smollm2", ["smollm2", "small"],
                  "The base model: SmolLM2-135M's shape, or a small one for a CPU.")
flags.DEFINE_integer("students", 4, "Students (K).")
flags.DEFINE_integer("examples", 32, "Rows per student's dataset.")
flags.DEFINE_integer("batch", 8, "Rows per optimizer step.")
flags.DEFINE_integer("length", 128, "Longest row in tokens; every batch is padded to it.")
flags.DEFINE_integer("epochs", 2, "Epochs per student.")
flags.DEFINE_integer("lora_rank", 8, "LoRA rank of every student.")


def base_config():
  if FLAGS.shape == "smollm2":
    return engines.smollm2_shape()
  return engines.smollm2_shape(layers=4, vocab_size=4096, hidden_size=192, intermediate_size=512,
                               num_heads=3, num_kv_heads=1)


def student_dataset(vocab_size: int, seed: int):
  import datasets
  import numpy as np
  rng = np.random.default_rng(seed)
  ids, masks = [], []
  for _ in range(FLAGS.examples):
    length = int(rng.integers(FLAGS.length // 2, FLAGS.length + 1))
    ids.append(rng.integers(17, vocab_size, length).tolist())  # 0..16: special tokens
    masks.append([i >= length // 2 for i in range(length)])
  return datasets.Dataset.from_dict({"input_ids": ids, "loss_mask": masks,
                                     "length": [len(x) for x in ids]})


def student_settings(seed: int):
  from subliminal_jax import lora
  from subliminal_jax.training import optimizers, trainer
  return trainer.FitSettings(
      epochs=FLAGS.epochs, batch_size=FLAGS.batch, seed=seed, length_multiple=FLAGS.length,
      optimization=optimizers.OptimizerSettings(learning_rate=1e-4, warmup_steps=0),
      lora=lora.LoraSettings(rank=FLAGS.lora_rank, alpha=float(FLAGS.lora_rank), seed=seed))


def steady_state(histories, shared_step: bool) -> tuple[int, float]:
  """(tokens, seconds) of every step but the first (the compile) of each run. A fit_many step is
  shared: its time counts once, its tokens for every student."""
  later = [history[1:] for history in histories]
  tokens = sum(r["tokens"] for history in later for r in history)
  runs = later[:1] if shared_step else later
  return tokens, sum(r["step_time_s"] for history in runs for r in history)


def main(argv):
  del argv
  if FLAGS.epochs * -(-FLAGS.examples // FLAGS.batch) < 2:
    raise app.UsageError("each student needs 2 or more steps: the first compiles, the rest are timed")
  compilation_cache.enable_from_flags()
  import jax
  from subliminal_jax.training import fit_many as fit_many_lib
  from subliminal_jax.training import trainer
  config = base_config()
  base = engines.random_model(config)
  data = [student_dataset(config.vocab_size, seed) for seed in range(FLAGS.students)]
  settings = [student_settings(seed) for seed in range(FLAGS.students)]
  with tempfile.TemporaryDirectory() as root:
    start = time.perf_counter()
    alone = [trainer.fit(engines.random_model(config), d, s, f"{root}/alone{i}", progress=False)[1]
             for i, (d, s) in enumerate(zip(data, settings))]
    alone_wall = time.perf_counter() - start
    start = time.perf_counter()
    together = [history for _, history in fit_many_lib.fit_many(
        base, data, settings, [f"{root}/together{i}" for i in range(FLAGS.students)],
        progress=False)]
    together_wall = time.perf_counter() - start
  tokens = sum(r["tokens"] for h in alone for r in h)
  alone_tokens, alone_s = steady_state(alone, shared_step=False)
  together_tokens, together_s = steady_state(together, shared_step=True)
  result = {
      "device": jax.devices()[0].device_kind, "shape": FLAGS.shape, "layers": config.num_layers,
      "params": config.num_params, "students": FLAGS.students, "lora_rank": FLAGS.lora_rank,
      "steps_per_student": len(alone[0]), "batch": FLAGS.batch, "length": FLAGS.length,
      "tokens": tokens,
      "alone_tokens_per_s": alone_tokens / alone_s,
      "together_tokens_per_s": together_tokens / together_s,
      "ratio": (together_tokens / together_s) / (alone_tokens / alone_s),
      "alone_wall_s": alone_wall, "together_wall_s": together_wall,
      "alone_wall_tokens_per_s": tokens / alone_wall,
      "together_wall_tokens_per_s": tokens / together_wall,
      "wall_ratio": alone_wall / together_wall,
  }
  engines.print_result(result, FLAGS.json)


if __name__ == "__main__":
  app.run(main)
