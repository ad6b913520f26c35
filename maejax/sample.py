"""The sample task: inpaint held-out images with a trained DiffMAE.

    python -m maejax.main --config=configs/diffmae_fmnist.py --workdir=DIR --config.task=sample \
        [--config.compare_mae_from=MAE_WORKDIR] [--config.sample.sampler=ddim --config.sample.steps=20]

Restores the newest checkpoint in DIR (or `config.init_from`), masks
`sample.num_images` held-out images (random masks at `sample.mask_ratio`, a
centred block covering about that fraction, or masks from a .npy file of
(L,) or (N, L) 0/1 rows), and draws `sample.num_samples` samples per image.
The encoder runs once per image; only the decoder runs per sampling step.
Writes DIR/images/inpaint_<mask>_<sampler><steps>.png and DIR/sample_metrics.json.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from maejax import (
    checkpoint,
    data_sources,
    diffusion,
    evaluate,
    input_pipeline,
    models,
    paths,
    preprocess,
    train_step,
    visualize,
    writers,
)
from maejax import task as task_lib
from maejax.errors import ConfigError, UserError
from maejax.models import masking, model_config

TRAJECTORY_SNAPSHOTS = 5
GRID_ROWS = 8
MODEL_NAMES = ("diffmae",)
METRICS_FILE = "sample_metrics.json"
# Separates the random inpainting masks' stream from every other use of the seed.
MASK_RNG_SALT = 0xA5C


def make_masks(sample_config, num_images: int, grid: int, seed: int) -> np.ndarray:
    """(N, L) float32 masks (1 = masked), every row hiding the same number of patches."""
    num_patches = grid * grid
    kind = sample_config.mask
    if kind == "random":
        masked = num_patches - masking.num_visible(num_patches, sample_config.mask_ratio)
        rng = np.random.default_rng((seed, MASK_RNG_SALT))
        masks = np.zeros((num_images, num_patches), np.float32)
        for row in masks:
            row[rng.permutation(num_patches)[:masked]] = 1.0
        return masks
    if kind == "center":
        block = int(np.clip(round(grid * np.sqrt(sample_config.mask_ratio)), 1, grid - 1))
        return np.tile(masking.center_block_mask(grid, block), (num_images, 1))
    if not os.path.exists(kind):
        raise ConfigError(
            "sample.mask", kind, "'random', 'center' or a .npy file of (L,) or (N, L) 0/1 masks"
        )
    masks = np.load(kind).astype(np.float32)
    masks = np.tile(masks, (num_images, 1)) if masks.ndim == 1 else masks[:num_images]
    if masks.shape != (num_images, num_patches) or not np.isin(masks, (0.0, 1.0)).all():
        raise ConfigError(
            "sample.mask", kind, f"a 0/1 array of shape ({num_patches},) or ({num_images}, {num_patches})"
        )
    counts = set(masks.sum(axis=1).astype(int))
    if len(counts) != 1 or counts.pop() in (0, num_patches):
        raise ConfigError(
            "sample.mask", kind, "every row must hide the same number of patches, at least one and not all"
        )
    return masks


def with_mask_count(model, masked: int):
    """The model with a mask ratio that hides exactly `masked` patches."""
    return model.clone(mask_ratio=(masked - 0.5) / model.num_patches)


def inpaint_fn(model, sampler: str, steps: int, eta: float, num_samples: int, eps_scale: float = 1.0):
    """jit (params, images, noise, key) -> masked-patch predictions of every kind.

    Returns a dict with (N, Lm, P) `t_T` (the one-step prediction from pure
    noise at t = T-1), (S, N, Lm, P) `samples`, (steps, N, Lm, P) `trajectory`
    of sample 0, and (N, L) `mask`, `ids_restore` plus what `assemble` needs.
    """
    schedule = model.schedule

    @jax.jit
    def run(params, images, noise, key):
        encoded = model.apply({"params": params}, images, noise, method=model.encode)

        def denoise(x_t, t):
            return model.apply({"params": params}, encoded, x_t, t, method=model.denoise)

        shape = (images.shape[0], model.num_patches - model.num_visible, model.patch_dim)
        x_T = jax.random.normal(jax.random.fold_in(key, 0), shape)
        t_T = denoise(x_T, jnp.full((shape[0],), schedule.timesteps - 1, jnp.int32))

        def one(sample_key):
            return diffusion.sample(
                denoise,
                schedule,
                shape,
                sample_key,
                sampler=sampler,
                steps=steps,
                eta=eta,
                eps_scale=eps_scale,
                return_trajectory=True,
            )

        keys = jax.vmap(lambda i: jax.random.fold_in(key, i + 1))(jnp.arange(num_samples))
        samples, trajectories = jax.vmap(one)(keys)
        return {"encoded": encoded, "t_T": t_T, "samples": samples, "trajectory": trajectories[0]}

    return run


def _pixels(model, params, encoded, masked_patches, mean, std):
    """Masked-patch predictions -> complete images in [0, 1] (visible pixels true)."""
    full = model.apply({"params": params}, encoded, masked_patches, method=model.assemble)
    images = masking.unpatchify(np.asarray(full), model.patch_size, model.in_channels)
    return preprocess.denormalize(images, mean, std)


def load_mae(workdir: str):
    """(model, params) of the MAE workdir to compare against, checked before any sampling."""
    mae_model = task_lib.source_model(workdir, "mae", "config.compare_mae_from")
    if mae_model is None:
        raise UserError(f"config.compare_mae_from={workdir!r} has no config.json: point it at an MAE workdir")
    mae = models.build_model(mae_model)
    params, loaded = checkpoint.load_params(workdir)
    task_lib.check_params_match(params, abstract_params(mae), loaded)
    return mae, params


def mae_prediction(mae, params, images, noise, mean, std):
    """MAE's reconstruction (visible pixels pasted in) of the same images under the same masks."""
    masked = int(np.asarray(noise >= 1.0).sum(axis=1)[0])
    mae = with_mask_count(mae, masked)
    out = jax.jit(lambda p: mae.apply({"params": p}, images, noise, method=mae.reconstruct))(params)
    recon = visualize.predicted_images(out["pred"], images, mae.patch_size, mae.norm_pix_loss)
    pixel_mask = masking.patch_mask_to_pixels(out["mask"], mae.patch_size, images.shape[-1])
    return preprocess.denormalize(np.asarray(images * (1 - pixel_mask) + recon * pixel_mask), mean, std)


