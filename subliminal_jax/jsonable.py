"""Values as JSON writes them: numpy and jax arrays and scalars, ConfigDicts, sets and paths.

:func:`json_default` is the ``default=`` hook of ``json.dump`` (it is called only for what JSON
cannot write itself, so the output of everything else is unchanged); :func:`to_jsonable` converts
a whole tree up front (mapping keys become strings), for writers that need plain values.
"""

from __future__ import annotations

import os
from typing import Any, Mapping


def json_default(value: Any) -> Any:
  """The JSON-ready form of a value ``json`` cannot write: ``to_dict()`` for ConfigDicts, a sorted
  list for sets, a string for paths, ``tolist()`` for arrays and numpy scalars."""
  if hasattr(value, "to_dict"):
    return value.to_dict()
  if isinstance(value, (set, frozenset)):
    return sorted(value)
  if isinstance(value, os.PathLike):
    return os.fspath(value)
  if hasattr(value, "tolist"):
    return value.tolist()
  raise TypeError(f"cannot write a value of type {type(value).__name__} as JSON: {value!r}")


def to_jsonable(value: Any) -> Any:
  """``value`` with every container made a dict (string keys) or list and every leaf a plain
  Python value (:func:`json_default` for those JSON cannot write)."""
  if isinstance(value, Mapping):
    return {str(k): to_jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_jsonable(v) for v in value]
  if value is None or isinstance(value, (str, bool, int, float)):
    return value
  return to_jsonable(json_default(value))
