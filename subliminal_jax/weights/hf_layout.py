"""The HF tensor layout of Llama/Qwen2/Gemma 3 checkpoints, and moving weights between it and our model.

Every weight source (safetensors directory, GGUF file) is first read into HF names and HF
orientation (``model.layers.3.self_attn.q_proj.weight``, [out, in]); this module alone knows how
those map onto the stacked NNX parameters, in both directions, so export is the exact inverse.
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from subliminal_jax import sharding
from subliminal_jax.models.transformer import Transformer, TransformerConfig

# (our linear name, HF module path inside a layer)
_LAYER_LINEARS = (
    ("q_proj", "self_attn.q_proj"), ("k_proj", "self_attn.k_proj"), ("v_proj", "self_attn.v_proj"),
    ("o_proj", "self_attn.o_proj"), ("gate_proj", "mlp.gate_proj"), ("up_proj", "mlp.up_proj"),
    ("down_proj", "mlp.down_proj"),
)
# (our norm name, HF module path inside a layer, whether it spans head_dim rather than hidden).
# The same HF name means different norms: Llama's post_attention_layernorm is the one before the
# MLP (our mlp_norm), Gemma's is the one on the attention output.
_LAYER_NORMS = (("attn_norm", "input_layernorm", False), ("mlp_norm", "post_attention_layernorm", False))
_GEMMA_LAYER_NORMS = (
    ("attn_norm", "input_layernorm", False), ("post_attn_norm", "post_attention_layernorm", False),
    ("mlp_norm", "pre_feedforward_layernorm", False),
    ("post_mlp_norm", "post_feedforward_layernorm", False),
    ("q_norm", "self_attn.q_norm", True), ("k_norm", "self_attn.k_norm", True))


def layer_norms(config: TransformerConfig) -> tuple[tuple[str, str, bool], ...]:
  """(our name, HF name, spans head_dim) of every norm inside a layer of ``config``'s family."""
  return _GEMMA_LAYER_NORMS if config.is_gemma else _LAYER_NORMS


def expected_hf_shapes(config: TransformerConfig) -> dict[str, tuple[int, ...]]:
  """Every tensor name a checkpoint of ``config`` must hold, with its HF shape."""
  c = config
  q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  dims = {"q_proj": (q, c.hidden_size), "k_proj": (kv, c.hidden_size), "v_proj": (kv, c.hidden_size),
          "o_proj": (c.hidden_size, q), "gate_proj": (c.intermediate_size, c.hidden_size),
          "up_proj": (c.intermediate_size, c.hidden_size),
          "down_proj": (c.hidden_size, c.intermediate_size)}
  shapes = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
            "model.norm.weight": (c.hidden_size,)}
  if not c.tie_embeddings:
    shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
  for i in range(c.num_layers):
    for ours, hf in _LAYER_LINEARS:
      shapes[f"model.layers.{i}.{hf}.weight"] = dims[ours]
      if c.attention_bias and ours in ("q_proj", "k_proj", "v_proj"):
        shapes[f"model.layers.{i}.{hf}.bias"] = (dims[ours][0],)
    for _, hf, per_head in layer_norms(c):
      shapes[f"model.layers.{i}.{hf}.weight"] = (c.head_dim if per_head else c.hidden_size,)
  return shapes


