"""On-device input (dataset.on_device) against the host loader: pre-training img/s on mae_fmnist.

    python benchmarks/device_input.py                 # 30 timed steps each way after 3 warm-up steps
    python benchmarks/device_input.py --steps 10 --batch_size 64 --repeats 2

Builds configs/mae_fmnist.py's model, optimizer, mesh and train step as
maejax/train.py does, then, in one process, times --steps pre-training steps
after --warmup steps (compilation, the host loader's prefetch queue filling):
- host loader + step: input_pipeline.TrainLoader (tfds reads, PIL
  RandomResizedCrop + flip + normalise in dataset.num_threads threads,
  prefetching) -> to_global -> the compiled train step;
- on-device input + step: device_input.DeviceLoader (indices, boxes, flips
  drawn on the host) -> to_global -> the step that gathers, crops,
  resizes, flips and normalises the device-resident uint8 split first;
- step alone: the compiled train step fed one fixed batch: what the model
  allows with no input work at all (the ceiling for both);
- host loader alone, on-device input alone: the two inputs without the
  model (batches made, nothing trained): what each could feed a
  faster device.
Each row is the best of --repeats (the rows alternate within a repeat). It
prints img/s per row, the device / host ratio, and the load average: on a
shared machine the numbers are only as good as the cores were idle.
"""

import argparse
import importlib.util
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402

from maejax import (  # noqa: E402
    data_sources,
    device_input,
    input_pipeline,
    loop,
    models,
    optim,
    sharding,
    train_step,
    validate,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(REPO, "configs", "mae_fmnist.py"))
    p.add_argument("--steps", type=int, default=30, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first compiles)")
    p.add_argument("--batch_size", type=int, help="default: the config's (mae_fmnist: 256)")
    p.add_argument("--repeats", type=int, default=1, help="runs per row; the table keeps the fastest")
    return p.parse_args(argv)


def load_config(path: str, batch_size):
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    if batch_size:
        config.batch_size = batch_size
    return config


def images_per_second(step_fn, init, batches, warmup: int, steps: int, batch_size: int) -> float:
    """Run warmup + steps steps on `batches` (an iterator of global batches); img/s of the timed ones."""
    state = init()
    for _ in range(warmup):
        state, metrics = step_fn(state, next(batches))
    jax.block_until_ready(metrics)
    started = time.perf_counter()
    for _ in range(steps):
        state, metrics = step_fn(state, next(batches))
    jax.block_until_ready((state, metrics))
    return steps * batch_size / (time.perf_counter() - started)


def main(argv=None):
    args = parse_args(argv)
    config = load_config(args.config, args.batch_size)
    resolved = validate.validate(config, jax.device_count(), jax.process_count())
    size, channels, batch = resolved.image_size, resolved.in_channels, config.batch_size
    mean, std = data_sources.normalization(config.dataset, channels)

    source = data_sources.get_source(config.dataset, config.dataset.train_split, channels)
    split = device_input.read_split(source, config.dataset.num_threads, verbose=True)

    model = models.build_model(resolved)
    key = jax.random.key(config.seed)
    shape = (batch, size, size, channels)
    abstract_params = jax.eval_shape(lambda: train_step.init_params(model, key, shape))
    tx, schedule = optim.build_optimizer(config, abstract_params, len(source))
    init_fn = lambda: train_step.init_state(model, tx, key, shape)  # noqa: E731
    mesh = sharding.make_mesh(config.mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    state_shardings = sharding.tree_shardings(jax.eval_shape(init_fn), mesh)
    init = jax.jit(init_fn, out_shardings=state_shardings)
    step = train_step.make_train_step(model, tx, schedule, key, config.grad_accum_steps)
    shardings = (state_shardings, batch_sharding, mesh)
    host_step = loop.compile_step(step, *shardings)
    device_step = device_input.compile_step(step, split, size, mean, std, *shardings)

    def host_rate():
        transform = input_pipeline.pretrain_transform(config.dataset, size, channels)
        loader = loop.train_loader(config, source, transform, {"next_batch": 0})
        batches = (input_pipeline.to_global({"image": b["image"]}, batch_sharding) for b in loader)
        try:
            return images_per_second(host_step, init, batches, args.warmup, args.steps, batch)
        finally:
            loader.close()

    def device_rate():
        scale, flip = tuple(config.dataset.crop_scale), bool(config.dataset.flip)
        loader = device_input.train_loader(config, split, {"next_batch": 0}, scale, flip)
        batches = (input_pipeline.to_global(device_input.plan(b), batch_sharding) for b in loader)
        return images_per_second(device_step, init, batches, args.warmup, args.steps, batch)

    def step_alone_rate():
        loader = device_input.train_loader(config, split, {"next_batch": 0}, (1.0, 1.0), False)
        fixed = input_pipeline.to_global(device_input.plan(next(loader)), batch_sharding)
        images = jax.jit(device_input.augment, static_argnums=4)(
            split.images, fixed["index"], fixed["box"], fixed["flip"], size, mean, std
        )
        one = input_pipeline.to_global({"image": jax.device_get(images)}, batch_sharding)
        return images_per_second(host_step, init, iter(lambda: one, None), args.warmup, args.steps, batch)

    def host_input_rate():
        transform = input_pipeline.pretrain_transform(config.dataset, size, channels)
        loader = loop.train_loader(config, source, transform, {"next_batch": 0})
        try:
            return input_rate(lambda: input_pipeline.to_global(next(loader), batch_sharding))
        finally:
            loader.close()

    def device_input_rate():
        scale, flip = tuple(config.dataset.crop_scale), bool(config.dataset.flip)
        loader = device_input.train_loader(config, split, {"next_batch": 0}, scale, flip)
        images = device_input.replicate(split.images, mesh)
        make = jax.jit(
            lambda images, p: device_input.augment(images, p["index"], p["box"], p["flip"], size, mean, std)
        )
        return input_rate(
            lambda: make(images, input_pipeline.to_global(device_input.plan(next(loader)), batch_sharding))
        )

    def input_rate(next_batch) -> float:
        for _ in range(args.warmup):
            out = next_batch()
        jax.block_until_ready(out)
        started = time.perf_counter()
        for _ in range(args.steps):
            out = next_batch()
        jax.block_until_ready(out)
        return args.steps * batch / (time.perf_counter() - started)

    rows = {
        "host loader + step": host_rate,
        "on-device input + step": device_rate,
        "step alone": step_alone_rate,
        "host loader alone": host_input_rate,
        "on-device input alone": device_input_rate,
    }
    best = dict.fromkeys(rows, 0.0)
    load = os.getloadavg()[0]
    for _ in range(args.repeats):
        for name, rate in rows.items():
            best[name] = max(best[name], rate())

    print(
        f"\n{os.path.basename(args.config)}: batch {batch}, {args.steps} timed steps after {args.warmup}, "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), {os.cpu_count()} cores, "
        f"load average {load:.2f} at start"
    )
    print(f"{'':<24}{'img/s':>10}")
    for name, value in best.items():
        print(f"{name:<24}{value:>10.0f}")
    ratio = best["on-device input + step"] / best["host loader + step"]
    print(f"pre-training, on-device / host input: {ratio:.2f}x")
    ratio = best["on-device input alone"] / best["host loader alone"]
    print(f"input alone, on-device / host: {ratio:.0f}x")


if __name__ == "__main__":
    main()
