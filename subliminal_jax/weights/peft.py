"""A model's LoRA adapters as a PEFT adapter directory: written for transformers, vLLM and peft,
and read back (a published PEFT LoRA onto our model).

``export_peft(model, out_dir, base_model_name_or_path=...)`` writes the two files of PEFT's
``save_pretrained`` for a LoRA on a causal LM:

* ``adapter_config.json``: ``peft_type`` LORA, ``task_type`` CAUSAL_LM, ``r``, ``lora_alpha``,
  ``target_modules`` (HF module names: ``q_proj``, ``gate_proj``, ...), no dropout, no bias;
* ``adapter_model.safetensors``: per layer and target,
  ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` [rank, in] and
  ``...lora_B.weight`` [out, rank] (PEFT's names and its torch.nn.Linear orientation; ours are the
  transposes, stacked over layers).

PEFT computes ``W x + (lora_alpha / r) B A x``; ``lora_alpha`` is written as ``scale * r`` (with
``use_rslora`` false), which gives our ``lora_scale`` exactly whichever of alpha/rank or
alpha/sqrt(rank) produced it. The base the adapters belong to is the one the student was trained
on: for a quantized GGUF base that is its dequantized weights (export them with ``export_hf``), not
the original checkpoint.

``load_peft(model, adapter_dir)`` is the inverse: it attaches a PEFT LoRA directory's adapters to a
base model loaded with :func:`subliminal_jax.loading.load` (also ``load(source, adapter=...)``).
It reads what a Llama/Qwen2/Gemma 3 causal-LM LoRA holds: ``r``, ``lora_alpha``, ``use_rslora``,
``target_modules`` (a list of module names or suffixes, or a regex string, matched as PEFT matches
them), ``exclude_modules`` and ``layers_to_transform`` (projections a layer does not adapt get
A = B = 0, which computes the base exactly), with tensor names with or without PEFT's
``base_model.model.`` prefix and adapter-name segment (``lora_A.default.weight``). Everything that
would make the adapted model compute something else (DoRA, ``modules_to_save``, trained biases,
per-module ranks, a base modified at init such as PiSSA's residual, ...) is refused, named.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import numpy as np
import safetensors.numpy

from subliminal_jax import files, lora
from subliminal_jax.models.transformer import Transformer
from subliminal_jax.weights import hf_layout

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."  # PeftModelForCausalLM wraps the transformers model twice
# A LoRA tensor of a layer projection as peft names it, the prefix and adapter name optional:
# (layer, HF module path inside the layer, A or B). A multimodal Gemma 3's text tower is accepted.
_TENSOR_NAME = re.compile(r"(?:base_model\.model\.)?"
                          r"(?:model\.(?:language_model\.)?|language_model\.model\.)?"
                          r"layers\.(\d+)\.(\w+\.\w+)\.lora_([AB])(?:\.\w+)?\.weight")
# Settings under which PEFT's LoRA computes something other than W x + scale B A x on the
# projections alone (set to anything truthy, they are refused), with what they add.
_UNSUPPORTED = {
    "use_dora": "DoRA's magnitude vectors", "modules_to_save": "fully trained copies of modules",
    "lora_bias": "a bias on lora_B", "fan_in_fan_out": "transposed (Conv1D) weights",
    "rank_pattern": "per-module ranks", "alpha_pattern": "per-module alphas",
    "layer_replication": "duplicated layers", "trainable_token_indices": "retrained embeddings",
    "target_parameters": "adapters on raw parameters", "use_qalora": "QA-LoRA's pooled inputs",
    "alora_invocation_tokens": "activated LoRA (off before its invocation tokens)"}
# init_lora_weights schemes that move the base weights (the adapter belongs to their residual).
_BASE_CHANGING_INITS = ("pissa", "olora", "loftq", "corda", "lora_ga")


def peft_tensors(model: Transformer) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(PEFT-named float32 tensors, the LoRA settings) of ``model``'s adapters."""
  targets = lora.lora_targets(model)
  if not targets:
    raise ValueError("the model has no LoRA adapters to export; a fully finetuned model is "
                     "exported whole with export_hf")
  hf_paths = dict(hf_layout._LAYER_LINEARS)
  linears = {name: getattr(model.layers, name) for name in targets}
  scales = {linear.lora_scale for linear in linears.values()}
  ranks = {linear.lora_a.get_value().shape[-1] for linear in linears.values()}
  if len(scales) != 1 or len(ranks) != 1:
    raise ValueError(f"PEFT's config has one rank and alpha; the adapters have ranks {sorted(ranks)} "
                     f"and scales {sorted(scales)}")
  tensors = {}
  for name, linear in linears.items():
    a = np.asarray(jax.device_get(linear.lora_a.get_value()), np.float32)
    b = np.asarray(jax.device_get(linear.lora_b.get_value()), np.float32)
    for i in range(model.config.num_layers):
      stem = f"{_PREFIX}model.layers.{i}.{hf_paths[name]}"
      tensors[f"{stem}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
      tensors[f"{stem}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
  (rank,), (scale,) = ranks, scales
  return tensors, {"r": int(rank), "lora_alpha": float(scale) * int(rank),
                   "target_modules": sorted(hf_paths[t].split(".")[-1] for t in targets)}


def export_peft(model: Transformer, out_dir: str | os.PathLike, *,
                base_model_name_or_path: str) -> None:
  """Writes ``model``'s LoRA adapters as a PEFT adapter directory at ``out_dir`` (created)."""
  tensors, settings = peft_tensors(model)
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  config = {"peft_type": "LORA", "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path, **settings,
            "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False,
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
            "modules_to_save": None}
  files.write_atomic(os.path.join(out_dir, ADAPTER_WEIGHTS),
                     lambda tmp: safetensors.numpy.save_file(tensors, tmp, {"format": "pt"}))
  files.write_json(os.path.join(out_dir, ADAPTER_CONFIG), config, sort_keys=True)


def _read_adapter_config(adapter_dir: str) -> dict[str, Any]:
  path = os.path.join(adapter_dir, ADAPTER_CONFIG)
  if not os.path.isdir(adapter_dir):
    raise FileNotFoundError(f"PEFT adapter directory not found: {adapter_dir!r}")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{adapter_dir!r} has no {ADAPTER_CONFIG}; expected a PEFT adapter "
                            f"directory ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})")
  try:
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path!r} is not valid JSON: {e}") from e
  if not isinstance(config, dict):
    raise ValueError(f"{path!r} holds {type(config).__name__}; expected a JSON object")
  return config


