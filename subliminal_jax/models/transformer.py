"""Decoder-only transformer for Llama (SmolLM2, Llama 3.x), Qwen2/Qwen2.5 and Gemma 3, in Flax NNX.

One file, one model, as in jax-llm-examples: GQA attention with RoPE, RMSNorm, a gated MLP, tied or
untied embeddings, optional q/k/v bias (Qwen2). The decoder layers are stored stacked, every
parameter with a leading ``layers`` axis, and run with ``jax.lax.scan``: compile time stays flat in
depth (30 layers compile like one), which matters on a 2-core CPU and on a pod alike.

Gemma 3 (``model_type="gemma3_text"``) is the same stack with its own choices, each switched on by
the config, not a second model: layers alternate between sliding-window (local) and global
attention, each kind with its own RoPE base; RMS norms on q and k, and around both the attention
and the MLP outputs ("sandwich" norms); GeGLU with tanh GELU; RMSNorm weights used as ``1 + w``;
embeddings multiplied by sqrt(hidden_size); attention scores scaled by ``query_pre_attn_scalar``.
The scan stays one scan: each layer's kind is a scanned boolean that selects its mask and RoPE
frequencies.

Every parameter carries ``logical_axes`` metadata (for example ``('layers', 'embed', 'mlp')``);
``subliminal_jax.sharding`` maps those names onto mesh axes, so the model code never names a mesh.

Positions come from the attention mask, so left- and right-padded batches give the same logits for
their real tokens as unpadded ones. An optional :class:`KVCache` turns the same forward pass into
prefill and decode steps for the sampler.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from subliminal_jax import sharding

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "gemma3_text")
LAYER_TYPES = ("full_attention", "sliding_attention")
# Gemma3TextConfig's defaults, for the fields a config.json may omit (hub configs of the
# multimodal Gemma 3 models list only what differs from them).
GEMMA3_DEFAULTS = {
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "query_pre_attn_scalar": 256,
    "sliding_window": 4096, "sliding_window_pattern": 6, "tie_word_embeddings": True,
    "max_position_embeddings": 131_072, "hidden_activation": "gelu_pytorch_tanh",
}


def gemma3_layer_types(num_layers: int, pattern: int = 6) -> tuple[str, ...]:
  """Gemma 3's default layout: every ``pattern``-th layer global, the others sliding."""
  return tuple("full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
               for i in range(num_layers))


