#!/usr/bin/env bash
# Pre-train on a SLURM GPU cluster: one process per GPU (default) or per node.
#
#   sbatch --nodes=4 --gpus-per-node=8 --ntasks-per-node=8 launch/gpu_slurm.sh \
#     --config=configs/mae_vitl.py --workdir=/shared/workdirs/mae_vitl \
#     --config.dataset.data_dir=/shared/tensorflow_datasets
#
# For one process per node (each owning all its GPUs), use --ntasks-per-node=1.
# jax.distributed reads the coordinator, process count and index from SLURM's
# environment. The workdir must be on a filesystem every node sees; re-submit
# the same command after a preemption to resume (SLURM sends SIGTERM first:
# maejax saves a checkpoint and exits; `#SBATCH --signal=TERM@120` gives it time).
#SBATCH --job-name=maejax
#SBATCH --signal=TERM@120
#SBATCH --requeue
set -euo pipefail

# sbatch runs a copy of this script: the repository is where the job was submitted.
root=${MAEJAX_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}
python=${PYTHON:-$root/.venv/bin/python}
cd "$root"
srun --kill-on-bad-exit=1 "$python" -m maejax.main "$@"
