"""Pre-trained encoder weights for fine-tuning and probing: load them, fit them into a classifier.

`config.init_from` names a pre-training workdir (its newest checkpoint's
encoder), a `maejax.convert` output, or 'random' (no weights: the
from-scratch baseline).
"""

import flax
import jax
import numpy as np

from maejax import checkpoint
from maejax.errors import UserError
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