def load_diffmae(task, model):
    """The DiffMAE params to sample from (WORKDIR or config.init_from), checked against the config."""
    source_dir = task.config.init_from or task.workdir
    label = "config.init_from" if task.config.init_from else "--workdir"
    trained = task_lib.source_model(source_dir, "diffmae", label)
    if trained is not None:
        check_diffusion_matches(trained, task.model, f"{label}={source_dir!r}")
    params, loaded = checkpoint.load_params(source_dir)
    if "decoder" not in params:
        raise UserError(f"{loaded} holds encoder weights only; sampling needs the DiffMAE decoder")
    task_lib.check_params_match(params, abstract_params(model), loaded)
    return params, loaded


def check_diffusion_matches(trained, resolved, source: str) -> None:
    """Refuse to sample with `model.diffusion` fields other than the checkpoint was trained with.

    The schedule and what the decoder outputs shape no parameter, so the
    params check cannot see them, and a mismatch would sample silently wrong.
    A field missing from an older config.json was trained with its default.
    `loss` only weighed the training error: sampling does not depend on it.
    """
    saved = model_config.resolve(trained).diffusion  # the defaults filled in, as for any model config
    for field, value in resolved.diffusion.items():
        was = saved[field]
        if field != "loss" and was != value:
            raise ConfigError(f"model.diffusion.{field}", value, f"{was!r}, what {source} was trained with")


def abstract_params(model):
    """The shapes and dtypes of `model`'s params, computed without allocating them."""
    shape = (1, model.image_size, model.image_size, model.in_channels)
    return jax.eval_shape(lambda: train_step.init_params(model, jax.random.key(0), shape))


def run(config, workdir: str) -> dict:
    """The sample task; returns the metrics it wrote to WORKDIR/sample_metrics.json."""
    with task_lib.begin(config, workdir, MODEL_NAMES) as task:
        return _sample(task)


