#!/usr/bin/env bash
# Pre-train on a Cloud TPU VM pod slice: create it (or reuse it), copy maejax to
# every worker, install it, and run the same command on all workers at once.
#
#   TPU_NAME=mae-pod ZONE=us-central2-b ACCELERATOR=v4-64 \
#     launch/tpu_pod.sh --config=configs/mae_vitl.py --workdir=gs://my-bucket/mae_vitl \
#       --config.dataset.data_dir=gs://my-bucket/tensorflow_datasets
#
# Each worker runs `python -m maejax.main ...`; jax.distributed finds the other
# workers from the TPU environment. Re-running the script after a preemption
# resumes from the newest checkpoint in --workdir (keep it on GCS).
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
ACCELERATOR=${ACCELERATOR:-v4-32}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
REMOTE_DIR=${REMOTE_DIR:-maejax}
root=$(cd "$(dirname "$0")/.." && pwd)

tpu() { gcloud compute tpus tpu-vm "$@" --zone="$ZONE"; }

if ! tpu describe "$TPU_NAME" >/dev/null 2>&1; then
  tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR" --version="$RUNTIME" ${TPU_CREATE_FLAGS:-}
fi

archive=$(mktemp --suffix=.tar.gz)
trap 'rm -f "$archive"' EXIT
git -C "$root" archive --format=tar.gz -o "$archive" HEAD
tpu scp "$archive" "$TPU_NAME:maejax.tar.gz" --worker=all
tpu ssh "$TPU_NAME" --worker=all --command="mkdir -p $REMOTE_DIR && tar -xzf maejax.tar.gz -C $REMOTE_DIR \
  && cd $REMOTE_DIR && python3 -m pip install -q -e . 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"

quoted=$(printf ' %q' "$@")
tpu ssh "$TPU_NAME" --worker=all --command="cd $REMOTE_DIR && python3 -m maejax.main$quoted"
