"""Writing a model as a Hugging Face directory that ``transformers`` (and :func:`loading.load`) read.

``export_hf(model_or_loaded, out_dir)`` writes ``config.json`` (``TransformerConfig.to_hf``), the
weights as ``model.safetensors`` (or shards plus ``model.safetensors.index.json`` above
``max_shard_bytes``) in the model's parameter dtype, and, when a tokenizer is known, its files and
``generation_config.json`` with the end-of-turn ids, so that
``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` loads it.

A marker file lists what an export wrote. A directory holding that marker is a previous export and
is replaced; any other non-empty directory is refused unless ``overwrite=True``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

import ml_dtypes
import numpy as np
import safetensors.numpy

from subliminal_jax.models.transformer import Transformer
from subliminal_jax.weights import hf_layout

MARKER_FILE = "subliminal_jax_export.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
_SHARD_PATTERN = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "chat_template.jinja")
_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}

log = logging.getLogger(__name__)


def _model_and_tokenizer(loaded_or_model: Any, tokenizer: Any) -> tuple[Transformer, Any]:
  if isinstance(loaded_or_model, Transformer):
    return loaded_or_model, tokenizer
  model = getattr(loaded_or_model, "model", None)
  if isinstance(model, Transformer):
    return model, tokenizer if tokenizer is not None else getattr(loaded_or_model, "tokenizer", None)
  raise TypeError("export_hf expects a Transformer or a loading.Loaded, got "
                  f"{type(loaded_or_model).__name__}")


def _prepare_directory(out_dir: str, overwrite: bool) -> None:
  """Creates ``out_dir`` or clears what a previous export wrote there; refuses foreign content."""
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise FileExistsError(f"export target {out_dir!r} exists and is not a directory")
  os.makedirs(out_dir, exist_ok=True)
  present = os.listdir(out_dir)
  if not present:
    return
  marker = os.path.join(out_dir, MARKER_FILE)
  if os.path.isfile(marker):
    with open(marker, encoding="utf-8") as f:
      previous = json.load(f).get("files", [])
    for name in previous + [MARKER_FILE]:
      if os.path.basename(name) == name and os.path.isfile(os.path.join(out_dir, name)):
        os.remove(os.path.join(out_dir, name))
    return
  if not overwrite:
    raise FileExistsError(
        f"export target {out_dir!r} is not empty ({len(present)} entries, e.g. {sorted(present)[:3]})"
        f" and is not a previous export_hf output (no {MARKER_FILE}); choose an empty directory or "
        "pass overwrite=True to write into it")
  # Stale weight files would confuse loaders (an old index next to a new single file).
  for name in present:
    if _SHARD_PATTERN.match(name):
      os.remove(os.path.join(out_dir, name))
  log.warning("export_hf: writing into non-empty directory %s (overwrite=True)", out_dir)


def _write_json(path: str, data: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def _shards(tensors: dict[str, np.ndarray], max_bytes: int) -> list[dict[str, np.ndarray]]:
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, array in tensors.items():
    if shards[-1] and size + array.nbytes > max_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = array
    size += array.nbytes
  return shards


def export_hf(loaded_or_model: Any, out_dir: str | os.PathLike, tokenizer: Any = None, *,
              overwrite: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
  """Writes the model (and its tokenizer, when known) as an HF directory at ``out_dir``.

  Args:
    loaded_or_model: a ``loading.Loaded`` (its tokenizer is used unless ``tokenizer`` is given) or
      a :class:`Transformer`. LoRA adapters must be merged first (``lora.merge_lora``).
    out_dir: the directory to write; created if needed.
    tokenizer: a :class:`subliminal_jax.tokenizer.Tokenizer` to save alongside, optional.
    overwrite: allow writing into a non-empty directory that is not a previous export.
    max_shard_bytes: above this many bytes of weights, write shards plus an index.
  """
  model, tokenizer = _model_and_tokenizer(loaded_or_model, tokenizer)
  config = model.config
  # Raises for unmerged LoRA adapters before the directory is touched.
  tensors = hf_layout.hf_tensors_from_model(model)
  dtype = _NUMPY_DTYPES.get(config.param_dtype)
  if dtype is None:
    raise ValueError(f"cannot export param_dtype {config.param_dtype!r}; supported: "
                     f"{list(_NUMPY_DTYPES)}")
  tensors = {name: np.ascontiguousarray(a.astype(dtype)) for name, a in sorted(tensors.items())}

  out_dir = os.fspath(out_dir)
  _prepare_directory(out_dir, overwrite)
  written: list[str] = []

  hf_config = config.to_hf()
  hf_config["torch_dtype"] = hf_config["dtype"] = config.param_dtype
  if tokenizer is not None:
    hf_config.update(eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
                     bos_token_id=tokenizer.bos_id)
  _write_json(os.path.join(out_dir, "config.json"), hf_config)
  written.append("config.json")

  shards = _shards(tensors, max_shard_bytes)
  metadata = {"format": "pt"}  # transformers refuses safetensors files without a known format
  if len(shards) == 1:
    safetensors.numpy.save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata)
    written.append("model.safetensors")
  else:
    weight_map = {}
    for i, shard in enumerate(shards):
      name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      safetensors.numpy.save_file(shard, os.path.join(out_dir, name), metadata)
      weight_map.update({tensor: name for tensor in shard})
      written.append(name)
    total = sum(a.nbytes for a in tensors.values())
    _write_json(os.path.join(out_dir, "model.safetensors.index.json"),
                {"metadata": {"total_size": total}, "weight_map": weight_map})
    written.append("model.safetensors.index.json")

  if tokenizer is not None:
    before = set(os.listdir(out_dir))
    tokenizer.save(out_dir)
    written += sorted((set(os.listdir(out_dir)) - before)
                      | {n for n in _TOKENIZER_FILES if os.path.isfile(os.path.join(out_dir, n))})
    ends = list(tokenizer.end_of_turn_ids) or [tokenizer.eos_id]
    generation = {"eos_token_id": ends if len(ends) > 1 else ends[0],
                  "pad_token_id": tokenizer.pad_id}
    if tokenizer.bos_id is not None:
      generation["bos_token_id"] = tokenizer.bos_id
    _write_json(os.path.join(out_dir, "generation_config.json"), generation)
    written.append("generation_config.json")

  # Written last: a directory whose export was interrupted has no marker and is not reused silently.
  _write_json(os.path.join(out_dir, MARKER_FILE),
              {"exported_by": "subliminal_jax", "files": sorted(set(written))})
