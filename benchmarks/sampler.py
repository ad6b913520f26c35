"""DiffMAE sampling speed: the lax.scan sampler against the same maths in Python loops.

    python benchmarks/sampler.py                 # the diffmae_fmnist model, 8 images
    python benchmarks/sampler.py --steps 50 250 --batch 32 --max_unrolled 0

For each step count it reports compile time and steady-state denoising steps
per second of three implementations of one DDPM sampling run (encoder once,
decoder per step), all in one process:
- scan:      maejax.diffusion.sample, one jitted lax.scan (what maejax uses);
- py-loop:   a Python for-loop calling a jitted single step (compiled once,
             one dispatch and host round trip per step);
- unrolled:  the Python for-loop traced inside one jit (the program grows
             with the step count; skipped above --max_unrolled steps).
"""

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maejax import diffusion, models  # noqa: E402
from maejax.recipes import fmnist_pretrain  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, nargs="+", default=[50, 250, 1000])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max_unrolled", type=int, default=50)
    return p.parse_args()


def setup(batch):
    config = fmnist_pretrain()
    config.model.name = "diffmae"
    model = models.build_model(config.model)
    images = jnp.asarray(np.random.default_rng(0).normal(size=(batch, 28, 28, 1)), jnp.float32)
    noise = jax.random.uniform(jax.random.key(1), (batch, model.num_patches))
    rngs = {"params": jax.random.key(0), "masking": jax.random.key(1), "diffusion": jax.random.key(2)}
    params = jax.jit(model.init)(rngs, images)["params"]
    return model, params, images, noise


def timed(fn, *args):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def measure(make, args, repeats):
    """(compile seconds, median run seconds) of a function built by make()."""
    fn = make()
    compile_s = timed(fn, *args)  # first call: trace + compile + one run
    runs = [timed(fn, *args) for _ in range(repeats)]
    run_s = statistics.median(runs)
    return max(compile_s - run_s, 0.0), run_s


def main():
    args = parse_args()
    model, params, images, noise = setup(args.batch)
    schedule = model.schedule
    shape = (args.batch, model.num_patches - model.num_visible, model.patch_dim)
    encode = jax.jit(lambda p, x, n: model.apply({"params": p}, x, n, method=model.encode))
    encoded = encode(params, images, noise)

    def denoise_with(p, enc):
        return lambda x_t, t: model.apply({"params": p}, enc, x_t, t, method=model.denoise)

    def scan_version(steps):
        return jax.jit(
            lambda p, enc, key: diffusion.sample(
                denoise_with(p, enc), schedule, shape, key, sampler="ddpm", steps=steps
            )
        )

    def one_step(p, enc, x_t, t, coef, key):
        x0 = denoise_with(p, enc)(x_t, jnp.full((shape[0],), t, jnp.int32))
        return diffusion.apply_step(coef, x_t, x0, key)

    def loop_version(steps, jit_each_step):
        ts = diffusion.timestep_sequence(schedule.timesteps, steps)
        nexts = np.concatenate([ts[1:], [-1]])
        coefs = jnp.asarray(diffusion.step_coefficients("ddpm", schedule, ts, nexts), jnp.float32)
        step_fn = jax.jit(one_step) if jit_each_step else one_step

        def run(p, enc, key):
            x = jax.random.normal(jax.random.fold_in(key, 0), shape)
            for i, t in enumerate(ts):
                x = step_fn(p, enc, x, int(t), coefs[i], jax.random.fold_in(key, i + 1))
            return x

        return run if jit_each_step else jax.jit(run)

    key = jax.random.key(3)
    print(
        f"DDPM sampling, diffmae_fmnist model ({model.variant} decoder), batch {args.batch}, "
        f"{os.cpu_count()} CPU threads, {jax.devices()[0].platform}"
    )
    print(f"{'steps':>6} {'implementation':<10} {'compile s':>10} {'run s':>8} {'steps/s':>9}")
    for steps in args.steps:
        rows = {"scan": measure(lambda s=steps: scan_version(s), (params, encoded, key), args.repeats)}
        rows["py-loop"] = measure(lambda s=steps: loop_version(s, True), (params, encoded, key), args.repeats)
        if steps <= args.max_unrolled:
            rows["unrolled"] = measure(
                lambda s=steps: loop_version(s, False), (params, encoded, key), args.repeats
            )
        for name, (compile_s, run_s) in rows.items():
            print(f"{steps:>6} {name:<10} {compile_s:>10.2f} {run_s:>8.3f} {steps / run_s:>9.1f}")


if __name__ == "__main__":
    main()
