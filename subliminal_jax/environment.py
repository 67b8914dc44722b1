"""What a result was computed with: the code's git commit, the package versions and the devices.

Written into every results.json, so a number can be traced to the code and stack that produced it
(and two results that differ can be told apart by what they ran on).
"""

from __future__ import annotations

import functools
import importlib.metadata
import pathlib
import platform
import subprocess
from typing import Any

import jax

# The packages whose versions can change a number in the results.
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "scipy", "ml-collections",
            "datasets", "tokenizers", "safetensors", "gguf", "ml-dtypes")


@functools.lru_cache(maxsize=1)
def git_state() -> dict[str, Any]:
  """{"sha", "dirty"} of the checkout this package runs from ({"sha": None} outside git)."""
  root = pathlib.Path(__file__).resolve().parents[1]

  def git(*args: str) -> str | None:
    try:
      result = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired):
      return None
    return result.stdout.strip() if result.returncode == 0 else None

  sha = git("rev-parse", "HEAD")
  if sha is None:
    return {"sha": None, "dirty": None}
  # Tracked files changed since the commit: the result may not be reproducible from the sha alone.
  status = git("status", "--porcelain", "--untracked-files=no")
  return {"sha": sha, "dirty": bool(status)}


def package_versions() -> dict[str, str | None]:
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return versions


def devices() -> dict[str, Any]:
  first = jax.devices()[0]
  return {"platform": first.platform, "device_kind": first.device_kind,
          "device_count": jax.device_count(), "process_count": jax.process_count()}


def describe() -> dict[str, Any]:
  """The environment record of results.json."""
  return {"git": git_state(), "python": platform.python_version(), "packages": package_versions(),
          "devices": devices()}
