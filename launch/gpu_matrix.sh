#!/usr/bin/env bash
# The `gpu` transfer matrix on a lent GPU (see benchmarks/gpu_matrix.py).
#   launch/gpu_matrix.sh prepare [--model=random|smollm2] [-- RUN_OPTIONS]   here: prints the call(s)
#   launch/gpu_matrix.sh stash                       there, in every call but the last
#   launch/gpu_matrix.sh run [--adapters_per_step=K] [--budget_s=S] ...     there, in the last call
set -euo pipefail
step=${1:?usage: launch/gpu_matrix.sh prepare|stash|run [options]}
shift
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
case "$step" in
  prepare) exec "${PYTHON:-.venv/bin/python}" -m benchmarks.gpu_matrix prepare "$@" ;;
  stash) exec "$python" -m benchmarks.gpu_matrix stash ;;
  run)
    "$python" -m benchmarks.gpu_matrix stash
    # The image lacks these; the wheels (CPython 3.12, no dependencies) came in the last call.
    if ! "$python" -c "import ml_collections, datasets, gguf, interegular" 2>/dev/null; then
      "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpu_matrix_site /tmp/gpu_matrix_stash/wheels/*.whl
      export PYTHONPATH=/tmp/gpu_matrix_site:${PYTHONPATH:-}
    fi
    # datasets 5.2 wants pyarrow >= 24, which is too big to travel (55 MB): fail here, not mid-job.
    "$python" -c "import datasets, pyarrow; print('datasets', datasets.__version__, 'pyarrow', pyarrow.__version__)"
    exec "$python" -m benchmarks.gpu_matrix run "$@" ;;
  *) echo "unknown step $step: expected prepare, stash or run" >&2; exit 2 ;;
esac