def _check_adapter_config(config: dict[str, Any], where: str) -> None:
  """Refuses what this loader cannot compute exactly."""
  if config.get("peft_type") != "LORA":
    raise ValueError(f"{where}: peft_type={config.get('peft_type')!r}; only 'LORA' is supported")
  if config.get("task_type") not in (None, "CAUSAL_LM"):
    raise ValueError(f"{where}: task_type={config['task_type']!r}; expected 'CAUSAL_LM'")
  if config.get("bias", "none") != "none":
    raise ValueError(f"{where}: bias={config['bias']!r} (trained biases) is not supported; "
                     "expected 'none'")
  for key, what in _UNSUPPORTED.items():
    if config.get(key):
      raise ValueError(f"{where}: {key}={config[key]!r} ({what}) is not supported; expected it "
                       "unset, false or empty")
  init = config.get("init_lora_weights")
  if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
    raise ValueError(f"{where}: init_lora_weights={init!r} changed the base weights when the "
                     "adapter was made; convert it to an adapter of the original base (peft's "
                     "save_pretrained(path_initial_model_for_weight_conversion=...)) first")
  rank, alpha = config.get("r"), config.get("lora_alpha")
  if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
    raise ValueError(f"{where}: r={rank!r}; expected a positive integer")
  if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
    raise ValueError(f"{where}: lora_alpha={alpha!r}; expected a positive number")


def adapter_config(adapter_dir: str | os.PathLike) -> dict[str, Any]:
  """The checked ``adapter_config.json`` of a PEFT LoRA directory (which must also hold the
  weights): raises as :func:`load_peft` does for the settings, before any model is loaded."""
  adapter_dir = os.fspath(adapter_dir)
  config = _read_adapter_config(adapter_dir)
  _check_adapter_config(config, repr(os.path.join(adapter_dir, ADAPTER_CONFIG)))
  _weights_path(adapter_dir)
  return config


def _matches(patterns: str | list[str], key: str) -> bool:
  """PEFT's match of a module name: a regex string in full, or a list entry as the name or a
  dotted suffix of it."""
  if isinstance(patterns, str):
    return re.fullmatch(patterns, key) is not None
  return any(key == p or key.endswith(f".{p}") for p in patterns)


