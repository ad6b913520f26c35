"""maejax models: `build_model(config.model)` returns a flax.linen Module.

The modules are pure: `model.init(rngs, images)` gives `{"params": ...}` and
`model.apply({"params": params}, images, ...)` runs them. Nothing here imports
the training loops, the input pipeline, sharding or checkpointing.
"""

import jax.numpy as jnp

from maejax.models import model_config
from maejax.models.classifier import Classifier
from maejax.models.diffmae import DiffMAE
from maejax.models.mae import MAE
from maejax.models.model_config import decoder_spec, encoder_spec, resolve

__all__ = ["MAE", "DiffMAE", "Classifier", "build_model", "resolve"]


def compute_dtype(resolved):
    return jnp.bfloat16 if resolved.dtype == "bfloat16" else jnp.float32


def build_model(config_model):
    """Build the model `config.model` describes, filling defaults for omitted fields.

    Raises:
      ConfigError: an unknown field or invalid value in `config.model`.
    """
    cfg = resolve(config_model)
    common = dict(
        image_size=cfg.image_size,
        dtype=compute_dtype(cfg),
        remat=cfg.remat,
        attention_impl=None if cfg.attention_impl == "xla" else cfg.attention_impl,
    )
    if cfg.name == "mae":
        return MAE(
            encoder_spec(cfg),
            decoder_spec(cfg),
            in_channels=cfg.in_channels,
            mask_ratio=cfg.mask_ratio,
            norm_pix_loss=cfg.norm_pix_loss,
            **common,
        )
    if cfg.name == "diffmae":
        d = cfg.diffusion
        return DiffMAE(
            encoder_spec(cfg),
            decoder_spec(cfg),
            in_channels=cfg.in_channels,
            mask_ratio=cfg.mask_ratio,
            norm_pix_loss=cfg.norm_pix_loss,
            variant=cfg.decoder.variant,
            adaln=cfg.decoder.adaln,
            time_embed_dim=cfg.decoder.time_embed_dim,
            schedule_name=d.schedule,
            timesteps=d.timesteps,
            beta_start=d.beta_start,
            beta_end=d.beta_end,
            rho=d.rho,
            prediction=d.prediction,
            loss=d.loss,
            **common,
        )
    if cfg.name == "classifier":
        return Classifier(
            encoder_spec(cfg),
            num_classes=cfg.num_classes,
            pool=cfg.pool,
            drop_path=cfg.drop_path,
            head_init_std=cfg.head_init_std,
            **common,
        )
    raise model_config.ConfigError("model.name", cfg.name, f"one of {list(model_config.MODEL_NAMES)}")
