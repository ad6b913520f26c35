"""Optimizers as the official recipes define them, in optax.

- `lr_schedule`: linear warmup from 0, then half-cycle cosine to `min_lr`,
  evaluated at every optimizer update (the official code adjusts the lr per
  iteration, not per epoch).
- `decay_mask`: weight decay on every tensor with more than one dimension,
  never on biases and LayerNorm parameters (official pre-training); fine-tuning
  also exempts `pos_embed` and `cls_token`.
- `layer_decay_scales`: the official layer-wise lr decay for fine-tuning.
- `lars`: the official linear-probe optimizer.
"""

import math

import jax
import jax.numpy as jnp
import optax

FINETUNE_NO_DECAY = ("pos_embed", "cls_token")


def lr_schedule(peak_lr: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0):
    """lr(step) for step = optimizer updates done (0-based)."""

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak_lr * step / max(warmup_steps, 1)
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        cosine = min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + jnp.cos(math.pi * jnp.clip(progress, 0.0, 1.0)))
        return jnp.where(step < warmup_steps, warm, cosine)

    return schedule


def path_names(path) -> tuple:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def decay_mask(params, no_decay_names=()):
    """True where weight decay applies: ndim > 1 and the leaf's name not exempt."""

    def decays(path, leaf):
        return leaf.ndim > 1 and path_names(path)[-1] not in no_decay_names

    return jax.tree_util.tree_map_with_path(decays, params)


def layer_id(names: tuple, num_layers: int) -> int:
    """The official `get_layer_id_for_vit`, with num_layers = depth + 1.

    0 for cls_token, pos_embed and the patch embedding; i + 1 for block i;
    num_layers for everything else (final norms, head), whose lr scale is 1.
    """
    name = names[-1] if names[0] != "encoder" else names[1]
    if name in ("cls_token", "pos_embed", "patch_embed"):
        return 0
    if name.startswith("blocks_"):
        return int(name.split("_")[1]) + 1
    return num_layers


def layer_decay_scales(params, depth: int, decay: float):
    """lr multiplier per leaf: decay ** (depth + 1 - layer_id), as the official rule."""
    num_layers = depth + 1

    def scale(path, _):
        return decay ** (num_layers - layer_id(path_names(path), num_layers))

    return jax.tree_util.tree_map_with_path(scale, params)


def scale_by_tree(scales) -> optax.GradientTransformation:
    """Multiply each update by a fixed per-leaf factor (layer-wise lr decay)."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, s: u * s, updates, scales), state

    return optax.GradientTransformation(init_fn, update_fn)


def lars(learning_rate, momentum: float, trust_coefficient: float, weight_decay: float, params):
    """The official LARS (main_linprobe): no decay and no trust scaling of 1-D params.

    For each tensor with ndim > 1: g += wd * p; g *= trust * |p| / |g| (when
    both norms are > 0); then heavy-ball momentum and -lr.
    """
    adapt = jax.tree.map(lambda p: p.ndim > 1, params)

    def init_fn(params):
        return optax.TraceState(trace=jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params):
        def one(g, p, do_adapt):
            if not do_adapt:
                return g
            g = g + weight_decay * p
            p_norm, g_norm = jnp.linalg.norm(p), jnp.linalg.norm(g)
            ratio = jnp.where((p_norm > 0) & (g_norm > 0), trust_coefficient * p_norm / g_norm, 1.0)
            return g * ratio

        updates = jax.tree.map(one, updates, params, adapt)
        trace = jax.tree.map(lambda g, t: momentum * t + g, updates, state.trace)
        return trace, optax.TraceState(trace=trace)

    return optax.chain(
        optax.GradientTransformation(init_fn, update_fn), optax.scale_by_learning_rate(learning_rate)
    )


def build_optimizer(config, params, num_train_examples: int, *, depth: int | None = None):
    """The optax transform and lr schedule a run's config asks for.

    Args:
      config: the run config (optimizer.*, batch_size, total_steps/epochs).
      params: the trainable params (for the decay mask and per-leaf scales).
      num_train_examples: converts epoch settings to steps.
      depth: encoder depth, for layer-wise lr decay (fine-tuning).

    Returns:
      (tx, schedule).
    """
    # The run config pulls in ml_collections and the input pipeline; the pieces above must import
    # without them (benchmarks/train_step.py runs on machines that have only jax and torch).
    from maejax import config as config_lib

    opt = config.optimizer
    total = config_lib.total_steps(config, num_train_examples)
    warmup = config_lib.warmup_steps(config, num_train_examples)
    schedule = lr_schedule(config_lib.learning_rate(config), total, warmup, opt.min_lr)
    parts = []
    if opt.grad_clip is not None:
        parts.append(optax.clip_by_global_norm(opt.grad_clip))
    if opt.name == "lars":
        parts.append(lars(schedule, opt.momentum, opt.trust_coefficient, opt.weight_decay, params))
        return optax.chain(*parts), schedule
    no_decay = FINETUNE_NO_DECAY if config.task == "finetune" else ()
    parts.append(
        optax.adamw(
            schedule,
            b1=opt.b1,
            b2=opt.b2,
            eps=1e-8,
            weight_decay=opt.weight_decay,
            mask=decay_mask(params, no_decay),
        )
    )
    if opt.layer_decay is not None and depth is not None:
        parts.append(scale_by_tree(layer_decay_scales(params, depth, opt.layer_decay)))
    return optax.chain(*parts), schedule
