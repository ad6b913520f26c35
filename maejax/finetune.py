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
logs `eval_top1`, `eval_top5` as fractions to metrics.jsonl.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from maejax import (
    augment,
    checkpoint,
    data_sources,
    input_pipeline,
    loop,
    models,
    optim,
    preprocess,
    train_step,
    writers,
)
from maejax import config as config_lib
from maejax import sharding as sharding_lib
from maejax.errors import ConfigError, UserError
from maejax.models.classifier import interpolate_pos_embed

RANDOM_INIT = "random"


# --- pre-trained weights -------------------------------------------------------


def pretrained_encoder(init_from: str):
    """The encoder params of a pre-training workdir / convert output, and what was loaded."""
    params, loaded = checkpoint.load_params(init_from)
    if "encoder" not in params:
        raise UserError(f"{loaded} has no encoder params (top-level keys: {sorted(params)})")
    return params["encoder"], loaded


def load_encoder(params: dict, encoder: dict, grid_size: int) -> dict:
    """`params` with its encoder replaced by `encoder` (shapes checked; pos table adapted).

    A pre-training encoder has no `pos_embed` param (its table is fixed) and a
    final `norm` the average-pooling classifier does not use: the classifier
    keeps its own sin-cos-initialised `pos_embed`, and the extra norm is dropped
    (as the official fine-tuning does). A learned `pos_embed` of another grid
    is interpolated.
    """
    target = flax.core.unfreeze(params["encoder"])
    merged = {}
    for name, value in target.items():
        if name == "pos_embed" and "pos_embed" in encoder:
            merged[name] = interpolate_pos_embed(encoder["pos_embed"], grid_size)
        elif name in encoder:
            merged[name] = encoder[name]
        else:
            merged[name] = value
        got = jax.tree.map(np.shape, merged[name])
        want = jax.tree.map(np.shape, value)
        if got != want:
            raise UserError(f"pre-trained encoder tensor {name!r} has shapes {got}, the config needs {want}")
    missing = sorted(set(target) - set(encoder) - {"pos_embed"})
    if missing:
        raise UserError(f"pre-trained encoder lacks {missing}: is model.encoder the pre-training's size?")
    return {**params, "encoder": merged}


# --- the step -----------------------------------------------------------------


def split_trainable(params: dict, probe: bool):
    """(trainable, frozen): the head alone trains in a linear probe."""
    if not probe:
        return params, {}
    return {"head": params["head"]}, {k: v for k, v in params.items() if k != "head"}


def make_step(model, tx, schedule, base_key, probe: bool, grad_accum_steps: int):
    """(state, batch{image, target}) -> (state, metrics); state {step, params, frozen, batch_stats, opt}."""

    def grad_fn(trainable, frozen, micro_batch, key, batch_stats):
        def loss_fn(trainable):
            variables = {"params": {**frozen, **trainable}}
            rngs = {"dropout": key}
            if probe:
                variables["batch_stats"] = batch_stats
                logits, updates = model.apply(
                    variables, micro_batch["image"], train=True, mutable=["batch_stats"], rngs=rngs
                )
                new_stats = updates["batch_stats"]
            else:
                logits, new_stats = (
                    model.apply(variables, micro_batch["image"], train=True, rngs=rngs),
                    batch_stats,
                )
            return optax.softmax_cross_entropy(logits, micro_batch["target"]).mean(), new_stats

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        return (loss, new_stats), grads

    def step_fn(state, batch):
        params, frozen, step = state["params"], state["frozen"], state["step"]
        (loss, stats), grads = train_step.accumulate_gradients(
            lambda mb, k, aux: grad_fn(params, frozen, mb, k, aux),
            batch,
            grad_accum_steps,
            jax.random.fold_in(base_key, step),
            state["batch_stats"],
        )
        params, opt, metrics = train_step.apply_update(tx, schedule, step, params, state["opt"], grads, loss)
        new_state = {"step": step + 1, "params": params, "frozen": frozen, "batch_stats": stats, "opt": opt}
        return new_state, metrics

    return step_fn


def make_eval_step(model):
    """(state, batch{image, label, valid}) -> {correct1, correct5, count} sums over the batch."""

    def eval_step(state, batch):
        variables = {"params": {**state["frozen"], **state["params"]}}
        if state["batch_stats"]:
            variables["batch_stats"] = state["batch_stats"]
        logits = model.apply(variables, batch["image"], train=False)
        top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
        hits = top5 == batch["label"][:, None]
        valid = batch["valid"]
        return {
            "correct1": jnp.sum(hits[:, 0] * valid),
            "correct5": jnp.sum(hits.any(axis=1) * valid),
            "count": jnp.sum(valid),
        }

    return eval_step


# --- input ----------------------------------------------------------------------


def train_transform(config, size: int, channels: int, probe: bool):
    """RandomResizedCrop + flip (+ RandAugment and random erasing when fine-tuning) + normalise."""
    mean, std = data_sources.normalization(config.dataset, channels)
    ft = config.finetune
    scale = tuple(ft.crop_scale)

    def transform(rng, image):
        image = preprocess.random_resized_crop(rng, image, size, scale)
        if rng.uniform() < 0.5:
            image = image[:, ::-1]
        if not probe and ft.randaug_ops > 0:
            img = augment.rand_augment(
                rng,
                preprocess.to_pil(np.ascontiguousarray(image)),
                ft.randaug_ops,
                ft.randaug_magnitude,
                ft.randaug_mstd,
            )
            image = preprocess.from_pil(img, channels)
        image = preprocess.normalize(image, mean, std)
        return image if probe else augment.random_erasing(rng, image, ft.reprob)

    return transform


