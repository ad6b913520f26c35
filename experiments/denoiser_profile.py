"""How much detail a DiffMAE's x0 estimate keeps, as a function of the noise level t.

    python experiments/denoiser_profile.py --diffmae=workdirs/table_long/diffmae \
        --diffmae=workdirs/table_long/diffmae_v --out=workdirs/table_long/denoiser_profile

For each DiffMAE workdir (its newest checkpoint), the masked patches of the
inpainting table's held-out images (the first `num_images` of the test split,
its random masks at the config's sample.mask_ratio) are noised to x_t =
q_sample(x0, t) with their true x0 and a fixed eps, and the decoder's x0
estimate is measured like an inpainting: PSNR on the masked region and the
high-frequency ratio (Laplacian energy over the real image's; 1.0 is as
detailed). A sampler's last steps run at small t, so a model whose estimate
at t = 0 (an input with 1 % noise) is already smooth cannot end on sharp
samples, whatever the sampler. The noised input's own ratio is the column
`x_t` (noise adds energy: above 1).

Writes OUT/profile.json and OUT/profile.md (with the commit it ran at).
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from experiments.inpainting_table import commit, write_record  # noqa: E402
from maejax import checkpoint, data_sources, diffusion, evaluate, input_pipeline, models, preprocess  # noqa: E402
from maejax import config as config_lib  # noqa: E402
from maejax import sample as sample_lib  # noqa: E402
from maejax import task as task_lib  # noqa: E402
from maejax.models import masking  # noqa: E402

TIMESTEPS = (0, 5, 20, 50, 100, 200, 400, 700, 999)
EPS_SEED = 0


def profile(workdir: str, num_images: int, timesteps) -> dict:
    """{'prediction', 'checkpoint', 'rows': [{t, abar, psnr, hf_ratio, hf_ratio_x_t}]} of one DiffMAE."""
    resolved = task_lib.source_model(workdir, "diffmae", "--diffmae")
    if resolved is None:
        raise SystemExit(f"--diffmae={workdir!r} has no config.json: point it at a DiffMAE workdir")
    config = config_lib.read_config_json(workdir)
    model = models.build_model(resolved)
    params, loaded = checkpoint.load_params(workdir)
    channels, size = resolved.in_channels, resolved.image_size
    mean, std = data_sources.normalization(config.dataset, channels)
    source = data_sources.get_source(config.dataset, config.dataset.eval_split, channels)
    transform = input_pipeline.eval_transform(config.dataset, size, channels)
    images = next(input_pipeline.eval_batches(source, transform, num_images))["image"]
    config.sample.mask = "random"
    masks = sample_lib.make_masks(
        config.sample, len(images), size // resolved.encoder.patch_size, config.seed
    )
    model = sample_lib.with_mask_count(model, int(masks[0].sum()))
    encoded = model.apply({"params": params}, images, masking.noise_from_mask(masks), method=model.encode)
    x0 = model.apply({"params": params}, encoded, method=model.masked_targets)
    eps = jax.random.normal(jax.random.key(EPS_SEED), x0.shape)
    truth = preprocess.denormalize(images, mean, std)
    pixel_mask = np.asarray(masking.patch_mask_to_pixels(masks, resolved.encoder.patch_size, channels))
    schedule = model.schedule

    def pixels(patches):
        return np.clip(sample_lib._pixels(model, params, encoded, patches, mean, std), 0.0, 1.0)

    rows = []
    for t in [t for t in timesteps if t < model.timesteps]:
        ts = jnp.full((x0.shape[0],), t, jnp.int32)
        x_t = diffusion.q_sample(schedule, x0, ts, eps)
        estimate = pixels(model.apply({"params": params}, encoded, x_t, ts, method=model.denoise))
        rows.append(
            {
                "t": int(t),
                "abar": float(schedule.alphas_cumprod[t]),
                "psnr": float(evaluate.psnr_masked(estimate, truth, pixel_mask).mean()),
                "hf_ratio": evaluate.high_frequency_ratio(estimate, truth, pixel_mask),
                "hf_ratio_x_t": evaluate.high_frequency_ratio(pixels(x_t), truth, pixel_mask),
            }
        )
        print(workdir, rows[-1], flush=True)
    return {"prediction": model.prediction, "checkpoint": loaded, "rows": rows}


def markdown(results: dict, num_images: int, revision: str) -> str:
    lines = [
        f"x0 estimate of the masked patches given their true x_t, {num_images} held-out test images, "
        f"random masks; commit {revision}.",
        "",
        "| t | abar_t | "
        + " | ".join(f"{os.path.basename(w)} ({r['prediction']}): PSNR / hf" for w, r in results.items())
        + " | x_t hf |",
        "|---|---|" + "---|" * (len(results) + 1),
    ]
    first = next(iter(results.values()))["rows"]
    for i, row in enumerate(first):
        cells = [f"{r['rows'][i]['psnr']:.2f} / {r['rows'][i]['hf_ratio']:.3f}" for r in results.values()]
        lines.append(
            f"| {row['t']} | {row['abar']:.4f} | " + " | ".join(cells) + f" | {row['hf_ratio_x_t']:.2f} |"
        )
    lines += ["", "Checkpoints: " + "; ".join(f"{w}: {r['checkpoint']}" for w, r in results.items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--diffmae", action="append", required=True, help="a DiffMAE workdir (repeatable)")
    parser.add_argument("--out", required=True, help="folder for profile.json and profile.md")
    parser.add_argument("--num_images", type=int, default=64, help="held-out test images")
    args = parser.parse_args(argv)
    if args.num_images < 1:
        parser.error(f"--num_images={args.num_images} is invalid: at least 1")
    results = {w: profile(w, args.num_images, TIMESTEPS) for w in args.diffmae}
    revision = commit()
    record = {"commit": revision, "num_images": args.num_images, "models": results}
    write_record(args.out, "profile", record, markdown(results, args.num_images, revision))


if __name__ == "__main__":
    main()
