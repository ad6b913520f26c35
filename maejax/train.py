"""Pre-training loop for MAE and DiffMAE: `train_and_evaluate(config, workdir)`.

Importable from a notebook; `python -m maejax.main` calls it for
config.task == 'pretrain'. Running it again on the same workdir resumes from
the newest checkpoint, input position included.
"""

import math
import os
import signal

import jax
import numpy as np

from maejax import (
    checkpoint,
    data_sources,
    input_pipeline,
    models,
    optim,
    sharding,
    train_step,
    visualize,
    writers,
)
from maejax import config as config_lib
from maejax import validate as validate_lib
from maejax.errors import UserError

NUM_RECON_IMAGES = 8


class TrainingDiverged(UserError):
    """The loss became NaN or infinite: the run stops and keeps its last good checkpoint."""


class PreemptionWatcher:
    """Turns SIGTERM (and a first Ctrl-C) into a flag the loop checks once per step.

    The loop then saves a checkpoint at the current step and exits cleanly; a
    second Ctrl-C interrupts at once. With several processes JAX's own
    preemption service takes SIGTERM instead and makes every process agree on
    the step to save at (`reached_preemption`), so no Python handler is set.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, checkpointer, single_process: bool):
        self.requested = False
        self._checkpointer = checkpointer
        self._single_process = single_process
        self._previous = {}

    def reached(self, step: int) -> bool:
        return self.requested or self._checkpointer.manager.reached_preemption(step)

    def __enter__(self):
        for sig in self.SIGNALS if self._single_process else ():
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (some notebook runners): no handler
                pass
        return self

    def _handle(self, signum, frame):
        del frame
        self.requested = True
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, self._previous.get(signal.SIGINT, signal.default_int_handler))

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def recon_fn(model):
    """jit-compiled (params, images, noise) -> model outputs used for pictures."""

    @jax.jit
    def reconstruct(params, images, noise):
        out = model.apply({"params": params}, images, noise=noise, train=False)
        return {"pred": out["pred"], "mask": out["mask"]}

    return reconstruct


def write_reconstructions(writer, reconstruct, params, images, noise, model_cfg, mean, std, step: int):
    out = jax.device_get(reconstruct(params, images, noise))
    columns = visualize.reconstruction_columns(
        images, out["pred"], out["mask"], model_cfg.encoder.patch_size, model_cfg.norm_pix_loss, mean, std
    )
    return writer.write_image(step, "reconstructions", visualize.grid(columns), f"recon_{step:07d}.png")


def check_finite(metrics: dict, step: int, last_checkpoint) -> None:
    if not all(math.isfinite(float(v)) for v in metrics.values()):
        kept = (
            f"the last good checkpoint (step {last_checkpoint}) is kept"
            if last_checkpoint
            else "no checkpoint"
        )
        raise TrainingDiverged(
            f"non-finite loss/gradients at step {step} ({metrics}); {kept}. Try a lower optimizer.blr, "
            "optimizer.grad_clip=1.0, more optimizer.warmup_steps, or model.dtype='float32'"
        )


def train_and_evaluate(config, workdir: str) -> dict:
    """Pre-train (or resume pre-training) the model of `config` in `workdir`.

    Returns:
      The last logged metrics, {"step": ..., "loss": ..., ...}.
    """
    # --- validation (before anything compiles) --------------------------------
    model_cfg = validate_lib.validate(config, jax.device_count(), jax.process_count())
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    if is_main:
        config_lib.write_config_json(config_lib.with_resolved_model(config), workdir)

    # --- mesh ------------------------------------------------------------------
    mesh = sharding.make_mesh(config.mesh)
    batch_sharding = sharding.batch_sharding(mesh)

    # --- input -----------------------------------------------------------------
    channels, size = model_cfg.in_channels, model_cfg.image_size
    train_source = data_sources.get_source(config.dataset, config.dataset.train_split, channels)
    num_train = len(train_source)
    total_steps = config_lib.total_steps(config, num_train)
    mean, std = data_sources.normalization(config.dataset, channels)

    # --- model and optimizer ---------------------------------------------------
    model = models.build_model(model_cfg)
    base_key = jax.random.key(config.seed)
    image_shape = (config.batch_size, size, size, channels)
    abstract_params = jax.eval_shape(lambda: train_step.init_params(model, base_key, image_shape))
    tx, schedule = optim.build_optimizer(config, abstract_params, num_train)

    # --- shard -----------------------------------------------------------------
    init = lambda key: train_step.init_state(model, tx, key, image_shape)  # noqa: E731
    abstract_state = jax.eval_shape(init, base_key)
    state_shardings = sharding.tree_shardings(abstract_state, mesh)

    # --- checkpoint ------------------------------------------------------------
    ckpt = checkpoint.Checkpointer(workdir, config.keep_checkpoints)
    restored = ckpt.restore_latest(checkpoint.abstract_with_shardings(abstract_state, state_shardings))
    if restored:
        start_step, state, position = restored
    else:
        start_step, position = 0, {"next_batch": 0}
        state = jax.jit(init, out_shardings=state_shardings)(base_key)
    writer = writers.Writer(workdir, enabled=is_main)
    writer.truncate_after(start_step)

    # --- update ----------------------------------------------------------------
    step_fn = jax.jit(
        train_step.make_train_step(model, tx, schedule, base_key, config.grad_accum_steps),
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    loader = input_pipeline.TrainLoader(
        train_source,
        input_pipeline.pretrain_transform(config.dataset, size, channels),
        seed=config.seed,
        batch_size=config.batch_size,
        start_batch=int(position["next_batch"]),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        prefetch=config.dataset.prefetch,
    )

    # --- evals: reconstructions of fixed held-out images -----------------------
    eval_source = data_sources.get_source(config.dataset, config.dataset.eval_split, channels)
    recon_images = next(
        input_pipeline.eval_batches(
            eval_source, input_pipeline.eval_transform(config.dataset, size, channels), NUM_RECON_IMAGES
        )
    )["image"]
    recon_noise = np.asarray(
        jax.random.uniform(jax.random.key(config.seed + 1), (NUM_RECON_IMAGES, model.num_patches)), np.float32
    )
    reconstruct = recon_fn(model)

    # --- loop ------------------------------------------------------------------
    progress = writers.Progress(total_steps, config.batch_size, start_step, enabled=is_main)
    resumed = (
        f"resuming at step {start_step} (input batch {position['next_batch']})"
        if restored
        else "from scratch"
    )
    progress.print(f"training {total_steps} steps, {resumed}; workdir {os.path.abspath(workdir)}")
    last_saved = ckpt.all_steps()[-1] if ckpt.all_steps() else None
    last = {}
    step = start_step
    with PreemptionWatcher(ckpt, jax.process_count() == 1) as preemption:
        try:
            while step < total_steps:
                batch = input_pipeline.to_global({"image": next(loader)["image"]}, batch_sharding)
                state, metrics = step_fn(state, batch)
                step += 1
                final = step == total_steps
                if step % config.log_every_steps == 0 or final:
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    check_finite(metrics, step, last_saved)
                    metrics["img_per_s"] = progress.images_per_second(step)
                    writer.write_scalars(step, metrics)
                    progress.print(progress.line(step, metrics, metrics["img_per_s"]))
                    last = {"step": step, **metrics}
                if step % config.image_every_steps == 0 or final:
                    write_reconstructions(
                        writer,
                        reconstruct,
                        state["params"],
                        recon_images,
                        recon_noise,
                        model_cfg,
                        mean,
                        std,
                        step,
                    )
                preempted = preemption.reached(step)
                if step % config.checkpoint_every_steps == 0 or final or preempted:
                    check_finite(
                        {"param_norm": float(jax.device_get(metrics["param_norm"]))}, step, last_saved
                    )
                    ckpt.save(step, state, {"next_batch": loader.position})
                    last_saved = step
                if preempted and not final:
                    progress.print(f"preemption requested: saved step {step}; run the same command to resume")
                    break
        finally:
            loader.close()
            ckpt.close()
            writer.close()
    if is_main and step == total_steps:
        progress.print(
            f"done: {step} steps. metrics {writer.metrics_path}; reconstructions "
            f"{os.path.join(workdir, writers.IMAGES_DIR)}; checkpoints {ckpt.directory}"
        )
    return last
