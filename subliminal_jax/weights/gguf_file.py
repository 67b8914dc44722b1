"""The container layer of a GGUF file: metadata, the tensor directory, raw tensor bytes.

``gguf.GGUFReader`` parses every element of every metadata array into its own numpy view: opening
Gemma 3's file, whose tokenizer arrays hold 262,144 entries each, took 11 s of CPU and 735 MB here
(SmolLM2's 49,152 entries, a few seconds). This reader walks the same documented layout (GGUF v2
and v3, little-endian: header, key/value pairs, tensor infos, aligned tensor data) with one
``np.frombuffer`` per numeric array, and opens that file in a fraction of a second. Tensor bytes
stay memory-mapped; turning them into floats is left to the ``gguf`` package's own
``gguf.quants.dequantize`` (see :mod:`subliminal_jax.weights.gguf`).
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import os
import struct
from typing import Any

import gguf as gguf_lib
import numpy as np

_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
_MAX_ARRAY_NESTING = 8  # arrays of arrays: real files nest one level; deeper is a corrupt header
_VT = gguf_lib.GGUFValueType
_NUMPY_TYPES = {
    _VT.UINT8: np.uint8, _VT.INT8: np.int8, _VT.UINT16: np.uint16, _VT.INT16: np.int16,
    _VT.UINT32: np.uint32, _VT.INT32: np.int32, _VT.FLOAT32: np.float32, _VT.BOOL: np.bool_,
    _VT.UINT64: np.uint64, _VT.INT64: np.int64, _VT.FLOAT64: np.float64,
}


class _Malformed(ValueError):
  """What is wrong with a file's bytes; GGUFFile adds the file's name and size."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """One tensor's directory entry. ``shape`` is in GGML order (innermost, contiguous dim first)."""

  name: str
  shape: tuple[int, ...]
  tensor_type: gguf_lib.GGMLQuantizationType
  data_offset: int  # absolute, in bytes
  n_bytes: int


class GGUFFile:
  """A GGUF file opened read-only: ``fields`` (metadata key -> value) and ``tensors`` (name ->
  :class:`TensorInfo`), in file order; ``raw(name)`` gives a tensor's bytes without copying.

  Metadata values are Python scalars and strings; numeric arrays are numpy arrays, string arrays
  lists of str. Raises ValueError naming the file, what is wrong and where, for anything that is
  not a complete GGUF v2/v3 file.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    with open(self.path, "rb") as f:
      self.size = os.fstat(f.fileno()).st_size
      self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.size else b""
    try:
      self._parse()
    except _Malformed as e:
      raise ValueError(f"{self.path!r} is not a readable GGUF file (truncated or corrupt?): {e} "
                       f"(file size {self.size:,} bytes)") from None

  def raw(self, name: str) -> np.ndarray:
    """The tensor's stored bytes as a read-only uint8 array (memory-mapped, not copied)."""
    info = self.tensors[name]
    return np.frombuffer(self._map, np.uint8, info.n_bytes, info.data_offset)

  # --- parsing ---

  def _parse(self) -> None:
    self._offset = 0
    magic = self._take(4)
    if magic != _MAGIC:
      raise _Malformed(f"magic {magic!r}, expected {_MAGIC!r}")
    version = self._scalar("<I")
    if version not in _SUPPORTED_VERSIONS:
      raise _Malformed(f"GGUF version {version} (big-endian or too old?); supported versions: "
                       f"{list(_SUPPORTED_VERSIONS)}")
    num_tensors, num_fields = self._scalar("<Q"), self._scalar("<Q")
    self.fields: dict[str, Any] = {}
    for _ in range(num_fields):
      key = self._string()
      self.fields[key] = self._value(_VT(self._checked_type(key)))
    infos = [self._tensor_info() for _ in range(num_tensors)]
    alignment = self.fields.get("general.alignment", _DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment < 1:
      raise _Malformed(f"general.alignment is {alignment!r}, expected a positive integer")
    data_start = -(-self._offset // alignment) * alignment
    self.tensors: dict[str, TensorInfo] = {}
    for name, shape, kind, relative in infos:
      block, type_size = gguf_lib.GGML_QUANT_SIZES[kind]
      n_bytes = math.prod(shape) // block * type_size
      start = data_start + relative
      if start + n_bytes > self.size:
        raise _Malformed(f"tensor {name!r} needs bytes up to {start + n_bytes:,}")
      self.tensors[name] = TensorInfo(name, shape, kind, start, n_bytes)

  def _take(self, n: int) -> bytes:
    end = self._offset + n
    if end > self.size:
      raise _Malformed(f"its header runs past the end of the file (to byte {end:,})")
    data = self._map[self._offset:end]
    self._offset = end
    return data

  def _scalar(self, fmt: str) -> Any:
    return struct.unpack(fmt, self._take(struct.calcsize(fmt)))[0]

  def _string(self) -> str:
    raw = self._take(self._scalar("<Q"))
    try:
      return raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise _Malformed(f"the string at byte {self._offset - len(raw):,} is not UTF-8 ({e})") from e

  def _checked_type(self, key: str) -> int:
    kind = self._scalar("<I")
    if kind not in _VT._value2member_map_:
      raise _Malformed(f"metadata {key!r} has unknown value type {kind}")
    return kind

  def _value(self, kind: gguf_lib.GGUFValueType, depth: int = 0) -> Any:
    if kind == _VT.STRING:
      return self._string()
    if kind != _VT.ARRAY:
      dtype = np.dtype(_NUMPY_TYPES[kind]).newbyteorder("<")
      value = np.frombuffer(self._take(dtype.itemsize), dtype)[0]
      return bool(value) if kind == _VT.BOOL else value.item()
    if depth >= _MAX_ARRAY_NESTING:
      raise _Malformed(f"arrays nested more than {_MAX_ARRAY_NESTING} deep at byte {self._offset:,}")
    item_kind = _VT(self._checked_type("array item"))
    count = self._scalar("<Q")
    if item_kind in _NUMPY_TYPES:  # one read for the whole array: the fast path that matters
      dtype = np.dtype(_NUMPY_TYPES[item_kind]).newbyteorder("<")
      return np.frombuffer(self._take(count * dtype.itemsize), dtype).copy()
    return [self._value(item_kind, depth + 1) for _ in range(count)]

  def _tensor_info(self) -> tuple[str, tuple[int, ...], gguf_lib.GGMLQuantizationType, int]:
    name = self._string()
    shape = tuple(int(self._scalar("<Q")) for _ in range(self._scalar("<I")))
    kind = self._scalar("<I")
    if kind not in gguf_lib.GGMLQuantizationType._value2member_map_:
      raise _Malformed(f"tensor {name!r} has unknown GGML type id {kind}")
    kind = gguf_lib.GGMLQuantizationType(kind)
    if kind not in gguf_lib.GGML_QUANT_SIZES:
      raise _Malformed(f"tensor {name!r} has type {kind.name}, whose block size the gguf package "
                       "does not know")
    return name, shape, kind, int(self._scalar("<Q"))
