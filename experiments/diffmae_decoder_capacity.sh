#!/usr/bin/env bash
# Does a bigger DiffMAE decoder denoise better at the small t that decide a sample's detail?
#
#   bash experiments/diffmae_decoder_capacity.sh   # ~45 min on 2 CPU cores
#   STEPS=14063 DECODERS=w128d4 bash experiments/diffmae_decoder_capacity.sh
#       # 60 epochs, the wide decoder only (~1 h 25 min): experiments/results/table_long/capacity60_e40702c
#   STEPS=23438 DECODERS=w128d4 bash experiments/diffmae_decoder_capacity.sh
#       # the long budget's length, the wide decoder only (~2 h 15 min): the 64-wide
#       # one at that length is `LOSS=v bash experiments/diffmae_v_prediction.sh pretrain`
#
# The long budget's DiffMAE, v-predicting with the v loss (as
# `LOSS=v bash experiments/diffmae_v_prediction.sh pretrain`), trained for STEPS
# steps (default 4,688: 20 epochs) twice: with its 64-wide 2-block decoder
# (mlp 256) and with a 128-wide 4-block one (mlp 512, the encoder's width);
# DECODERS (default "w64d2 w128d4") picks which.
# Then experiments/denoiser_profile.py measures both x0 estimates against t
# beside the 100-epoch v-loss model, if present. Equal steps, so the profile
# compares what each decoder learns in the same training, not converged models.
#   workdirs/table_long/capacity_w64d2_s$STEPS, capacity_w128d4_s$STEPS, capacity_profile_s$STEPS
# Runs resume from their last checkpoint; a finished one is re-checked in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
table=workdirs/table_long
steps="${STEPS:-4688}"
pretrain() {  # workdir, then decoder overrides
    local workdir="$1"
    shift
    "$python" -m maejax.main --config=configs/diffmae_fmnist.py --workdir="$workdir" \
        --config.model.diffusion.prediction=v --config.model.diffusion.loss=v \
        --config.total_steps="$steps" --config.checkpoint_every_steps=1000 "$@"
}
declare -A decoder_overrides=(
    [w64d2]=""
    [w128d4]="--config.model.decoder.width=128 --config.model.decoder.depth=4 --config.model.decoder.mlp_dim=512"
)
profiled=()
for decoder in ${DECODERS:-w64d2 w128d4}; do
    [ -v "decoder_overrides[$decoder]" ] || { echo "DECODERS: unknown '$decoder'; valid: w64d2 w128d4" >&2; exit 2; }
    # shellcheck disable=SC2086  # the overrides are separate words
    pretrain "$table/capacity_${decoder}_s$steps" ${decoder_overrides[$decoder]}
    profiled+=(--diffmae="$table/capacity_${decoder}_s$steps")
done
[ -f "$table/diffmae_v_vloss/config.json" ] && profiled+=(--diffmae="$table/diffmae_v_vloss")
"$python" experiments/denoiser_profile.py "${profiled[@]}" --out="$table/capacity_profile_s$steps"
