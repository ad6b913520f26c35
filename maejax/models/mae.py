"""The MAE pre-training model (He et al. 2021) and its loss, as the official code.

The encoder sees only the visible patches (cls first); the decoder embeds
them, appends one shared mask token per removed patch, unshuffles, adds its own
sin-cos table and predicts every patch's pixels. The loss is the per-patch MSE
averaged over masked patches, optionally against per-patch normalised pixels.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from maejax.models import masking
from maejax.models.vit import (
    Encoder,
    ViTSpec,
    block_class,
    dense,
    layer_norm,
    pool_tokens,
    sincos_2d,
    token_init,
)

NORM_PIX_EPS = 1e-6


def normalize_patches(patches):
    """Per-patch standardisation with the unbiased variance (torch `.var`), eps 1e-6.

    Returns (normalised, mean, var), each broadcastable to (B, L, P).
    """
    mean = patches.mean(axis=-1, keepdims=True)
    var = patches.var(axis=-1, keepdims=True, ddof=1)
    return (patches - mean) / jnp.sqrt(var + NORM_PIX_EPS), mean, var


def denormalize_patches(pred, reference_patches):
    """Undo norm-pix on predictions using the true patches' mean and variance.

    The usual way to look at a norm_pix_loss model's output: its predictions
    carry no brightness or contrast of their own.
    """
    _, mean, var = normalize_patches(reference_patches)
    return pred * jnp.sqrt(var + NORM_PIX_EPS) + mean


def reconstruction_loss(pred, target, mask, weights=None):
    """Mean over masked patches of each patch's mean squared error.

    Args:
      pred, target: (B, L, P).
      mask: (B, L), 1 = masked.
      weights: optional, broadcastable to (B, L): each patch's error is
        weighted, the mean still over the masked patches (DiffMAE's v loss).
    """
    per_patch = jnp.mean(jnp.square(pred - target), axis=-1)
    if weights is not None:
        per_patch = per_patch * weights
    return jnp.sum(per_patch * mask) / jnp.sum(mask)


def loss_targets(patches, norm_pix_loss: bool):
    return normalize_patches(patches)[0] if norm_pix_loss else patches


class PatchModel:
    """What MAE and DiffMAE share: patch geometry, masking and encoder features.

    A mixin for flax modules with `encoder_spec`, `image_size`, `in_channels`,
    `mask_ratio` and an `encoder` submodule.
    """

    @property
    def patch_size(self) -> int:
        return self.encoder_spec.patch_size

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_visible(self) -> int:
        return masking.num_visible(self.num_patches, self.mask_ratio)

    @property
    def patch_dim(self) -> int:
        return self.patch_size**2 * self.in_channels

    def make_masking(self, batch: int, noise=None) -> masking.Masking:
        """The official per-example masking from `noise` (B, L), drawn from the "masking" rng if None."""
        if noise is None:
            noise = jax.random.uniform(self.make_rng("masking"), (batch, self.num_patches))
        return masking.masking_from_noise(noise, self.num_visible)

    def features(self, images, pool: str = "cls"):
        """(B, D) features of unmasked images from the frozen encoder (kNN, probes)."""
        return pool_tokens(self.encoder(masking.patchify(images, self.patch_size), train=False), pool)


class MAEDecoder(nn.Module):
    """Lightweight decoder: embed, mask tokens, unshuffle, blocks, per-patch pixels."""

    spec: ViTSpec
    num_patches: int
    patch_dim: int
    dtype: Any = jnp.float32
    remat: bool = False
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, latent, ids_restore):
        """(B, 1 + Lk, D_enc) latent, (B, L) ids_restore -> (B, L, p*p*C) predictions."""
        spec = self.spec
        x = dense(spec.width, "embed", self.dtype)(latent)
        batch, kept = x.shape[0], x.shape[1] - 1
        mask_token = self.param("mask_token", token_init, (1, 1, spec.width)).astype(x.dtype)
        fill = jnp.broadcast_to(mask_token, (batch, self.num_patches - kept, spec.width))
        tokens = jnp.concatenate([x[:, 1:], fill], axis=1)
        tokens = jnp.take_along_axis(tokens, ids_restore[..., None], axis=1)
        x = jnp.concatenate([x[:, :1], tokens], axis=1)
        grid = int(round(self.num_patches**0.5))
        x = x + jnp.asarray(sincos_2d(grid, spec.width, cls_token=True))[None].astype(x.dtype)
        block = block_class(self.remat)
        for i in range(spec.depth):
            x = block(
                spec.num_heads,
                spec.mlp_dim,
                dtype=self.dtype,
                attention_impl=self.attention_impl,
                name=f"blocks_{i}",
            )(x)
        x = layer_norm("norm", self.dtype)(x)
        x = dense(self.patch_dim, "pred", self.dtype)(x)
        return x[:, 1:]


class MAE(PatchModel, nn.Module):
    """Masked autoencoder for pre-training.

    `apply({"params": p}, images, noise=None, train=True)` with NHWC float32
    images returns a dict: `loss` (scalar), `pred` (B, L, p*p*C, float32,
    in the loss's target space), `mask` (B, L, 1 = masked), `ids_restore`
    (B, L), `latent` (B, 1 + Lk, D). `noise` (B, L) fixes the mask exactly as
    the official code; otherwise it is drawn from the "masking" rng.
    """

    encoder_spec: ViTSpec
    decoder_spec: ViTSpec
    image_size: int
    in_channels: int = 3
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False
    dtype: Any = jnp.float32
    remat: bool = False
    attention_impl: str | None = None

    def setup(self):
        self.encoder = Encoder(
            self.encoder_spec,
            self.image_size,
            dtype=self.dtype,
            remat=self.remat,
            attention_impl=self.attention_impl,
        )
        self.decoder = MAEDecoder(
            self.decoder_spec,
            self.num_patches,
            self.patch_dim,
            dtype=self.dtype,
            remat=self.remat,
            attention_impl=self.attention_impl,
        )

    def random_inputs(self, key, batch: int) -> dict:
        """Per-example random inputs of a training step: the mask noise (B, L)."""
        return {"noise": jax.random.uniform(key, (batch, self.num_patches))}

    def __call__(self, images, noise=None, train: bool = True):
        patches = masking.patchify(images, self.patch_size)
        m = self.make_masking(images.shape[0], noise)
        latent = self.encoder(patches, m.ids_keep, train=train)
        pred = self.decoder(latent, m.ids_restore).astype(jnp.float32)
        target = loss_targets(patches.astype(jnp.float32), self.norm_pix_loss)
        loss = reconstruction_loss(pred, target, m.mask)
        return {"loss": loss, "pred": pred, "mask": m.mask, "ids_restore": m.ids_restore, "latent": latent}

    def reconstruct(self, images, noise):
        """{"pred", "mask"} for pictures: the forward pass without drop path."""
        out = self(images, noise=noise, train=False)
        return {"pred": out["pred"], "mask": out["mask"]}
