"""The inpainting table: MAE, DiffMAE's t = T prediction and DiffMAE's samplers, from one run.

    python experiments/inpainting_table.py --diffmae=workdirs/diffmae_fmnist [--mae=workdirs/mae_fmnist] \
        --out=workdirs/inpainting [--num_images=64] [--num_samples=4] [--steps=10,50,250] \
        [--samplers=ddpm,ddim,renoise] [--eps_scales=1] [--masks=random,center] [--classifier=FILE.npz]

One process loads the models once and runs every setting in turn, with the
sample task's own functions (maejax/sample.py) on the same held-out images
(the first `num_images` of the test split), the same masks and the same key,
so a setting's PSNR, high-frequency ratio and diversity are those that
`--config.task=sample` writes to sample_metrics.json for it. Settings, for
each mask (`random` at the DiffMAE config's sample.mask_ratio, or the `center`
block): `mae` (MAE's reconstruction, when --mae names a workdir), `tT`
(DiffMAE's one-step prediction from pure noise at t = T), `<sampler><steps>`
for every sampler and step count (`<sampler><steps>_eps<lambda>` for every
--eps_scales value other than 1: the sampler dividing each step's inferred
noise by lambda, sample.eps_scale),
and two model-free controls that calibrate the measures: `classmean` fills
the masked region with the mean image of the true class (a blur that knows
the label: PSNR's favourite) and `swap` with the pixels of another real
test image of the same class (sharp, plausible and wrong: PSNR punishes it).

Writes OUT/<mask>_<method>.json per setting (method: mae, tT, ddpm10, ...),
OUT/real.json (the real images, the sanity row), OUT/table.md (the Markdown
table, with the commit it ran at) and OUT/classifier.npz (the feature
classifier, trained once on the training split and reused by later runs).
A setting that fails, or a measure that is not finite, stops the run with a
non-zero exit; table.md is written only when every setting succeeded.

Columns. PSNR on the masked region, the high-frequency ratio (Laplacian
energy of the masked region over the real image's: 1.0 is as detailed),
diversity (per-pixel standard deviation across samples), and two measures
from a fixed classifier: an MLP (784-256-64-10 for Fashion-MNIST) trained on
the raw pixels of the training split:
- FD: the Frechet distance between Gaussian fits of its 64-d penultimate
  features (the role Inception's pool features play in FID) on the
  inpainted images and on the real test images not being inpainted (the
  reference, at least 5,000 images). This is the distribution-level
  measure. PSNR scores each fill against its own truth, so the conditional
  mean of all plausible fills, a blur, maximises it; FD compares the set of
  inpainted images with the set of real ones through the mean and
  covariance of their features, so a fill that is sharp and plausible but
  not the true one costs nothing, while mean-like fills, too alike and too
  smooth to be real, move the features off the real distribution and
  shrink their spread. Visible pixels are the true ones in every row, so
  only the masked region can move the features.
- top-1: the classifier's accuracy on the inpainted images: whether the
  fill keeps the garment's class (a per-image, semantic check beside FD).
Both read the whole image, 28 x 28 pixels in [0, 1], as real images are.

Sanity and small samples. The controls order the two kinds of measure
oppositely: `classmean` above `swap` in PSNR, `swap` at the real images' FD
and `classmean` well above it. Measured on Fashion-MNIST, 64 images, random
/ centre masks: PSNR 13.6 / 13.3 dB for `classmean`, 11.1 / 10.8 for
`swap`; FD 25 / 28 for `classmean`, 14 / 18 for `swap`, 16 for the real
images. Top-1 does not see blur (97 % for `classmean`), which is why FD is
the distribution-level measure. table.md says whether the controls came out
in this order; they do not at 16 or 32 images, where FD is too noisy to rank
rows (64 is the least that separated them, 128 separates them clearly).
The `real images` row scores the N true
images: top-1 is the classifier's accuracy on them (near its test accuracy,
printed under the table) and FD is the floor at this N: a Gaussian fitted to N
points misses the reference by their sampling error alone, so FD is biased
upward at small N, by about the same for every row. Compare rows with each
other and with the floor at the same `num_images`, never across runs of
different `num_images`. For samplers, FD is the mean over the S sets of N
samples (each sample index one set), so every row fits N points. Under the
table, the FD between the two halves of the reference (thousands of images
each) shows the measure is near 0 for two samples of the real distribution.
"""

