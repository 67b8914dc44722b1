"""Test setup: 8 fake CPU devices, so sharded code paths run on any machine; one fresh XLA
compilation cache per test session; light XLA optimisation for the tiny models most tests use; the
real SmolLM2 loaded once per test process; two tiny main jobs and the tiny transfer matrix built
once per session."""

import os
import shutil
import tempfile

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# XLA:CPU's newer MLIR fusion emitters (its default) compile about twice as slowly as the classic
# ones, and compiling is most of what the tests on tiny models do: test_train_step took 47-54 CPU s
# with them and 21-27 without, while the real-model tests' run time did not change (60.5 and 59.3
# CPU s for test_real_smollm2). Subprocess jobs inherit it with XLA_FLAGS.
_FAST_COMPILE_FLAG = "--xla_cpu_use_fusion_emitters=false"
if "xla_cpu_use_fusion_emitters" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " " + _FAST_COMPILE_FLAG
# On 8 fake devices one process runs every device's program on one pool of threads, sized
# max(CPUs, devices) = 8 here, and a collective holds its thread until its peers arrive. When a
# device has two collectives in flight (XLA:CPU runs independent thunks concurrently), the blocked
# threads can fill the pool while a lagging device still needs a thread to reach them: the sharded
# distillation step deadlocked so in 5 of 9 runs at 845638f, and CI stop 35 failed on it. Eight
# threads per device leave it room (6 of 6 runs passed with 64). PJRT reads PJRT_NPROC for the
# pool's size; subprocess jobs inherit it.
os.environ.setdefault("PJRT_NPROC", "64")
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
# Every compile is kept, even the ~0.1 s ones (about 80 per main-job process, which each test
# subprocess would repeat): a cache read costs milliseconds.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# Tests on tiny models spend most of their time in XLA compiles, which light optimisation (no
# expensive LLVM passes) makes about twice as fast; subprocess jobs inherit it. Tests on a real
# model (the `smollm2` fixture, tests/test_real_*.py), whose run time dominates, compile with full
# optimisation.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")


# A crashed xdist worker's fatal-signal dump goes to stderr, and CI shows only the end of its log,
# where idle threads, pytest's own frames and the extension-module list push the crashing frames
# out of view. Each worker writes its dump to a file in this directory instead, and the controller
# prints the project's and its libraries' frames of every dump at the end of the terminal summary.
if "SUBLIMINAL_TEST_CRASH_DIR" not in os.environ:  # the controller's, inherited by its workers
  os.environ["SUBLIMINAL_TEST_CRASH_DIR"] = tempfile.mkdtemp(prefix="subliminal_jax_test_crash_")
_CRASH_DIR = os.environ["SUBLIMINAL_TEST_CRASH_DIR"]
_CRASH_LINES_SHOWN = 60
_TEST_RUNNER_FRAMES = ("/_pytest/", "/pluggy/", "/xdist/", "/execnet/", 'File "<string>"')


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
  if not hasattr(config, "workerinput"):
    return
  import faulthandler
  worker = config.workerinput["workerid"]
  config._crash_log = open(os.path.join(_CRASH_DIR, f"{worker}.log"), "w")
  faulthandler.enable(file=config._crash_log, all_threads=True)


def pytest_terminal_summary(terminalreporter):
  _report_time_per_file(terminalreporter)
  for name in sorted(os.listdir(_CRASH_DIR)) if os.path.isdir(_CRASH_DIR) else ():
    with open(os.path.join(_CRASH_DIR, name)) as f:
      lines = [line for line in f.read().splitlines()
               if line.strip() and not line.startswith("Extension modules")
               and not any(frame in line for frame in _TEST_RUNNER_FRAMES)]
    if lines:
      terminalreporter.section(f"fatal error in worker {name[:-len('.log')]}")
      terminalreporter.write_line("\n".join(lines[:_CRASH_LINES_SHOWN]))


# Where the suite's time goes, printed at the end of every run: per test file (setup, call and
# teardown summed) its wall seconds, its CPU seconds (the test process and the subprocesses it
# waited for; a shared machine inflates it far less than wall time, so files are ranked by
# it) and its seconds of XLA compiling in the test process: the figures a change aimed at the
# suite's length needs.
_FILES_SHOWN = 20
_MEASURES = ("cpu_s", "xla_compile_s")
_seen = {name: 0.0 for name in _MEASURES}
_time_per_file: dict[str, list[float]] = {}


def _measures_now() -> dict[str, float]:
  import resource
  from subliminal_jax import compilation_cache
  own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                        resource.RUSAGE_CHILDREN))
  return {"cpu_s": own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime,
          "xla_compile_s": compilation_cache.compile_seconds()}


