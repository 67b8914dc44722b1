"""Our engines on benchmark workloads: a training step, grammar-constrained sampling, teacher forcing.

Every workload runs a model of a given shape with random weights (default: SmolLM2-135M's) on
random token ids, so it needs no checkpoint and runs the same on any host. The number grammar is
compiled over a synthetic vocabulary of the model's size (``synthetic_token_texts``): its cost in
the decode loop (a [states, vocab] table gather per step) is that of a real tokenizer's.

Each ``run``/``step`` blocks until its result is on the host, so wall time around it is the
engine's time.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from benchmarks import flops as flops_lib

__all__ = ["smollm2_shape", "random_model", "synthetic_token_texts", "TrainWorkload",
           "SamplingWorkload", "EvaluationWorkload", "LORA_TARGETS", "define_workload_flags",
           "print_result"]

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_NUM_SPECIAL = 17  # ids 0..16 are special tokens (SmolLM2's layout); 2 ends a turn
END_ID = 2


def define_workload_flags(*, train_batch: int, train_steps: int, sample_batch: int) -> None:
  """The workload sizes every benchmark of training and sampling takes, with its defaults."""
  from absl import flags
  flags.DEFINE_integer("train_batch", train_batch, "Training sequences per step.")
  flags.DEFINE_integer("train_length", 128, "Tokens per training sequence.")
  flags.DEFINE_integer("train_steps", train_steps, "Timed training steps per engine (after warm-up).")
  define_sampling_flags(sample_batch=sample_batch)


def define_sampling_flags(*, sample_batch: int) -> None:
  """The sampling workload's sizes (rows, prompt and new tokens), with its defaults."""
  from absl import flags
  flags.DEFINE_integer("sample_batch", sample_batch, "Rows sampled at once.")
  flags.DEFINE_integer("prompt_tokens", 88, "Prompt tokens per row.")
  flags.DEFINE_integer("new_tokens", 40, "max_new_tokens.")


def print_result(result: dict[str, Any], as_json: bool) -> None:
  """One JSON line, or one ``key: value`` line per entry."""
  import json
  import sys
  if as_json:
    print(json.dumps(result))
  else:
    for key, value in result.items():
      print(f"{key:>24}: {value}")
  sys.stdout.flush()


def smollm2_shape(dtype: str = "float32", layers: int = 30, **overrides: Any):
  """SmolLM2-135M's architecture (``layers`` decoder layers; fewer for a quick look)."""
  from subliminal_jax.models.transformer import TransformerConfig
  fields = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=layers,
                num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=1e5, rms_norm_eps=1e-5,
                tie_embeddings=True, max_position_embeddings=8192, dtype=dtype)
  fields.update(overrides)
  return TransformerConfig(**fields)


def random_model(config, seed: int = 0):
  from flax import nnx
  from subliminal_jax.models.transformer import Transformer
  return Transformer(config, rngs=nnx.Rngs(seed))