import argparse
import contextlib
import functools
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import ConfigDict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from maejax import config as config_lib  # noqa: E402
from maejax import data_sources, diffusion, evaluate, input_pipeline, models, preprocess, validate  # noqa: E402
from maejax import sample as sample_lib  # noqa: E402
from maejax import task as task_lib  # noqa: E402
from maejax.errors import UserError  # noqa: E402
from maejax.models import masking  # noqa: E402

MASKS = ("random", "center")
SAMPLER_LABELS = {"ddpm": "DDPM", "ddim": "DDIM", "renoise": "re-noise"}
MIN_REFERENCE = 5000  # real test images behind the FD reference, besides the inpainted ones
HIDDEN, FEATURES = 256, 64
CLASSIFIER_SEED = 0
CONTROL_SALT = 0xC0
CONTROL_LABELS = {
    "classmean": "class-mean fill (a blur)",
    "swap": "another real image of the class",
}
COLUMNS = (
    "setting",
    "PSNR masked (dB)",
    "high-frequency ratio",
    "diversity",
    "classifier top-1 (%)",
    "FD to real (classifier features)",
)


# ---------------------------------------------------------------- arguments


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--diffmae", required=True, help="a DiffMAE workdir (its newest checkpoint)")
    parser.add_argument("--mae", help="an MAE workdir, trained on the same data; without it, no MAE rows")
    parser.add_argument("--out", required=True, help="where the metrics files and table.md go")
    parser.add_argument("--num_images", type=int, default=64, help="held-out test images inpainted")
    parser.add_argument("--num_samples", type=int, default=4, help="DiffMAE samples per image")
    parser.add_argument("--steps", default="10,50,250", help="sampler step counts, comma-separated")
    parser.add_argument("--samplers", default=",".join(diffusion.SAMPLERS), help="comma-separated")
    parser.add_argument(
        "--eps_scales", default="1", help="sample.eps_scale values, comma-separated (1 = off)"
    )
    parser.add_argument("--masks", default=",".join(MASKS), help="comma-separated: random, center")
    parser.add_argument(
        "--classifier",
        help="the feature classifier (.npz); trained and saved there if absent (default OUT/classifier.npz)",
    )
    parser.add_argument("--classifier_epochs", type=int, default=5, help="when training the classifier")
    args = parser.parse_args(argv)
    args.steps = _int_list(parser, "--steps", args.steps)
    args.samplers = _choices(parser, "--samplers", args.samplers, diffusion.SAMPLERS)
    args.eps_scales = _scale_list(parser, args.eps_scales)
    args.masks = _choices(parser, "--masks", args.masks, MASKS)
    if not args.masks:
        parser.error("--masks is empty: give at least one of random, center")
    if args.samplers and not args.steps:
        parser.error("--steps is empty: give at least one step count for the samplers")
    for name in ("num_images", "num_samples", "classifier_epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)} is invalid: at least 1")
    if args.num_samples < 2:
        parser.error("--num_samples=1 is invalid: diversity needs at least 2 samples per image")
    args.classifier = args.classifier or os.path.join(args.out, "classifier.npz")
    return args


def _int_list(parser, flag: str, text: str) -> list:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        parser.error(f"{flag}={text!r} is invalid: comma-separated integers, e.g. 10,50,250")
    if any(v < 1 for v in values):
        parser.error(f"{flag}={text!r} is invalid: every step count must be at least 1")
    return values


def _scale_list(parser, text: str) -> list:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        parser.error(f"--eps_scales={text!r} is invalid: comma-separated numbers, e.g. 1,1.1,1.15")
    low, high = diffusion.EPS_SCALE_RANGE
    if not values or any(not low <= v <= high for v in values):
        parser.error(
            f"--eps_scales={text!r} is invalid: at least one value, each in [{low:g}, {high:g}] (1 = off)"
        )
    return list(dict.fromkeys(values))


def method_name(sampler: str, steps: int, eps_scale: float) -> str:
    """A sampler setting's method name: ddpm250, or ddpm250_eps1.15 with a noise scale."""
    return f"{sampler}{steps}" + ("" if eps_scale == 1 else f"_eps{eps_scale:g}")


