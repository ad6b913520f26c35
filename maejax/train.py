"""Pre-training loop for MAE and DiffMAE: `train_and_evaluate(config, workdir)`.

Importable from a notebook; `python -m maejax.main` calls it for
config.task == 'pretrain'. Running it again on the same workdir resumes from
the newest checkpoint, input position included.
"""

import functools

import jax
import numpy as np

from maejax import config as config_lib
from maejax import (
    data_sources,
    device_input,
    input_pipeline,
    loop,
    models,
    optim,
    sharding,
    train_step,
    visualize,
)
from maejax import task as task_lib

NUM_RECON_IMAGES = 8


def recon_fn(model, mesh):
    """jit-compiled (params, images, noise) -> model outputs used for pictures, on every process."""

    @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
    def reconstruct(params, images, noise):
        return model.apply({"params": params}, images, noise, method=model.reconstruct)

    return reconstruct


def write_reconstructions(writer, reconstruct, params, images, noise, model_cfg, mean, std, step: int):
    out = jax.device_get(reconstruct(params, images, noise))
    columns = visualize.reconstruction_columns(
        images, out["pred"], out["mask"], model_cfg.encoder.patch_size, model_cfg.norm_pix_loss, mean, std
    )
    return writer.write_image(step, "reconstructions", visualize.grid(columns), f"recon_{step:07d}.png")


MODEL_NAMES = ("mae", "diffmae")


def train_and_evaluate(config, workdir: str) -> dict:
    """Pre-train (or resume pre-training) the model of `config` in `workdir`.

    Returns:
      The last logged metrics, {"step": ..., "loss": ..., ...}.
    """
    with task_lib.begin(config, workdir, MODEL_NAMES) as task:
        return _pretrain(task)


def _pretrain(task) -> dict:
    config, model_cfg = task.config, task.model

    # --- input -----------------------------------------------------------------
    channels, size = model_cfg.in_channels, model_cfg.image_size
    train_source, eval_source = task_lib.sources(task)
    num_train = len(train_source)
    total_steps = config_lib.total_steps(config, num_train)
    mean, std = data_sources.normalization(config.dataset, channels)
    on_device, split = config.dataset.on_device, None
    if on_device:  # read before anything compiles: a split that is no single array is refused first
        split = device_input.read_split(train_source, config.dataset.num_threads, task.is_main)

    # --- model and optimizer ---------------------------------------------------
    model = models.build_model(model_cfg)
    base_key = jax.random.key(config.seed)
    image_shape = (config.batch_size, size, size, channels)
    abstract_params = jax.eval_shape(lambda: train_step.init_params(model, base_key, image_shape))
    tx, schedule = optim.build_optimizer(config, abstract_params, num_train)

    # --- mesh, shard and checkpoint ------------------------------------------
    run = task_lib.restore_or_init(task, lambda: train_step.init_state(model, tx, base_key, image_shape))
    writer = run.writer

    # --- update ----------------------------------------------------------------
    step = train_step.make_train_step(model, tx, schedule, base_key, config.grad_accum_steps)
    shardings = (run.state_shardings, run.batch_sharding, run.mesh)
    if on_device:
        step_fn = device_input.compile_step(step, split, size, mean, std, *shardings)
        scale, flip = tuple(config.dataset.crop_scale), bool(config.dataset.flip)
        loader = device_input.train_loader(config, split, run.position, scale, flip)
        make_batch = device_input.plan
    else:
        step_fn = loop.compile_step(step, *shardings)
        transform = input_pipeline.pretrain_transform(config.dataset, size, channels)
        loader = loop.train_loader(config, train_source, transform, run.position)
        make_batch = lambda batch: {"image": batch["image"]}

    # --- evals: reconstructions of fixed held-out images, kNN monitor ----------
    eval_transform = input_pipeline.eval_transform(config.dataset, size, channels)
    recon_images = next(input_pipeline.eval_batches(eval_source, eval_transform, NUM_RECON_IMAGES))["image"]
    recon_noise = np.asarray(
        jax.random.uniform(jax.random.key(config.seed + 1), (NUM_RECON_IMAGES, model.num_patches)), np.float32
    )
    reconstruct = recon_fn(model, run.mesh)

    def write_images(step, state):
        write_reconstructions(
            writer, reconstruct, state["params"], recon_images, recon_noise, model_cfg, mean, std, step
        )

    hooks = [loop.Hook(config.image_every_steps, write_images)]
    if config.knn_every_steps:
        features = lambda params, images: model.apply(  # noqa: E731
            {"params": params}, images, config.knn.pool, method=model.features
        )
        knn = loop.knn_hook(
            config,
            features,
            run.batch_sharding,
            train_source,
            eval_source,
            eval_transform,
            config.knn_every_steps,
        )
        hooks.append(knn)

    # --- loop ------------------------------------------------------------------
    return loop.run(
        task,
        run,
        step_fn=step_fn,
        loader=loader,
        make_batch=make_batch,
        total_steps=total_steps,
        hooks=hooks,
    )
