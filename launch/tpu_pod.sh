#!/usr/bin/env bash
# A TPU VM pod slice: the same command on every worker; jax.distributed.initialize() discovers the
# coordinator, process count and id from the TPU environment (--distributed).
#   launch/tpu_pod.sh TPU_NAME ZONE configs/animal_numbers.py:paper /mnt/gcs/run1 [extra flags]
# The repository must be at the same path on every worker (e.g. cloned by a startup script), and the
# workdir must be a path on storage every worker mounts (gcsfuse of a bucket, or NFS/Filestore):
# every worker reads the artifacts that process 0 marks done. Each worker installs jax's TPU build
# (make setup-tpu; the plain setup is the CPU build). Append --dry_run to check the command first.
set -euo pipefail
tpu=${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [extra flags]}
zone=${2:?zone}
config=${3:?config}
workdir=${4:?workdir}
shift 4
repo=${REPO_DIR:-\$HOME/subliminal-jax}
# Quoted for the workers' shell, so paths and values with spaces arrive as one argument each.
flags=$(printf ' %q' --distributed --config="$config" --workdir="$workdir" "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  cd $repo && make setup-tpu >/dev/null &&
  .venv/bin/python -m subliminal_jax.main$flags"
