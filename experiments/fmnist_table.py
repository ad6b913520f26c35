"""The Fashion-MNIST table: scratch vs MAE vs DiffMAE at one budget, every row scripted.

    python experiments/fmnist_table.py --budget=cpu      # about 45 minutes on 2 CPU cores
    python experiments/fmnist_table.py --budget=long     # 100 pre-training epochs, 30 fine-tuning
    python experiments/fmnist_table.py --budget=quick    # the quick check (MAE and scratch)
    python experiments/fmnist_table.py --budget=cpu --dry_run   # print the commands only
    python experiments/fmnist_table.py --budget=long --runs=mae,linprobe_mae   # part of a budget
    python experiments/fmnist_table.py --budget=long --report   # table the runs as they are, run nothing

A part of a budget (`--runs`, which may also name `pixel_logreg`, the raw-pixel floors)
writes partial.json, partial.md and partial_curves.png instead: the cells and curves
whose runs exist, each cell with the steps it had out of the budget's. `--report`
writes them from the workdirs as they are without running anything, for runs stopped
part-way.

Runs, with the recipes in configs/ and only the budget's step counts changed
(the recipes keep the training split on the device: dataset.on_device):
pre-training (`mae_fmnist`, `diffmae_fmnist`), then from each start (random
init, MAE, DiffMAE) fine-tuning (`finetune_fmnist`; the long budget's 30 epochs
run `finetune_fmnist_long`, which turns mild regularisation on) and linear probing
(`linprobe_fmnist`, which also logs the kNN top-1 of the frozen features), the
logistic regression on raw pixels (the floor), the inpainting table
(experiments/inpainting_table.py) and the curves. Writes, under OUT
(default workdirs/table_<budget>):

  <run>/            each run's workdir (metrics.jsonl, checkpoints)
  results.json      every number of the table, the budget and the commit it ran at
  table.md          the Markdown table the README quotes
  curves.png        pre-training loss, fine-tuning / probing loss and test top-1 against steps
  inpainting/       the inpainting table (table.md) and one metrics file per setting

A run that fails stops the script with its command and stderr (no silent gaps).
Runs resume: a finished run's workdir is reused, an interrupted one continues
from its last checkpoint (maejax resumes exactly).
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = os.environ.get("PYTHON", sys.executable)
STEPS_PER_EPOCH = 60000 / 256  # Fashion-MNIST's training split at batch 256

# Step counts per budget; `evals`: test-set evaluations along each fine-tuning / probing
# curve; `starts`: the encoders fine-tuned and probed; `knn`: the kNN column's (training
# bank, test queries) sizes. The long budget takes the whole of both splits (the usual
# protocol); the short ones keep the monitor's subsets, which is what their tables ran.
# `<task>_config`: a recipe other than configs/<task>_fmnist.py (the short-run one).
BUDGETS = {
    "quick": dict(
        pretrain=100,
        finetune=150,
        linprobe=150,
        evals=1,
        starts=("random", "mae"),
        diffmae=False,
        inpainting=False,
    ),
    "cpu": dict(pretrain=2000, finetune=700, linprobe=300, evals=4, starts=("random", "mae", "diffmae")),
    "long": dict(
        pretrain=math.ceil(100 * STEPS_PER_EPOCH),
        finetune=math.ceil(30 * STEPS_PER_EPOCH),
        linprobe=math.ceil(10 * STEPS_PER_EPOCH),
        evals=10,
        starts=("random", "mae", "diffmae"),
        knn=(60000, 10000),
        finetune_config="configs/finetune_fmnist_long.py",  # regularised for 30 epochs
    ),
}
KNN_SUBSETS = (10000, 2000)  # maejax's kNN monitor defaults (config.knn.num_train / num_eval)
LABELS = {"random": "scratch (random init)", "mae": "MAE", "diffmae": "DiffMAE"}
PRETRAIN_CONFIGS = {"mae": "configs/mae_fmnist.py", "diffmae": "configs/diffmae_fmnist.py"}


def commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "maejax", "configs"], cwd=REPO, capture_output=True, text=True
    )
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def plan(budget: dict, out: str) -> list:
    """[(name, command)] of every maejax run this budget needs, in order."""
    runs = []
    pretrained = ["mae"] + (["diffmae"] if budget.get("diffmae", True) else [])
    for name in pretrained:
        fields = {
            "total_steps": budget["pretrain"],
            "checkpoint_every_steps": checkpoint_every(budget["pretrain"]),
        }
        runs.append((name, main_command(PRETRAIN_CONFIGS[name], os.path.join(out, name), fields)))
    for task in ("finetune", "linprobe"):
        steps = budget[task]
        for start in budget["starts"]:
            init = "random" if start == "random" else os.path.join(out, start)
            fields = {
                "init_from": init,
                "total_steps": steps,
                "eval_every_steps": max(steps // budget["evals"], 1),
                "checkpoint_every_steps": checkpoint_every(steps),
            }
            if task == "linprobe" and "knn" in budget:
                fields["knn.num_train"], fields["knn.num_eval"] = budget["knn"]
            name = f"{task}_{start}"
            runs.append((name, main_command(recipe(budget, task), os.path.join(out, name), fields)))
    return runs


def recipe(budget: dict, task: str) -> str:
    """The config file a budget's fine-tuning or probing runs."""
    return budget.get(f"{task}_config", f"configs/{task}_fmnist.py")


