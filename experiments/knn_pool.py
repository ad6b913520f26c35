"""kNN top-1 of pre-trained encoders with cls or average-pooled features, the pool chosen on validation.

    python experiments/knn_pool.py --encoder=workdirs/table_long/mae \
        --encoder=workdirs/table_long/diffmae --out=workdirs/table_long/knn_pool

The long table's kNN column reads the cls token (`knn.pool='cls'`, the linear
probe's feature). MAE's loss never reads the cls token, so the average of the
patch tokens (`knn.pool='avg'`) may be the better kNN feature. To choose
without looking at the test split, each pool is first scored on a validation
split carved from the training split (bank: its first `--bank` images,
queries: the rest), then on the usual protocol (bank: the whole training
split, queries: the whole test split; `--num_train` / `--num_eval` take the
first images of each only, as the kNN monitor's knn.num_train / num_eval
do). The same weighted kNN as maejax's monitor (k = 20, cosine similarity,
temperature 0.07) on the frozen encoder of each workdir's newest checkpoint,
images as the evaluation pipeline reads them (no augmentation).

Writes OUT/knn_pool.json and OUT/knn_pool.md (with the commit it ran at).
"""

import argparse
import os
import sys

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from experiments.inpainting_table import commit, write_record  # noqa: E402
from maejax import checkpoint, data_sources, evaluate, input_pipeline, models  # noqa: E402
from maejax import config as config_lib  # noqa: E402
from maejax import task as task_lib  # noqa: E402
from maejax.models import vit  # noqa: E402

K, TEMPERATURE = 20, 0.07  # maejax's kNN monitor defaults (config.knn)
BATCH = 1000


def split_features(config, resolved, model, params, split: str, limit=None) -> tuple:
    """({pool: (N, D) features}, (N,) labels) of a split's first `limit` images (all: None), in order."""
    channels = resolved.in_channels
    source = data_sources.get_source(config.dataset, split, channels)
    transform = input_pipeline.eval_transform(config.dataset, resolved.image_size, channels)
    apply = jax.jit(
        lambda p, x: {pool: model.apply({"params": p}, x, pool, method=model.features) for pool in vit.POOLS}
    )
    feats, labels = {pool: [] for pool in vit.POOLS}, []
    for batch in input_pipeline.eval_batches(source, transform, BATCH, limit=limit):
        valid = batch["valid"] > 0
        out = jax.device_get(apply(params, batch["image"]))
        for pool in vit.POOLS:
            feats[pool].append(np.asarray(out[pool])[valid])
        labels.append(np.asarray(batch["label"])[valid])
    return {pool: np.concatenate(f) for pool, f in feats.items()}, np.concatenate(labels)


def scores(workdir: str, bank: int, num_train=None, num_eval=None) -> dict:
    """{'checkpoint', 'validation': {pool: top1}, 'test': {pool: top1}, 'chosen'} of one encoder."""
    if task_lib.saved_config(workdir) is None:
        raise SystemExit(f"--encoder={workdir!r} has no config.json: point it at a pre-training workdir")
    config = config_lib.read_config_json(workdir)
    resolved = config_lib.with_resolved_model(config).model
    if resolved.name not in ("mae", "diffmae"):
        raise SystemExit(
            f"--encoder={workdir!r} holds a {resolved.name!r} model; give an MAE or DiffMAE workdir"
        )
    model = models.build_model(resolved)
    params, loaded = checkpoint.load_params(workdir)
    split = lambda name, limit: split_features(config, resolved, model, params, name, limit)  # noqa: E731
    train, train_labels = split(config.dataset.train_split, num_train)
    test, test_labels = split(config.dataset.eval_split, num_eval)
    if not 0 < bank < len(train_labels):
        raise SystemExit(f"--bank={bank} is invalid: between 1 and {len(train_labels) - 1} training images")
    classes = int(train_labels.max()) + 1
    result = {"checkpoint": loaded, "validation": {}, "test": {}}
    for pool in vit.POOLS:
        f = train[pool]
        result["validation"][pool] = evaluate.knn_top1(
            f[:bank], train_labels[:bank], f[bank:], train_labels[bank:], classes, K, TEMPERATURE
        )
        result["test"][pool] = evaluate.knn_top1(
            f, train_labels, test[pool], test_labels, classes, K, TEMPERATURE
        )
        print(workdir, pool, result["validation"][pool], result["test"][pool], flush=True)
    result["chosen"] = max(vit.POOLS, key=lambda pool: result["validation"][pool])
    return result


def markdown(results: dict, bank: int, revision: str) -> str:
    pools = vit.POOLS
    lines = [
        f"kNN top-1 (%) (k = {K}, cosine, temperature {TEMPERATURE}), commit {revision}. Validation: bank "
        f"the first {bank:,} training images, queries the rest; test: bank the whole training split, "
        "queries the whole test split. The pool marked * is the one validation chose.",
        "",
        "| encoder | "
        + " | ".join(f"validation, {p}" for p in pools)
        + " | "
        + " | ".join(f"test, {p}" for p in pools)
        + " |",
        "|---|" + "---|" * (2 * len(pools)),
    ]
    for workdir, r in results.items():
        marks = {p: "*" if p == r["chosen"] else "" for p in pools}
        cells = [f"{100 * r['validation'][p]:.2f}{marks[p]}" for p in pools]
        cells += [f"{100 * r['test'][p]:.2f}{marks[p]}" for p in pools]
        lines.append(f"| {workdir} | " + " | ".join(cells) + " |")
    lines += ["", "Checkpoints: " + "; ".join(f"{w}: {r['checkpoint']}" for w, r in results.items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--encoder", action="append", required=True, help="an MAE or DiffMAE workdir (repeatable)"
    )
    parser.add_argument("--out", required=True, help="folder for knn_pool.json and knn_pool.md")
    parser.add_argument("--bank", type=int, default=50000, help="training images in the validation bank")
    parser.add_argument("--num_train", type=int, help="the first N training images only (default: all)")
    parser.add_argument("--num_eval", type=int, help="the first N test images only (default: all)")
    args = parser.parse_args(argv)
    results = {w: scores(w, args.bank, args.num_train, args.num_eval) for w in args.encoder}
    revision = commit()
    record = {"commit": revision, "bank": args.bank, "k": K, "temperature": TEMPERATURE, "encoders": results}
    write_record(args.out, "knn_pool", record, markdown(results, args.bank, revision))


if __name__ == "__main__":
    main()
