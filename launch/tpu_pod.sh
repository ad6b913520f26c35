#!/usr/bin/env bash
# Pre-train on a Cloud TPU VM pod slice from your own machine: create the slice
# (or reuse it), ship this working tree to every worker, install maejax[tpu]
# into a Python 3.11 environment there, and run the same command on all workers.
#
#   TPU_NAME=mae-pod ZONE=us-central2-b ACCELERATOR=v4-64 \
#     WORKER_SETUP='mountpoint -q /mnt/bucket || (mkdir -p /mnt/bucket && gcsfuse my-bucket /mnt/bucket)' \
#     launch/tpu_pod.sh --config=configs/mae_vitl.py --workdir=/mnt/bucket/mae_vitl \
#       --config.dataset.data_dir=gs://my-bucket/tensorflow_datasets
#
# Each worker runs `python -m maejax.main ...`; jax.distributed finds the other
# workers from the TPU environment. After a preemption, run the same command
# again: a preempted slice is deleted and created anew, the tree is shipped
# again, the environment is reused (reinstalled only when setup.py changed), and
# maejax resumes from the newest checkpoint in --workdir. That folder must be
# one every worker sees and that outlives the VMs (a bucket mounted with
# gcsfuse, which WORKER_SETUP can mount on fresh VMs); gs:// URLs are refused.
# gcloud keeps one ssh session per worker open for the whole run: launch from a
# machine that stays up (or inside tmux/screen).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: TPU_NAME=NAME ZONE=ZONE [ACCELERATOR=TYPE] launch/tpu_pod.sh --config=CONFIG --workdir=SHARED_DIR [maejax.main flags...]

Creates (or reuses) the TPU VM slice NAME, ships this working tree (tracked files
plus untracked files git does not ignore) to every worker, installs maejax[tpu]
into a uv Python environment there, and runs `python -m maejax.main FLAGS` on all
workers (gcloud compute tpus tpu-vm ssh --worker=all). Run it again after a
preemption: the run resumes from --workdir.

Environment:
  TPU_NAME        (required) the TPU VM slice to create or reuse
  ZONE            (required) its zone, e.g. us-central2-b
  ACCELERATOR     accelerator type, needed only to create the slice (e.g. v4-64)
  RUNTIME         TPU software version for a new slice (default tpu-ubuntu2204-base;
                  v5e: v2-alpha-tpuv5-lite, v6e: v2-alpha-tpuv6e)
  PROJECT         Google Cloud project (default: gcloud's configured project)
  TPU_CREATE_FLAGS  extra flags for `tpu-vm create`, split on spaces (e.g. --spot)
  REMOTE_DIR      folder under each worker's home for the tree (default maejax)
  MAEJAX_PYTHON   Python version uv installs on the workers (default 3.11)
  WORKER_SETUP    a shell command run on every worker before each start, e.g. to
                  mount the bucket that holds --workdir; it must be safe to repeat
EOF
}

die() {
  echo "tpu_pod: error: $*" >&2
  exit 2
}

say() { echo "tpu_pod: $*" >&2; }

# Quote for any remote POSIX shell (printf %q can emit bash-only $'...').
shell_quote() { printf "'%s'" "${1//\'/\'\\\'\'}"; }

check_arguments() {
  if [[ $# -eq 0 ]]; then
    usage >&2
    exit 2
  fi
  if [[ $1 == -h || $1 == --help ]]; then
    usage
    exit 0
  fi
  [[ -n ${TPU_NAME:-} ]] || die "set TPU_NAME to the TPU VM slice to create or reuse (see --help)"
  [[ -n ${ZONE:-} ]] || die "set ZONE to the slice's zone, e.g. ZONE=us-central2-b (see --help)"
  # Without a shared --workdir each worker would checkpoint to its own disk,
  # which a preemption deletes: nothing could resume.
  local arg
  for arg in "$@"; do
    [[ $arg == --workdir=* || $arg == --workdir ]] && return 0
  done
  die "pass --workdir=DIR on a folder every worker sees that outlives the VMs (a gcsfuse-mounted bucket)"
}

tpu() {
  local project=()
  [[ -n ${PROJECT:-} ]] && project=(--project="$PROJECT")
  # ${a[@]+"${a[@]}"}: macOS's bash 3.2 calls an empty array unbound under set -u.
  gcloud compute tpus tpu-vm "$@" --zone="$ZONE" ${project[@]+"${project[@]}"}
}

create_slice() {
  [[ -n ${ACCELERATOR:-} ]] || die "$TPU_NAME does not exist in $ZONE: set ACCELERATOR (e.g. v4-64) to create it"
  local extra=()
  read -r -a extra <<<"${TPU_CREATE_FLAGS:-}"
  say "creating $TPU_NAME ($ACCELERATOR) in $ZONE"
  tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR" --version="${RUNTIME:-tpu-ubuntu2204-base}" ${extra[@]+"${extra[@]}"}
}

# Reuse a READY slice; a preempted one only comes back by being created again.
ensure_slice() {
  local state
  state=$(tpu describe "$TPU_NAME" --format='value(state)' 2>/dev/null) || state=""
  case $state in
    "") create_slice ;;
    READY) say "reusing $TPU_NAME in $ZONE" ;;
    PREEMPTED | TERMINATED)
      say "$TPU_NAME is $state: deleting it and creating it again"
      tpu delete "$TPU_NAME" --quiet
      create_slice
      ;;
    *) die "$TPU_NAME is $state; run this again once it is READY" ;;
  esac
}