def _choices(parser, flag: str, text: str, valid) -> list:
    values = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in values if v not in valid]
    if unknown:
        parser.error(f"{flag}={text!r} is invalid: {unknown} not in {list(valid)}")
    return values


def commit() -> str:
    """The repository's commit, with '-dirty' when tracked files differ from it."""
    try:
        git = lambda *a: subprocess.run(  # noqa: E731
            ["git", *a], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        head = git("rev-parse", "--short=12", "HEAD")
        return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def write_record(out: str, stem: str, record: dict, text: str) -> None:
    """OUT/<stem>.json (the numbers) and OUT/<stem>.md (their table), and the table on stdout."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump(record, f, indent=2)
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write(text)
    print(text)


# ---------------------------------------------------------------- models


def load_models(args):
    """The DiffMAE's config, resolved model and params, and MAE's (model, params) or None, all checked."""
    task_lib.source_model(args.diffmae, "diffmae", "--diffmae")
    if task_lib.saved_config(args.diffmae) is None:
        raise UserError(f"--diffmae={args.diffmae!r} has no config.json: point it at a DiffMAE workdir")
    if args.mae and task_lib.source_model(args.mae, "mae", "--mae") is None:
        raise UserError(f"--mae={args.mae!r} has no config.json: point it at an MAE workdir")
    config = config_lib.read_config_json(args.diffmae)
    config.task = "sample"
    config.init_from = None
    config.compare_mae_from = args.mae
    config.sample.num_images = args.num_images
    config.sample.num_samples = args.num_samples
    config.sample.eps_scale = 1.0  # each row passes its own; workdirs saved before the field lack it
    resolved = validate.validate(config)
    model = models.build_model(resolved)
    too_many = [s for s in args.steps if s > model.timesteps]
    if args.samplers and too_many:
        raise UserError(
            f"--steps {too_many} exceed the DiffMAE's model.diffusion.timesteps={model.timesteps}"
        )
    task = task_lib.Task(config, args.diffmae, resolved, lease=None, is_main=True)
    params, loaded = sample_lib.load_diffmae(task, model)
    return config, resolved, model, params, loaded, sample_lib.load_mae(args.mae) if args.mae else None


# ---------------------------------------------------------------- data


def split_pixels(config, resolved, split: str, batch_size: int = 1000):
    """A whole split in order, read as the sample task reads it: ((N, H, W, C) in [0, 1], (N,) labels)."""
    channels, size = resolved.in_channels, resolved.image_size
    mean, std = data_sources.normalization(config.dataset, channels)
    source = data_sources.get_source(config.dataset, split, channels)
    transform = input_pipeline.eval_transform(config.dataset, size, channels)
    images, labels = [], []
    for batch in input_pipeline.eval_batches(source, transform, batch_size):
        valid = batch["valid"] > 0
        images.append(batch["image"][valid])
        labels.append(batch["label"][valid])
    images = preprocess.denormalize(np.concatenate(images), mean, std).astype(np.float32)
    return images, np.concatenate(labels)


# ---------------------------------------------------------------- the feature classifier


def _mlp_init(key, dims):
    params = {}
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        params[f"w{i}"] = jax.random.normal(jax.random.fold_in(key, i), (d_in, d_out)) * np.sqrt(2.0 / d_in)
        params[f"b{i}"] = jnp.zeros(d_out)
    return params


def _features(params, x):
    """(N, H, W, C) pixels in [0, 1] -> (N, FEATURES) penultimate activations."""
    h = (x.reshape(x.shape[0], -1) - 0.5) / 0.5
    h = jax.nn.relu(h @ params["w0"] + params["b0"])
    return jax.nn.relu(h @ params["w1"] + params["b1"])


def _logits(params, x):
    return _features(params, x) @ params["w2"] + params["b2"]


features = jax.jit(_features)
logits = jax.jit(_logits)


def in_chunks(fn, params, x, size: int = 2000) -> np.ndarray:
    return np.concatenate([np.asarray(fn(params, x[i : i + size])) for i in range(0, len(x), size)])


def train_classifier(images, labels, epochs: int, batch: int = 256) -> dict:
    """The MLP on raw pixels, AdamW (lr 1e-3, wd 1e-4), batch 256."""
    num_classes = int(labels.max()) + 1
    dims = (int(np.prod(images.shape[1:])), HIDDEN, FEATURES, num_classes)
    params = _mlp_init(jax.random.key(CLASSIFIER_SEED), dims)
    tx = optax.adamw(1e-3, weight_decay=1e-4)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, x, y):
        loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(_logits(p, x), y).mean()  # noqa: E731
        grads = jax.grad(loss)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt

    rng = np.random.default_rng(CLASSIFIER_SEED)
    for _ in range(epochs):
        order = rng.permutation(len(images))
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i : i + batch]
            params, opt = step(params, opt, images[idx], labels[idx])
    return jax.device_get(params)


def accuracy(params, images, labels) -> float:
    return float(np.mean(in_chunks(logits, params, images).argmax(axis=1) == labels))


def load_or_train_classifier(path: str, config, resolved, epochs: int, test_images, test_labels):
    """(params, info) of the cached classifier, trained on the training split when absent."""
    shape = [resolved.image_size, resolved.image_size, resolved.in_channels]
    data = {"dataset": config.dataset.name, "image_shape": shape}
    if os.path.exists(path):
        with np.load(path) as f:
            params = {k: f[k] for k in f.files if k[0] in "wb"}
            info = json.loads(str(f["info"]))
        trained_on = {k: info.get(k) for k in data}
        if trained_on != data:
            raise UserError(
                f"--classifier={path!r} was trained on {trained_on}, these images are {data}: "
                "delete it or pass another --classifier"
            )
        print(f"classifier: {path} (test top-1 {100 * info['test_top1']:.1f} %)", flush=True)
        return params, info
    start = time.time()
    train_images, train_labels = split_pixels(config, resolved, config.dataset.train_split)
    params = train_classifier(train_images, train_labels, epochs)
    info = {
        **data,
        "dims": [int(params[f"w{i}"].shape[0]) for i in range(3)] + [int(params["w2"].shape[1])],
        "epochs": epochs,
        "train_images": len(train_images),
        "test_top1": accuracy(params, test_images, test_labels),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(path, info=json.dumps(info), **{k: np.asarray(v) for k, v in params.items()})
    print(
        f"classifier: trained {epochs} epochs in {time.time() - start:.0f} s, test top-1 "
        f"{100 * info['test_top1']:.1f} %; saved to {path}",
        flush=True,
    )
    return params, info


# ---------------------------------------------------------------- measures


def gaussian_fit(feats) -> tuple:
    """(mean (D,), covariance (D, D)) of (N, D) features, in float64."""
    feats = np.asarray(feats, np.float64)
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(fit_a, fit_b) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between two Gaussian fits.

    Tr((S_a S_b)^(1/2)) is computed as the trace of the symmetric
    (S_a^(1/2) S_b S_a^(1/2))^(1/2), which has the same eigenvalues and stays
    real for rank-deficient fits (fewer points than dimensions).
    """
    (mu_a, cov_a), (mu_b, cov_b) = fit_a, fit_b
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    middle = root_a @ cov_b @ root_a
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * cross)


