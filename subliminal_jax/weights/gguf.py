"""Reading llama- and gemma3-architecture GGUF files (llama.cpp's format) into our model.

A GGUF file holds metadata (architecture hyperparameters, the tokenizer) and tensors, possibly
block-quantized. :class:`GGUFReader` turns the metadata into a :class:`TransformerConfig` and each
tensor, on request, into a float32 array in HF names and HF orientation, so that
:func:`subliminal_jax.weights.hf_layout.model_from_hf_tensors` builds the model exactly as it does
from a safetensors directory. What differs from HF checkpoints is undone here:

* quantized blocks: every type ``gguf.quants.dequantize`` implements (legacy, K- and I-quants,
  BF16, ...; the list is taken from the installed ``gguf`` package) is dequantized with it; any
  other type is refused with the list of supported ones rather than guessed at, and a tensor that
  dequantizes to NaN or inf (corrupt data) is refused, named;
* llama: llama.cpp's converter permutes the rows of ``attn_q`` and ``attn_k`` from HF's rotate-half
  RoPE layout into interleaved pairs (``convert_hf_to_gguf.py``, ``LlamaModel.permute``); the
  inverse permutation here matches transformers' own GGUF loader (``_reverse_permute_weights``);
* gemma3: the converter stores every norm weight as ``1 + w`` (llama.cpp's RMSNorm multiplies by
  the weight itself, Gemma's by ``1 + w``); 1 is subtracted back, as transformers' loader does.
  Its q/k rows are not permuted. Facts the file does not state are llama.cpp's own constants for
  this architecture: every 6th layer global, local RoPE base 10,000, and the attention scale.

Tensor data is memory-mapped: nothing is read or dequantized until a tensor is asked for.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import gguf as gguf_lib
import numpy as np
from jax.sharding import Mesh

from subliminal_jax.models.transformer import Transformer, TransformerConfig, gemma3_layer_types
from subliminal_jax.weights import hf_layout
from subliminal_jax.weights.gguf_file import GGUFFile

SUPPORTED_ARCHITECTURES = ("llama", "gemma3")


def dequantizable_types() -> tuple[str, ...]:
  """Every GGML tensor type the installed ``gguf`` package dequantizes (probed on one zero block,
  so a newer gguf that learns a type admits it here without a change)."""
  names = []
  for qtype in gguf_lib.GGMLQuantizationType:
    if qtype not in gguf_lib.GGML_QUANT_SIZES:
      continue
    _, type_size = gguf_lib.GGML_QUANT_SIZES[qtype]
    try:
      gguf_lib.quants.dequantize(np.zeros(type_size, np.uint8), qtype)
    except NotImplementedError:
      continue
    names.append(qtype.name)
  return tuple(names)


SUPPORTED_TENSOR_TYPES = dequantizable_types()

# GGUF tensor name (inside one block) -> HF name (inside one layer), per architecture.
_LINEAR_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_NAMES = {
    "llama": {**_LINEAR_NAMES, "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"},
    "gemma3": {**_LINEAR_NAMES, "attn_norm": "input_layernorm",
               "post_attention_norm": "post_attention_layernorm",
               "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
               "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"},
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
# llama.cpp (llama-model.cpp, LLM_ARCH_GEMMA3): sliding layers use RoPE base 10,000, and the
# 27B model (62 layers) scales attention by hidden_size / num_heads instead of head_dim.
_GEMMA3_LOCAL_ROPE_THETA = 10_000.0
_GEMMA3_27B_LAYERS = 62
_DEQUANTIZE_SLICE_VALUES = 1 << 22


def hf_name(gguf_name: str, architecture: str = "llama") -> str | None:
  """The HF name of a GGUF tensor (``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``),
  or None for tensors the model does not use."""
  if gguf_name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[gguf_name]
  names = _LAYER_NAMES[architecture]
  parts = gguf_name.split(".")
  if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in names:
    return f"model.layers.{parts[1]}.{names[parts[2]]}.{parts[3]}"
  return None


def unpermute_rotary(w: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's rotary row permutation of a q or k projection ([out, in] or a bias [out]).

  Within each head llama.cpp stores rows as interleaved pairs (0, d/2, 1, d/2+1, ...); HF keeps
  the two halves apart. ``num_heads`` is the number of query heads for q, of kv heads for k.
  """
  rows = w.shape[0]
  if rows % (2 * num_heads):
    raise ValueError(f"cannot unpermute a tensor with {rows} rows over {num_heads} heads")
  return w.reshape(num_heads, rows // num_heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def permute_rotary(w: np.ndarray, num_heads: int) -> np.ndarray:
  """llama.cpp's converter permutation (the inverse of :func:`unpermute_rotary`), for writing GGUF."""
  rows = w.shape[0]
  return w.reshape(num_heads, 2, rows // num_heads // 2, -1).swapaxes(1, 2).reshape(w.shape)


class GGUFReader:
  """A llama- or gemma3-architecture GGUF file as a config plus HF-named float32 tensors.

  ``reader.config`` is the model's :class:`TransformerConfig`; ``reader.get(hf_name)`` dequantizes
  one tensor (in HF layout); ``reader.shapes()`` gives every HF tensor's shape without reading
  data; ``reader.tensor_types()`` the stored type of each GGUF tensor; ``reader.file`` the parsed
  :class:`~subliminal_jax.weights.gguf_file.GGUFFile` (its metadata feeds the tokenizer).
  """

  def __init__(self, path: str | os.PathLike, **config_overrides: Any):
    path = os.fspath(path)
    if not os.path.exists(path):
      raise FileNotFoundError(f"GGUF file not found: {path!r}")
    if not os.path.isfile(path):
      raise ValueError(f"{path!r} is not a file; a GGUF source must be a .gguf file")
    self.path = path
    self.file = GGUFFile(path)  # a ValueError naming the file if it is not a complete GGUF
    self.architecture = self._field("general.architecture")
    if self.architecture not in SUPPORTED_ARCHITECTURES:
      raise ValueError(f"{path!r}: GGUF architecture {self.architecture!r} is not supported; "
                       f"supported: {list(SUPPORTED_ARCHITECTURES)}")
    self._tensors = self.file.tensors
    self._hf_to_gguf = {hf: name for name in self._tensors
                        if (hf := hf_name(name, self.architecture)) is not None}
    self.config = self._read_config(**config_overrides)

  # --- metadata ---

  def _field(self, key: str, default: Any = None) -> Any:
    return self.file.fields.get(key, default)

  def metadata(self) -> dict[str, Any]:
    """All metadata fields except the (large) tokenizer arrays."""
    large = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
             "tokenizer.ggml.scores")
    return {k: v for k, v in self.file.fields.items() if k not in large}

  def _read_config(self, **overrides: Any) -> TransformerConfig:
    arch = self.architecture

    def required(key: str) -> Any:
      value = self._field(f"{arch}.{key}")
      if value is None:
        raise ValueError(f"{self.path!r}: GGUF metadata lacks {arch}.{key}")
      return value

    hidden = int(required("embedding_length"))
    num_heads = int(required("attention.head_count"))
    head_dim = int(self._field(f"{arch}.attention.key_length", hidden // num_heads))
    rope_dims = int(self._field(f"{arch}.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
      raise ValueError(f"{self.path!r}: partial rotary embeddings ({arch}.rope.dimension_count="
                       f"{rope_dims}, head_dim={head_dim}) are not supported")
    eps = float(required("attention.layer_norm_rms_epsilon"))
    fields = dict(
        vocab_size=self._vocab_size(),
        hidden_size=hidden,
        intermediate_size=int(required("feed_forward_length")),
        num_layers=int(required("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(self._field(f"{arch}.attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rope_theta=float(self._field(f"{arch}.rope.freq_base", 10000.0)),
        # Stored as float32 (1e-5 reads 9.99999974e-06); 7 significant digits recover the intent.
        rms_norm_eps=float(f"{eps:.7g}"),
        tie_embeddings="output.weight" not in self._tensors,
        attention_bias="blk.0.attn_q.bias" in self._tensors,
        max_position_embeddings=int(self._field(f"{arch}.context_length", 8192)),
        model_type="llama",
    )
    fields.update(self._gemma3_fields(fields) if arch == "gemma3" else self._check_llama_rope())
    fields.update(overrides)
    return TransformerConfig(**fields)

  def _vocab_size(self) -> int:
    arch = self.architecture
    tokens = self._field("tokenizer.ggml.tokens")
    if tokens is not None:
      return len(tokens)
    if self._field(f"{arch}.vocab_size") is not None:
      return int(self._field(f"{arch}.vocab_size"))
    if "token_embd.weight" in self._tensors:
      return int(self._tensors["token_embd.weight"].shape[-1])
    raise ValueError(f"{self.path!r}: no vocabulary size (no tokenizer.ggml.tokens, "
                     f"{arch}.vocab_size or token_embd.weight)")

  def _check_llama_rope(self) -> dict[str, Any]:
    scaling = self._field("llama.rope.scaling.type")
    if (scaling not in (None, "none")) or "rope_freqs.weight" in self._tensors:
      raise ValueError(f"{self.path!r}: RoPE scaling in GGUF files ({scaling or 'rope_freqs.weight'}) "
                       "is not supported; load the model's HF safetensors directory instead")
    return {}

  def _gemma3_fields(self, fields: dict[str, Any]) -> dict[str, Any]:
    num_layers = fields["num_layers"]
    pattern = self._field("gemma3.attention.sliding_window_pattern")
    if pattern is None:
      layer_types = gemma3_layer_types(num_layers)
    elif np.ndim(pattern) == 0:
      layer_types = gemma3_layer_types(num_layers, int(pattern))
    else:  # one flag per layer, True = sliding
      layer_types = tuple("sliding_attention" if flag else "full_attention" for flag in pattern)
    scaling = self._field("gemma3.rope.scaling.type")
    factor = float(self._field("gemma3.rope.scaling.factor", 1.0))
    if scaling not in (None, "none", "linear"):
      raise ValueError(f"{self.path!r}: gemma3 RoPE scaling {scaling!r} is not supported; "
                       "supported: 'linear'")
    rope_scaling = (("factor", factor), ("rope_type", "linear")) if factor != 1.0 else None
    query_scalar = (fields["hidden_size"] // fields["num_heads"]
                    if num_layers == _GEMMA3_27B_LAYERS else fields["head_dim"])
    return dict(model_type="gemma3_text", layer_types=layer_types,
                sliding_window=int(self._field("gemma3.attention.sliding_window", 4096)),
                rope_local_theta=float(self._field("gemma3.rope.freq_base_swa",
                                                   _GEMMA3_LOCAL_ROPE_THETA)),
                rope_scaling=rope_scaling, query_pre_attn_scalar=float(query_scalar))

  # --- tensors ---

  def tensor_types(self) -> dict[str, str]:
    """GGUF tensor name -> stored type name (``"Q4_1"``, ``"F32"``, ...)."""
    return {name: t.tensor_type.name for name, t in self._tensors.items()}

  def shapes(self) -> dict[str, tuple[int, ...]]:
    """HF name -> HF shape of every model tensor in the file (no data is read)."""
    return {hf: tuple(reversed(self._tensors[name].shape)) for hf, name in self._hf_to_gguf.items()}

  def get(self, name: str) -> np.ndarray:
    """One tensor by HF name, dequantized to float32, in HF layout."""
    if name not in self._hf_to_gguf:
      raise KeyError(f"{self.path!r} has no tensor for {name!r}")
    gguf_name = self._hf_to_gguf[name]
    w = self.dequantize(gguf_name)
    if self.architecture == "gemma3":
      if gguf_name.endswith("norm.weight"):
        w -= 1.0
    elif ".attn_q." in gguf_name:
      w = unpermute_rotary(w, self.config.num_heads)
    elif ".attn_k." in gguf_name:
      w = unpermute_rotary(w, self.config.num_kv_heads)
    return w

  def dequantize(self, gguf_name: str) -> np.ndarray:
    """One tensor by GGUF name, as stored (no unpermutation), dequantized to a new float32 array."""
    t = self._tensors[gguf_name]
    kind = t.tensor_type.name
    if kind not in SUPPORTED_TENSOR_TYPES:
      raise ValueError(f"{self.path!r}: tensor {gguf_name!r} has type {kind}, which is not "
                       f"supported; supported types: {list(SUPPORTED_TENSOR_TYPES)}")
    shape = tuple(reversed(t.shape))
    # The library dequantizes rows of blocks: [rows, bytes per row] -> [rows, values per row].
    rows = self.file.raw(gguf_name).reshape(int(np.prod(shape[:-1], dtype=np.int64)), -1)
    out = np.empty((rows.shape[0], shape[-1]), np.float32)
    # In slices of rows: its temporaries are several times the output (Gemma's 262k x 640
    # embedding is 671 MB as float32), and the peak is what a small machine has to hold.
    step = max(1, _DEQUANTIZE_SLICE_VALUES // shape[-1])
    for start in range(0, rows.shape[0], step):
      out[start:start + step] = gguf_lib.quants.dequantize(rows[start:start + step], t.tensor_type)
    out = out.reshape(shape)
    hf_layout.check_finite(out, gguf_name, self.path)
    return out

  def check(self) -> None:
    """Raises a clear error if tensors are missing, misshapen or of an unsupported type."""
    hf_layout.check_shapes(self.config, self.shapes(), self.path)
    for hf in hf_layout.expected_hf_shapes(self.config):
      gguf_name = self._hf_to_gguf[hf]
      kind = self._tensors[gguf_name].tensor_type.name
      if kind not in SUPPORTED_TENSOR_TYPES:
        raise ValueError(f"{self.path!r}: tensor {gguf_name!r} has type {kind}, which is not "
                         f"supported; supported types: {list(SUPPORTED_TENSOR_TYPES)}")

  def model(self, mesh: Mesh | None = None,
            progress: Callable[[str], None] | None = None) -> Transformer:
    """The model with this file's weights (checked first, so a bad file fails before any work)."""
    self.check()
    return hf_layout.model_from_hf_tensors(self.config, self.get, mesh, progress)

  def weight_files(self) -> list[str]:
    return [self.path]
