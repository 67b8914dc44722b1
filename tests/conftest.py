"""Test setup: 8 fake CPU devices, so sharded code paths run on any machine, and one fresh XLA
compilation cache per test session."""

import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Many tests (and the main jobs they start as subprocesses) compile the same programs: one
# persistent cache for the session turns repeats into file reads. It is made here, in the process
# that starts the xdist workers, which inherit it with the environment; a new session starts
# empty, so its time is that of a clean clone.
_SESSION_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _SESSION_CACHE = tempfile.mkdtemp(prefix="subliminal_jax_test_xla_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


def pytest_unconfigure(config):
  if _SESSION_CACHE is not None and not hasattr(config, "workerinput"):
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
