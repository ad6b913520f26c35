#!/usr/bin/env bash
# Pre-train on a Cloud TPU VM pod slice: create it (or reuse it), copy maejax to
# every worker, install it, and run the same command on all workers at once.
#
#   TPU_NAME=mae-pod ZONE=us-central2-b ACCELERATOR=v4-64 \
#     launch/tpu_pod.sh --config=configs/mae_vitl.py --workdir=/mnt/my-bucket/mae_vitl \
#       --config.dataset.data_dir=gs://my-bucket/tensorflow_datasets
#
# Each worker runs `python -m maejax.main ...`; jax.distributed finds the other
# workers from the TPU environment. Re-running the script after a preemption
# resumes from the newest checkpoint in --workdir: a folder every worker sees
# that outlives the VMs (a bucket mounted with gcsfuse); gs:// URLs are refused.
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
# The working tree as it is: tracked files and untracked ones git does not ignore.
(cd "$root" && git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -czf "$archive" 2>/dev/null)
dirty=$([[ -n $(git -C "$root" status --porcelain) ]] && echo " with uncommitted changes" || echo "")
echo "shipping maejax at $(git -C "$root" rev-parse --short HEAD)$dirty to $TPU_NAME" >&2
tpu scp "$archive" "$TPU_NAME:maejax.tar.gz" --worker=all
# TPU VM images may ship a python3 older than maejax needs (3.11): uv makes a 3.11 environment.
tpu ssh "$TPU_NAME" --worker=all --command="set -e; mkdir -p $REMOTE_DIR && tar -xzf maejax.tar.gz -C $REMOTE_DIR \
  && python3 -m pip install -q --user uv && ~/.local/bin/uv venv -q --allow-existing --python 3.11 $REMOTE_DIR/.venv \
  && ~/.local/bin/uv pip install -q --python $REMOTE_DIR/.venv/bin/python -e '$REMOTE_DIR[tpu]'"

quoted=$(printf ' %q' "$@")
tpu ssh "$TPU_NAME" --worker=all --command="cd $REMOTE_DIR && .venv/bin/python -m maejax.main$quoted"
