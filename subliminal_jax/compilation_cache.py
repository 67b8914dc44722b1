"""jax's persistent compilation cache, on by default, and the time a process spends compiling.

Stages, student seeds, reruns and tests compile the same programs again and again; with the cache
each repeat is a file read instead of an XLA compile. Every command-line entry point (the main
job, ``generate``, the benchmarks) imports this module, which defines ``--compilation_cache_dir``
(default ``$JAX_COMPILATION_CACHE_DIR``, else ``~/.cache/subliminal_jax/xla`` under
``$XDG_CACHE_HOME`` if set; ``''`` turns the cache off), and calls :func:`enable_from_flags`.
The tests use one fresh cache directory per session (tests/conftest.py).

:func:`release_programs_near_map_limit` drops the programs jax holds in memory once the process
nears the kernel's limit on memory mappings (each XLA:CPU executable maps its machine code in a
few; LLVM aborts a compile past the limit); the stage runner calls it after every stage.

:func:`compile_seconds` is the wall time this process has spent in XLA compiles (and persistent
cache reads) so far, from jax's own monitoring events; the stage runner reports it beside each
stage's run time.
"""

from __future__ import annotations

import gc
import os
import threading

import jax
from absl import flags
from absl import logging

__all__ = ["default_dir", "enable", "enable_from_flags", "compile_seconds", "release_programs",
           "release_programs_near_map_limit"]

# Compiles shorter than this are not written (reading them back would cost about as much), unless
# $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS says otherwise (jax reads and checks it at import).
_MIN_COMPILE_SECONDS = 0.5
_MIN_COMPILE_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"


def default_dir() -> str:
  """``$JAX_COMPILATION_CACHE_DIR`` if set, else ``subliminal_jax/xla`` in the user's cache dir."""
  explicit = os.environ.get("JAX_COMPILATION_CACHE_DIR")
  if explicit is not None:
    return explicit
  cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(cache_home, "subliminal_jax", "xla")


_DIR = flags.DEFINE_string(
    "compilation_cache_dir", default_dir(),
    "Persistent XLA compilation cache directory ('' turns it off). Stages, seeds and reruns "
    "compile the same programs; the cache turns each repeat compile into a file read.")


def enable(directory: str) -> None:
  """Writes and reads compiled programs under ``directory`` ('' or None: the cache stays off)."""
  if not directory:
    return
  jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))
  if _MIN_COMPILE_ENV not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", _MIN_COMPILE_SECONDS)


def enable_from_flags() -> None:
  """:func:`enable` with ``--compilation_cache_dir`` (call after absl has parsed the flags)."""
  enable(_DIR.value)


_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_lock = threading.Lock()
_compile_total = 0.0


def _on_duration(event: str, seconds: float, **_) -> None:
  global _compile_total
  if event == _BACKEND_COMPILE_EVENT:
    with _lock:
      _compile_total += seconds


jax.monitoring.register_event_duration_secs_listener(_on_duration)


def compile_seconds() -> float:
  """Seconds this process has spent in XLA compiles (or reading them from the cache) so far."""
  with _lock:
    return _compile_total


# Of the kernel's mappings per process (vm.max_map_count, 65,530 by default), the share past which
# the programs jax holds in memory are dropped: far enough below it that the next stage's
# compiles fit, far enough above a stage's own needs (thousands) that it rarely fires.
MAP_SHARE = 0.5


def _map_counts() -> tuple[int, int] | None:
  """(mappings of this process, the kernel's limit), or None where /proc does not say."""
  try:
    with open("/proc/sys/vm/max_map_count") as f:
      limit = int(f.read())
    with open("/proc/self/maps", "rb") as f:
      return sum(1 for _ in f), limit
  except (OSError, ValueError):
    return None


def release_programs() -> None:
  """Drops the compiled programs jax holds in memory, and the mappings of their machine code
  (later calls recompile, or read the persistent cache)."""
  jax.clear_caches()
  gc.collect()


def release_programs_near_map_limit(share: float = MAP_SHARE) -> bool:
  """:func:`release_programs` when this process holds more than ``share`` of the memory mappings
  the kernel allows. Returns whether it did."""
  counts = _map_counts()
  if counts is None or counts[0] <= share * counts[1]:
    return False
  release_programs()
  after = _map_counts()
  logging.info("%d of %d memory mappings in use: compiled programs released (%s now)",
               counts[0], counts[1], after[0] if after else "?")
  return True
