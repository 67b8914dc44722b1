"""What a result was computed with: the code's git commit, the package versions, the devices and
the host CPU.

Written into every results.json, so a number can be traced to the code and stack that produced it
(and two results that differ can be told apart by what they ran on). The host matters on CPU:
XLA:CPU hands dots and reductions to kernels it picks at run time by the CPU's instruction sets,
so the same code and packages on another CPU can round differently (float32 last digits).
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
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


# Read once as the package loads (about 5 ms of git) and cached: a record written hours later
# names the code that is running, not a commit made while it ran.
git_state()


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


# The instruction sets that choose XLA:CPU's (and its kernel libraries') code paths.
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
             "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "neon", "asimd",
             "sve", "sve2")


def parse_cpuinfo(text: str) -> tuple[str | None, list[str]]:
  """(the first processor's model name, its ISA_FLAGS present) from /proc/cpuinfo's text."""
  fields: dict[str, str] = {}
  for line in text.splitlines():
    if not line.strip():
      if fields:
        break  # the first processor's block is enough: the others are the same CPU
      continue
    key, _, value = line.partition(":")
    fields.setdefault(key.strip(), value.strip())
  flags = set((fields.get("flags") or fields.get("Features") or "").split())
  return fields.get("model name"), [f for f in ISA_FLAGS if f in flags]


def host() -> dict[str, Any]:
  """The CPU (model, ISA flags, logical count) and XLA_FLAGS: what changes XLA:CPU's rounding."""
  try:
    model, flags = parse_cpuinfo(pathlib.Path("/proc/cpuinfo").read_text())
  except OSError:  # not Linux
    model, flags = None, []
  return {"machine": platform.machine(), "cpu": model or platform.processor() or None,
          "isa": flags, "cpus": os.cpu_count(), "xla_flags": os.environ.get("XLA_FLAGS")}


def describe() -> dict[str, Any]:
  """The environment record of results.json."""
  return {"git": git_state(), "python": platform.python_version(), "packages": package_versions(),
          "devices": devices(), "host": host()}
