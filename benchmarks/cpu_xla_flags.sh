#!/usr/bin/env bash
# Does an XLA CPU flag speed up maejax's pre-training step on this machine? One run of
# benchmarks/train_step.py per flag set (maejax only, ViT-B/16 batch 8 float32, 3 rounds),
# so the ms/step lines compare directly. Run it on a quiet machine.
#
#   bash benchmarks/cpu_xla_flags.sh | tee benchmarks/results/cpu_xla_flags.txt
set -uo pipefail # no -e: a flag this jaxlib rejects must not lose the other rows
cd "$(dirname "$0")/.."
py="${PYTHON:-.venv/bin/python}"
for flags in "" \
    "--xla_cpu_use_thunk_runtime=false" \
    "--xla_cpu_experimental_xnn_fusion_type=dot" \
    "--xla_cpu_enable_concurrency_optimized_scheduler=true" \
    "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY" \
    "--xla_cpu_use_onednn=true" \
    "--xla_cpu_experimental_onednn_custom_call=true" \
    "--xla_cpu_experimental_onednn_fusion_type=dot" \
    "--xla_cpu_experimental_ynn_fusion_type=dot" \
    "--xla_cpu_prefer_vector_width=512"; do
    echo "== XLA_FLAGS=[$flags]"
    XLA_FLAGS="$flags" timeout 300 "$py" benchmarks/train_step.py --reference=none --rounds=3 --steps=1 2>&1 |
        grep -E "maejax MAE|compile|rror" | head -3
done