# What the backward pass keeps of each layer's forward pass (TransformerConfig.remat):
#   "none": every intermediate (the most memory);
#   "dots": the projections' matmul outputs only, the norms, RoPE, attention and activations
#           recomputed (jax's dots_with_no_batch_dims_saveable);
#   "full": nothing but the layer's input, all of it recomputed (the least memory);
#   "auto": "dots" on CPU, "none" elsewhere. XLA:CPU spends more writing and reading the layer
#           scan's stacked intermediates than recomputing them: SmolLM2-135M's full-finetune step
#           (8 x 128, float32, 2-core EPYC) ran 150 tok/s with "none" and 177-181 with "dots"
#           (benchmarks.train_throughput --remat). No accelerator has been measured, so they
#           keep "none".
REMAT_CHOICES = ("none", "dots", "full", "auto")
# The jax.checkpoint policy of each choice that recomputes (None: save nothing but the inputs).
_CHECKPOINT_POLICIES = {"full": None,
                        "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def resolve_remat(remat: str, backend: str | None = None) -> str:
  """``remat`` with "auto" replaced by the policy for ``backend`` (default: jax's)."""
  if remat != "auto":
    return remat
  return "dots" if (backend or jax.default_backend()) == "cpu" else "none"


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
  # Llama: type "llama3"; Gemma 3: type "linear", applied to the global layers only (as HF does).
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  rms_norm_eps: float = 1e-5
  tie_embeddings: bool = False
  attention_bias: bool = False
  max_position_embeddings: int = 8192
  model_type: str = "llama"
  # Gemma 3 only (None for the other families):
  sliding_window: int | None = None  # keys a sliding layer's query sees, itself included
  layer_types: tuple[str, ...] | None = None  # per layer, one of LAYER_TYPES
  rope_local_theta: float | None = None  # RoPE base of the sliding layers
  query_pre_attn_scalar: float | None = None  # scores are divided by sqrt(this), not sqrt(head_dim)
  param_dtype: str = "float32"
  dtype: str = "float32"  # compute dtype of activations and matmuls; logits are always float32
  remat: str = "none"  # one of REMAT_CHOICES: what the backward pass recomputes (True = "full")

  def __post_init__(self):
    if isinstance(self.remat, bool):  # the knob was a bool: True recomputed everything
      object.__setattr__(self, "remat", "full" if self.remat else "none")
    if self.remat not in REMAT_CHOICES:
      raise ValueError(f"remat={self.remat!r}; expected one of {list(REMAT_CHOICES)}")
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
    if self.is_gemma:
      self._check_gemma_fields()
    else:
      given = [name for name in ("sliding_window", "layer_types", "rope_local_theta",
                                 "query_pre_attn_scalar") if getattr(self, name) is not None]
      if given:
        raise ValueError(f"{given} are Gemma 3 settings; model_type {self.model_type!r} has none")

  def _check_gemma_fields(self) -> None:
    types = self.layer_types
    if types is None or len(types) != self.num_layers or set(types) - set(LAYER_TYPES):
      raise ValueError(f"layer_types must give one of {list(LAYER_TYPES)} for each of the "
                       f"{self.num_layers} layers, got {types!r}")
    if "sliding_attention" in types and not (isinstance(self.sliding_window, int)
                                             and self.sliding_window >= 1):
      raise ValueError(f"sliding_window must be a positive int when layers slide, got "
                       f"{self.sliding_window!r}")
    for name in ("rope_local_theta", "query_pre_attn_scalar"):
      if not (getattr(self, name) or 0) > 0:
        raise ValueError(f"{name} must be > 0 for gemma3_text, got {getattr(self, name)!r}")

  def replace(self, **changes: Any) -> "TransformerConfig":
    return dataclasses.replace(self, **changes)

  @property
  def is_gemma(self) -> bool:
    """Gemma 3's layer recipe (see the module docstring)."""
    return self.model_type == "gemma3_text"

  @property
  def has_sliding_layers(self) -> bool:
    return self.layer_types is not None and "sliding_attention" in self.layer_types

  @property
  def num_params(self) -> int:
    d, f, v, l = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_layers
    q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * f + 2 * d
    if self.attention_bias:
      per_layer += q + 2 * kv
    if self.is_gemma:  # q and k norms, and the post-attention and post-MLP norms
      per_layer += 2 * self.head_dim + 2 * d
    return v * d * (1 if self.tie_embeddings else 2) + l * per_layer + d

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], **overrides: Any) -> "TransformerConfig":
    """Builds a config from an HF ``config.json`` dict: model_type llama, qwen2, gemma3_text, or
    gemma3 (the multimodal Gemma 3, whose language model is read from its ``text_config``)."""
    model_type = hf.get("model_type")
    if model_type == "gemma3":
      hf = {"tie_word_embeddings": hf.get("tie_word_embeddings", True),
            **(hf.get("text_config") or {}), "model_type": "gemma3_text"}
      model_type = "gemma3_text"
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(
          f"model_type {model_type!r} is not supported; supported: "
          f"{list(SUPPORTED_MODEL_TYPES) + ['gemma3']}")
    if model_type == "gemma3_text":
      hf = {**GEMMA3_DEFAULTS, **{k: v for k, v in hf.items() if v is not None or k in (
          "sliding_window", "layer_types", "rope_scaling")}}
    num_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
    fields = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
        model_type=model_type,
    )
    fields.update(_gemma3_fields(hf) if model_type == "gemma3_text" else _rope_fields(hf))
    fields.update(overrides)
    return cls(**fields)

  def to_hf(self) -> dict[str, Any]:
    """The HF ``config.json`` dict that ``transformers`` loads this architecture from."""
    architecture = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                    "gemma3_text": "Gemma3ForCausalLM"}[self.model_type]
    hf = {
        "model_type": self.model_type,
        "architectures": [architecture],
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
    if self.is_gemma:
      del hf["hidden_act"]
      hf.update(hidden_activation="gelu_pytorch_tanh", rope_local_base_freq=self.rope_local_theta,
                sliding_window=self.sliding_window, layer_types=list(self.layer_types),
                # transformers' Gemma3TextConfig accepts only an int here
                query_pre_attn_scalar=(int(self.query_pre_attn_scalar)
                                       if float(self.query_pre_attn_scalar).is_integer()
                                       else self.query_pre_attn_scalar),
                attention_bias=False,
                final_logit_softcapping=None, attn_logit_softcapping=None)
    return hf


def _rope_scaling(scaling: Mapping[str, Any] | None, supported: str) -> tuple | None:
  """An HF rope scaling dict as hashable sorted pairs; None for default RoPE."""
  scaling = {k: v for k, v in (scaling or {}).items() if k != "rope_theta"}
  rope_type = scaling.get("rope_type", scaling.get("type", "default"))
  if rope_type == "default":
    return None
  if rope_type != supported:
    raise ValueError(f"rope_scaling type {rope_type!r} is not supported; supported: {supported!r}")
  return tuple(sorted(scaling.items()))


def _rope_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
  """Llama / Qwen2 RoPE settings. transformers v5 writes "rope_parameters" (theta inside); older
  config.json files write "rope_theta" and "rope_scaling"."""
  rope_parameters = hf.get("rope_parameters") or {}
  return dict(
      rope_theta=float(hf.get("rope_theta") or rope_parameters.get("rope_theta", 10000.0)),
      rope_scaling=_rope_scaling(hf.get("rope_scaling") or rope_parameters, "llama3"))


def _gemma3_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
  """Gemma 3's own settings from a gemma3_text config dict (GEMMA3_DEFAULTS filled in)."""
  if hf.get("hidden_activation") not in ("gelu_pytorch_tanh", "gelu_tanh"):
    raise ValueError(f"gemma3_text hidden_activation {hf.get('hidden_activation')!r} is not "
                     "supported; supported: 'gelu_pytorch_tanh'")
  for name in ("final_logit_softcapping", "attn_logit_softcapping", "use_bidirectional_attention"):
    if hf.get(name):
      raise ValueError(f"gemma3_text {name}={hf[name]!r} is not supported (Gemma 3 checkpoints "
                       "set it to null/false)")
  # transformers v5 nests RoPE by layer type; older files give two thetas and one rope_scaling
  # (which HF applies to the global layers only).
  by_type = hf.get("rope_parameters") or {}
  full, local = by_type.get("full_attention") or {}, by_type.get("sliding_attention") or {}
  if _rope_scaling(local, "linear") is not None:
    raise ValueError(f"RoPE scaling of the sliding layers ({local}) is not supported")
  layer_types = hf.get("layer_types") or gemma3_layer_types(
      hf["num_hidden_layers"], int(hf.get("sliding_window_pattern") or 6))
  return dict(
      rope_theta=float(full.get("rope_theta") or hf["rope_theta"]),
      rope_scaling=_rope_scaling(full or hf.get("rope_scaling"), "linear"),
      rope_local_theta=float(local.get("rope_theta") or hf["rope_local_base_freq"]),
      sliding_window=hf.get("sliding_window"),
      layer_types=tuple(layer_types),
      query_pre_attn_scalar=float(hf["query_pre_attn_scalar"]))


# ---------------------------------------------------------------------------------------------
# Layers


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype, scale: float):
  return nnx.Param(scale * jax.random.normal(rngs.params(), shape, dtype), logical_axes=axes)