def _transformed_layers(config: dict[str, Any], num_layers: int, where: str) -> set[int]:
  """The layers ``layers_to_transform`` keeps (all when unset), as PEFT reads our layer names."""
  pattern = config.get("layers_pattern")
  if pattern and "layers" not in ([pattern] if isinstance(pattern, str) else pattern):
    raise ValueError(f"{where}: layers_pattern={pattern!r} names no part of this model's module "
                     "names (model.layers.<i>...); expected 'layers' or unset")
  layers = config.get("layers_to_transform")
  if layers is None or layers == []:
    return set(range(num_layers))
  layers = [layers] if isinstance(layers, int) else layers
  beyond = [i for i in layers if not isinstance(i, int) or not 0 <= i < num_layers]
  if beyond:
    raise ValueError(f"{where}: layers_to_transform={config['layers_to_transform']!r} names "
                     f"{beyond}, which the model lacks (it has layers 0..{num_layers - 1})")
  return set(layers)


def _declared_layers(config: dict[str, Any], num_layers: int, where: str) -> dict[str, list[int]]:
  """{our target: the layers it adapts} that ``target_modules`` and friends select."""
  targets, exclude = config.get("target_modules"), config.get("exclude_modules") or []
  if targets == "all-linear":  # PEFT: every linear layer but the output head
    targets = list(lora.LORA_TARGETS)
  keys = {(ours, i): f"model.layers.{i}.{hf}"
          for ours, hf in hf_layout._LAYER_LINEARS for i in range(num_layers)}
  if isinstance(targets, str):
    chosen = {k for k, key in keys.items() if _matches(targets, key)}
  elif isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
    unknown = [t for t in targets if not any(_matches([t], key) for key in keys.values())]
    if unknown:
      raise ValueError(f"{where}: target_modules entries {unknown} name no projection of the "
                       f"model's layers; supported: {list(lora.LORA_TARGETS)}")
    layers = _transformed_layers(config, num_layers, where)
    # As PEFT: a full module name is taken as it is; layers_to_transform filters suffixes.
    chosen = {(ours, i) for (ours, i), key in keys.items()
              if key in targets or (i in layers and _matches(targets, key))}
  else:
    raise ValueError(f"{where}: target_modules={targets!r}; expected a non-empty list of module "
                     f"names (e.g. {list(lora.LORA_TARGETS)}) or a regex string")
  chosen = {k for k in chosen if not _matches(exclude, keys[k])}
  if not chosen:
    raise ValueError(f"{where}: target_modules={targets!r} (exclude_modules={exclude!r}) selects "
                     f"none of the model's projections {list(lora.LORA_TARGETS)}")
  return {ours: sorted(i for o, i in chosen if o == ours)
          for ours in lora.LORA_TARGETS if any(o == ours for o, _ in chosen)}


def _weights_path(adapter_dir: str) -> str:
  path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
  if not os.path.isfile(path):
    if os.path.isfile(os.path.join(adapter_dir, "adapter_model.bin")):
      raise ValueError(f"{adapter_dir!r} holds adapter_model.bin (a PyTorch pickle), which is not "
                       f"read; convert it to {ADAPTER_WEIGHTS} (load it with peft and "
                       "save_pretrained(..., safe_serialization=True))")
    raise FileNotFoundError(f"{adapter_dir!r} has no {ADAPTER_WEIGHTS}")
  return path


def _adapter_tensors(adapter_dir: str, num_layers: int
                     ) -> dict[tuple[str, int, str], tuple[str, np.ndarray]]:
  """{(our target, layer, "A" | "B"): (stored name, tensor)} of the adapter's weights file."""
  path = _weights_path(adapter_dir)
  try:
    stored = safetensors.numpy.load_file(path)
  except Exception as e:  # SafetensorError on a truncated or corrupt file
    raise ValueError(f"{path!r} is not a readable safetensors file (truncated or corrupt?): {e}"
                     ) from e
  ours_of = {hf: ours for ours, hf in hf_layout._LAYER_LINEARS}
  tensors: dict[tuple[str, int, str], tuple[str, np.ndarray]] = {}
  for name, tensor in sorted(stored.items()):
    match = _TENSOR_NAME.fullmatch(name)
    if match is None or match[2] not in ours_of:
      raise ValueError(f"{path!r}: tensor {name!r} is not the lora_A or lora_B of a layer "
                       f"projection (e.g. {_PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight)")
    layer = int(match[1])
    if layer >= num_layers:
      raise ValueError(f"{path!r}: tensor {name!r} is for layer {layer}; the model has "
                       f"{num_layers} layers (0..{num_layers - 1})")
    key = (ours_of[match[2]], layer, match[3])
    if key in tensors:
      raise ValueError(f"{path!r}: tensors {tensors[key][0]!r} and {name!r} are the same "
                       "adapter (two adapter names in one file?)")
    hf_layout.check_finite(tensor, name, path)
    tensors[key] = (name, tensor)
  return tensors