def measure(predictions, truth, pixel_mask, labels, feature_fn, reference) -> dict:
    """The table's measures of S sets of N inpainted images.

    Args:
      predictions: (S, N, H, W, C) complete images in [0, 1] (visible pixels true).
      truth, pixel_mask: (N, H, W, C); labels: (N,) classes of the true images.
      feature_fn: (N, H, W, C) -> ((N, D) features, (N,) predicted classes).
      reference: the Gaussian fit of the real reference images' features.
    Returns:
      psnr, hf_ratio, top1, fd: means over the S sets; diversity across the S
      sets (None when S = 1).
    """
    out = {"psnr": [], "hf_ratio": [], "top1": [], "fd": []}
    for images in predictions:
        feats, predicted = feature_fn(images)
        out["psnr"].append(evaluate.psnr_masked(images, truth, pixel_mask).mean())
        out["hf_ratio"].append(evaluate.high_frequency_ratio(images, truth, pixel_mask))
        out["top1"].append(np.mean(predicted == labels))
        out["fd"].append(frechet_distance(gaussian_fit(feats), reference))
    metrics = {k: float(np.mean(v)) for k, v in out.items()}
    metrics["diversity"] = (
        evaluate.sample_diversity(predictions, pixel_mask) if len(predictions) > 1 else None
    )
    return metrics


