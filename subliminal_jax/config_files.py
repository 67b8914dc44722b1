"""Config files that build on other config files.

Config files are loaded by path (absl's ``config_flags``), not imported as a package, so a config
that extends another one (a sweep or a grid over a base experiment) loads its neighbour by path too.
"""

from __future__ import annotations

import importlib.util
import os
import types


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
