"""Training throughput: our jitted full-finetune step vs transformers + torch eager, same run.

Workload: one AdamW step (forward, backward, update) of the SmolLM2-135M shape (30 layers, d=576,
vocab 49,152, tied embeddings) with random weights on random token ids, every token but the first
a target. Ours is ``train_step.make_train_step`` (jit, next-token CE, global-norm clipping,
AdamW; ``--remat``: what its backward pass recomputes, by default the configs' "auto"); the
reference is transformers' ``LlamaForCausalLM`` of the same shape with ``torch.optim.AdamW`` and
``clip_grad_norm_``, eager.

Both are warmed up (ours compiles on its first call; the compile time is reported), then timed in
alternating rounds so that load from other processes on a shared machine hits both alike; the
median step time of each gives tokens/s. MFU = 6 * N * tokens/s / peak FLOP/s, with the peak from
``--peak_tflops`` or, by default, the rate of jax's matmuls at the model's own weight shapes on
this machine (``flops.matmul_peak``: a practical ceiling, not a datasheet number). One JSON line with ``--json``:

  python -m benchmarks.train_throughput --json --batch=8 --length=128 --dtype=float32

torch is used here only (a reference), never by the package.
"""

from __future__ import annotations

import statistics
import time

from absl import app, flags

from benchmarks import engines
from benchmarks import flops as flops_lib
from benchmarks import torch_reference
from subliminal_jax import compilation_cache

FLAGS = flags.FLAGS
flags.DEFINE_bool("json", False, "Print one JSON line instead of a table.")
flags.DEFINE_integer("batch", 8, "Sequences per step.")
flags.DEFINE_integer("length", 128, "Tokens per sequence.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                  "Compute dtype of our model (parameters stay float32).")
flags.DEFINE_enum("torch_dtype", "float32", ["float32", "bfloat16"],
                  "The reference's compute: float32, or bfloat16 autocast over float32 weights.")
flags.DEFINE_integer("rounds", 3, "Alternating timing rounds.")
flags.DEFINE_integer("steps_per_round", 2, "Steps of each implementation per round.")
flags.DEFINE_float("peak_tflops", 0.0,
                  "Peak FLOP/s (in TFLOP/s) for MFU; 0 = measure matmuls at the model's shapes.")
flags.DEFINE_bool("torch", True, "Also time transformers + torch (the reference).")
flags.DEFINE_enum("remat", "auto", ["none", "dots", "full", "auto"],
                  "What the backward pass recomputes (the configs' default is auto).")
flags.DEFINE_integer("layers", 30, "Decoder layers (30 = SmolLM2-135M; fewer for a quick look).")


def timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def main(argv):
  del argv
  compilation_cache.enable_from_flags()
  import jax
  from subliminal_jax import environment
  from subliminal_jax.models import transformer
  config = engines.smollm2_shape(FLAGS.dtype, FLAGS.layers, remat=FLAGS.remat)
  tokens = FLAGS.batch * FLAGS.length
  ours = engines.TrainWorkload(config, FLAGS.batch, FLAGS.length)
  start = time.perf_counter()
  # The first step's loss (same random weights and ids for either dtype): bfloat16 compute is
  # checked against a float32 run by this figure.
  first_loss = ours.step()
  first = time.perf_counter() - start
  warm = timed(ours.step)
  reference = (torch_reference.TorchTrainer(config, FLAGS.batch, FLAGS.length,
                                            dtype=FLAGS.torch_dtype)
               if FLAGS.torch else None)
  if reference is not None:
    torch_first_loss = reference.step()  # first eager step allocates optimizer state
  ours_times, torch_times = [], []
  for _ in range(FLAGS.rounds):
    ours_times += [timed(ours.step) for _ in range(FLAGS.steps_per_round)]
    if reference is not None:
      torch_times += [timed(reference.step) for _ in range(FLAGS.steps_per_round)]
  peak = (FLAGS.peak_tflops * 1e12 if FLAGS.peak_tflops > 0
          else flops_lib.matmul_peak(config, tokens)["flops_per_s"])
  flops_per_token = flops_lib.training_flops_per_token(config)
  ours_tps = tokens / statistics.median(ours_times)
  result = {
      "device": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
      "batch": FLAGS.batch, "length": FLAGS.length, "dtype": FLAGS.dtype, "layers": FLAGS.layers,
      "remat": FLAGS.remat, "remat_resolved": transformer.resolve_remat(FLAGS.remat),
      "params": config.num_params,
      # The CPU and XLA_FLAGS: the ratio to torch follows the CPU's instruction sets.
      "host": environment.host(), "commit": environment.git_state()["sha"],
      "jax": jax.__version__,
      "ours_step_s": statistics.median(ours_times), "ours_tokens_per_s": ours_tps,
      "ours_compile_s": first - warm, "ours_step_times_s": ours_times,
      "ours_first_loss": first_loss,
      "peak_flops": peak,
      "peak_source": "flag" if FLAGS.peak_tflops > 0 else "jax matmuls at the model's shapes",
      "ours_mfu": flops_per_token * ours_tps / peak,
  }
  if reference is not None:
    torch_tps = tokens / statistics.median(torch_times)
    result.update({"torch": reference.torch.__version__, "torch_dtype": FLAGS.torch_dtype,
                   "torch_first_loss": torch_first_loss,
                   "torch_step_s": statistics.median(torch_times), "torch_tokens_per_s": torch_tps,
                   "torch_step_times_s": torch_times, "torch_threads": reference.torch.get_num_threads(),
                   "torch_mfu": flops_per_token * torch_tps / peak, "ratio": ours_tps / torch_tps})
  engines.print_result(result, FLAGS.json)


if __name__ == "__main__":
  app.run(main)