# Tracked files (as they are on disk, edits included) and untracked files git
# does not ignore; tracked files deleted from the disk are left out.
pack_tree() {
  local root=$1 archive=$2 path
  (
    cd "$root"
    git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' path; do
      if [[ -e $path || -L $path ]]; then printf '%s\0' "$path"; fi
    done | tar --null --no-recursion -T - -czf "$archive"
  )
}

describe_tree() {
  local root=$1 commit changes
  commit=$(git -C "$root" rev-parse HEAD)
  changes=$(git -C "$root" status --porcelain --untracked-files=normal | wc -l | tr -d ' ')
  if [[ $changes == 0 ]]; then
    say "shipping commit $commit, working tree clean"
  else
    say "shipping commit $commit, working tree dirty ($changes uncommitted paths, shipped as they are)"
  fi
}

# What every worker runs before the job: replace the tree (keeping .venv, so
# files deleted here go away there), make the environment once, and install
# again only when setup.py (the dependencies) changed.
remote_setup() {
  local dir=$1 setup_hash=$2
  cat <<EOF
set -eu
dir=$(shell_quote "$dir")
case \$dir in /*) ;; *) dir="\$HOME/\$dir" ;; esac
mkdir -p "\$dir"
find "\$dir" -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +
tar -xzf ~/maejax.tar.gz -C "\$dir"
export PATH="\$HOME/.local/bin:\$PATH"
# TPU VM images ship an older python3 than maejax needs; uv brings its own.
if ! command -v uv >/dev/null 2>&1; then
  python3 -m pip install -q --user uv 2>/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh
fi
[ -x "\$dir/.venv/bin/python" ] || uv venv -q --python $(shell_quote "${MAEJAX_PYTHON:-3.11}") "\$dir/.venv"
stamp="\$dir/.venv/.maejax-tpu-installed"
if [ "\$(cat "\$stamp" 2>/dev/null)" != $(shell_quote "$setup_hash") ]; then
  uv pip install -q --python "\$dir/.venv/bin/python" -e "\$dir[tpu]"
  echo $(shell_quote "$setup_hash") > "\$stamp"
fi
EOF
}

remote_run() {
  local dir=$1
  shift
  local setup="" arg quoted=""
  [[ -n ${WORKER_SETUP:-} ]] && setup="$WORKER_SETUP && "
  for arg in "$@"; do quoted+=" $(shell_quote "$arg")"; done
  printf '%scd %s && exec .venv/bin/python -m maejax.main%s' "$setup" "$(shell_quote "$dir")" "$quoted"
}

main() {
  check_arguments "$@"
  command -v gcloud >/dev/null || die "gcloud is not on PATH (https://cloud.google.com/sdk/docs/install)"
  local root dir tmp
  root=$(cd "$(dirname "$0")/.." && pwd)
  git -C "$root" rev-parse --git-dir >/dev/null 2>&1 || die "$root is not a git checkout: cannot tell which files to ship"
  dir=${REMOTE_DIR:-maejax}

  tmp=$(mktemp -d)
  trap "rm -rf $(shell_quote "$tmp")" EXIT
  pack_tree "$root" "$tmp/maejax.tar.gz"
  describe_tree "$root"
  ensure_slice
  tpu scp "$tmp/maejax.tar.gz" "$TPU_NAME:maejax.tar.gz" --worker=all
  tpu ssh "$TPU_NAME" --worker=all --command="bash -c $(shell_quote "$(remote_setup "$dir" "$(git -C "$root" hash-object setup.py)")")"
  say "starting on every worker of $TPU_NAME: python -m maejax.main $*"
  tpu ssh "$TPU_NAME" --worker=all --command="$(remote_run "$dir" "$@")"
}

main "$@"
