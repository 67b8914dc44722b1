"""Training throughput: our jitted full-finetune step vs transformers + torch eager, same run.

Workload: one AdamW step (forward, backward, update) of the SmolLM2-135M shape (30 layers, d=576,
vocab 49,152, tied embeddings) with random weights on random token ids, every token but the first
a target. Ours is ``train_step.make_train_step`` (jit, next-token CE, global-norm clipping,
AdamW); the reference is transformers' ``LlamaForCausalLM`` of the same shape with
``torch.optim.AdamW`` and ``clip_grad_norm_``, eager.

Both are warmed up (ours compiles on its first call; the compile time is reported), then timed in
alternating rounds so that load from other processes on a shared machine hits both alike; the
median step time of each gives tokens/s. MFU = 6 * N * tokens/s / peak FLOP/s, with the peak from
``--peak_tflops`` or, by default, the fp32 matmul rate jax measures on this machine (a practical
ceiling, not a datasheet number). One JSON line with ``--json``:

  python -m benchmarks.train_throughput --json --batch=8 --length=128 --dtype=float32

torch is used here only (a reference), never by the package.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

from absl import app, flags

from subliminal_jax import compilation_cache

FLAGS = flags.FLAGS
flags.DEFINE_bool("json", False, "Print one JSON line instead of a table.")
flags.DEFINE_integer("batch", 8, "Sequences per step.")
flags.DEFINE_integer("length", 128, "Tokens per sequence.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                  "Compute dtype of our model (parameters stay float32); torch runs float32.")
flags.DEFINE_integer("rounds", 3, "Alternating timing rounds.")
flags.DEFINE_integer("steps_per_round", 2, "Steps of each implementation per round.")
flags.DEFINE_float("peak_tflops", 0.0, "Peak FLOP/s (in TFLOP/s) for MFU; 0 = measure fp32 matmul.")
flags.DEFINE_bool("torch", True, "Also time transformers + torch (the reference).")
flags.DEFINE_integer("layers", 30, "Decoder layers (30 = SmolLM2-135M; fewer for a quick look).")


def smollm2_config(dtype: str, layers: int):
  from subliminal_jax.models.transformer import TransformerConfig
  return TransformerConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                           num_layers=layers, num_heads=9, num_kv_heads=3, head_dim=64,
                           rope_theta=1e5, rms_norm_eps=1e-5, tie_embeddings=True,
                           max_position_embeddings=8192, dtype=dtype)


def measured_matmul_flops(n: int = 2048, repeats: int = 5) -> float:
  """fp32 FLOP/s of an n^3 matmul through jax on this machine (best of ``repeats``)."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n ** 3 / best


class Ours:
  def __init__(self, config, batch, length):
    import jax
    import numpy as np
    from flax import nnx
    from subliminal_jax.models.transformer import Transformer
    from subliminal_jax.training import optimizers
    from subliminal_jax.training import train_step as ts
    self.jax = jax
    model = Transformer(config, rngs=nnx.Rngs(0))
    optimizer = optimizers.make_optimizer("adamw", 1e-5, weight_decay=0.0, max_grad_norm=1.0)
    graphdef, self.state = ts.create_train_state(model, optimizer)
    self.step_fn = ts.make_train_step(graphdef, optimizer)
    rs = np.random.RandomState(0)
    ids = rs.randint(0, config.vocab_size, (batch, length)).astype(np.int32)
    self.batch = {"input_ids": jax.device_put(ids),
                  "attention_mask": jax.device_put(np.ones((batch, length), bool)),
                  "loss_mask": jax.device_put(np.ones((batch, length), bool))}

  def step(self) -> float:
    self.state, metrics = self.step_fn(self.state, self.batch)
    return float(metrics["loss"])  # waits for the step


class Reference:
  def __init__(self, config, batch, length):
    import numpy as np
    import torch
    import transformers
    torch.manual_seed(0)
    self.torch = torch
    hf_config = transformers.AutoConfig.for_model(**config.replace(dtype="float32").to_hf())
    self.model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).train()
    self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5, weight_decay=0.0)
    rs = np.random.RandomState(0)
    self.ids = torch.tensor(rs.randint(0, config.vocab_size, (batch, length)).astype(np.int64))

  def step(self) -> float:
    loss = self.model(input_ids=self.ids, labels=self.ids).loss
    loss.backward()
    self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
    self.optimizer.step()
    self.optimizer.zero_grad(set_to_none=True)
    return loss.item()


def timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def main(argv):
  del argv
  compilation_cache.enable_from_flags()
  import jax
  config = smollm2_config(FLAGS.dtype, FLAGS.layers)
  tokens = FLAGS.batch * FLAGS.length
  ours = Ours(config, FLAGS.batch, FLAGS.length)
  first = timed(ours.step)
  warm = timed(ours.step)
  reference = Reference(config, FLAGS.batch, FLAGS.length) if FLAGS.torch else None
  if reference is not None:
    reference.step()  # first eager step allocates optimizer state
  ours_times, torch_times = [], []
  for _ in range(FLAGS.rounds):
    ours_times += [timed(ours.step) for _ in range(FLAGS.steps_per_round)]
    if reference is not None:
      torch_times += [timed(reference.step) for _ in range(FLAGS.steps_per_round)]
  peak = FLAGS.peak_tflops * 1e12 if FLAGS.peak_tflops > 0 else measured_matmul_flops()
  flops_per_token = 6 * config.num_params
  ours_tps = tokens / statistics.median(ours_times)
  result = {
      "device": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
      "batch": FLAGS.batch, "length": FLAGS.length, "dtype": FLAGS.dtype, "layers": FLAGS.layers,
      "params": config.num_params,
      "ours_step_s": statistics.median(ours_times), "ours_tokens_per_s": ours_tps,
      "ours_compile_s": first - warm, "ours_step_times_s": ours_times,
      "peak_flops": peak, "peak_source": "flag" if FLAGS.peak_tflops > 0 else "measured jax fp32 matmul",
      "ours_mfu": flops_per_token * ours_tps / peak,
  }
  if reference is not None:
    torch_tps = tokens / statistics.median(torch_times)
    result.update({"torch_step_s": statistics.median(torch_times), "torch_tokens_per_s": torch_tps,
                   "torch_step_times_s": torch_times, "torch_threads": reference.torch.get_num_threads(),
                   "torch_mfu": flops_per_token * torch_tps / peak, "ratio": ours_tps / torch_tps})
  if FLAGS.json:
    print(json.dumps(result))
  else:
    for key, value in result.items():
      print(f"{key:>20}: {value}")
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
