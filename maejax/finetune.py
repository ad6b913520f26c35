"""Fine-tuning and linear probing: `train_and_evaluate(config, workdir)` for
config.task 'finetune' or 'linprobe'.

Both start from `config.init_from`: a pre-training workdir (its newest
checkpoint's encoder), a `maejax.convert` output, or 'random' (a randomly
initialised encoder, the from-scratch baseline).

- finetune: the whole classifier trains with AdamW (0.9, 0.999), layer-wise lr
  decay, weight decay except on biases, norms, pos_embed and cls_token, label
  smoothing, mixup/cutmix, RandAugment and random erasing (FINETUNE.md).
- linprobe: the encoder is frozen; a BatchNorm (no affine) + Linear head
  trains with LARS on the cls feature (main_linprobe).

Evaluation covers the whole eval split once (padded, across processes) and
logs `eval_top1`, `eval_top5` as fractions to metrics.jsonl. The parts live
in pretrained.py (weights), finetune_step.py (steps) and finetune_input.py
(host augmentation); this file wires them into a task.
"""

import jax
import jax.numpy as jnp

from maejax import config as config_lib
from maejax import data_sources, device_input, input_pipeline, loop, models, optim, pretrained
from maejax import sharding as sharding_lib
from maejax import task as task_lib
from maejax.errors import ConfigError
from maejax.finetune_input import batch_maker, device_batch_maker, train_transform
from maejax.finetune_step import make_eval_step, make_step, new_state, split_trainable

MODEL_NAMES = ("classifier",)


def evaluate_split(eval_fn, state, source, transform, batch_size, batch_sharding) -> dict:
    totals = {"correct1": 0.0, "correct5": 0.0, "count": 0.0}
    for batch in input_pipeline.eval_batches(
        source, transform, batch_size, jax.process_index(), jax.process_count()
    ):
        sums = jax.device_get(eval_fn(state, input_pipeline.to_global(batch, batch_sharding)))
        totals = {k: totals[k] + float(sums[k]) for k in totals}
    count = totals["count"]
    return {
        "eval_top1": totals["correct1"] / count,
        "eval_top5": totals["correct5"] / count,
        "eval_examples": count,
    }


def train_and_evaluate(config, workdir: str) -> dict:
    """Fine-tune or linear-probe (config.task) from config.init_from; resumable like pre-training."""
    with task_lib.begin(config, workdir, MODEL_NAMES) as task:
        return _finetune(task)


def _finetune(task) -> dict:
    config, resolved = task.config, task.model
    probe = config.task == "linprobe"

    # --- input and weights (read before anything compiles) ---------------------------
    channels, size = resolved.in_channels, resolved.image_size
    train_source, eval_source = task_lib.sources(task)
    if train_source.num_classes != resolved.num_classes:
        raise ConfigError(
            "model.num_classes",
            resolved.num_classes,
            f"{config.dataset.name} has {train_source.num_classes} classes",
        )
    total_steps = config_lib.total_steps(config, len(train_source))
    on_device, split = config.dataset.on_device, None
    if on_device:  # read before anything compiles: a split that is no single array is refused first
        split = device_input.read_split(train_source, config.dataset.num_threads, task.is_main)
    encoder, loaded = (None, "random initialisation")
    if config.init_from != pretrained.RANDOM_INIT:
        encoder, loaded = pretrained.pretrained_encoder(config.init_from)

    # --- model and optimizer -----------------------------------------------------------
    model = models.build_model(resolved).clone(probe=probe)
    base_key = jax.random.key(config.seed)
    image_shape = (config.batch_size, size, size, channels)

    # The pre-trained encoder is an argument of the jitted init, not a constant
    # baked into its program (a ViT-H's weights would not fit in one).
    def init_variables(encoder):
        variables = model.init({"params": base_key, "dropout": base_key}, jnp.zeros(image_shape), train=False)
        params = variables["params"]
        if encoder is not None:
            params = pretrained.load_encoder(params, encoder, size // resolved.encoder.patch_size)
        return params, variables.get("batch_stats", {})

    abstract_params, _ = jax.eval_shape(init_variables, encoder)
    trainable_shapes, _ = split_trainable(abstract_params, probe)
    tx, schedule = optim.build_optimizer(
        config, trainable_shapes, len(train_source), depth=resolved.encoder.depth
    )

    def init(encoder):
        return new_state(*init_variables(encoder), tx, probe)

    # --- mesh, shard and checkpoint ----------------------------------------------------
    run = task_lib.restore_or_init(task, init, encoder)
    if task.is_main:
        print(f"{config.task} from {loaded}", flush=True)

    # --- update and eval ---------------------------------------------------------------
    step = make_step(model, tx, schedule, base_key, probe, config.grad_accum_steps)
    shardings = (run.state_shardings, run.batch_sharding, run.mesh)
    if on_device:
        mean, std = data_sources.normalization(config.dataset, channels)
        step_fn = device_input.compile_step(step, split, size, mean, std, *shardings)
        # train_transform's crop and flip; validate refused the host-only augmentations.
        scale = tuple(config.finetune.crop_scale)
        loader = device_input.train_loader(config, split, run.position, scale, flip=True)
        make_batch = device_batch_maker(config, resolved.num_classes, probe)
    else:
        step_fn = loop.compile_step(step, *shardings)
        loader = loop.train_loader(
            config, train_source, train_transform(config, size, channels, probe), run.position
        )
        make_batch, counter = batch_maker(config, resolved.num_classes, probe)
        counter["batch"] = loader.position

    eval_fn = jax.jit(
        make_eval_step(model),
        in_shardings=(run.state_shardings, run.batch_sharding),
        out_shardings=sharding_lib.replicated(run.mesh),
    )
    eval_transform = input_pipeline.eval_transform(
        config.dataset, size, channels, config.finetune.eval_resize_ratio
    )

    def run_eval(step, state):
        return evaluate_split(
            eval_fn, state, eval_source, eval_transform, config.batch_size, run.batch_sharding
        )

    hooks = [loop.Hook(config.eval_every_steps, run_eval)]
    if probe:  # the frozen encoder's kNN accuracy, for comparison with the probe
        features = lambda params, images: model.apply({"params": params}, images, method=model.features)  # noqa: E731
        hooks.append(
            loop.knn_hook(config, features, run.batch_sharding, train_source, eval_source, eval_transform)
        )

    return loop.run(
        task,
        run,
        step_fn=step_fn,
        loader=loader,
        make_batch=make_batch,
        total_steps=total_steps,
        hooks=hooks,
    )
