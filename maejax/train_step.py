"""The pure pre-training step: (state, batch) -> (state, metrics).

The state is a plain dict {"step", "params", "opt"}. All randomness of a
step comes from `fold_in(base_key, step)`, so a resumed run draws exactly
what an uninterrupted one would. Per-example random inputs (MAE's mask noise,
DiffMAE's t and eps) are drawn once for the whole global batch and then split
into micro-batches, so gradient accumulation computes the same update as one
large batch.
"""

import jax
import jax.numpy as jnp
import optax


def init_params(model, key, image_shape):
    """Freshly initialised params for images of `image_shape` (B, H, W, C)."""
    images = jnp.zeros(image_shape, jnp.float32)
    rngs = {"params": key, **step_rngs(jax.random.fold_in(key, 1))}
    return model.init(rngs, images, **model.random_inputs(key, image_shape[0]), train=False)["params"]


def init_state(model, tx, key, image_shape) -> dict:
    """{"step": 0, "params": ..., "opt": ...} for images of `image_shape` (B, H, W, C)."""
    params = init_params(model, key, image_shape)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt": tx.init(params)}


def step_rngs(key) -> dict:
    """The model's rng streams for one (micro-)step."""
    return {name: jax.random.fold_in(key, i) for i, name in enumerate(("masking", "dropout", "diffusion"))}


def split_micro_batches(tree, num: int):
    """(B, ...) leaves -> (num, B/num, ...), micro-batch i = examples i, i+num, ...

    Strided, not contiguous, so every device keeps its own rows of a batch that
    is sharded along B.
    """

    def split(x):
        x = x.reshape((x.shape[0] // num, num) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(split, tree)


def make_train_step(model, tx, schedule, base_key, grad_accum_steps: int = 1):
    """Build `train_step(state, batch) -> (state, metrics)` (not yet jitted).

    batch: {"image": (B, H, W, C) float32}, B the global batch per update.
    metrics: loss, lr, grad_norm, param_norm (scalars).
    """

    def loss_fn(params, images, inputs, key):
        out = model.apply({"params": params}, images, **inputs, rngs=step_rngs(key), train=True)
        return out["loss"]

    grad_fn = jax.value_and_grad(loss_fn)

    def train_step(state, batch):
        params, step = state["params"], state["step"]
        key = jax.random.fold_in(base_key, step)
        images = batch["image"]
        inputs = model.random_inputs(jax.random.fold_in(key, 0), images.shape[0])
        if grad_accum_steps == 1:
            loss, grads = grad_fn(params, images, inputs, jax.random.fold_in(key, 1))
        else:
            micro = split_micro_batches({"image": images, "inputs": inputs}, grad_accum_steps)

            def accumulate(carry, xs):
                index, mb = xs
                loss, grads = grad_fn(params, mb["image"], mb["inputs"], jax.random.fold_in(key, 1 + index))
                return jax.tree.map(jnp.add, carry, (loss, grads)), None

            zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
            (loss, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum_steps), micro))
            loss, grads = jax.tree.map(lambda x: x / grad_accum_steps, (loss, grads))
        updates, opt = tx.update(grads, state["opt"], params)
        params = optax.apply_updates(params, updates)
        metrics = {
            "loss": loss,
            "lr": schedule(step),
            "grad_norm": optax.global_norm(grads),
            "param_norm": optax.global_norm(params),
        }
        return {"step": step + 1, "params": params, "opt": opt}, metrics

    return train_step
