#!/usr/bin/env bash
# The GPU rows of the README's speed table in one go: MAE ViT-B/16 and ViT-L/16 and DiffMAE
# ViT-L/16 at batch 256, bfloat16, each maejax step beside the HF reference eager and under
# torch.compile, on the same GPU (benchmarks/train_step.py). About 7 minutes on an H200, mostly
# compiling (a maejax ViT-L step ~50 s, torch.compile of the HF ViT-L ~105 s); each command has
# its own time limit so a hang cannot take the rest with it. Then, last, the host's input
# pipeline (benchmarks/input_pipeline.py: JPEG decode + crop, threads against worker processes)
# pinned to 1 ... 16 cores, about 3 minutes: whether the host could feed the GPU.
#
#   bash benchmarks/gpu_speed.sh           # on the GPU machine; output under $OUT (else benchmarks/out)
#   bash benchmarks/gpu_speed.sh --tiny    # the same commands at tiny sizes: checks the script on CPU
#
# Needs jax (CUDA), flax, optax, torch and transformers; not ml_collections or TensorFlow.
set -uo pipefail # no -e: one failing command must not lose the other rows
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/out}"
mkdir -p "$out"
py="${PYTHON:-python}" # e.g. PYTHON=.venv/bin/python
log="$out/gpu_speed.txt"
b_models=mae:xla,mae:cudnn
l_models=mae:xla,mae:cudnn,diffmae:cudnn
extra=(--warmup=3 --steps=20)
cores=$(nproc)
input=(--cores $(printf '%s\n' 1 2 4 8 16 | awk -v n="$cores" '$1 <= n') --repeats=1 --no_grain)
if [[ "${1:-}" == "--tiny" ]]; then
  b_models=mae:xla # cuDNN exists only on NVIDIA GPUs
  l_models=mae:xla,diffmae:xla
  extra=(--tiny --warmup=1 --steps=1 --dtype=bfloat16 --reference=both --compile_backend=eager)
  input=(--cores 1 --repeats=1 --no_grain --images=8 --classes=2 --batch_size=4 --batches=1)
fi

{
  date -u
  git rev-parse HEAD 2>/dev/null && git status --short 2>/dev/null | head -20
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null
} >"$log" 2>&1

row() { # row NAME SECONDS ARGS...: one benchmark command, stdout to the log, stderr to its own file
  local name=$1 limit=$2
  shift 2
  echo "== $name: train_step.py $* ${extra[*]}" | tee -a "$log"
  timeout "$limit" "$py" benchmarks/train_step.py "$@" "${extra[@]}" 2>"$out/$name.stderr" | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  [[ $rc == 0 ]] || echo "== $name: exit $rc (124: over its ${limit} s limit); see $out/$name.stderr" | tee -a "$log"
}

row vit_b16 170 --variant=B/16 --batch=256 --models=$b_models
row vit_l16 310 --variant=L/16 --batch=256 --models=$l_models
echo "== input: input_pipeline.py ${input[*]} ($cores cores here)" | tee -a "$log"
timeout 240 "$py" benchmarks/input_pipeline.py "${input[@]}" 2>"$out/input.stderr" | tee -a "$log"
[[ ${PIPESTATUS[0]} == 0 ]] || echo "== input: failed or over 240 s; see $out/input.stderr" | tee -a "$log"
echo "== done; output in $log"