def pixel_floors(budget: dict, out: str) -> tuple:
    """(name, command) of the raw-pixel floors, their kNN on the same sets as the encoders'."""
    bank, queries = budget.get("knn", KNN_SUBSETS)
    command = [PYTHON, "experiments/pixel_logreg.py", f"--out={os.path.join(out, 'pixel_logreg.json')}"]
    return "pixel_logreg", command + [f"--knn_train={bank}", f"--knn_eval={queries}"]


def select(runs: list, names: str) -> list:
    """The named runs of a plan, in the order named; an unknown name is an error naming the valid ones."""
    by_name = dict(runs)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in by_name]
    if unknown or not wanted:
        sys.exit(f"--runs={names!r}: unknown run(s) {unknown}; valid: {', '.join(by_name)}")
    return [(n, by_name[n]) for n in wanted]


def checkpoint_every(steps: int) -> int:
    """A quarter of a short run; at most 1,000 steps lost to a preemption of a long one."""
    return min(max(steps // 4, 50), 1000)


def main_command(config: str, workdir: str, fields: dict) -> list:
    command = [PYTHON, "-m", "maejax.main", f"--config={config}", f"--workdir={workdir}"]
    return command + [f"--config.{k}={v}" for k, v in fields.items()]


def run(name: str, command: list, out: str) -> None:
    """Run one step of the table; its wall time adds up in OUT/seconds.json across resumed invocations."""
    started = time.time()
    log = os.path.join(out, "logs", f"{name}.log")
    with open(log, "a") as f:
        result = subprocess.run(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        sys.exit(f"{name} failed (exit {result.returncode}): {' '.join(command)}\n{tail}")
    seconds = read_json(os.path.join(out, "seconds.json"), {})
    seconds[name] = seconds.get(name, 0) + round(time.time() - started)
    write_json(os.path.join(out, "seconds.json"), seconds)
    print(f"{name:20s} done in {time.time() - started:6.0f} s", flush=True)


def read_json(path: str, default=None):
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def write_json(path: str, value) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=1)


def read_metrics(workdir: str) -> list:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def last(rows: list, key: str):
    values = [r[key] for r in rows if key in r]
    return values[-1] if values else None


def collect(budget: dict, out: str) -> dict:
    """The table's numbers from the runs' metrics files; a missing number is an error."""
    rows = {}
    for start in budget["starts"]:
        finetune = read_metrics(os.path.join(out, f"finetune_{start}"))
        probe = read_metrics(os.path.join(out, f"linprobe_{start}"))
        row = {
            "finetune_top1": last(finetune, "eval_top1"),
            "linprobe_top1": last(probe, "eval_top1"),
            "knn_top1": last(probe, "knn_top1"),
        }
        missing = [k for k, v in row.items() if v is None]
        if missing:
            sys.exit(f"{start}: the runs logged no {missing} (see {out}/*_{start}/metrics.jsonl)")
        rows[start] = row
    floor = read_json(os.path.join(out, "pixel_logreg.json"))
    return {"rows": rows, "pixel_logreg_top1": floor["eval_top1"], "pixel_logreg": floor}


def markdown(results: dict) -> str:
    b = results["budget"]
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    lines = [
        f"Budget `{results['budget_name']}`: pre-training {b['pretrain']} steps "
        f"({b['pretrain'] / STEPS_PER_EPOCH:.1f} epochs), fine-tuning {b['finetune']} steps "
        f"({b['finetune'] / STEPS_PER_EPOCH:.1f} epochs, `{recipe(b, 'finetune')}`), "
        f"linear probe {b['linprobe']} steps (`{recipe(b, 'linprobe')}`), batch 256; "
        f"commit {results['commit']}, {results['minutes']:.0f} min of runs on this machine. "
        + knn_sentence(b),
        "",
        "| encoder | fine-tune top-1 | linear-probe top-1 | kNN top-1 |",
        "|---|---|---|---|",
    ]
    for start, row in results["rows"].items():
        cells = [pct(row["finetune_top1"]), pct(row["linprobe_top1"]), pct(row["knn_top1"])]
        lines.append(f"| {LABELS[start]} | " + " | ".join(cells) + " |")
    lines.append(pixel_row(results["pixel_logreg"]))
    return "\n".join(lines) + "\n"


def pixel_row(floor: dict) -> str:
    """The raw-pixel floors' row: logistic regression under the probe, kNN (when measured) under kNN."""
    knn = f"{100 * floor['knn_top1']:.1f}" if "knn_top1" in floor else "-"
    return f"| raw pixels, logistic regression / kNN | - | {100 * floor['eval_top1']:.1f} | {knn} |"


def knn_sentence(budget: dict) -> str:
    bank, queries = budget.get("knn", KNN_SUBSETS)
    return f"kNN: k = 20 on the frozen encoder's cls features, {bank:,} training / {queries:,} test images."


def partial(budget: dict, out: str) -> dict:
    """The cells whose runs have metrics, each with the step of its number and the budget's steps."""

    def cell(run_name: str, key: str, steps: int):
        workdir = os.path.join(out, run_name)
        ran = os.path.exists(os.path.join(workdir, "metrics.jsonl"))
        rows = [r for r in read_metrics(workdir) if key in r] if ran else []
        return {"value": rows[-1][key], "step": rows[-1]["step"], "of": steps} if rows else None

    pretraining = {name: cell(name, "loss", budget["pretrain"]) for name in PRETRAIN_CONFIGS}
    rows = {
        start: {
            "finetune_top1": cell(f"finetune_{start}", "eval_top1", budget["finetune"]),
            "linprobe_top1": cell(f"linprobe_{start}", "eval_top1", budget["linprobe"]),
            "knn_top1": cell(f"linprobe_{start}", "knn_top1", budget["linprobe"]),
        }
        for start in budget["starts"]
    }
    return {
        "pretraining": pretraining,
        "rows": rows,
        "pixel_logreg": read_json(os.path.join(out, "pixel_logreg.json")),
    }


def partial_markdown(results: dict) -> str:
    b = results["budget"]

    def show(c):
        return "not run" if c is None else f"{100 * c['value']:.1f} (step {c['step']:,} of {c['of']:,})"

    trained = [
        f"{LABELS[name]} pre-trained {c['step']:,} of {c['of']:,} steps (loss {c['value']:.4f})"
        for name, c in results["pretraining"].items()
        if c is not None
    ]
    lines = [
        f"Part of budget `{results['budget_name']}` (pre-training {b['pretrain']:,} steps, fine-tuning "
        f"{b['finetune']:,}, linear probe {b['linprobe']:,}, batch 256), commit {results['commit']}: "
        + ("; ".join(trained) or "no pre-training")
        + ". Each cell: test top-1 (%) at the step it was measured, of the run's scheduled steps. "
        + knn_sentence(b),
        "",
        "| encoder | fine-tune top-1 | linear-probe top-1 | kNN top-1 |",
        "|---|---|---|---|",
    ]
    for start, row in results["rows"].items():
        lines.append(f"| {LABELS[start]} | " + " | ".join(show(row[k]) for k in KEYS) + " |")
    if results.get("pixel_logreg"):
        lines.append(pixel_row(results["pixel_logreg"]))
    return "\n".join(lines) + "\n"


KEYS = ("finetune_top1", "linprobe_top1", "knn_top1")


def write_partial(budget_name: str, out: str, at: str) -> None:
    """OUT/partial.json and partial.md: the budget's cells that have runs, each at the step it reached."""
    budget = BUDGETS[budget_name]
    results = {"budget_name": budget_name, "budget": {k: v for k, v in budget.items() if k != "starts"}}
    results.update(partial(budget, out), commit=at, seconds=read_json(os.path.join(out, "seconds.json")))
    write_json(os.path.join(out, "partial.json"), results)
    with open(os.path.join(out, "partial.md"), "w") as f:
        f.write(partial_markdown(results))
    plot(budget, out, os.path.join(out, "partial_curves.png"))
    print(partial_markdown(results))


def plot(budget: dict, out: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 5, figsize=(22, 4))
    for name in PRETRAIN_CONFIGS:
        if os.path.exists(os.path.join(out, name, "metrics.jsonl")):
            rows = [r for r in read_metrics(os.path.join(out, name)) if "loss" in r]
            axes[0].plot([r["step"] for r in rows], [r["loss"] for r in rows], label=LABELS[name])
    axes[0].set(title="pre-training loss", xlabel="step", yscale="log")
    for col, (task, title) in enumerate((("finetune", "fine-tuning"), ("linprobe", "linear probe")), start=1):
        for start in budget["starts"]:
            workdir = os.path.join(out, f"{task}_{start}")
            if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
                continue  # part of a budget: a run not started yet has no curve
            rows = read_metrics(workdir)
            train = [r for r in rows if "loss" in r]
            evals = [r for r in rows if "eval_top1" in r]
            axes[col].plot([r["step"] for r in train], [r["loss"] for r in train], label=LABELS[start])
            axes[col + 2].plot(
                [r["step"] for r in evals], [100 * r["eval_top1"] for r in evals], "o-", label=LABELS[start]
            )
        axes[col].set(title=f"{title}: training loss", xlabel="step")
        axes[col + 2].set(title=f"{title}: test top-1 (%)", xlabel="step")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a panel of a partial budget may have no curve yet
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", choices=sorted(BUDGETS), required=True)
    parser.add_argument("--out", help="default: workdirs/table_<budget>")
    parser.add_argument("--dry_run", action="store_true", help="print the commands and stop")
    parser.add_argument("--runs", help="comma-separated run names (see --dry_run): only these, in this order")
    parser.add_argument(
        "--report",
        action="store_true",
        help="write partial.json / partial.md from the workdirs as they are and run nothing "
        "(a run stopped part-way counts to its last evaluation)",
    )
    args = parser.parse_args()
    budget = BUDGETS[args.budget]
    out = os.path.abspath(args.out or os.path.join(REPO, "workdirs", f"table_{args.budget}"))
    runs = plan(budget, out)
    if args.runs:
        runs = select(runs + [pixel_floors(budget, out)], args.runs)
    if args.dry_run:
        for name, command in runs:
            print(f"{name}: {' '.join(command)}")
        return
    if args.report:
        write_partial(args.budget, out, commit())
        return
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    at = commit()
    for name, command in runs:
        run(name, command, out)
    if args.runs:
        write_partial(args.budget, out, at)
        return
    run(*pixel_floors(budget, out), out)
    if budget.get("inpainting", True):
        inpainting = [PYTHON, "experiments/inpainting_table.py", f"--diffmae={os.path.join(out, 'diffmae')}"]
        inpainting += [f"--mae={os.path.join(out, 'mae')}", f"--out={os.path.join(out, 'inpainting')}"]
        run("inpainting", inpainting, out)

    results = {"budget_name": args.budget, "budget": {k: v for k, v in budget.items() if k != "starts"}}
    seconds = read_json(os.path.join(out, "seconds.json"))
    results.update(collect(budget, out), commit=at, seconds=seconds, minutes=sum(seconds.values()) / 60)
    write_json(os.path.join(out, "results.json"), results)
    table = markdown(results)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table)
    plot(budget, out, os.path.join(out, "curves.png"))
    print(table)


if __name__ == "__main__":
    main()