@contextlib.contextmanager
def setting(name: str):
    """Names the setting in the traceback of whatever fails inside it."""
    try:
        yield
    except Exception as e:
        raise RuntimeError(f"setting {name} failed: {type(e).__name__}: {e}") from e


def check_finite(name: str, metrics: dict) -> None:
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not np.isfinite(v)]
    if bad:
        raise RuntimeError(f"setting {name}: {bad} not finite ({ {k: metrics[k] for k in bad} })")


# ---------------------------------------------------------------- settings


def row_label(mask: str, method: str, masked: int, num_patches: int) -> str:
    where = f"{mask} ({masked}/{num_patches} patches)"
    if method == "mae":
        return f"{where}: MAE reconstruction"
    if method == "tT":
        return f"{where}: DiffMAE t = T (one step from noise)"
    if method in CONTROL_LABELS:
        return f"{where}: control, {CONTROL_LABELS[method]}"
    run, _, scale = method.partition("_eps")
    sampler = run.rstrip("0123456789")
    label = f"{where}: DiffMAE {SAMPLER_LABELS[sampler]} {run[len(sampler) :]} steps"
    return label + (f", noise estimate / {scale}" if scale else "")


def control_fills(truth, labels, pool, pool_labels, pixel_mask, seed: int) -> dict:
    """Two model-free fills of the masked region that calibrate the measures, (N, H, W, C) each.

    `classmean`: the mean of the pool's images of the true class, a blur that
    knows the label (PSNR rewards it, FD should not). `swap`: the pixels of a
    random pool image of the true class, sharp and plausible but not the
    truth (PSNR punishes it, FD should not). The pool is the FD reference.
    """
    rng = np.random.default_rng((seed, CONTROL_SALT))
    class_mean = np.stack([pool[pool_labels == c].mean(axis=0) for c in labels])
    swap = np.stack([pool[rng.choice(np.flatnonzero(pool_labels == c))] for c in labels])
    paste = lambda fill: truth * (1 - pixel_mask) + fill * pixel_mask  # noqa: E731
    return {"classmean": paste(class_mean), "swap": paste(swap)}


def run_mask(mask, args, ctx) -> list:
    """Every setting of one mask, each written to OUT/<mask>_<method>.json as it finishes; their rows."""
    config, model, params = ctx["config"], ctx["model"], ctx["params"]
    images, truth, labels = ctx["images"], ctx["truth"], ctx["labels"]
    mean, std = ctx["mean"], ctx["std"]
    grid = model.image_size // model.patch_size
    sample_config = ConfigDict({**config.sample.to_dict(), "mask": mask})
    masks = sample_lib.make_masks(sample_config, len(images), grid, config.seed)
    masked = int(masks[0].sum())
    model = sample_lib.with_mask_count(model, masked)
    noise = masking.noise_from_mask(masks)
    pixel_mask = np.asarray(masking.patch_mask_to_pixels(masks, model.patch_size, model.in_channels))
    score = lambda x: measure(x, truth, pixel_mask, labels, ctx["feature_fn"], ctx["reference"])  # noqa: E731
    info = {
        "mask": mask,
        "masked_patches": masked,
        "num_patches": grid * grid,
        "num_images": len(images),
        "checkpoint": ctx["checkpoint"],
        "mae": args.mae,
        "commit": ctx["commit"],
    }
    rows = []

    def record(method, metrics, **extra):
        name = f"{mask}_{method}"
        check_finite(name, metrics)
        result = {"setting": name, "label": row_label(mask, method, masked, grid * grid), **metrics}
        result.update({**info, **extra})
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump(result, f, indent=2)
        print(f"{name}: {json.dumps(metrics)}", flush=True)
        rows.append(result)

    mae_images = None
    if ctx["mae"] is not None:
        start = time.time()
        with setting(f"{mask}_mae"):
            mae_images = sample_lib.mae_prediction(*ctx["mae"], images, noise, mean, std)
            seconds = round(time.time() - start, 1)
            record("mae", {**score(mae_images[None]), "diversity": 0.0}, seconds=seconds)

    t_T, eta = None, float(config.sample.eta)
    runs = [(s, n, e) for s in args.samplers for e in args.eps_scales for n in args.steps]
    for sampler, steps, scale in runs or [("ddpm", 1, 1.0)]:  # without samplers, one short run gives t = T
        start = time.time()
        method = method_name(sampler, steps, scale)
        with setting(f"{mask}_{method}" if runs else f"{mask}_tT"):
            out = sample_lib.inpaint_fn(model, sampler, steps, eta, args.num_samples, scale)(
                params, images, noise, jax.random.key(config.seed)
            )
            encoded = out["encoded"]
            pixels = functools.partial(sample_lib._pixels, model, params, encoded, mean=mean, std=std)
            if t_T is None:  # the same key draws the same x_T in every run
                t_T = pixels(out["t_T"])
            if runs:
                samples = np.stack([pixels(x) for x in out["samples"]])
                extra = {"sampler": sampler, "steps": steps, "eta": eta, "eps_scale": scale}
                extra["num_samples"] = args.num_samples
                record(method, score(samples), seconds=round(time.time() - start, 1), **extra)
    with setting(f"{mask}_tT"):
        tT_metrics = score(t_T[None])
        if mae_images is not None:
            tT_metrics["psnr_vs_mae"] = float(evaluate.psnr_masked(t_T, mae_images, pixel_mask).mean())
        record("tT", tT_metrics)
    fills = control_fills(truth, labels, ctx["pool"], ctx["pool_labels"], pixel_mask, config.seed)
    for method, filled in fills.items():
        with setting(f"{mask}_{method}"):
            record(method, score(filled[None]))
    order = ["mae", "tT"] + [method_name(*run) for run in runs] + list(fills)
    return sorted(rows, key=lambda r: order.index(r["setting"][len(mask) + 1 :]))


