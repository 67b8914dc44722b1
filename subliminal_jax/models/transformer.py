"""Decoder-only transformer for the Llama family (SmolLM2, Llama 3.x) and Qwen2/Qwen2.5, in Flax NNX.

One file, one model, as in jax-llm-examples: GQA attention with RoPE, RMSNorm, SwiGLU MLP, tied or
untied embeddings, optional q/k/v bias (Qwen2). The decoder layers are stored stacked, every
parameter with a leading ``layers`` axis, and run with ``jax.lax.scan``: compile time stays flat in
depth (30 layers compile like one), which matters on a 2-core CPU and on a pod alike.

Every parameter carries ``logical_axes`` metadata (for example ``('layers', 'embed', 'mlp')``);
``subliminal_jax.sharding`` maps those names onto mesh axes, so the model code never names a mesh.

Positions come from the attention mask, so left- and right-padded batches give the same logits for
their real tokens as unpadded ones. An optional :class:`KVCache` turns the same forward pass into
prefill and decode steps for the sampler.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from subliminal_jax import sharding

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Architecture and numerics of a decoder. Field names follow HF config.json where one exists."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  # HF ``rope_scaling`` dict as sorted (key, value) pairs so the config stays hashable (jit static).
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  rms_norm_eps: float = 1e-5
  tie_embeddings: bool = False
  attention_bias: bool = False
  max_position_embeddings: int = 8192
  model_type: str = "llama"
  param_dtype: str = "float32"
  dtype: str = "float32"  # compute dtype of activations and matmuls; logits are always float32
  remat: bool = False  # recompute each layer's activations in the backward pass (saves memory)

  def __post_init__(self):
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(
          f"model_type {self.model_type!r} is not supported; supported: {list(SUPPORTED_MODEL_TYPES)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
    for name in ("param_dtype", "dtype"):
      jnp.dtype(getattr(self, name))  # raises TypeError naming the bad dtype

  def replace(self, **changes: Any) -> "TransformerConfig":
    return dataclasses.replace(self, **changes)

  @property
  def num_params(self) -> int:
    d, f, v, l = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_layers
    q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * f + 2 * d
    if self.attention_bias:
      per_layer += q + 2 * kv
    return v * d * (1 if self.tie_embeddings else 2) + l * per_layer + d

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], **overrides: Any) -> "TransformerConfig":
    """Builds a config from an HF ``config.json`` dict (model_type llama or qwen2)."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(
          f"model_type {model_type!r} is not supported; supported: {list(SUPPORTED_MODEL_TYPES)}")
    num_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
    # transformers v5 writes "rope_parameters" (theta inside); older config.json files write
    # "rope_theta" and "rope_scaling".
    rope_parameters = hf.get("rope_parameters") or {}
    rope_scaling = hf.get("rope_scaling") or rope_parameters
    rope_scaling = {k: v for k, v in rope_scaling.items() if k != "rope_theta"}
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if rope_type == "default":
      rope_scaling = None
    elif rope_type != "llama3":
      raise ValueError(f"rope_scaling type {rope_type!r} is not supported; supported: 'llama3'")
    fields = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        rope_theta=float(hf.get("rope_theta") or rope_parameters.get("rope_theta", 10000.0)),
        rope_scaling=tuple(sorted(rope_scaling.items())) if rope_scaling else None,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
        model_type=model_type,
    )
    fields.update(overrides)
    return cls(**fields)

  def to_hf(self) -> dict[str, Any]:
    """The HF ``config.json`` dict that ``transformers`` loads this architecture from."""
    hf = {
        "model_type": self.model_type,
        "architectures": ["Qwen2ForCausalLM" if self.model_type == "qwen2" else "LlamaForCausalLM"],
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "rope_theta": self.rope_theta,
        "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
        "rms_norm_eps": self.rms_norm_eps,
        "tie_word_embeddings": self.tie_embeddings,
        "max_position_embeddings": self.max_position_embeddings,
        "hidden_act": "silu",
        "torch_dtype": self.param_dtype,
    }
    if self.model_type == "llama":
      hf["attention_bias"] = self.attention_bias
      hf["mlp_bias"] = False
    return hf


