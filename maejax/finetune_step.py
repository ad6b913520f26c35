"""The fine-tuning and linear-probe steps: (state, batch) -> (state, metrics), and the eval step.

The state is {step, params, frozen, batch_stats, opt}: a linear probe trains
only the head (`params`) and keeps the encoder in `frozen`.
"""

import jax
import jax.numpy as jnp
import optax

from maejax import train_step


def split_trainable(params: dict, probe: bool):
    """(trainable, frozen): the head alone trains in a linear probe."""
    if not probe:
        return params, {}
    return {"head": params["head"]}, {k: v for k, v in params.items() if k != "head"}


def new_state(params: dict, batch_stats: dict, tx, probe: bool) -> dict:
    """The train state at step 0: {step, params (trained), frozen, batch_stats, opt}."""
    trainable, frozen = split_trainable(params, probe)
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": trainable,
        "frozen": frozen,
        "batch_stats": batch_stats,
        "opt": tx.init(trainable),
    }


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