def on_token_rows(project: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
  """``project`` applied to ``x`` [..., in] as one axis of token rows, [tokens, in]; its output's
  leading axes restored.

  A matmul's weight gradient then contracts a single token axis, which XLA:CPU's dots read in
  place; contracting (batch, seq) made it write each [tokens, width] cotangent transposed first
  (1.2x slower training steps).
  """
  y = project(x.reshape(-1, x.shape[-1]))
  return y.reshape(*x.shape[:-1], y.shape[-1])


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
    return on_token_rows(self._project, x)

  def _project(self, x: jax.Array) -> jax.Array:
    y = x @ self.kernel[...].astype(x.dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(x.dtype)
    if self.lora_a is not None:
      delta = (x @ self.lora_a[...].astype(x.dtype)) @ self.lora_b[...].astype(x.dtype)
      y = y + self.lora_scale * delta
    return y


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis. ``unit_offset`` (Gemma): the weight is stored as HF stores it and
  used as ``1 + w`` (so it starts at 0); otherwise used as is (starts at 1)."""

  def __init__(self, num_layers: int, dim: int, eps: float, *, param_dtype, unit_offset: bool = False,
               axis: str | None = "embed"):
    lead = (num_layers,) if num_layers else ()
    lead_axes = ("layers",) if num_layers else ()
    init = jnp.zeros if unit_offset else jnp.ones
    self.scale = nnx.Param(init(lead + (dim,), param_dtype), logical_axes=lead_axes + (axis,))
    self.eps = eps
    self.unit_offset = unit_offset

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    if self.unit_offset:  # as HF's Gemma: scale by (1 + w) in float32, then cast back
      return (normed * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)
    # As HF's Llama: cast back, then scale.
    return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


def rope_inverse_frequencies(config: TransformerConfig, local: bool = False) -> jax.Array:
  """RoPE inverse frequencies [head_dim / 2]; ``local``: those of Gemma's sliding layers."""
  hd = config.head_dim
  theta = config.rope_local_theta if local else config.rope_theta
  inv_freq = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
  s = dict(config.rope_scaling or {}) if not local else {}
  if s.get("rope_type", s.get("type")) == "linear":  # positions divided by factor
    return inv_freq / s["factor"]
  if s:  # llama3 scaling, as in transformers' _compute_llama3_parameters
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


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
              score_divisor: float | None = None) -> jax.Array:
  """Grouped-query attention. q [b,t,h,d]; k, v [b,kv,s,d]; mask [b,t,s] (True = may attend).

  Keys and values come heads-first, the KV cache's layout: both contractions then read them as
  stored (batch dims leading), with no transposed copy of the cache per layer and step. Scores are
  divided by ``score_divisor`` (default sqrt(d)).
  """
  b, t, h, d = q.shape
  kv = k.shape[1]
  q = q.reshape(b, t, kv, h // kv, d)
  scores = jnp.einsum("btkgd,bksd->bkgts", q, k).astype(jnp.float32) / (score_divisor or math.sqrt(d))
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
    self.attn_norm = RMSNorm(n, c.hidden_size, c.rms_norm_eps, param_dtype=pd,
                             unit_offset=c.is_gemma)
    self.q_proj = Linear(n, c.hidden_size, q_dim, ("embed", "q_heads"), bias=c.attention_bias,
                         param_dtype=pd, rngs=rngs)
    self.k_proj = Linear(n, c.hidden_size, kv_dim, ("embed", "kv_heads"), bias=c.attention_bias,
                         param_dtype=pd, rngs=rngs)
    self.v_proj = Linear(n, c.hidden_size, kv_dim, ("embed", "kv_heads"), bias=c.attention_bias,
                         param_dtype=pd, rngs=rngs)
    self.o_proj = Linear(n, q_dim, c.hidden_size, ("q_heads", "embed"), bias=False, param_dtype=pd,
                         rngs=rngs)
    self.mlp_norm = RMSNorm(n, c.hidden_size, c.rms_norm_eps, param_dtype=pd,
                            unit_offset=c.is_gemma)
    self.gate_proj = Linear(n, c.hidden_size, c.intermediate_size, ("embed", "mlp"), bias=False,
                            param_dtype=pd, rngs=rngs)
    self.up_proj = Linear(n, c.hidden_size, c.intermediate_size, ("embed", "mlp"), bias=False,
                          param_dtype=pd, rngs=rngs)
    self.down_proj = Linear(n, c.intermediate_size, c.hidden_size, ("mlp", "embed"), bias=False,
                            param_dtype=pd, rngs=rngs)
    # Gemma 3: norms on q and k (per head, over head_dim) and on each sublayer's output.
    gemma_norm = lambda dim, axis="embed": nnx.data(  # noqa: E731
        RMSNorm(n, dim, c.rms_norm_eps, param_dtype=pd, unit_offset=True, axis=axis)
        if c.is_gemma else None)
    self.q_norm, self.k_norm = gemma_norm(c.head_dim, None), gemma_norm(c.head_dim, None)
    self.post_attn_norm, self.post_mlp_norm = gemma_norm(c.hidden_size), gemma_norm(c.hidden_size)
    self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
    self.activation = "gelu_tanh" if c.is_gemma else "silu"
    self.score_divisor = math.sqrt(c.query_pre_attn_scalar) if c.query_pre_attn_scalar else None

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
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, kv, t, d]
    if cache_kv is not None:
      start = (layer_index, 0, 0, write_index, 0)
      cache_kv = tuple(jax.lax.dynamic_update_slice(c, new[None].astype(c.dtype), start)
                       for c, new in zip(cache_kv, (k, v)))
      k, v = (jax.lax.dynamic_index_in_dim(c, layer_index, 0, keepdims=False).astype(x.dtype)
              for c in cache_kv)
    out = self.o_proj(attention(q, k, v, mask, self.score_divisor))
    if self.post_attn_norm is not None:
      out = self.post_attn_norm(out)
    x = sharding.constrain(x + out, ("batch", "seq", "embed"))
    h = self.mlp_norm(x)
    gate = self.gate_proj(h)
    gate = jax.nn.gelu(gate, approximate=True) if self.activation == "gelu_tanh" else jax.nn.silu(gate)
    out = self.down_proj(gate * self.up_proj(h))
    if self.post_mlp_norm is not None:
      out = self.post_mlp_norm(out)
    x = sharding.constrain(x + out, ("batch", "seq", "embed"))
    return x, cache_kv


class Transformer(nnx.Module):
  """The decoder. ``model(input_ids, attention_mask)`` -> float32 logits [batch, length, vocab]."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    self.config = config
    pd = jnp.dtype(config.param_dtype)
    self.embed = nnx.Param(jax.random.normal(rngs.params(), (config.vocab_size, config.hidden_size), pd),
                           logical_axes=("vocab", "embed"))
    self.layers = DecoderLayers(config, rngs=rngs)
    self.final_norm = RMSNorm(0, config.hidden_size, config.rms_norm_eps, param_dtype=pd,
                              unit_offset=config.is_gemma)
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
                    cache: KVCache | None = None, positions: jax.Array | None = None,
                    attend: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
    """Final-norm hidden states [batch, length, hidden] and the updated cache (if one was given).

    By default positions count the real tokens and attention is causal. ``positions`` [b, t] and
    ``attend`` [b or 1, t, key slots] (True = may attend; the key slots are the cache's
    ``max_length``, or t without a cache) replace both, for tokens that are not one sequence: a
    token trie packed in one row, each token attending to the cached prompt and its own ancestors
    (teacher-forced evaluation). Keys still need a True ``attention_mask``/cache ``key_mask``; a
    cached key's position stays ``cumsum(key_mask) - 1`` (for Gemma's sliding window), and the
    cache's ``next_position`` then advances by the real tokens as usual, meaningless for a trie.
    """
    c = self.config
    dtype = jnp.dtype(c.dtype)
    b, t = input_ids.shape
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), bool)
    attention_mask = attention_mask.astype(bool)
    explicit_positions = positions is not None
    if not explicit_positions:
      offset = cache.next_position[:, None] if cache is not None else 0
      # Positions count real tokens only, so padding on either side leaves them unchanged.
      positions = jnp.maximum(offset + jnp.cumsum(attention_mask, axis=1) - 1, 0).astype(jnp.int32)
    if cache is None:
      key_mask, key_slots, write_index = attention_mask, jnp.arange(t), 0
    else:
      write_index = cache.length
      key_mask = jax.lax.dynamic_update_slice_in_dim(cache.key_mask, attention_mask, write_index, 1)
      key_slots = jnp.arange(cache.max_length)
    if attend is None:
      query_slots = write_index + jnp.arange(t)
      mask = (key_slots[None, :] <= query_slots[:, None])[None] & key_mask[:, None, :]
    else:
      mask = attend.astype(bool) & key_mask[:, None, :]
    sliding_mask = None
    if c.has_sliding_layers:
      # The window counts real tokens (positions), so padding never uses up a row's window; for
      # contiguous rows this is HF's window over cache slots.
      key_positions = positions if cache is None else jnp.cumsum(key_mask, axis=1) - 1
      if explicit_positions and cache is not None:  # the new keys sit where they were told
        key_positions = jax.lax.dynamic_update_slice_in_dim(
            key_positions, positions.astype(key_positions.dtype), write_index, 1)
      distance = positions[:, :, None] - key_positions[:, None, :]
      sliding_mask = mask & (distance < c.sliding_window)

    # Gather rows from a table whose embed dim is whole (vocab stays split over tensor): the
    # rows then come out sharded like the batch of ids. Gathering from the fsdp-split table
    # leaves rows split on embed, which XLA can only move to batch-split by rematerialising.
    table = sharding.constrain(self.embed[...], ("vocab", None))
    x = jnp.take(table, input_ids, axis=0).astype(dtype)
    if c.is_gemma:  # HF multiplies by sqrt(hidden) rounded to the embedding dtype
      x = x * jnp.asarray(math.sqrt(c.hidden_size), dtype)
    x = sharding.constrain(x, ("batch", "seq", "embed"))
    inv_freq = rope_inverse_frequencies(c)
    graphdef, layer_state = nnx.split(self.layers)
    if c.has_sliding_layers:
      local_inv_freq = rope_inverse_frequencies(c, local=True)
      is_sliding = jnp.asarray([kind == "sliding_attention" for kind in c.layer_types])
    else:
      is_sliding = None

    # The whole cache rides in the scan's carry and each layer updates its own slot in place.
    # Scanned over as inputs and outputs instead, every decode step copied the full cache twice
    # (a decode step 2.4x slower at the SmolLM2 shape on a CPU; see README Performance).
    def body(carry, scanned):
      x, cache_kv = carry
      state, layer_index, sliding = scanned
      layer = nnx.merge(graphdef, state)
      layer_freq, layer_mask = inv_freq, mask
      if sliding is not None:  # this layer's kind picks its RoPE base and its mask
        layer_freq = jnp.where(sliding, local_inv_freq, inv_freq)
        layer_mask = jnp.where(sliding, sliding_mask, mask)
      x, cache_kv = layer.layer(x, positions, layer_freq, layer_mask, cache_kv, layer_index,
                                write_index)
      return (x, cache_kv), None

    remat = resolve_remat(c.remat)
    if remat in _CHECKPOINT_POLICIES:
      body = jax.checkpoint(body, prevent_cse=False, policy=_CHECKPOINT_POLICIES[remat])
    cache_kv = (cache.k, cache.v) if cache is not None else None
    (x, cache_kv), _ = jax.lax.scan(
        body, (x, cache_kv), (layer_state, jnp.arange(c.num_layers), is_sliding))
    x = self.final_norm(x)
    if cache is not None:
      k_new, v_new = cache_kv
      cache = KVCache(k=k_new, v=v_new, key_mask=key_mask,
                      next_position=cache.next_position + attention_mask.sum(1).astype(jnp.int32),
                      length=cache.length + t)
    return x, cache

  def logits_from_hidden(self, x: jax.Array) -> jax.Array:
    if self.lm_head is None:
      logits = on_token_rows(lambda rows: rows @ self.embed[...].astype(rows.dtype).T, x)
    else:
      logits = self.lm_head(x)
    return sharding.constrain(logits.astype(jnp.float32), ("batch", "seq", "vocab"))

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
               cache: KVCache | None = None, positions: jax.Array | None = None,
               attend: jax.Array | None = None):
    """Logits [batch, length, vocab] (float32); with ``cache``, returns ``(logits, new_cache)``.
    ``positions``/``attend``: see :meth:`hidden_states`."""
    x, new_cache = self.hidden_states(input_ids, attention_mask, cache=cache, positions=positions,
                                      attend=attend)
    logits = self.logits_from_hidden(x)
    return logits if cache is None else (logits, new_cache)