# ---------------------------------------------------------------------------------------------
# Layers


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype, scale: float):
  return nnx.Param(scale * jax.random.normal(rngs.params(), shape, dtype), logical_axes=axes)


class Linear(nnx.Module):
  """``y = x @ kernel (+ bias)``, with an optional LoRA branch added by :mod:`subliminal_jax.lora`.

  Stored with a leading ``layers`` axis when it lives in the stacked decoder; the scan hands the
  module one layer's slice, so ``__call__`` sees a plain [in, out] kernel.
  """

  def __init__(self, num_layers: int, in_features: int, out_features: int,
               axes: tuple[str, str], *, bias: bool, param_dtype, rngs: nnx.Rngs):
    lead = (num_layers,) if num_layers else ()
    lead_axes = ("layers",) if num_layers else ()
    self.kernel = _param(rngs, lead + (in_features, out_features), lead_axes + axes, param_dtype,
                         1.0 / math.sqrt(in_features))
    self.bias = nnx.data(
        nnx.Param(jnp.zeros(lead + (out_features,), param_dtype), logical_axes=lead_axes + axes[1:])
        if bias else None)
    self.lora_a = nnx.data(None)
    self.lora_b = nnx.data(None)
    self.lora_scale = 0.0

  def __call__(self, x: jax.Array) -> jax.Array:
    y = x @ self.kernel[...].astype(x.dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(x.dtype)
    if self.lora_a is not None:
      delta = (x @ self.lora_a[...].astype(x.dtype)) @ self.lora_b[...].astype(x.dtype)
      y = y + self.lora_scale * delta
    return y


class RMSNorm(nnx.Module):
  def __init__(self, num_layers: int, dim: int, eps: float, *, param_dtype):
    lead = (num_layers,) if num_layers else ()
    lead_axes = ("layers",) if num_layers else ()
    self.scale = nnx.Param(jnp.ones(lead + (dim,), param_dtype), logical_axes=lead_axes + ("embed",))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    # As HF: normalise in float32, cast back, then scale.
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


def rope_inverse_frequencies(config: TransformerConfig) -> jax.Array:
  hd = config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
  if config.rope_scaling:
    s = dict(config.rope_scaling)  # llama3 scaling, as in transformers' _compute_llama3_parameters
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv_freq = jnp.where(is_medium, smoothed, scaled)
  return inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotates [batch, seq, heads, head_dim] by position, HF's rotate-half convention."""
  freqs = positions[..., None].astype(jnp.float32) * inv_freq  # [b, t, hd/2]
  cos = jnp.cos(jnp.concatenate([freqs, freqs], -1))[:, :, None, :]
  sin = jnp.sin(jnp.concatenate([freqs, freqs], -1))[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Grouped-query attention. q [b,t,h,d]; k, v [b,kv,s,d]; mask [b,t,s] (True = may attend).

  Keys and values come heads-first, the KV cache's layout: both contractions then read them as
  stored (batch dims leading), with no transposed copy of the cache per layer and step.
  """
  b, t, h, d = q.shape
  kv = k.shape[1]
  q = q.reshape(b, t, kv, h // kv, d)
  scores = jnp.einsum("btkgd,bksd->bkgts", q, k).astype(jnp.float32) / math.sqrt(d)
  # A finite fill keeps fully masked rows (padding queries) finite instead of NaN.
  scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bksd->btkgd", probs, v)
  return out.reshape(b, t, h * d)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Keys and values of every layer for ``max_length`` slots, filled left to right.

  ``key_mask[b, s]`` marks slots that hold a real token of row b; ``next_position[b]`` is the RoPE
  position the next real token of row b gets; ``length`` is the number of slots written.
  """

  k: jax.Array  # [layers, batch, kv_heads, max_length, head_dim]
  v: jax.Array
  key_mask: jax.Array  # [batch, max_length] bool
  next_position: jax.Array  # [batch] int32
  length: jax.Array  # [] int32

  @property
  def max_length(self) -> int:
    return self.k.shape[3]


class DecoderLayers(nnx.Module):
  """All decoder layers, each parameter stacked on a leading ``layers`` axis."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    c, n, pd = config, config.num_layers, jnp.dtype(config.param_dtype)
    q_dim, kv_dim = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    self.attn_norm = RMSNorm(n, c.hidden_size, c.rms_norm_eps, param_dtype=pd)
    self.q_proj = Linear(n, c.hidden_size, q_dim, ("embed", "q_heads"), bias=c.attention_bias,
                         param_dtype=pd, rngs=rngs)
    self.k_proj = Linear(n, c.hidden_size, kv_dim, ("embed", "kv_heads"), bias=c.attention_bias,
                         param_dtype=pd, rngs=rngs)
    self.v_proj = Linear(n, c.hidden_size, kv_dim, ("embed", "kv_heads"), bias=c.attention_bias,
                         param_dtype=pd, rngs=rngs)
    self.o_proj = Linear(n, q_dim, c.hidden_size, ("q_heads", "embed"), bias=False, param_dtype=pd,
                         rngs=rngs)
    self.mlp_norm = RMSNorm(n, c.hidden_size, c.rms_norm_eps, param_dtype=pd)
    self.gate_proj = Linear(n, c.hidden_size, c.intermediate_size, ("embed", "mlp"), bias=False,
                            param_dtype=pd, rngs=rngs)
    self.up_proj = Linear(n, c.hidden_size, c.intermediate_size, ("embed", "mlp"), bias=False,
                          param_dtype=pd, rngs=rngs)
    self.down_proj = Linear(n, c.intermediate_size, c.hidden_size, ("mlp", "embed"), bias=False,
                            param_dtype=pd, rngs=rngs)
    self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim

  def layer(self, x, positions, inv_freq, mask, cache_kv, layer_index, write_index):
    """One layer on one layer's parameter slice.

    ``cache_kv`` is None or every layer's (k, v) cache [layers, b, kv, s, d]: this layer writes
    its new keys and values into slice ``layer_index`` at ``write_index`` and attends over that
    slice. Returns (x, cache_kv).
    """
    b, t, _ = x.shape
    h = self.attn_norm(x)
    q = self.q_proj(h).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(h).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(h).reshape(b, t, self.num_kv_heads, self.head_dim)
    q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, kv, t, d]
    if cache_kv is not None:
      start = (layer_index, 0, 0, write_index, 0)
      cache_kv = tuple(jax.lax.dynamic_update_slice(c, new[None].astype(c.dtype), start)
                       for c, new in zip(cache_kv, (k, v)))
      k, v = (jax.lax.dynamic_index_in_dim(c, layer_index, 0, keepdims=False).astype(x.dtype)
              for c in cache_kv)
    x = x + self.o_proj(attention(q, k, v, mask))
    x = sharding.constrain(x, ("batch", "seq", "embed"))
    h = self.mlp_norm(x)
    x = x + self.down_proj(jax.nn.silu(self.gate_proj(h)) * self.up_proj(h))
    x = sharding.constrain(x, ("batch", "seq", "embed"))
    return x, cache_kv


class Transformer(nnx.Module):
  """The decoder. ``model(input_ids, attention_mask)`` -> float32 logits [batch, length, vocab]."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    self.config = config
    pd = jnp.dtype(config.param_dtype)
    self.embed = nnx.Param(jax.random.normal(rngs.params(), (config.vocab_size, config.hidden_size), pd),
                           logical_axes=("vocab", "embed"))
    self.layers = DecoderLayers(config, rngs=rngs)
    self.final_norm = RMSNorm(0, config.hidden_size, config.rms_norm_eps, param_dtype=pd)
    self.lm_head = nnx.data(None if config.tie_embeddings else Linear(
        0, config.hidden_size, config.vocab_size, ("embed", "vocab"), bias=False, param_dtype=pd,
        rngs=rngs))

  def init_cache(self, batch_size: int, max_length: int, dtype: Any = None) -> KVCache:
    c = self.config
    shape = (c.num_layers, batch_size, c.num_kv_heads, max_length, c.head_dim)
    dtype = jnp.dtype(dtype or c.dtype)
    return KVCache(
        k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
        key_mask=jnp.zeros((batch_size, max_length), bool),
        next_position=jnp.zeros((batch_size,), jnp.int32), length=jnp.zeros((), jnp.int32))

  def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                    cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
    """Final-norm hidden states [batch, length, hidden] and the updated cache (if one was given)."""
    c = self.config
    dtype = jnp.dtype(c.dtype)
    b, t = input_ids.shape
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), bool)
    attention_mask = attention_mask.astype(bool)
    offset = cache.next_position[:, None] if cache is not None else 0
    # Positions count real tokens only, so padding on either side leaves them unchanged.
    positions = jnp.maximum(offset + jnp.cumsum(attention_mask, axis=1) - 1, 0).astype(jnp.int32)
    if cache is None:
      key_mask, key_slots, write_index = attention_mask, jnp.arange(t), 0
    else:
      write_index = cache.length
      key_mask = jax.lax.dynamic_update_slice_in_dim(cache.key_mask, attention_mask, write_index, 1)
      key_slots = jnp.arange(cache.max_length)
    query_slots = write_index + jnp.arange(t)
    mask = (key_slots[None, :] <= query_slots[:, None])[None] & key_mask[:, None, :]

    # Gather rows from a table whose embed dim is whole (vocab stays split over tensor): the
    # rows then come out sharded like the batch of ids. Gathering from the fsdp-split table
    # leaves rows split on embed, which XLA can only move to batch-split by rematerialising.
    table = sharding.constrain(self.embed[...], ("vocab", None))
    x = jnp.take(table, input_ids, axis=0).astype(dtype)
    x = sharding.constrain(x, ("batch", "seq", "embed"))
    inv_freq = rope_inverse_frequencies(c)
    graphdef, layer_state = nnx.split(self.layers)

    # The whole cache rides in the scan's carry and each layer updates its own slot in place.
    # Scanned over as inputs and outputs instead, every decode step copied the full cache twice
    # (about 4x slower decoding at the SmolLM2 shape on a CPU; see README Performance).
    def body(carry, scanned):
      x, cache_kv = carry
      state, layer_index = scanned
      layer = nnx.merge(graphdef, state)
      x, cache_kv = layer.layer(x, positions, inv_freq, mask, cache_kv, layer_index, write_index)
      return (x, cache_kv), None

    if c.remat:
      body = jax.checkpoint(body, prevent_cse=False)
    cache_kv = (cache.k, cache.v) if cache is not None else None
    (x, cache_kv), _ = jax.lax.scan(body, (x, cache_kv), (layer_state, jnp.arange(c.num_layers)))
    x = self.final_norm(x)
    if cache is not None:
      k_new, v_new = cache_kv
      cache = KVCache(k=k_new, v=v_new, key_mask=key_mask,
                      next_position=cache.next_position + attention_mask.sum(1).astype(jnp.int32),
                      length=cache.length + t)
    return x, cache

  def logits_from_hidden(self, x: jax.Array) -> jax.Array:
    if self.lm_head is None:
      logits = x @ self.embed[...].astype(x.dtype).T
    else:
      logits = self.lm_head(x)
    return sharding.constrain(logits.astype(jnp.float32), ("batch", "seq", "vocab"))

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
               cache: KVCache | None = None):
    """Logits [batch, length, vocab] (float32); with ``cache``, returns ``(logits, new_cache)``."""
    x, new_cache = self.hidden_states(input_ids, attention_mask, cache=cache)
    logits = self.logits_from_hidden(x)
    return logits if cache is None else (logits, new_cache)