def synthetic_token_texts(vocab_size: int) -> list[str]:
  """Token texts for a vocabulary of ``vocab_size``: special tokens (empty text), the digits, the
  number format's separators, then distinct three-letter words."""
  texts = [""] * _NUM_SPECIAL + [str(d) for d in range(10)] + [",", " ", ".", ", ", " ,"]
  letters = "abcdefghijklmnopqrstuvwxyz"
  i = 0
  while len(texts) < vocab_size:
    texts.append(letters[i % 26] + letters[i // 26 % 26] + letters[i // 676 % 26])
    i += 1
  return texts[:vocab_size]


def _random_ids(rows: int, length: int, vocab_size: int, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return rng.integers(_NUM_SPECIAL, vocab_size, (rows, length)).astype(np.int32)


class TrainWorkload:
  """One AdamW step (next-token cross-entropy on every token) of full finetuning or LoRA."""

  def __init__(self, config, batch: int, length: int, lora_rank: int = 0, mesh=None):
    from flax import nnx
    from subliminal_jax import lora
    from subliminal_jax.training import optimizers
    from subliminal_jax.training import train_step as ts
    model = random_model(config)
    if lora_rank:
      lora.apply_lora(model, rank=lora_rank, alpha=float(lora_rank), targets=LORA_TARGETS)
    optimizer = optimizers.make_optimizer("adamw", 1e-5, weight_decay=0.0, max_grad_norm=1.0)
    graphdef, self._state = ts.create_train_state(
        model, optimizer, trainable=nnx.LoRAParam if lora_rank else nnx.Param, mesh=mesh)
    self._step = ts.make_train_step(graphdef, optimizer, mesh=mesh)
    ids = _random_ids(batch, length, config.vocab_size)
    self._batch = {"input_ids": ids, "attention_mask": np.ones_like(ids, bool),
                   "loss_mask": np.ones_like(ids, bool)}
    self.tokens = batch * length
    adapters = flops_lib.lora_params(config, lora_rank, LORA_TARGETS) if lora_rank else 0
    self.flops = self.tokens * flops_lib.training_flops_per_token(config, adapters)

  def step(self) -> float:
    self._state, metrics = self._step(self._state, self._batch)
    return float(metrics["loss"])  # waits for the step


@dataclasses.dataclass
class SamplingRun:
  seconds: float
  num_steps: int  # tokens chosen per row (the prefill's and every decode step's)
  new_tokens: int  # generated tokens up to each row's end, summed over rows
  grammatical: int  # rows that ended with a text the grammar accepts


class SamplingWorkload:
  """Grammar-constrained sampling at temperature 1 of ``batch`` random prompts."""

  def __init__(self, model, batch: int, prompt_tokens: int, mesh=None, seed: int = 0):
    from subliminal_jax.sampling import grammar as grammar_lib
    from subliminal_jax.sampling import sampler
    self.model, self.mesh, self.seed = model, mesh, seed
    vocab = model.config.vocab_size
    self.grammar = grammar_lib.compile_token_grammar(grammar_lib.number_sequence_pattern(),
                                                     synthetic_token_texts(vocab))
    self.ids = _random_ids(batch, prompt_tokens, vocab, seed)
    self.batch = batch
    self.prompt_length = sampler.prompt_bucket_length(prompt_tokens)  # what the prefill computes

  def run(self, max_new_tokens: int, cache_length: int) -> SamplingRun:
    from subliminal_jax.sampling import sampler
    start = time.perf_counter()
    out = sampler.sample(self.model, self.ids, np.ones_like(self.ids, bool),
                         max_new_tokens=max_new_tokens, seed=self.seed, temperature=1.0,
                         grammar=self.grammar, end_token_ids=(END_ID,), mesh=self.mesh,
                         cache_length=cache_length)
    seconds = time.perf_counter() - start
    grammatical = sum(self.grammar.accepts(row[:n - 1])
                      for row, n, ended in zip(out.tokens, out.lengths, out.ended) if ended)
    return SamplingRun(seconds, out.num_steps, int(out.lengths.sum()), int(grammatical))


class EvaluationWorkload:
  """trait_metrics' teacher forcing: log P(continuation, then a word boundary | prompt) for every
  (prompt, continuation) pair, as the exact trait metric computes it."""

  def __init__(self, model, prompts: int, prompt_tokens: int, continuations: int,
               max_continuation: int = 3, mesh=None, seed: int = 0):
    self.model, self.mesh = model, mesh
    vocab = model.config.vocab_size
    rng = np.random.default_rng(seed)
    self.prompt_ids = [list(row) for row in _random_ids(prompts, prompt_tokens, vocab, seed)]
    lengths = rng.integers(1, max_continuation + 1, continuations)
    self.continuations = [list(_random_ids(1, n, vocab, seed + 1 + i)[0])
                          for i, n in enumerate(lengths)]
    self.boundary = rng.random(vocab) < 0.5
    # Useful work: each prompt once (its last position to the vocabulary), then every
    # continuation's tokens after every prompt (each to the vocabulary, for the boundary).
    self.flops = (flops_lib.forward_flops(model.config, prompts * prompt_tokens, prompts)
                  + flops_lib.forward_flops(model.config, prompts * int(lengths.sum())))

  def run(self) -> float:
    from subliminal_jax.evaluation import trait_metrics
    start = time.perf_counter()
    trait_metrics.continuation_logprobs(self.model, self.prompt_ids, self.continuations,
                                        pad_id=0, boundary=self.boundary, mesh=self.mesh)
    return time.perf_counter() - start