def batch_maker(config, num_classes: int, probe: bool):
    """Host-local loader batch -> {image, target}: mixup/cutmix and smoothed soft targets."""
    ft = config.finetune
    counter = {"batch": 0}

    def make(batch):
        rng = np.random.default_rng((config.seed, counter["batch"], jax.process_index(), 0x313))
        counter["batch"] += 1
        if probe:
            return {
                "image": batch["image"],
                "target": augment.one_hot_smoothed(batch["label"], num_classes, 0.0),
            }
        images, targets, _ = augment.mix_batch(
            rng,
            batch["image"],
            batch["label"],
            num_classes,
            mixup=ft.mixup,
            cutmix=ft.cutmix,
            prob=ft.mixup_prob,
            switch_prob=ft.mixup_switch_prob,
            smoothing=ft.label_smoothing,
        )
        return {"image": images, "target": targets}

    return make, counter


# --- the task -------------------------------------------------------------------


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
    # --- validation ---------------------------------------------------------------
    resolved = loop.start_run(config, workdir, ("classifier",))
    probe = config.task == "linprobe"
    is_main = jax.process_index() == 0

    # --- input ----------------------------------------------------------------------
    channels, size = resolved.in_channels, resolved.image_size
    train_source = data_sources.get_source(config.dataset, config.dataset.train_split, channels)
    eval_source = data_sources.get_source(config.dataset, config.dataset.eval_split, channels)
    if train_source.num_classes != resolved.num_classes:
        raise ConfigError(
            "model.num_classes",
            resolved.num_classes,
            f"{config.dataset.name} has {train_source.num_classes} classes",
        )
    total_steps = config_lib.total_steps(config, len(train_source))

    # --- model, weights and optimizer --------------------------------------------------
    model = models.build_model(resolved).clone(probe=probe)
    base_key = jax.random.key(config.seed)
    image_shape = (config.batch_size, size, size, channels)
    encoder, loaded = (None, "random initialisation")
    if config.init_from != RANDOM_INIT:
        encoder, loaded = pretrained_encoder(config.init_from)

    # The pre-trained encoder is an argument of the jitted init, not a constant
    # baked into its program (a ViT-H's weights would not fit in one).
    def init_variables(encoder):
        variables = model.init({"params": base_key, "dropout": base_key}, jnp.zeros(image_shape), train=False)
        params = variables["params"]
        if encoder is not None:
            params = load_encoder(params, encoder, size // resolved.encoder.patch_size)
        return params, variables.get("batch_stats", {})

    abstract_params, _ = jax.eval_shape(init_variables, encoder)
    trainable_shapes, _ = split_trainable(abstract_params, probe)
    tx, schedule = optim.build_optimizer(
        config, trainable_shapes, len(train_source), depth=resolved.encoder.depth
    )

    def init(encoder):
        params, stats = init_variables(encoder)
        trainable, frozen = split_trainable(params, probe)
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": trainable,
            "frozen": frozen,
            "batch_stats": stats,
            "opt": tx.init(trainable),
        }

    # --- mesh, shard and checkpoint ----------------------------------------------------
    abstract_state = jax.eval_shape(init, encoder)
    mesh, batch_sharding, state_shardings = loop.mesh_and_shardings(config, abstract_state)
    ckpt = checkpoint.Checkpointer(workdir, config.keep_checkpoints)
    start_step, state, position, restored = loop.restore_or_init(
        ckpt, abstract_state, state_shardings, init, encoder
    )
    writer = writers.Writer(workdir, enabled=is_main)
    writer.truncate_after(start_step)
    if is_main:
        print(f"{config.task} from {loaded}", flush=True)

    # --- update and eval ---------------------------------------------------------------
    step_fn = loop.compile_step(
        make_step(model, tx, schedule, base_key, probe, config.grad_accum_steps),
        state_shardings,
        batch_sharding,
        mesh,
    )
    eval_fn = jax.jit(
        make_eval_step(model),
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=sharding_lib.replicated(mesh),
    )
    eval_transform = input_pipeline.eval_transform(
        config.dataset, size, channels, config.finetune.eval_resize_ratio
    )
    loader = loop.train_loader(config, train_source, train_transform(config, size, channels, probe), position)
    make_batch, counter = batch_maker(config, resolved.num_classes, probe)
    counter["batch"] = loader.position

    def run_eval(step, state):
        return evaluate_split(eval_fn, state, eval_source, eval_transform, config.batch_size, batch_sharding)

    hooks = [loop.Hook(config.eval_every_steps, run_eval)]
    if probe:  # the frozen encoder's kNN accuracy, for comparison with the probe
        features = lambda params, images: model.apply({"params": params}, images, method=model.features)  # noqa: E731
        hooks.append(
            loop.knn_hook(config, features, batch_sharding, train_source, eval_source, eval_transform)
        )

    return loop.run(
        config=config,
        workdir=workdir,
        state=state,
        step_fn=step_fn,
        loader=loader,
        batch_sharding=batch_sharding,
        make_batch=make_batch,
        ckpt=ckpt,
        writer=writer,
        total_steps=total_steps,
        start_step=start_step,
        restored=restored,
        hooks=hooks,
    )
