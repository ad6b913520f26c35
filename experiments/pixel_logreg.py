"""The raw-pixel floors of the downstream table: logistic regression and kNN on Fashion-MNIST pixels.

    python experiments/pixel_logreg.py --out=workdirs/table/pixel_logreg.json
    python experiments/pixel_logreg.py --out=... --knn_train=60000 --knn_eval=10000

Softmax regression on the 784 normalised pixels (plus a bias), trained with
AdamW (lr 1e-3, wd 1e-4) for 20 epochs of batch 256 on the 60,000 training
images, evaluated on the 10,000 test images (`eval_top1`: the linear probe's floor).
`knn_top1`: the kNN column's floor, the same weighted kNN as maejax's
(`maejax.evaluate.knn_top1`: k = 20, cosine, temperature 0.07) on the normalised
pixels of the first --knn_train training and --knn_eval test images, the sets the
encoders' kNN uses. Reads the data through maejax's offline Fashion-MNIST source.
"""

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maejax import data_sources, evaluate  # noqa: E402
from maejax.recipes import fmnist_pretrain  # noqa: E402


def load(dataset, split):
    source = data_sources.get_source(dataset, split, 1)
    records = source.__getitems__(range(len(source)))
    mean, std = data_sources.normalization(dataset, 1)
    x = (np.stack([r["image"] for r in records]).astype(np.float32) / 255.0 - mean) / std
    return x.reshape(len(records), -1), np.asarray([r["label"] for r in records])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--knn_train", type=int, default=10000, help="kNN bank: the first N training images")
    parser.add_argument("--knn_eval", type=int, default=2000, help="kNN queries: the first N test images")
    args = parser.parse_args()
    dataset = fmnist_pretrain().dataset
    x_train, y_train = load(dataset, "train")
    x_test, y_test = load(dataset, "test")
    params = {"w": jnp.zeros((784, 10)), "b": jnp.zeros(10)}
    tx = optax.adamw(1e-3, weight_decay=1e-4)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, x, y):
        def loss(p):
            return optax.softmax_cross_entropy_with_integer_labels(x @ p["w"] + p["b"], y).mean()

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, value

    rng = np.random.default_rng(0)
    for _ in range(args.epochs):
        order = rng.permutation(len(x_train))
        for i in range(0, len(order) - 255, 256):
            idx = order[i : i + 256]
            params, opt, _ = step(params, opt, x_train[idx], y_train[idx])
    accuracy = float(np.mean(np.argmax(x_test @ params["w"] + params["b"], axis=1) == y_test))
    knn = evaluate.knn_top1(
        x_train[: args.knn_train],
        y_train[: args.knn_train],
        x_test[: args.knn_eval],
        y_test[: args.knn_eval],
        10,
    )
    result = {"eval_top1": accuracy, "epochs": args.epochs, "batch": 256, "knn_top1": knn}
    result.update(knn_train=min(args.knn_train, len(x_train)), knn_eval=min(args.knn_eval, len(x_test)))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
