"""One MAE pre-training step (forward, backward, AdamW update): maejax vs. the reference.

    python benchmarks/train_step.py                      # ViT-B/16, 224 px, batch 8
    python benchmarks/train_step.py --variant=mu/4 --image_size=32 --batch=64

The reference is HuggingFace `ViTMAEForPreTraining` (PyTorch, the official
model) with torch.optim.AdamW, on the same sizes, in the same process. The
two are timed in alternating rounds so that machine noise hits both alike;
the table shows medians, the ratio, and achieved GFLOP/s (FLOPs per step from
XLA's cost analysis of the compiled maejax step, the same model for both).
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

from maejax import config as config_lib  # noqa: E402
from maejax import models, optim, train_step  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="B/16")
    p.add_argument("--width", type=int, help="override the variant's encoder width (mlp 4x)")
    p.add_argument("--depth", type=int, help="override the variant's encoder depth")
    p.add_argument("--heads", type=int, help="override the variant's encoder heads")
    p.add_argument("--patch_size", type=int, help="override the variant's patch size")
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--in_channels", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--mask_ratio", type=float, default=0.75)
    p.add_argument("--decoder_width", type=int, default=512)
    p.add_argument("--decoder_depth", type=int, default=8)
    p.add_argument("--decoder_heads", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--rounds", type=int, default=3, help="alternating timing rounds")
    p.add_argument("--steps", type=int, default=3, help="timed steps per round and implementation")
    p.add_argument("--skip_torch", action="store_true")
    return p.parse_args()


def model_config(args) -> dict:
    return dict(
        image_size=args.image_size,
        in_channels=args.in_channels,
        encoder=dict(
            variant=args.variant,
            **{
                k: v
                for k, v in dict(
                    width=args.width, depth=args.depth, num_heads=args.heads, patch_size=args.patch_size
                ).items()
                if v is not None
            },
        ),
        decoder=dict(width=args.decoder_width, depth=args.decoder_depth, num_heads=args.decoder_heads),
        mask_ratio=args.mask_ratio,
        norm_pix_loss=True,
        dtype=args.dtype,
    )


def maejax_runner(args):
    cfg = config_lib.base_config()
    cfg.model.update(model_config(args))
    cfg.batch_size, cfg.total_steps = args.batch, 1000
    cfg.optimizer.warmup_steps = 10
    model = models.build_model(cfg.model)
    shape = (args.batch, args.image_size, args.image_size, args.in_channels)
    key = jax.random.key(0)
    abstract = jax.eval_shape(lambda: train_step.init_params(model, key, shape))
    tx, schedule = optim.build_optimizer(cfg, abstract, num_train_examples=1)
    state = jax.jit(lambda k: train_step.init_state(model, tx, k, shape))(key)
    step = jax.jit(train_step.make_train_step(model, tx, schedule, key), donate_argnums=0)
    batch = {"image": jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)}
    compiled = step.lower(state, batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])

    return run, float(cost.get("flops", float("nan")))


def torch_runner(args):
    import torch

    from tests.torch_reference import hf_model

    torch.set_num_threads(os.cpu_count())
    model = hf_model(model_config(args)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    shape = (args.batch, args.in_channels, args.image_size, args.image_size)
    pixels = torch.from_numpy(np.random.default_rng(0).normal(size=shape).astype(np.float32))

    def run():
        loss = model(pixel_values=pixels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


def time_rounds(runners: dict, rounds: int, steps: int) -> dict:
    times = {name: [] for name in runners}
    for run in runners.values():  # warm-up (compilation, allocator)
        run()
        run()
    for _ in range(rounds):
        for name, run in runners.items():
            for _ in range(steps):
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    args = parse_args()
    jax_run, flops = maejax_runner(args)
    runners = {"maejax (JAX/Flax)": jax_run}
    if not args.skip_torch:
        runners["reference (HF PyTorch)"] = torch_runner(args)
    medians = time_rounds(runners, args.rounds, args.steps)
    print(
        f"MAE train step, {args.variant} {args.image_size}px, batch {args.batch}, mask {args.mask_ratio}, "
        f"decoder {args.decoder_width}x{args.decoder_depth}, {args.dtype}, {os.cpu_count()} CPU threads, "
        f"{jax.devices()[0].platform}"
    )
    print(f"FLOPs per step (XLA cost analysis): {flops / 1e9:.1f} GFLOP ({flops / args.batch:.3g} per image)")
    print(f"{'implementation':<24} {'ms/step':>9} {'img/s':>8} {'GFLOP/s':>8}")
    for name, sec in medians.items():
        print(f"{name:<24} {sec * 1e3:9.1f} {args.batch / sec:8.2f} {flops / sec / 1e9:8.1f}")
    if len(medians) == 2:
        ours, ref = medians.values()
        print(f"speed ratio maejax / reference: {ref / ours:.2f}x")


if __name__ == "__main__":
    main()
