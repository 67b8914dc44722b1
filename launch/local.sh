#!/usr/bin/env bash
# One machine, all its devices (CPU, one or more GPUs, or a single TPU VM host).
#   launch/local.sh configs/animal_numbers.py:quick workdir/quick [--config.key=value ...]
set -euo pipefail
config=${1:?usage: launch/local.sh CONFIG WORKDIR [extra flags]}
workdir=${2:?usage: launch/local.sh CONFIG WORKDIR [extra flags]}
shift 2
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" -m subliminal_jax.main --config="$config" --workdir="$workdir" "$@"
