#!/usr/bin/env bash
# One question of the long budget: does 30-epoch fine-tuning want regularisation back?
#
#   bash experiments/long_finetune_regularised.sh mae            # from workdirs/table_long/mae
#   bash experiments/long_finetune_regularised.sh random         # the same recipe from random init
#   bash experiments/long_finetune_regularised.sh mae mild       # the milder recipe below
#
# `finetune_fmnist` (whole images, flips only, no regularisation, no layer decay) won
# the 150-step sweep, but over the long budget's 30 epochs it memorises the training
# split (loss 0.004 by the end). This runs the long budget's fine-tuning (the same
# command as `fmnist_table.py --budget=long` runs for finetune_<START>) with on-device
# regularisers turned back on:
#   strong (default): RandomResizedCrop over 50-100 % of the area, label smoothing 0.1,
#                     drop path 0.1;
#   mild:             RandomResizedCrop over 80-100 %, label smoothing 0.1, drop path
#                     0.1, and the official recipe's layer-wise lr decay (0.75, as for
#                     ViT-L/H), which keeps the pre-trained lower blocks closer to MAE's.
# (Random erasing, RandAugment, mixup and cutmix run on the host pipeline only,
# several times slower on this 2-core machine.) The workdir is
# workdirs/table_long/finetune_<START>_<RECIPE>; it resumes when run again.
set -euo pipefail
start="${1:?usage: $0 mae|random [strong|mild]}"
recipe="${2:-strong}"
cd "$(dirname "$0")/.."
table=workdirs/table_long
init="$table/$start"
[ "$start" = random ] && init=random
case "$recipe" in
    strong) extra=(--config.finetune.crop_scale="(0.5, 1.0)") ;;
    mild) extra=(--config.finetune.crop_scale="(0.8, 1.0)" --config.optimizer.layer_decay=0.75) ;;
    *) echo "recipe must be strong or mild, got '$recipe'" >&2; exit 2 ;;
esac
workdir="$table/finetune_${start}_regularised"
[ "$recipe" = mild ] && workdir="$table/finetune_${start}_mild"
exec "${PYTHON:-.venv/bin/python}" -m maejax.main --config=configs/finetune_fmnist.py \
    --workdir="$workdir" --config.init_from="$init" \
    --config.total_steps=7032 --config.eval_every_steps=703 --config.checkpoint_every_steps=1000 \
    --config.finetune.label_smoothing=0.1 --config.model.drop_path=0.1 "${extra[@]}"
