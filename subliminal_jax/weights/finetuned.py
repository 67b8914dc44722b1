"""A finetune's trained weights on disk: LoRA adapters, or all parameters of a full finetune.

What a training stage keeps of its model: only what it trained (``adapters.safetensors`` for LoRA,
``params.safetensors`` for a full finetune), named by each variable's path in the NNX state, and
written atomically (a temporary file renamed into place: a kill never leaves a torn file that a
rerun would read). :func:`restore` puts them back on a copy of the base model.
"""

from __future__ import annotations

import os
import pathlib

import jax
import safetensors.numpy
from flax import nnx

from subliminal_jax import files, lora, sharding

ADAPTERS_FILE = "adapters.safetensors"
PARAMS_FILE = "params.safetensors"


def _trained(adapters: lora.LoraSettings) -> tuple[type, str]:
  return (nnx.LoRAParam, ADAPTERS_FILE) if adapters.rank > 0 else (nnx.Param, PARAMS_FILE)


def save(model: nnx.Module, adapters: lora.LoraSettings, out_dir: str | os.PathLike) -> None:
  """Writes what ``model``'s finetune trained (its adapters, or every parameter for rank 0)."""
  kind, name = _trained(adapters)
  flat = {".".join(str(k) for k in key): sharding.to_host(v.get_value())
          for key, v in nnx.to_flat_state(nnx.state(model, kind))}
  files.write_atomic(pathlib.Path(out_dir) / name,
                     lambda tmp: safetensors.numpy.save_file(flat, tmp))


def restore(base: nnx.Module, adapters: lora.LoraSettings, directory: str | os.PathLike
            ) -> nnx.Module:
  """A copy of ``base`` with the finetune saved in ``directory`` (adapters made as ``adapters``
  says, then their trained values; or every parameter of a full finetune)."""
  model = adapters.apply(nnx.clone(base))
  kind, name = _trained(adapters)
  path = pathlib.Path(directory) / name
  tensors = files.read_safetensors(path)
  for key, variable in nnx.to_flat_state(nnx.state(model, kind)):
    tensor_name = ".".join(str(k) for k in key)
    if tensor_name not in tensors:
      raise ValueError(f"{path} has no tensor {tensor_name}")
    current = variable.get_value()
    variable.set_value(jax.device_put(tensors[tensor_name].astype(current.dtype), current.sharding))
  return model
