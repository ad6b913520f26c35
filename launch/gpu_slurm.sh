#!/usr/bin/env bash
# Pre-train on a SLURM GPU cluster, one process per GPU or one per node.
#
# From a login node (installs maejax[cuda12] there, where the network is, then submits):
#   launch/gpu_slurm.sh --nodes=4 --gpus-per-node=8 --ntasks-per-node=8 -- \
#     --config=configs/mae_vitl.py --workdir=/shared/workdirs/mae_vitl \
#     --config.dataset.data_dir=/shared/tensorflow_datasets
# or submit it yourself (it installs inside the job if the environment is missing):
#   sbatch --nodes=4 --gpus-per-node=8 --ntasks-per-node=8 launch/gpu_slurm.sh \
#     --config=configs/mae_vitl.py --workdir=/shared/workdirs/mae_vitl
#
# --ntasks-per-node=<GPUs per node>: each process drives one GPU (JAX gives the
# task with SLURM_LOCALID=i the i-th GPU it sees). --ntasks-per-node=1: each
# process drives all of its node's GPUs; JAX would give it only the first, so
# this script sets MAEJAX_LOCAL_DEVICES=all, which maejax.main honours. Request
# GPUs per node (--gpus-per-node or --gres=gpu:N), not --gpus-per-task: JAX
# counts GPUs from 0 on every node. jax.distributed reads the coordinator and
# process ids from SLURM's environment. The workdir must be on a filesystem
# every node sees. SLURM sends SIGTERM 120 s before a preemption or time limit
# (--signal below): maejax saves a checkpoint and exits, and the requeued job
# (or the same command submitted again) resumes from it.
#SBATCH --job-name=maejax
#SBATCH --signal=TERM@120
#SBATCH --requeue
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/gpu_slurm.sh [SBATCH_OPTION...] -- --config=CONFIG --workdir=SHARED_DIR [maejax.main flags...]
       sbatch [SBATCH_OPTION...] launch/gpu_slurm.sh --config=CONFIG --workdir=SHARED_DIR [maejax.main flags...]

The first form (on a login node) prepares the Python environment, then submits
this script with sbatch. Inside the job (the second form, or salloc) it prepares
the environment if needed and runs `srun python -m maejax.main FLAGS`, one task
per GPU (--ntasks-per-node=GPUS) or one per node (--ntasks-per-node=1).

Environment:
  MAEJAX_VENV    an existing environment with maejax installed: used as it is,
                 nothing is installed (default: ROOT/.venv, created with uv and
                 kept up to date with maejax[cuda12])
  MAEJAX_EXTRA   the jax extra to install (default cuda12; cuda13 for CUDA 13)
  MAEJAX_PYTHON  the Python version uv creates ROOT/.venv with (default 3.11)
  MAEJAX_ROOT    the maejax checkout (default: this script's, or inside a job
                 the directory sbatch was run from)
EOF
}

die() {
  echo "gpu_slurm: error: $*" >&2
  exit 2
}

say() { echo "gpu_slurm: $*" >&2; }

# The checkout: sbatch runs a copy of this script from its spool directory, so
# inside a job only MAEJAX_ROOT (set when this script submits) or the
# submission directory can say where it is.
find_root() {
  local root
  if [[ -n ${MAEJAX_ROOT:-} ]]; then
    root=$MAEJAX_ROOT
  elif [[ -n ${SLURM_JOB_ID:-} ]]; then
    root=${SLURM_SUBMIT_DIR:-$PWD}
  else
    root=$(cd "$(dirname "$0")/.." && pwd)
  fi
  [[ -f $root/setup.py && -d $root/maejax ]] ||
    die "$root is not a maejax checkout: submit from the checkout or set MAEJAX_ROOT"
  echo "$root"
}

ensure_uv() {
  export PATH="$HOME/.local/bin:$PATH"
  command -v uv >/dev/null && return
  say "installing uv into ~/.local/bin"
  python3 -m pip install -q --user uv 2>/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh
}

