"""ViT classifier for fine-tuning and linear probing, as the official MAE code builds it.

- Fine-tuning (`probe=False`): the encoder with a trainable `pos_embed`
  (initialised to the sin-cos table), drop path, and either global average
  pooling of the patch tokens followed by `fc_norm` (official default,
  `pool='avg'`; the encoder's final norm is then dropped) or the normalised
  cls token (`pool='cls'`); a Linear head initialised with std 2e-5.
- Linear probing (`probe=True`): the same encoder (frozen by the task) and a
  head of BatchNorm without affine (eps 1e-6) + Linear initialised with std
  0.01, as `main_linprobe`.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from maejax.models import masking
from maejax.models.vit import Encoder, ViTSpec, layer_norm


def interpolate_pos_embed(table, grid_size: int):
    """(1, 1 + g*g, D) position table -> (1, 1 + grid_size**2, D), bicubic on the patch grid.

    The cls row is kept. For fixed sin-cos tables maejax recomputes the table
    exactly instead; this is for learned tables (fine-tuned checkpoints) used
    at another resolution. (jax's bicubic kernel is Keys' a = -0.5; torch's
    is a = -0.75, so values differ slightly from the official interpolation.)
    """
    table = jnp.asarray(table)
    old = int(round((table.shape[1] - 1) ** 0.5))
    if old == grid_size:
        return table
    dim = table.shape[-1]
    grid = table[0, 1:].reshape(old, old, dim)
    resized = jax.image.resize(grid, (grid_size, grid_size, dim), method="bicubic")
    return jnp.concatenate([table[:, :1], resized.reshape(1, grid_size * grid_size, dim)], axis=1)


class Classifier(nn.Module):
    encoder_spec: ViTSpec
    image_size: int
    num_classes: int
    pool: str = "avg"
    drop_path: float = 0.0
    head_init_std: float = 2e-5
    probe: bool = False
    dtype: Any = jnp.float32
    remat: bool = False
    attention_impl: str | None = None

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.encoder_spec.patch_size) ** 2

    def setup(self):
        self.encoder = Encoder(
            self.encoder_spec,
            self.image_size,
            drop_path=self.drop_path,
            learned_pos=True,  # frozen with the encoder in a probe; a fine-tuned table loads as is
            final_norm=self.pool == "cls",
            dtype=self.dtype,
            remat=self.remat,
            attention_impl=self.attention_impl,
        )
        if self.pool == "avg":
            self.fc_norm = layer_norm("fc_norm", self.dtype)
        if self.probe:
            self.head_norm = nn.BatchNorm(
                use_bias=False, use_scale=False, epsilon=1e-6, momentum=0.9, name="head_norm"
            )
        std = 0.01 if self.probe else self.head_init_std
        self.head = nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(std), name="head")

    def features(self, images, train: bool = False):
        """(B, D) pooled features of whole images (no masking)."""
        tokens = self.encoder(masking.patchify(images, self.encoder_spec.patch_size), train=train)
        if self.pool == "avg":
            return self.fc_norm(tokens[:, 1:].mean(axis=1))
        return tokens[:, 0]

    def __call__(self, images, train: bool = False):
        """(B, H, W, C) images -> (B, num_classes) float32 logits."""
        feats = self.features(images, train=train)
        if self.probe:
            feats = self.head_norm(
                jax.lax.stop_gradient(feats).astype(jnp.float32), use_running_average=not train
            )
        return self.head(feats).astype(jnp.float32)