# ---------------------------------------------------------------- the table


def _cell(value, fmt: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, fmt)


def controls_ordered(rows: list) -> dict:
    """{mask: whether PSNR prefers the blur control and FD the sharp one}, as both should.

    False means FD is too noisy at this `num_images` to rank rows (measured on
    Fashion-MNIST: ordered at 64 images and more, not at 16 or 32).
    """
    by_name = {r["setting"]: r for r in rows}
    ordered = {}
    for mask in dict.fromkeys(r["mask"] for r in rows):
        blur, sharp = by_name[f"{mask}_classmean"], by_name[f"{mask}_swap"]
        ordered[mask] = blur["psnr"] > sharp["psnr"] and sharp["fd"] < blur["fd"]
    return ordered


def render_table(rows: list, real: dict, header: dict) -> str:
    """The Markdown table: the real images first, then one row per setting, then the notes."""
    lines = [
        f"Inpainting, {header['num_images']} held-out test images, {header['num_samples']} DiffMAE "
        f"samples each; DiffMAE {header['checkpoint']}, MAE {header['mae'] or 'not given (no MAE rows)'}; "
        f"commit {header['commit']}.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for r in [real, *rows]:
        cells = [
            r["label"],
            _cell(r["psnr"], ".2f"),
            _cell(r["hf_ratio"], ".3f"),
            "0 (deterministic)" if r["setting"].endswith("_mae") else _cell(r["diversity"], ".3f"),
            _cell(r["top1"], ".1f", 100),
            _cell(r["fd"], ".2f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Classifier: MLP {'-'.join(map(str, header['classifier']['dims']))} on raw training pixels, "
        f"{header['classifier']['epochs']} epochs, top-1 {100 * header['classifier']['test_top1']:.1f} % "
        f"on the whole test split. FD: Frechet distance of its {FEATURES}-d penultimate features to "
        f"{header['reference_images']} real test images not inpainted; biased upward at small N, so the "
        f"real-images row ({header['num_images']} true images) is the floor. Two halves of the "
        f"reference ({header['reference_images'] // 2} images each) are {real['fd_reference_halves']:.3f} "
        "apart. Controls: the masked region filled without a model, by the class's mean image or by "
        f"another real image of the class. DDIM eta {header['eta']}.",
        "",
    ]
    ordered = controls_ordered(rows)
    lines += [
        "Self-check, the controls order PSNR and FD oppositely (PSNR prefers the blur, FD the real "
        "image): " + ", ".join(f"{m} {'yes' if ok else 'NO'}" for m, ok in ordered.items()) + ".",
        "",
    ]
    if not all(ordered.values()):
        lines[-1:-1] = [
            f"FD at {header['num_images']} images is too noisy to rank these rows: rerun with more "
            "--num_images.",
            "",
        ]
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    table_path = os.path.join(args.out, "table.md")
    if os.path.exists(table_path):
        os.remove(table_path)  # a failed run must not leave an older table looking current
    config, resolved, model, params, loaded, mae = load_models(args)
    channels = resolved.in_channels
    mean, std = data_sources.normalization(config.dataset, channels)

    test_images, test_labels = split_pixels(config, resolved, config.dataset.eval_split)
    if len(test_images) - args.num_images < MIN_REFERENCE:
        raise UserError(
            f"--num_images={args.num_images} leaves {len(test_images) - args.num_images} test images for "
            f"the FD reference; at most {len(test_images) - MIN_REFERENCE} (at least {MIN_REFERENCE} needed)"
        )
    classifier, classifier_info = load_or_train_classifier(
        args.classifier, config, resolved, args.classifier_epochs, test_images, test_labels
    )

    def feature_fn(images):
        return in_chunks(features, classifier, images), in_chunks(logits, classifier, images).argmax(axis=1)

    # The sample task's images: the first num_images of the split, normalised as it normalises them.
    source = data_sources.get_source(config.dataset, config.dataset.eval_split, channels)
    transform = input_pipeline.eval_transform(config.dataset, resolved.image_size, channels)
    batch = next(input_pipeline.eval_batches(source, transform, args.num_images))
    images, labels = batch["image"], batch["label"]
    truth = preprocess.denormalize(images, mean, std)
    np.testing.assert_array_equal(labels, test_labels[: args.num_images])
    reference_feats = feature_fn(test_images[args.num_images :])[0]
    reference = gaussian_fit(reference_feats)
    half = len(reference_feats) // 2
    halves = frechet_distance(gaussian_fit(reference_feats[:half]), gaussian_fit(reference_feats[half:]))

    run_commit = commit()
    feats, predicted = feature_fn(truth)
    real = {
        "setting": "real",
        "label": "real images (sanity)",
        "psnr": None,
        "hf_ratio": 1.0,
        "diversity": None,
        "top1": float(np.mean(predicted == labels)),
        "fd": frechet_distance(gaussian_fit(feats), reference),
        "fd_reference_halves": halves,
        "num_images": args.num_images,
        "reference_images": len(reference_feats),
        "classifier": {"path": args.classifier, **classifier_info},
        "commit": run_commit,
    }
    check_finite("real", real)
    with open(os.path.join(args.out, "real.json"), "w") as f:
        json.dump(real, f, indent=2)
    print(
        f"real: top1 {real['top1']:.3f}, FD {real['fd']:.3f} (floor), reference halves {halves:.3f}",
        flush=True,
    )

    ctx = {
        "config": config,
        "model": model,
        "params": params,
        "mae": mae,
        "images": images,
        "truth": truth,
        "labels": labels,
        "mean": mean,
        "std": std,
        "feature_fn": feature_fn,
        "reference": reference,
        "pool": test_images[args.num_images :],
        "pool_labels": test_labels[args.num_images :],
        "checkpoint": loaded,
        "commit": run_commit,
    }
    rows = []
    for mask in args.masks:
        rows += run_mask(mask, args, ctx)
    header = {
        "num_images": args.num_images,
        "num_samples": args.num_samples,
        "checkpoint": loaded,
        "mae": args.mae,
        "commit": run_commit,
        "classifier": classifier_info,
        "reference_images": len(reference_feats),
        "eta": float(config.sample.eta),
    }
    table = render_table(rows, real, header)
    if not all(controls_ordered(rows).values()):
        print(
            f"warning: at --num_images={args.num_images} FD does not order the controls; see {table_path}",
            file=sys.stderr,
            flush=True,
        )
    with open(table_path, "w") as f:
        f.write(table)
    print(table)
    print(f"wrote {len(rows) + 1} metrics files and {table_path}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"inpainting_table: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