# Prints the environment's python. A named environment is used untouched;
# ROOT/.venv is created once and reinstalled only when setup.py or the extra
# changed, so a requeued job starts at once.
ensure_env() {
  local root=$1 venv extra stamp want
  if [[ -n ${MAEJAX_VENV:-} ]]; then
    [[ -x $MAEJAX_VENV/bin/python ]] || die "MAEJAX_VENV=$MAEJAX_VENV has no bin/python"
    echo "$MAEJAX_VENV/bin/python"
    return
  fi
  venv=$root/.venv
  extra=${MAEJAX_EXTRA:-cuda12}
  stamp=$venv/.maejax-installed
  want="$extra $(cksum <"$root/setup.py")"
  if [[ ! -x $venv/bin/python || $(cat "$stamp" 2>/dev/null) != "$want" ]]; then
    ensure_uv >&2
    [[ -x $venv/bin/python ]] || uv venv -q --python "${MAEJAX_PYTHON:-3.11}" "$venv" >&2
    say "installing maejax[$extra] into $venv"
    uv pip install -q --python "$venv/bin/python" -e "$root[$extra]" >&2
    echo "$want" >"$stamp"
  fi
  echo "$venv/bin/python"
}

# Tasks on each node, from SLURM_TASKS_PER_NODE ("8(x4)", "1", "2(x3),1"):
# one number when every node runs the same count, else it stops.
tasks_per_node() {
  local spec=${SLURM_TASKS_PER_NODE:-} entry counts=() count
  [[ -n $spec ]] || die "SLURM_TASKS_PER_NODE is not set: run inside sbatch or salloc"
  IFS=, read -r -a counts <<<"$spec"
  count=${counts[0]%%(*}
  for entry in "${counts[@]}"; do
    [[ ${entry%%(*} == "$count" ]] ||
      die "nodes run different numbers of tasks (SLURM_TASKS_PER_NODE=$spec): use --ntasks-per-node"
  done
  echo "$count"
}

# One task per node drives all the node's GPUs; one task per GPU, one GPU each
# (JAX's default under SLURM). Anything else would leave GPUs idle or ask JAX
# for a GPU index the node does not have.
choose_devices() {
  local per_node=$1 gpus=${SLURM_GPUS_ON_NODE:-}
  if [[ $per_node == 1 ]]; then
    export MAEJAX_LOCAL_DEVICES=all
    say "one process per node, each driving all ${gpus:-its} GPUs"
  else
    [[ -z $gpus || $gpus == "$per_node" ]] ||
      die "$per_node tasks per node but $gpus GPUs per node: use --ntasks-per-node=$gpus (one per GPU) or 1 (one per node)"
    unset MAEJAX_LOCAL_DEVICES
    say "one process per GPU, $per_node per node"
  fi
}

submit() {
  local root=$1
  shift
  local options=()
  while [[ $# -gt 0 && $1 != -- ]]; do
    options+=("$1")
    shift
  done
  [[ $# -gt 0 ]] || die "not inside a SLURM job: separate sbatch options from maejax flags with --, or submit with sbatch (see --help)"
  shift
  [[ $# -gt 0 ]] || die "no maejax flags after --: pass at least --config=CONFIG"
  ensure_env "$root" >/dev/null
  cd "$root"
  MAEJAX_ROOT=$root sbatch "${options[@]}" "$root/launch/gpu_slurm.sh" "$@"
}

run() {
  local root=$1
  shift
  [[ $# -gt 0 ]] || die "no maejax flags: pass at least --config=CONFIG (see --help)"
  local python per_node
  python=$(ensure_env "$root")
  per_node=$(tasks_per_node)
  choose_devices "$per_node"
  cd "$root"
  exec srun --kill-on-bad-exit=1 "$python" -m maejax.main "$@"
}

main() {
  if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    usage
    exit 0
  fi
  if [[ $# -eq 0 ]]; then
    usage >&2
    exit 2
  fi
  local root
  root=$(find_root)
  if [[ -n ${SLURM_JOB_ID:-} ]]; then
    run "$root" "$@"
  else
    submit "$root" "$@"
  fi
}

main "$@"
