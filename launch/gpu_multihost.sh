#!/usr/bin/env bash
# Several GPU hosts, one process per host. Run this on every host with the same arguments and
#   JAX_COORDINATOR_ADDRESS=host0:1234  JAX_NUM_PROCESSES=<hosts>  JAX_PROCESS_ID=<0..hosts-1>
# in the environment (a scheduler sets them; under SLURM use --distributed instead, which
# auto-detects). Each process drives all GPUs of its host; the mesh spans every GPU of every host.
# Each host installs jax's CUDA build first (make setup-cuda; the plain setup is the CPU build).
#   launch/gpu_multihost.sh configs/animal_numbers.py:paper /shared/run1 [extra flags]
# Append --dry_run to print what the flags resolve to without starting the job, and
# --distributed_timeout=SECONDS (default 300) to bound the wait for hosts that start late.
set -euo pipefail
config=${1:?usage: launch/gpu_multihost.sh CONFIG WORKDIR [extra flags]}
workdir=${2:?workdir on storage shared by every host}
shift 2
: "${JAX_COORDINATOR_ADDRESS:?set JAX_COORDINATOR_ADDRESS=host:port of process 0}"
: "${JAX_NUM_PROCESSES:?set JAX_NUM_PROCESSES}"
: "${JAX_PROCESS_ID:?set JAX_PROCESS_ID}"
cd "$(dirname "$0")/.."
make setup-cuda >/dev/null
exec "${PYTHON:-.venv/bin/python}" -m subliminal_jax.main --config="$config" --workdir="$workdir" \
  --coordinator_address="$JAX_COORDINATOR_ADDRESS" --num_processes="$JAX_NUM_PROCESSES" \
  --process_id="$JAX_PROCESS_ID" "$@"
