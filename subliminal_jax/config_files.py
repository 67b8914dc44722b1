"""Config files that build on other config files.

Config files are loaded by path (absl's ``config_flags``), not imported as a package, so a config
that extends another one (a sweep or a grid over a base experiment) loads its neighbour by path too,
and sets its points' values with :func:`apply_overrides` (dotted keys, as ``--config.a.b=`` does).
Code reads a config section into typed settings (a dataclass whose fields hold the defaults) with
:func:`settings_from_config`.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import os
import types
from typing import Any, Mapping

from ml_collections import ConfigDict


def load_neighbour(config_file: str, name: str) -> types.ModuleType:
  """The config file ``name`` (e.g. ``"mnist_aux.py"``) beside ``config_file`` (pass ``__file__``)."""
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), name)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path} not found (loaded by {config_file})")
  stem = os.path.splitext(name)[0]
  spec = importlib.util.spec_from_file_location(f"{stem}_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def apply_overrides(base: ConfigDict, overrides: Mapping[str, Any], where: str) -> ConfigDict:
  """A copy of ``base`` with dotted keys set (``{"model.num_aux": 10}``).

  A key the base lacks is an error (ml_collections' ``update_from_flattened_dict`` would add it
  silently: a typo must not make a new knob), and so is a change of type, as on the command line.
  A list given for a tuple-valued key becomes a tuple. ``where`` names the overrides in errors.
  """
  config = copy.deepcopy(base)
  for key, value in overrides.items():
    *path, leaf = key.split(".")
    node = config
    for depth, part in enumerate(path):
      if part not in node or not isinstance(node[part], ConfigDict):
        raise ValueError(f"{where}: override {key!r}: the base config has no section "
                         f"{'.'.join(path[:depth + 1])!r}")
      node = node[part]
    if leaf not in node:
      raise ValueError(f"{where}: override {key!r} names no key of the base config "
                       f"(keys of {'.'.join(path) or 'the root'}: {sorted(node.keys())})")
    if isinstance(value, list) and isinstance(node[leaf], tuple):
      value = tuple(value)
    try:
      node[leaf] = value
    except TypeError as e:
      raise ValueError(f"{where}: override {key}={value!r}: {e}") from e
  return config


def settings_from_config(cls: type, config: Any) -> dict[str, Any]:
  """The fields of dataclass ``cls`` that ``config`` (a ConfigDict, a dict or a dataclass) sets,
  for ``cls(**...)``: the defaults stay in ``cls``, keys of other settings are left to them, and
  None means the field's default."""
  if dataclasses.is_dataclass(config):
    config = dataclasses.asdict(config)
  elif hasattr(config, "to_dict"):
    config = config.to_dict()
  return {field.name: config[field.name] for field in dataclasses.fields(cls)
          if config.get(field.name) is not None}
