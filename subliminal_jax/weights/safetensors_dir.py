"""Reading a Hugging Face model directory (config.json + safetensors) into our model.

The directory is what ``save_pretrained`` writes for ``LlamaForCausalLM``, ``Qwen2ForCausalLM`` or
``Gemma3ForCausalLM`` (Llama 3.x, SmolLM2, Qwen2.5, Gemma 3 1B/270M, ...): ``config.json`` plus
either ``model.safetensors`` or shards listed in ``model.safetensors.index.json``. The multimodal
``Gemma3ForConditionalGeneration`` (Gemma-3-4B and up) is read as its language model: its
``text_config``, and the tensors under the language model's prefix (the vision tower is skipped).
Tensors are read one at a time through safetensors' numpy API (memory-mapped), so a sharded
multi-GB checkpoint never sits in memory twice; every shape is checked against the config before
any data is read.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import numpy as np
import safetensors
from jax.sharding import Mesh

from subliminal_jax.models.transformer import Transformer, TransformerConfig
from subliminal_jax.weights import hf_layout

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Where a multimodal Gemma 3 checkpoint keeps its language model: transformers v4 wrote
# "language_model.model.*", v5 writes "model.language_model.*".
_GEMMA3_TEXT_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."),
                         ("language_model.lm_head.", "lm_head."))


def _text_tower_name(name: str) -> str | None:
  """The Gemma3ForCausalLM name of a Gemma3ForConditionalGeneration tensor; None for the rest."""
  if name == "lm_head.weight":
    return name
  for prefix, replacement in _GEMMA3_TEXT_PREFIXES:
    if name.startswith(prefix):
      return replacement + name[len(prefix):]
  return None

# config.json fields that change what a model computes, per model_type, with the values our
# Transformer implements (an absent field takes transformers' default, the first value). A config
# asking for anything else would load without complaint and compute another function, so it is
# refused. Llama's attention_bias also puts a bias on o_proj, which our model does not have.
IMPLEMENTED_HF_FIELDS: dict[str, dict[str, tuple[Any, ...]]] = {
    "llama": {"hidden_act": ("silu",), "mlp_bias": (False,), "attention_bias": (False,)},
    "qwen2": {"hidden_act": ("silu",), "use_sliding_window": (False,)},
    # Activation and soft-capping are checked where the Gemma 3 config is read (models/transformer).
    "gemma3_text": {"attention_bias": (False,)},
}


def check_implemented_fields(hf_config: dict[str, Any], source: str) -> None:
  """Raises a ValueError naming each config.json field set to a value the model does not compute."""
  implemented = IMPLEMENTED_HF_FIELDS.get(hf_config.get("model_type"), {})
  for field, values in implemented.items():
    value = hf_config.get(field, values[0])
    if value not in values:
      raise ValueError(
          f"{source}: {field}={value!r} is not implemented by this model (model_type "
          f"{hf_config['model_type']!r} computes {field}={values[0]!r}); loading it would silently "
          f"compute something else. Implemented: {field} in {list(values)}")


def _open(path: str):
  try:
    return safetensors.safe_open(path, framework="numpy")
  except Exception as e:  # SafetensorError on truncated or corrupt headers
    raise ValueError(f"{path!r} is not a readable safetensors file (truncated or corrupt?): {e}") from e


class SafetensorsDir:
  """An HF model directory as a config plus HF-named tensors read lazily.

  ``d.config`` is the :class:`TransformerConfig` from ``config.json``; ``d.shapes()`` maps each
  tensor name to its shape (headers only); ``d.get(name)`` reads one tensor as a numpy array in its
  stored dtype (bfloat16 via ml_dtypes).
  """

  def __init__(self, path: str | os.PathLike, **config_overrides: Any):
    path = os.fspath(path)
    if not os.path.exists(path):
      raise FileNotFoundError(f"model directory not found: {path!r}")
    if not os.path.isdir(path):
      raise ValueError(f"{path!r} is not a directory; an HF source must be a directory holding "
                       "config.json and model.safetensors (or a sharded index)")
    self.path = path
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
      raise FileNotFoundError(f"{path!r} has no config.json; expected an HF model directory "
                              "(config.json + model.safetensors)")
    try:
      with open(config_path, encoding="utf-8") as f:
        self.hf_config: dict[str, Any] = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{config_path!r} is not valid JSON: {e}") from e
    check_implemented_fields(self.hf_config, repr(config_path))
    try:
      self.config = TransformerConfig.from_hf(self.hf_config, **config_overrides)
    except (KeyError, ValueError) as e:
      raise ValueError(f"{config_path!r}: {e if isinstance(e, ValueError) else f'missing key {e}'}"
                       ) from e
    rename = _text_tower_name if self.hf_config.get("model_type") == "gemma3" else (lambda n: n)
    stored_files = self._tensor_files()
    # Our (HF text-model) name -> the name stored in the files.
    self._stored_name = {ours: name for name in stored_files if (ours := rename(name)) is not None}
    self._file_of = {ours: stored_files[name] for ours, name in self._stored_name.items()}
    self._shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(set(self._file_of.values())):
      with _open(file) as f:
        for name in f.keys():
          ours = rename(name)
          if ours is not None and self._file_of.get(ours) == file:
            self._shapes[ours] = tuple(f.get_slice(name).get_shape())
    listed_missing = sorted(set(self._file_of) - set(self._shapes))
    if listed_missing:
      raise ValueError(f"{path!r}: the index lists tensors its shards do not hold: "
                       f"{listed_missing[:5]}")

  def _tensor_files(self) -> dict[str, str]:
    single = os.path.join(self.path, SINGLE_FILE)
    index = os.path.join(self.path, INDEX_FILE)
    if os.path.isfile(index):
      try:
        with open(index, encoding="utf-8") as f:
          weight_map = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{index!r} is not a safetensors index (a JSON object with weight_map): "
                         f"{e}") from e
      files = {name: os.path.join(self.path, shard) for name, shard in weight_map.items()}
      absent = sorted({f for f in files.values() if not os.path.isfile(f)})
      if absent:
        raise FileNotFoundError(f"{index!r} lists shards that are missing: {absent[:3]}")
      return files
    if os.path.isfile(single):
      with _open(single) as f:
        return {name: single for name in f.keys()}
    present = sorted(os.listdir(self.path))
    raise FileNotFoundError(f"{self.path!r} has neither {SINGLE_FILE} nor {INDEX_FILE} "
                            f"(it holds {present[:10]}); PyTorch .bin checkpoints are not read")

  def weight_files(self) -> list[str]:
    return sorted(set(self._file_of.values()))

  def shapes(self) -> dict[str, tuple[int, ...]]:
    return dict(self._shapes)

  def get(self, name: str) -> np.ndarray:
    """One tensor in its stored dtype; a tensor holding NaN or inf is refused, named."""
    if name not in self._file_of:
      raise KeyError(f"{self.path!r} has no tensor {name!r}")
    with _open(self._file_of[name]) as f:
      tensor = f.get_tensor(self._stored_name[name])
    hf_layout.check_finite(tensor, name, self._file_of[name])
    return tensor

  def check(self) -> None:
    """Raises a ValueError naming each missing tensor or shape that disagrees with config.json."""
    hf_layout.check_shapes(self.config, self._shapes, self.path)

  def model(self, mesh: Mesh | None = None,
            progress: Callable[[str], None] | None = None) -> Transformer:
    """The model with this directory's weights (shapes checked first)."""
    self.check()
    return hf_layout.model_from_hf_tensors(self.config, self.get, mesh, progress)
