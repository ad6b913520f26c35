"""Optimisation: the official lr schedule, decay mask, gradient accumulation, layer decay, LARS."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from maejax import config as config_lib
from maejax import models, optim, train_step

TINY = dict(
    image_size=16, in_channels=1, encoder=dict(variant="mu/4"), decoder=dict(width=32, depth=1, num_heads=2)
)


def official_lr(step, peak, total, warmup, min_lr):
    """The official adjust_learning_rate, with epochs counted in optimizer updates."""
    if step < warmup:
        return peak * step / warmup
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (total - warmup)))


@pytest.mark.parametrize("step", [0, 1, 5, 9, 10, 11, 40, 55, 99, 100])
def test_schedule_matches_the_official_rule(step):
    schedule = optim.lr_schedule(2.0, total_steps=100, warmup_steps=10, min_lr=0.1)
    assert float(schedule(step)) == pytest.approx(official_lr(step, 2.0, 100, 10, 0.1), rel=1e-6, abs=1e-7)


def test_peak_lr_is_blr_times_batch_over_256():
    config = config_lib.base_config()
    config.batch_size, config.optimizer.blr = 4096, 1.5e-4
    assert config_lib.learning_rate(config) == pytest.approx(2.4e-3)
    config.optimizer.lr = 0.1
    assert config_lib.learning_rate(config) == 0.1


def test_epochs_convert_to_steps_in_one_place():
    config = config_lib.base_config()
    config.batch_size, config.total_epochs, config.optimizer.warmup_epochs = 4096, 800.0, 40.0
    n = 1281167
    # 312 whole batches per epoch (the last partial batch is dropped, as the official loader).
    assert config_lib.total_steps(config, n) == 800 * 312 == 249_600
    assert config_lib.warmup_steps(config, n) == 40 * 312


def mae_params(cfg=TINY):
    model = models.build_model(cfg)
    return model, jax.jit(lambda k: train_step.init_params(model, k, (2, 16, 16, 1)))(jax.random.key(0))


def test_weight_decay_mask_on_a_real_parameter_tree():
    _, params = mae_params()
    mask = optim.decay_mask(params)
    enc, dec = mask["encoder"], mask["decoder"]
    assert enc["blocks_0"]["attn"]["qkv"]["kernel"] and enc["patch_embed"]["kernel"]
    assert dec["pred"]["kernel"] and dec["embed"]["kernel"]
    assert not enc["blocks_0"]["attn"]["qkv"]["bias"] and not enc["norm"]["scale"] and not enc["norm"]["bias"]
    assert not dec["blocks_0"]["norm1"]["scale"] and not enc["patch_embed"]["bias"]
    # Official pre-training decays the (1, 1, D) tokens (only 1-D tensors are exempt) ...
    assert enc["cls_token"] and dec["mask_token"]
    # ... fine-tuning exempts cls_token and pos_embed by name.
    assert not optim.decay_mask(params, optim.FINETUNE_NO_DECAY)["encoder"]["cls_token"]


@pytest.mark.slow
def test_gradient_accumulation_equals_the_large_batch():
    # Plain SGD makes the new params linear in the gradient, so they expose any
    # difference between the accumulated and the large-batch gradient (Adam's
    # first step is sign-like and would hide or magnify it).
    model, params = mae_params()
    tx = optax.sgd(1.0)
    schedule = optim.lr_schedule(1.0, 100, 0)
    state = {"step": jnp.asarray(3, jnp.int32), "params": params, "opt": tx.init(params)}
    batch = {"image": jax.random.normal(jax.random.key(1), (16, 16, 16, 1))}
    results = []
    for accum in (1, 4):
        step = jax.jit(train_step.make_train_step(model, tx, schedule, jax.random.key(7), accum))
        results.append(step(state, batch))
    (big, big_metrics), (acc, acc_metrics) = results
    assert float(acc_metrics["loss"]) == pytest.approx(float(big_metrics["loss"]), rel=1e-5)
    assert float(acc_metrics["grad_norm"]) == pytest.approx(float(big_metrics["grad_norm"]), rel=1e-5)
    grad = lambda new: jax.tree.map(lambda p, n: p - n, params, new["params"])  # noqa: E731
    pairs = zip(jax.tree.leaves(grad(acc)), jax.tree.leaves(grad(big)), strict=True)
    worst = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30)) for a, b in pairs)
    assert worst < 1e-5
    assert float(big_metrics["grad_norm"]) > 1e-3  # a real gradient


@pytest.mark.slow
def test_the_step_key_depends_only_on_the_step():
    model, params = mae_params()
    config = config_lib.base_config()
    config.batch_size, config.total_steps = 4, 10
    tx, schedule = optim.build_optimizer(config, params, 1000)
    step = jax.jit(train_step.make_train_step(model, tx, schedule, jax.random.key(0)))
    batch = {"image": jax.random.normal(jax.random.key(1), (4, 16, 16, 1))}
    at = lambda s: {"step": jnp.asarray(s, jnp.int32), "params": params, "opt": tx.init(params)}  # noqa: E731
    loss = lambda s: float(step(at(s), batch)[1]["loss"])  # noqa: E731
    assert loss(5) == loss(5) and loss(5) != loss(6)


@pytest.mark.slow
def test_grad_clip_clips_the_global_norm_before_adamw():
    params = {"w": jnp.ones((4, 4)), "b": jnp.ones((4,))}
    config = config_lib.base_config()
    config.batch_size, config.total_steps, config.optimizer.warmup_steps = 256, 10, 0
    g1 = {"w": jnp.full((4, 4), 10.0), "b": jnp.full((4,), -10.0)}  # norm ~45: clipped to 0.5
    g2 = {"w": jnp.full((4, 4), 0.01), "b": jnp.full((4,), 0.02)}  # small: untouched

    def run(clip, grads):
        config.optimizer.grad_clip = clip
        tx, _ = optim.build_optimizer(config, params, 1)
        state = tx.init(params)
        for g in grads:
            updates, state = tx.update(g, state, params)
        return updates

    by_hand = optax.clip_by_global_norm(0.5).update(g1, None)[0]
    clipped = run(0.5, [g1, g2])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), clipped, run(None, [by_hand, g2]))
    assert not np.allclose(clipped["w"], run(None, [g1, g2])["w"])