def check_shapes(config: TransformerConfig, shapes: Mapping[str, tuple[int, ...]], source: str) -> None:
  """Raises a ValueError naming every missing tensor or shape that disagrees with ``config``."""
  expected = expected_hf_shapes(config)
  missing = sorted(set(expected) - set(shapes))
  if missing:
    raise ValueError(f"{source}: missing tensors for this config: {missing[:5]}"
                     + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
  wrong = [(n, tuple(shapes[n]), s) for n, s in expected.items() if tuple(shapes[n]) != s]
  if wrong:
    details = "; ".join(f"{n} has shape {got}, the config expects {want}" for n, got, want in wrong[:5])
    raise ValueError(f"{source}: weights disagree with the config: {details}")


def check_finite(tensor: np.ndarray, name: str, source: str) -> None:
  """Raises a ValueError naming a tensor that holds NaN or inf (a corrupt file: every logit would
  be NaN)."""
  finite = np.isfinite(tensor)
  if not finite.all():
    bad = int(finite.size - np.count_nonzero(finite))
    raise ValueError(f"{source!r}: tensor {name!r} holds {bad:,} non-finite values (NaN or inf) of "
                     f"{finite.size:,}; the file is corrupt (re-download or re-convert it)")


def model_from_hf_tensors(config: TransformerConfig, get: Callable[[str], np.ndarray],
                          mesh: Mesh | None = None,
                          progress: Callable[[str], None] | None = None) -> Transformer:
  """Builds the model from HF-layout tensors, each parameter placed directly in its sharding.

  ``get(name)`` returns one tensor as a host array; the model is first built abstractly
  (``nnx.eval_shape``), so no random initialisation and no full copy on one device happen.
  ``progress(name)``, if given, is called before each tensor is read.
  """
  abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  pd = jnp.dtype(config.param_dtype)

  # Each parameter's host array is built only when it is placed, in the parameter dtype, so host
  # memory holds one stacked parameter at a time (a 7B bf16 model never sits in host RAM whole).
  def host(name: str) -> np.ndarray:
    if progress is not None:
      progress(name)
    return np.asarray(get(name)).astype(pd, copy=False)

  def stacked(fmt: str, transpose: bool) -> np.ndarray:
    return np.stack([host(fmt.format(i)).T if transpose else host(fmt.format(i))
                     for i in range(config.num_layers)])

  builders: dict[tuple, Callable[[], np.ndarray]] = {
      ("embed",): lambda: host("model.embed_tokens.weight"),
      ("final_norm", "scale"): lambda: host("model.norm.weight")}
  if not config.tie_embeddings:
    builders[("lm_head", "kernel")] = lambda: host("lm_head.weight").T
  for ours, hf in _LAYER_LINEARS:
    builders[("layers", ours, "kernel")] = (
        lambda hf=hf: stacked(f"model.layers.{{}}.{hf}.weight", True))
    if config.attention_bias and ours in ("q_proj", "k_proj", "v_proj"):
      builders[("layers", ours, "bias")] = (
          lambda hf=hf: stacked(f"model.layers.{{}}.{hf}.bias", False))
  for ours, hf, _ in layer_norms(config):
    builders[("layers", ours, "scale")] = lambda hf=hf: stacked(f"model.layers.{{}}.{hf}.weight", False)

  def place(path, variable: nnx.Variable):
    key = tuple(str(getattr(p, "key", p)) for p in path)
    array = np.ascontiguousarray(builders[key]())
    if array.shape != variable.get_value().shape:
      raise ValueError(f"tensor for {'.'.join(key)} has shape {array.shape}, the model expects "
                       f"{variable.get_value().shape}")
    if mesh is None:
      return variable.replace(jnp.asarray(array))
    spec = sharding.variable_spec(variable, mesh)
    return variable.replace(sharding.put_host_array(array, jax.sharding.NamedSharding(mesh, spec)))

  state = jax.tree_util.tree_map_with_path(place, state, is_leaf=lambda v: isinstance(v, nnx.Variable))
  return nnx.merge(graphdef, state)


def hf_tensors_from_model(model: Transformer) -> dict[str, np.ndarray]:
  """The model's weights in HF names and layout (LoRA adapters must be merged first)."""
  config = model.config
  layers = model.layers
  for ours, _ in _LAYER_LINEARS:
    if getattr(layers, ours).lora_a is not None:
      raise ValueError(f"{ours} still has LoRA adapters: merge them (subliminal_jax.lora.merge) "
                       "before exporting")

  def host(x) -> np.ndarray:
    return np.asarray(jax.device_get(x[...]), dtype=np.float32)

  out = {"model.embed_tokens.weight": host(model.embed),
         "model.norm.weight": host(model.final_norm.scale)}
  if model.lm_head is not None:
    out["lm_head.weight"] = host(model.lm_head.kernel).T
  for ours, hf in _LAYER_LINEARS:
    linear = getattr(layers, ours)
    kernel = host(linear.kernel)
    for i in range(config.num_layers):
      out[f"model.layers.{i}.{hf}.weight"] = np.ascontiguousarray(kernel[i].T)
    if linear.bias is not None:
      bias = host(linear.bias)
      for i in range(config.num_layers):
        out[f"model.layers.{i}.{hf}.bias"] = bias[i]
  for ours, hf, _ in layer_norms(config):
    scale = host(getattr(layers, ours).scale)
    for i in range(config.num_layers):
      out[f"model.layers.{i}.{hf}.weight"] = scale[i]
  return out
