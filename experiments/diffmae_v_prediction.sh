#!/usr/bin/env bash
# The long budget's DiffMAE pre-training with a v-predicting decoder, and its inpainting table.
#
#   bash experiments/diffmae_v_prediction.sh    # ~75 min pre-training + ~2 min table on 2 CPU cores
#
# The long table's DiffMAE (configs/diffmae_fmnist.py, x0-prediction as in the
# DiffMAE paper) inpaints blurry samples: given its masked patches at t = 0,
# nearly clean, its 64-wide 2-block decoder's x0 prediction keeps 0.41 of their
# Laplacian energy (PSNR 23.9 dB), so every sampler ends on a smoothed estimate.
# With model.diffusion.prediction=v the decoder outputs v and the x0 estimate is
# sqrt(abar_t) x_t - sqrt(1 - abar_t) v: a nearly clean input passes through.
# Same data, encoder, decoder, schedule, loss (x0 MSE) and 23,438 steps (100
# epochs) as fmnist_table.py --budget=long's `diffmae` run; the table compares it
# with the same MAE (workdirs/table_long/mae) on the same images, masks and key.
# Workdir workdirs/table_long/diffmae_v (resumes when run again), table in
# workdirs/table_long/inpainting_v.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
table=workdirs/table_long
"$python" -m maejax.main --config=configs/diffmae_fmnist.py --workdir="$table/diffmae_v" \
    --config.model.diffusion.prediction=v --config.total_steps=23438 --config.checkpoint_every_steps=1000
"$python" experiments/inpainting_table.py --diffmae="$table/diffmae_v" --mae="$table/mae" \
    --out="$table/inpainting_v"
