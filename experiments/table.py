"""Collect the Fashion-MNIST downstream table and plot its training curves.

    python experiments/table.py --table_dir=workdirs/table --plot=docs/fmnist_curves.png

Reads metrics.jsonl of finetune_<start> and linprobe_<start> workdirs
(start: random, mae, diffmae) and pixel_logreg.json; prints a Markdown table
of the final eval top-1 (and the probe's kNN top-1) and saves a PNG with
training loss and eval top-1 against steps.
"""

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STARTS = {"random": "random init", "mae": "MAE", "diffmae": "DiffMAE"}


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def final(rows, key):
    values = [r[key] for r in rows if key in r]
    return values[-1] if values else None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--table_dir", required=True)
    parser.add_argument("--plot", required=True)
    args = parser.parse_args()
    runs = {}
    for task in ("finetune", "linprobe"):
        for start in STARTS:
            path = os.path.join(args.table_dir, f"{task}_{start}", "metrics.jsonl")
            if os.path.exists(path):
                runs[task, start] = read(path)
    fmt = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    print("| encoder | fine-tune top-1 | linear probe top-1 | kNN top-1 |")
    print("|---|---|---|---|")
    for start, label in STARTS.items():
        ft, lp = runs.get(("finetune", start), []), runs.get(("linprobe", start), [])
        cells = [fmt(final(ft, "eval_top1")), fmt(final(lp, "eval_top1")), fmt(final(lp, "knn_top1"))]
        print(f"| {label} | " + " | ".join(cells) + " |")
    logreg = os.path.join(args.table_dir, "pixel_logreg.json")
    if os.path.exists(logreg):
        with open(logreg) as f:
            print(f"| raw pixels, logistic regression | - | {fmt(json.load(f)['eval_top1'])} | - |")

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for col, task in enumerate(("finetune", "linprobe")):
        for start, label in STARTS.items():
            rows = runs.get((task, start))
            if not rows:
                continue
            train = [r for r in rows if "loss" in r]
            evals = [r for r in rows if "eval_top1" in r]
            axes[0, col].plot([r["step"] for r in train], [r["loss"] for r in train], label=label)
            axes[1, col].plot(
                [r["step"] for r in evals], [100 * r["eval_top1"] for r in evals], "o-", label=label
            )
        name = "fine-tuning" if task == "finetune" else "linear probing"
        axes[0, col].set(title=f"{name}: training loss", xlabel="step")
        axes[1, col].set(title=f"{name}: test top-1 (%)", xlabel="step")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
    fig.savefig(args.plot, dpi=90)
    print(f"saved {args.plot}")


if __name__ == "__main__":
    main()
