"""Writing test GGUF files with gguf.GGUFWriter, shared by the weight and Gemma tests."""

import gguf
import numpy as np


def add_tensor(writer: gguf.GGUFWriter, name: str, w: np.ndarray, kind: str = "F32") -> None:
  """Adds ``w`` stored as GGUF type ``kind``; 1-D tensors stay F32, as llama.cpp writes them."""
  if kind == "F32" or w.ndim == 1:
    writer.add_tensor(name, w.astype(np.float32))
  elif kind == "F16":
    writer.add_tensor(name, w.astype(np.float16))
  else:
    qtype = gguf.GGMLQuantizationType[kind]
    writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)


def finish(writer: gguf.GGUFWriter, path):
  """Writes header, metadata and tensors, closes the file; returns ``path``."""
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path
