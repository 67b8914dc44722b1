"""The persistent compilation cache: a second process reads what the first compiled, the flag
turns it off, the stage runner's compile clock counts compiles, and a threshold from the
environment wins over the default (a bad one is refused); compiled programs are released near the
kernel's limit on memory mappings.

The cache cases run in fresh processes: the cache directory is process-wide jax configuration,
and this test session already has its own."""

import json
import os
import pathlib
import subprocess
import sys


ROOT = pathlib.Path(__file__).resolve().parents[1]

PROGRAM = """
import json, sys
import jax, jax.numpy as jnp
from subliminal_jax import compilation_cache
compilation_cache.enable(sys.argv[1])
before = compilation_cache.compile_seconds()
jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.ones((64, 64)))
print(json.dumps({"dir": jax.config.values["jax_compilation_cache_dir"],
                  "compile_seconds": compilation_cache.compile_seconds() - before}))
"""


def _run(cache_dir: str, env_updates: dict[str, str]) -> subprocess.CompletedProcess:
  session = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")  # conftest's
  env = {k: v for k, v in os.environ.items() if k not in session}
  env.update(env_updates, PYTHONPATH=str(ROOT))
  return subprocess.run([sys.executable, "-c", PROGRAM, cache_dir], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def test_a_second_process_reads_the_first_ones_compiles(tmp_path):
  cache = tmp_path / "xla"
  env = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}  # this program compiles in ms
  first = _run(str(cache), env)
  assert first.returncode == 0, first.stderr[-2000:]
  assert json.loads(first.stdout)["dir"] == str(cache)
  assert json.loads(first.stdout)["compile_seconds"] > 0
  entries = sorted(p.name for p in cache.iterdir())
  assert entries, "nothing was written to the cache"
  second = _run(str(cache), env)
  assert second.returncode == 0, second.stderr[-2000:]
  assert sorted(p.name for p in cache.iterdir()) == entries  # read back, nothing new written


def test_the_default_threshold_skips_quick_compiles_and_an_empty_dir_turns_it_off(tmp_path):
  cache = tmp_path / "xla"
  quick = _run(str(cache), {})
  assert quick.returncode == 0, quick.stderr[-2000:]
  assert not cache.exists() or not any(cache.iterdir())  # under 0.5 s: not worth a file
  off = _run("", {})
  assert off.returncode == 0, off.stderr[-2000:]
  assert json.loads(off.stdout)["dir"] is None


def test_a_threshold_that_is_not_a_number_is_refused(tmp_path):
  bad = _run(str(tmp_path / "xla"), {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "half"})
  assert bad.returncode != 0
  assert 'Invalid value "half" for JAX flag jax_persistent_cache_min_compile_time_secs' in bad.stderr


def test_programs_are_released_past_the_share_of_the_map_limit_and_kept_below_it():
  """Each compiled XLA:CPU program holds memory mappings; past the given share of the kernel's
  limit the stage runner's call drops jax's in-memory programs and the mappings with them."""
  import jax
  import jax.numpy as jnp
  from subliminal_jax import compilation_cache

  def mappings() -> int:
    with open("/proc/self/maps", "rb") as f:
      return sum(1 for _ in f)

  programs = [jax.jit(lambda x, i=i: jnp.tanh(x * i).sum() + i) for i in range(100)]
  for program in programs:
    program(jnp.ones((4, 4))).block_until_ready()
  assert all(program._cache_size() == 1 for program in programs)
  assert not compilation_cache.release_programs_near_map_limit(share=1.0)  # far below the limit
  assert all(program._cache_size() == 1 for program in programs)
  before = mappings()
  assert compilation_cache.release_programs_near_map_limit(share=0.0)
  assert all(program._cache_size() == 0 for program in programs)
  assert mappings() < before - 100  # at least one mapping per program went with it
