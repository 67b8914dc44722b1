#!/usr/bin/env bash
# A TPU VM pod slice: the same command on every worker; jax.distributed.initialize() discovers the
# coordinator, process count and id from the TPU environment (--distributed).
#   launch/tpu_pod.sh TPU_NAME ZONE configs/animal_numbers.py:paper /mnt/gcs/run1 [extra flags]
# The repository must be at the same path on every worker (e.g. cloned by a startup script), and the
# workdir must be a path on storage every worker mounts (gcsfuse of a bucket, or NFS/Filestore):
# every worker reads the artifacts that process 0 marks done.
set -euo pipefail
tpu=${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [extra flags]}
zone=${2:?zone}
config=${3:?config}
workdir=${4:?workdir}
shift 4
repo=${REPO_DIR:-\$HOME/subliminal-jax}
extra=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  cd $repo && make setup >/dev/null &&
  .venv/bin/python -m subliminal_jax.main --distributed --config=$config --workdir=$workdir$extra"
