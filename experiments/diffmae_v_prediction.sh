#!/usr/bin/env bash
# The long budget's DiffMAE with a v-predicting decoder: pre-training, inpainting, fine-tuning, probing.
#
#   bash experiments/diffmae_v_prediction.sh            # every stage in turn (~2 h 15 min on 2 CPU cores)
#   bash experiments/diffmae_v_prediction.sh STAGE...   # pretrain | inpainting | finetune | linprobe
#   LOSS=v bash experiments/diffmae_v_prediction.sh STAGE...   # the same with the v loss
#
# The long table's DiffMAE (configs/diffmae_fmnist.py, x0-prediction as in the
# DiffMAE paper) inpaints blurry samples: given its masked patches at t = 0,
# nearly clean, its 64-wide 2-block decoder's x0 prediction keeps 0.41 of their
# Laplacian energy (PSNR 23.9 dB), so every sampler ends on a smoothed estimate.
# With model.diffusion.prediction=v the decoder outputs v and the x0 estimate is
# sqrt(abar_t) x_t - sqrt(1 - abar_t) v: a nearly clean input passes through.
# Everything else is fmnist_table.py --budget=long's: the same data, encoder,
# decoder, schedule, loss (x0 MSE) and 23,438 pre-training steps (100 epochs);
# fine-tuning with configs/finetune_fmnist_long.py (7,032 steps), probing with
# configs/linprobe_fmnist.py (2,344 steps, kNN over the whole splits).
# LOSS=v adds model.diffusion.loss=v (the MSE of v, which weighs small t up to
# 1e4 times more than the x0 MSE) and runs in the *_v_vloss workdirs.
#   pretrain    ~75 min  workdirs/table_long/diffmae_v (or diffmae_v_vloss)
#   inpainting   ~3 min  workdirs/table_long/inpainting_v (the inpainting table, against
#                        workdirs/table_long/mae) and workdirs/table_long/denoiser_profile
#                        (every long-budget DiffMAE's x0 estimates against t)
#   finetune    ~47 min  workdirs/table_long/finetune_diffmae_v
#   linprobe     ~8 min  workdirs/table_long/linprobe_diffmae_v, then the kNN pools
#                        (experiments/knn_pool.py) in workdirs/table_long/knn_pool_v
# Runs resume from their last checkpoint; a finished one is re-checked in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
table=workdirs/table_long
case "${LOSS:-x0}" in
    x0) run=v extra=() ;;
    v) run=v_vloss extra=(--config.model.diffusion.loss=v) ;;
    *) echo "LOSS must be x0 or v, got '$LOSS'" >&2; exit 2 ;;
esac
main() { "$python" -m maejax.main "$@"; }
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(pretrain inpainting finetune linprobe)
for stage in "${stages[@]}"; do
    case "$stage" in
        pretrain)
            main --config=configs/diffmae_fmnist.py --workdir="$table/diffmae_$run" \
                --config.model.diffusion.prediction=v --config.total_steps=23438 \
                --config.checkpoint_every_steps=1000 ${extra[@]+"${extra[@]}"} ;;
        inpainting)
            "$python" experiments/inpainting_table.py --diffmae="$table/diffmae_$run" --mae="$table/mae" \
                --out="$table/inpainting_$run"
            profiled=()
            for name in diffmae diffmae_v diffmae_v_vloss; do
                [ -f "$table/$name/config.json" ] && profiled+=(--diffmae="$table/$name")
            done
            "$python" experiments/denoiser_profile.py "${profiled[@]}" --out="$table/denoiser_profile" ;;
        finetune)
            main --config=configs/finetune_fmnist_long.py --workdir="$table/finetune_diffmae_$run" \
                --config.init_from="$table/diffmae_$run" --config.total_steps=7032 \
                --config.eval_every_steps=703 --config.checkpoint_every_steps=1000 ;;
        linprobe)
            main --config=configs/linprobe_fmnist.py --workdir="$table/linprobe_diffmae_$run" \
                --config.init_from="$table/diffmae_$run" --config.total_steps=2344 \
                --config.eval_every_steps=234 --config.checkpoint_every_steps=586 \
                --config.knn.num_train=60000 --config.knn.num_eval=10000
            "$python" experiments/knn_pool.py --encoder="$table/diffmae_$run" --out="$table/knn_pool_$run" ;;
        *) echo "unknown stage '$stage': pretrain, inpainting, finetune or linprobe" >&2; exit 2 ;;
    esac
done