def pytest_collection_finish(session):
  # The baseline (and the import that starts the compile clock) comes after collecting: importing
  # the test files is no test's time.
  _seen.update(_measures_now())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  outcome = yield
  now = _measures_now()
  report = outcome.get_result()
  for name in _MEASURES:
    report.user_properties.append((name, now[name] - _seen[name]))
    _seen[name] = now[name]


def pytest_runtest_logreport(report):
  seconds = _time_per_file.setdefault(report.nodeid.split("::")[0], [0.0] * (1 + len(_MEASURES)))
  seconds[0] += report.duration
  for i, name in enumerate(_MEASURES, 1):
    seconds[i] += sum(v for k, v in report.user_properties if k == name)


def _report_time_per_file(terminalreporter) -> None:
  if not _time_per_file:
    return
  wall, cpu, compiling = (sum(s[i] for s in _time_per_file.values()) for i in range(3))
  terminalreporter.section("time per test file (all workers)")
  terminalreporter.write_line(
      f"{wall:.0f} s in tests, {cpu:.0f} CPU s, {compiling:.0f} s XLA compiling in the test "
      f"processes; the {_FILES_SHOWN} files that used the most CPU (wall s, CPU s, compiling s):")
  busiest = sorted(_time_per_file.items(), key=lambda kv: -kv[1][1])[:_FILES_SHOWN]
  for path, (seconds, cpu_seconds, compile_seconds) in busiest:
    terminalreporter.write_line(f"{seconds:8.1f} {cpu_seconds:8.1f} {compile_seconds:8.1f}  {path}")


def pytest_unconfigure(config):
  if hasattr(config, "workerinput"):
    return
  if _SESSION_CACHE is not None:
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
  shutil.rmtree(_CRASH_DIR, ignore_errors=True)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Each XLA:CPU executable keeps a few memory mappings of its machine code for as long as jax's
  caches hold it: after about 400 tests a worker passed the kernel's 65,530 mappings per process
  (vm.max_map_count) and LLVM aborted a compile with "Unable to allocate section memory" (10,061
  mappings after three of the 58 test files). Programs are dropped after every test file."""
  yield
  from subliminal_jax import compilation_cache
  compilation_cache.release_programs()


@pytest.fixture(autouse=True)
def _full_optimisation_for_real_models(request):
  real = "smollm2" in request.fixturenames or request.module.__name__.startswith("test_real_")
  if not real:
    yield
    return
  import jax
  previous = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", False)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture(scope="session")
def smollm2():
  """The real SmolLM2-135M-Instruct from the embedded GGUF (float32), loaded once per process."""
  from subliminal_jax import loading
  return loading.load("smollm2")


@pytest.fixture(scope="session")
def smollm2_transformers():
  """transformers' own model from the same GGUF (the reference), loaded once per process."""
  import torch
  import transformers
  from subliminal_jax.weights import embedded
  path = embedded.smollm2_path()
  return transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_job(tmp_path_factory):
  """The workdir of the tiny main job (configs/animal_numbers.py:tiny), built once per session for
  every worker; read only (copy it to rerun)."""
  import tiny_jobs
  from configs import animal_numbers as animal_config
  from subliminal_jax.experiments import animal_numbers
  return tiny_jobs.built_once(
      tmp_path_factory, "tiny_job",
      lambda directory: animal_numbers.run(animal_config.get_config("tiny"), str(directory)))


@pytest.fixture(scope="session")
def finetuned_tiny_job(tmp_path_factory):
  """The workdir of the tiny main job with finetuned teachers (tests/tiny_jobs.py), built once per
  session for every worker; read only (copy it to rerun)."""
  import tiny_jobs
  from subliminal_jax.experiments import animal_numbers
  return tiny_jobs.built_once(
      tmp_path_factory, "finetuned_tiny_job",
      lambda directory: animal_numbers.run(tiny_jobs.finetuned_teachers_config(), str(directory)))


@pytest.fixture(scope="session")
def tiny_matrix_job(tmp_path_factory):
  """The tiny 3x3 transfer matrix (tests/tiny_jobs.py), built once per session for every worker:
  (its config, its workdir, what its run returned); read only (copy it to rerun)."""
  import tiny_jobs
  from subliminal_jax.experiments import transfer_matrix
  config = tiny_jobs.tiny_matrix_config()
  workdir, results = tiny_jobs.run_once(
      tmp_path_factory, "tiny_matrix",
      lambda directory: transfer_matrix.run(config, str(directory)))
  return config, workdir, results


def pytest_collection_modifyitems(config, items):
  """Tests marked slow (minutes each) first, the multi-process jobs (the longest) before the rest:
  with xdist, a long test handed out last keeps one worker busy after the other ran out of work."""
  def order(item):
    slow = item.get_closest_marker("slow") is not None
    return (not slow, "test_multihost.py" not in item.nodeid)
  items.sort(key=order)
