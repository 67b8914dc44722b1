"""FLOP counts of the engines' work and this machine's ceilings, measured in the same run.

Counts follow the usual convention (Kaplan et al.; PaLM's MFU): 2 FLOPs per matmul weight per
token forward, twice that backward; attention's score and value products are left out (about 3%
of a forward at 128 tokens of context for the SmolLM2 shape), as are norms and activations.

* forward: ``2 * (body + head)`` per token, where ``body`` is every decoder matmul weight and
  ``head`` the vocabulary projection (the tied embedding; a lookup of the input embedding is no
  matmul). A sampler prefill projects only each row's last position to the vocabulary.
* full finetuning: ``6 * (body + head)`` per token (forward, gradient with respect to activations
  and to weights).
* LoRA: ``4 * (body + head) + 6 * adapters`` per token: the frozen weights need the forward and the
  activation gradient only; the adapters add all three.

The ceilings: ``matmul_peak`` times XLA float matmuls of the model's own weight shapes at a given
number of rows (the rate the engine could reach if it did nothing but its matmuls), and
``memory_bandwidth`` the rate of reading a large array (the bound of small-batch decoding, which
reads every weight once per step).
"""

from __future__ import annotations

import time
from typing import Any, Callable

__all__ = ["matmul_shapes", "forward_flops", "training_flops_per_token", "lora_params",
           "best_time", "matmul_peak", "memory_bandwidth"]


def matmul_shapes(config) -> list[tuple[int, int, int]]:
  """(in, out, count) of every matmul weight of one forward: each decoder layer's, then the head."""
  c = config
  q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  layer = [(c.hidden_size, q, 1), (c.hidden_size, kv, 2), (q, c.hidden_size, 1),
           (c.hidden_size, c.intermediate_size, 2), (c.intermediate_size, c.hidden_size, 1)]
  return ([(i, o, n * c.num_layers) for i, o, n in layer]
          + [(c.hidden_size, c.vocab_size, 1)])


def _body_and_head(config) -> tuple[int, int]:
  shapes = matmul_shapes(config)
  body = sum(i * o * n for i, o, n in shapes[:-1])
  return body, config.hidden_size * config.vocab_size


def forward_flops(config, body_tokens: int, head_tokens: int | None = None) -> float:
  """FLOPs of a forward over ``body_tokens`` tokens, ``head_tokens`` of them (default all)
  projected to the vocabulary."""
  body, head = _body_and_head(config)
  head_tokens = body_tokens if head_tokens is None else head_tokens
  return 2.0 * (body * body_tokens + head * head_tokens)


def lora_params(config, rank: int, targets: tuple[str, ...]) -> int:
  """Adapter parameters (A and B) of rank ``rank`` on ``targets`` of every layer."""
  c = config
  q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  dims = {"q_proj": (c.hidden_size, q), "k_proj": (c.hidden_size, kv),
          "v_proj": (c.hidden_size, kv), "o_proj": (q, c.hidden_size),
          "gate_proj": (c.hidden_size, c.intermediate_size),
          "up_proj": (c.hidden_size, c.intermediate_size),
          "down_proj": (c.intermediate_size, c.hidden_size)}
  return c.num_layers * sum(rank * (dims[t][0] + dims[t][1]) for t in targets)


def training_flops_per_token(config, adapters: int = 0) -> float:
  """6N for full finetuning (``adapters=0``); 4N + 6 * adapters for LoRA."""
  body, head = _body_and_head(config)
  if adapters == 0:
    return 6.0 * (body + head)
  return 4.0 * (body + head) + 6.0 * adapters


def best_time(fn: Callable[[], Any], repeats: int) -> float:
  """Shortest wall time of ``repeats`` calls of ``fn`` (which must block until done)."""
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def matmul_peak(config, rows: int, dtype: str = "float32", repeats: int = 5) -> dict[str, Any]:
  """FLOP/s of XLA matmuls ``[rows, in] @ [in, out]`` at each of the model's weight shapes.

  ``flops_per_s`` is the rate over one forward's mix (each shape weighted by how often a forward
  uses it); ``best_shape_flops_per_s`` the fastest single shape.
  """
  import jax
  matmul = jax.jit(lambda x, w: x @ w)
  total_flops = total_seconds = best_rate = 0.0
  for fan_in, fan_out, count in matmul_shapes(config):
    x = jax.random.normal(jax.random.key(0), (rows, fan_in), dtype)
    w = jax.random.normal(jax.random.key(1), (fan_in, fan_out), dtype)
    matmul(x, w).block_until_ready()
    seconds = best_time(lambda: matmul(x, w).block_until_ready(), repeats)
    flops = 2.0 * rows * fan_in * fan_out
    best_rate = max(best_rate, flops / seconds)
    total_flops += count * flops
    total_seconds += count * seconds
  return {"rows": rows, "dtype": dtype, "flops_per_s": total_flops / total_seconds,
          "best_shape_flops_per_s": best_rate}


def memory_bandwidth(num_bytes: int = 2**29, repeats: int = 5) -> float:
  """Bytes/s of a jitted sum over a float32 array of ``num_bytes`` (a read-only stream)."""
  import jax
  import jax.numpy as jnp
  x = jnp.ones((num_bytes // 4,), jnp.float32)
  total = jax.jit(jnp.sum)
  total(x).block_until_ready()
  return num_bytes / best_time(lambda: total(x).block_until_ready(), repeats)