def _sample(task) -> dict:
    config, resolved = task.config, task.model
    model = models.build_model(resolved)
    if config.sample.steps > model.timesteps:
        raise ConfigError(
            "sample.steps", config.sample.steps, f"at most model.diffusion.timesteps={model.timesteps}"
        )
    # Every input is checked before the sampler compiles.
    params, loaded = load_diffmae(task, model)
    mae = load_mae(config.compare_mae_from) if config.compare_mae_from else None
    task_lib.record_config(task, filename=task_lib.SAMPLE_CONFIG_FILE)

    channels, size = resolved.in_channels, resolved.image_size
    mean, std = data_sources.normalization(config.dataset, channels)
    source = data_sources.get_source(config.dataset, config.dataset.eval_split, channels)
    transform = input_pipeline.eval_transform(config.dataset, size, channels)
    images = next(input_pipeline.eval_batches(source, transform, config.sample.num_images))["image"]
    grid = size // resolved.encoder.patch_size
    masks = make_masks(config.sample, len(images), grid, config.seed)
    model = with_mask_count(model, int(masks[0].sum()))
    noise = masking.noise_from_mask(masks)

    s = config.sample
    out = inpaint_fn(model, s.sampler, s.steps, s.eta, s.num_samples, s.eps_scale)(
        params, images, noise, jax.random.key(config.seed)
    )
    encoded = out["encoded"]
    truth = preprocess.denormalize(images, mean, std)
    pixel_mask = np.asarray(masking.patch_mask_to_pixels(masks, resolved.encoder.patch_size, channels))
    t_T = _pixels(model, params, encoded, out["t_T"], mean, std)
    samples = np.stack([_pixels(model, params, encoded, x, mean, std) for x in out["samples"]])
    metrics = {
        "psnr_tT": float(evaluate.psnr_masked(t_T, truth, pixel_mask).mean()),
        "psnr_samples": float(np.mean([evaluate.psnr_masked(x, truth, pixel_mask).mean() for x in samples])),
        "hf_ratio_tT": evaluate.high_frequency_ratio(t_T, truth, pixel_mask),
        "hf_ratio_samples": float(
            np.mean([evaluate.high_frequency_ratio(x, truth, pixel_mask) for x in samples])
        ),
        "diversity": evaluate.sample_diversity(samples, pixel_mask),
    }
    columns = [truth, truth * (1 - pixel_mask) + 0.5 * pixel_mask]
    if mae is not None:
        mae = mae_prediction(*mae, images, noise, mean, std)
        metrics["psnr_mae"] = float(evaluate.psnr_masked(mae, truth, pixel_mask).mean())
        metrics["hf_ratio_mae"] = evaluate.high_frequency_ratio(mae, truth, pixel_mask)
        # How close DiffMAE's t = T prediction is to MAE's reconstruction itself.
        metrics["psnr_tT_vs_mae"] = float(evaluate.psnr_masked(t_T, mae, pixel_mask).mean())
        columns.append(mae)
    snapshots = np.unique(
        np.linspace(0, len(out["trajectory"]) - 1, TRAJECTORY_SNAPSHOTS).round().astype(int)
    )
    trajectory = [_pixels(model, params, encoded, out["trajectory"][i], mean, std) for i in snapshots]
    columns += [t_T, *samples, *trajectory]

    name = f"inpaint_{os.path.splitext(os.path.basename(s.mask))[0]}_{s.sampler}{s.steps}"
    name += "" if s.eps_scale == 1 else f"_eps{s.eps_scale:g}"
    info = {"checkpoint": loaded, "sampler": s.sampler, "steps": s.steps, "eta": s.eta, "mask": s.mask}
    info["eps_scale"] = s.eps_scale
    info.update(
        {"num_images": len(images), "num_samples": s.num_samples, "masked_patches": int(masks[0].sum())}
    )
    info["grid_columns"] = (
        "original | masked | "
        + ("MAE | " if config.compare_mae_from else "")
        + "t=T prediction | "
        + " | ".join(f"sample {i}" for i in range(s.num_samples))
        + " | x0 trajectory of sample 0 at steps "
        + ", ".join(str(int(i)) for i in snapshots)
    )
    if task.is_main:
        workdir = task.workdir
        writer = writers.Writer(workdir)
        rows = [np.asarray(c)[:GRID_ROWS] for c in columns]  # metrics use every image
        path = writer.write_image(0, name, visualize.grid(rows), f"{name}.png")
        writer.close()
        metrics_path = paths.join(workdir, METRICS_FILE)
        paths.write_atomic(metrics_path, json.dumps({**metrics, **info, "image": path}, indent=2))
        print(json.dumps(metrics))
        print(f"wrote {path} ({info['grid_columns']}) and {metrics_path}")
    return metrics