def _stacked_adapter(model: Transformer, target: str, layers: list[int], rank: int,
                     tensors: dict[tuple[str, int, str], tuple[str, np.ndarray]], where: str
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Our (A [layers, in, r], B [layers, r, out]) of ``target``; zeros in layers not adapted."""
  num_layers, d_in, d_out = getattr(model.layers, target).kernel.get_value().shape
  if rank > min(d_in, d_out):  # apply_lora's limit, checked before the model changes
    raise ValueError(f"{where}: r={rank} exceeds min(in, out) = {min(d_in, d_out)} of {target}")
  a = np.zeros((num_layers, d_in, rank), np.float32)
  b = np.zeros((num_layers, rank, d_out), np.float32)
  hf = dict(hf_layout._LAYER_LINEARS)[target]
  for i in layers:
    for part, stacked, expected in (("A", a, (rank, d_in)), ("B", b, (d_out, rank))):
      if (target, i, part) not in tensors:
        raise ValueError(f"{where}: target_modules declares {hf} of layer {i}, but there is no "
                         f"tensor {_PREFIX}model.layers.{i}.{hf}.lora_{part}.weight")
      name, tensor = tensors[(target, i, part)]
      if tensor.shape != expected:
        raise ValueError(f"{where}: tensor {name!r} has shape {tuple(tensor.shape)}; the model's "
                         f"{target} with r={rank} expects {expected}")
      stacked[i] = tensor.astype(np.float32).T
  return a, b


def load_peft(model: Transformer, adapter_dir: str | os.PathLike) -> Transformer:
  """Attaches the LoRA adapters of the PEFT adapter directory ``adapter_dir`` to ``model`` (a base
  without adapters), in place; returns ``model``. Everything is checked before ``model`` changes.

  Raises:
    FileNotFoundError: no such directory, or it lacks adapter_config.json / the weights file.
    ValueError: a PEFT setting this loader does not compute, target modules the model lacks, or
      tensors that are unknown, missing, for a layer the model lacks or of the wrong shape (each
      message names the value and what was expected).
  """
  adapter_dir = os.fspath(adapter_dir)
  adapted = lora.lora_targets(model)
  if adapted:
    raise ValueError(f"the model already has LoRA adapters on {list(adapted)}; load the PEFT "
                     "adapter onto a fresh base (or merge_lora first)")
  config = adapter_config(adapter_dir)
  where = repr(os.path.join(adapter_dir, ADAPTER_CONFIG))
  rank = config["r"]
  num_layers = model.config.num_layers
  declared = _declared_layers(config, num_layers, where)
  tensors = _adapter_tensors(adapter_dir, num_layers)
  stacked = {target: _stacked_adapter(model, target, layers, rank, tensors, where)
             for target, layers in declared.items()}
  taken = {(target, i, part) for target, layers in declared.items() for i in layers for part in "AB"}
  undeclared = sorted(name for key, (name, _) in tensors.items() if key not in taken)
  if undeclared:
    raise ValueError(f"{where}: tensor {undeclared[0]!r} adapts a module that target_modules="
                     f"{config['target_modules']!r} does not select")
  lora.apply_lora(model, rank=rank, alpha=float(config["lora_alpha"]), targets=tuple(stacked),
                  rslora=bool(config.get("use_rslora")))
  for target, values in stacked.items():
    linear = getattr(model.layers, target)
    for variable, value in zip((linear.lora_a, linear.lora_b), values):
      current = variable.get_value()  # apply_lora's placement on the kernel's mesh
      variable.set_value(jax.device_put(value.astype(current.dtype), current.sharding))
  return model
