#!/usr/bin/env bash
# The small-scale analogue of the MAE paper's Table 3 on Fashion-MNIST (CPU, about 75 minutes).
# Not part of the tests. Writes workdirs/table/*, docs/fmnist_curves.png and prints the table.
#
#   experiments/fmnist_table.sh            # from the repository root, after `make demo`
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
out=workdirs/table
run() { "$py" -m maejax.main "$@" 2>&1 | grep -v -e '^W' -e '^I0000' -e 'WARNING' || true; }

# Pre-training: MAE (the demo) and DiffMAE, 400 steps of batch 256 each.
[ -d workdirs/mae_fmnist/checkpoints ] || run --config=configs/mae_fmnist.py --workdir=workdirs/mae_fmnist
run --config=configs/diffmae_fmnist.py --workdir=workdirs/diffmae_fmnist

# Fine-tuning and linear probing, 470 steps of batch 256 (2 epochs) each, same recipe for every start.
for start in random:workdirs/random mae:workdirs/mae_fmnist diffmae:workdirs/diffmae_fmnist; do
  name=${start%%:*}; dir=${start#*:}
  init=$([ "$name" = random ] && echo random || echo "$dir")
  run --config=configs/finetune_fmnist.py --workdir=$out/finetune_$name --config.init_from=$init --config.eval_every_steps=94
  run --config=configs/linprobe_fmnist.py --workdir=$out/linprobe_$name --config.init_from=$init --config.eval_every_steps=94
done

# The floor: logistic regression on raw pixels, and the table with its curves.
"$py" experiments/pixel_logreg.py --out=$out/pixel_logreg.json
"$py" experiments/table.py --table_dir=$out --plot=docs/fmnist_curves.png
