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


def accumulate_gradients(grad_fn, batch, num: int, key, aux=None):
    """((mean loss, aux), mean grads) over `num` strided micro-batches of `batch`.

    grad_fn(micro_batch, key, aux) -> ((loss, aux), grads); `aux` (e.g.
    BatchNorm statistics) is threaded through the micro-batches in order.
    With num == 1 this is grad_fn(batch, key, aux).
    """
    if num == 1:
        return grad_fn(batch, key, aux)
    micro = split_micro_batches(batch, num)

    def body(carry, xs):
        total, grads_sum, aux = carry
        index, mb = xs
        (loss, aux), grads = grad_fn(mb, jax.random.fold_in(key, index), aux)
        return (total + loss, jax.tree.map(jnp.add, grads_sum, grads), aux), None

    grad_shapes = jax.eval_shape(lambda: grad_fn(jax.tree.map(lambda x: x[0], micro), key, aux)[1])
    zeros = (
        jnp.zeros((), jnp.float32),
        jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), grad_shapes),
        aux,
    )
    (loss, grads, aux), _ = jax.lax.scan(body, zeros, (jnp.arange(num), micro))
    return (loss / num, aux), jax.tree.map(lambda g: g / num, grads)


def apply_update(tx, schedule, step, params, opt_state, grads, loss):
    """One optimizer update: (new params, new optimizer state, the step's metrics)."""
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {
        "loss": loss,
        "lr": schedule(step),
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(params),
    }
    return params, opt_state, metrics


def make_train_step(model, tx, schedule, base_key, grad_accum_steps: int = 1):
    """Build `train_step(state, batch) -> (state, metrics)` (not yet jitted).

    batch: {"image": (B, H, W, C) float32}, B the global batch per update.
    metrics: loss, lr, grad_norm, param_norm (scalars).
    """

    def grad_fn(params, micro_batch, key, aux):
        def loss_fn(p):
            images, inputs = micro_batch["image"], micro_batch["inputs"]
            return model.apply({"params": p}, images, **inputs, rngs=step_rngs(key), train=True)["loss"], aux

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    def train_step(state, batch):
        params, step = state["params"], state["step"]
        key = jax.random.fold_in(base_key, step)
        images = batch["image"]
        inputs = model.random_inputs(jax.random.fold_in(key, 0), images.shape[0])
        (loss, _), grads = accumulate_gradients(
            lambda mb, k, aux: grad_fn(params, mb, k, aux),
            {"image": images, "inputs": inputs},
            grad_accum_steps,
            jax.random.fold_in(key, 1),
        )
        params, opt, metrics = apply_update(tx, schedule, step, params, state["opt"], grads, loss)
        return {"step": step + 1, "params": params, "opt": opt}, metrics

    return train_step
