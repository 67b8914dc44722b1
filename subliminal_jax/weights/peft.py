"""Writing a model's LoRA adapters as a PEFT adapter directory (transformers, vLLM and peft load it).

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
"""

from __future__ import annotations

import os
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
