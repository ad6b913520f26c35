"""DiffMAE (Wei et al. 2023): masked autoencoding as conditional diffusion.

Only the masked patches are noised, x_t^m = sqrt(abar_t) x_0^m +
sqrt(1 - abar_t) eps; the MAE encoder (unchanged: it never sees t or noise)
encodes the visible patches; the decoder predicts the clean masked patches
(x0-prediction) from x_t^m, t and the encoder's output. Loss: per-patch MSE
of the x0 estimate averaged over masked patches, t uniform per example. With
`model.diffusion.prediction='v'` the decoder outputs v instead and the x0
estimate is sqrt(abar_t) x_t - sqrt(1 - abar_t) v (`diffusion.x0_estimate`);
the loss, the samplers and `pred` are unchanged. `model.diffusion.loss='v'`
weighs each example's x0 error by 1 / (1 - abar_t), the MSE of the implied v
(`diffusion.loss_weights`); the samplers do not depend on it.

Decoder variants (`model.decoder.variant`):
- 'joint': self-attention over the projected visible latents and the
  embedded noisy masked tokens together (the MAE-style baseline).
- 'cross_self': each block: self-attention among the noisy masked tokens,
  then cross-attention to encoder features, then the MLP.
- 'cross': cross-attention to encoder features, then the MLP (no self-attention).
The cross variants are wired top-down: decoder block j (of D) attends to the
output of encoder block E - 1 - floor(j * E / D) (of E), so the first decoder
blocks read the last encoder blocks (`context_block_index`). Each block
normalises its context with its own LayerNorm.

The timestep enters as sinusoidal features (dim 256) -> MLP, added to the
noisy tokens; with `adaln=True` it also drives adaLN-Zero modulation (shift,
scale and a zero-initialised gate per sub-layer, as in DiT).
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from maejax import diffusion
from maejax.models import masking
from maejax.models.mae import PatchModel, loss_targets, reconstruction_loss
from maejax.models.vit import (
    CrossAttention,
    Encoder,
    Mlp,
    SelfAttention,
    ViTSpec,
    dense,
    layer_norm,
    materialize,
    sincos_2d,
)

VARIANTS = ("joint", "cross_self", "cross")


def context_block_index(j: int, decoder_depth: int, encoder_depth: int) -> int:
    """The encoder block whose output decoder block j attends to (top-down)."""
    return encoder_depth - 1 - (j * encoder_depth) // decoder_depth


def timestep_features(t, dim: int):
    """(B,) int timesteps -> (B, dim) [cos | sin] features, periods up to 10000 steps."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class TimestepEmbedding(nn.Module):
    width: int
    feature_dim: int = 256
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, t):
        x = timestep_features(t, self.feature_dim)
        x = nn.silu(dense(self.width, "fc1", self.dtype)(x))
        return dense(self.width, "fc2", self.dtype)(x)


def modulate(x, shift, scale):
    return x * (1.0 + scale[:, None]) + shift[:, None]


class DecoderBlock(nn.Module):
    """One DiffMAE decoder block of the given kind ('joint', 'cross_self', 'cross')."""

    kind: str
    num_heads: int
    mlp_dim: int
    adaln: bool = False
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x, context, temb):
        width = x.shape[-1]
        sublayers = (
            ["attn"]
            if self.kind == "joint"
            else (["attn", "cross"] if self.kind == "cross_self" else ["cross"])
        )
        sublayers.append("mlp")
        if self.adaln:
            mod = nn.Dense(
                3 * len(sublayers) * width,
                kernel_init=nn.initializers.zeros,
                dtype=self.dtype,
                name="adaln",
            )(nn.silu(temb))
            mods = jnp.split(mod, 3 * len(sublayers), axis=-1)
        for i, name in enumerate(sublayers):
            x = materialize(x)  # the residual stream, as in vit.Block
            h = layer_norm(f"norm_{name}", self.dtype)(x)
            if self.adaln:
                shift, scale, gate = mods[3 * i : 3 * i + 3]
                h = modulate(h, shift, scale)
            if name == "attn":
                h = SelfAttention(self.num_heads, self.dtype, self.attention_impl, name="attn")(h)
            elif name == "cross":
                ctx = layer_norm("norm_context", self.dtype)(context)
                h = CrossAttention(self.num_heads, self.dtype, self.attention_impl, name="cross")(h, ctx)
            else:
                h = Mlp(self.mlp_dim, self.dtype, name="mlp")(h)
            x = x + (gate[:, None] * h if self.adaln else h)
        return x


class DiffMAEDecoder(nn.Module):
    """Predicts the clean masked patches from noisy ones, t and the encoder's output."""

    spec: ViTSpec
    variant: str
    num_patches: int
    patch_dim: int
    encoder_depth: int
    adaln: bool = False
    time_embed_dim: int = 256
    dtype: Any = jnp.float32
    remat: bool = False
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x_t, t, encoded, ids_keep, ids_mask):
        """x_t (B, Lm, P), t (B,), encoded {latent, blocks} -> x0 prediction (B, Lm, P)."""
        spec = self.spec
        grid = int(round(self.num_patches**0.5))
        pos = jnp.asarray(sincos_2d(grid, spec.width, cls_token=True))[None]  # (1, 1 + L, W)
        take = (
            lambda table, ids: jnp.take_along_axis(  # noqa: E731
                jnp.broadcast_to(table, (ids.shape[0],) + table.shape[1:]), ids[..., None], axis=1
            )
        )
        temb = TimestepEmbedding(spec.width, self.time_embed_dim, self.dtype, name="time_embed")(t)
        tokens = dense(spec.width, "patch_embed", self.dtype)(x_t)
        tokens = tokens + take(pos[:, 1:], ids_mask).astype(tokens.dtype) + temb[:, None].astype(tokens.dtype)
        if self.variant == "joint":
            visible = dense(spec.width, "embed", self.dtype)(encoded["latent"])
            vis_pos = jnp.concatenate(
                [
                    jnp.broadcast_to(pos[:, :1], (ids_keep.shape[0], 1, spec.width)),
                    take(pos[:, 1:], ids_keep),
                ],
                axis=1,
            )
            tokens = jnp.concatenate([visible + vis_pos.astype(visible.dtype), tokens], axis=1)
        block = nn.remat(DecoderBlock) if self.remat else DecoderBlock
        for j in range(spec.depth):
            context = None
            if self.variant != "joint":
                context = encoded["blocks"][context_block_index(j, spec.depth, self.encoder_depth)]
            tokens = block(
                self.variant,
                spec.num_heads,
                spec.mlp_dim,
                self.adaln,
                self.dtype,
                self.attention_impl,
                name=f"blocks_{j}",
            )(tokens, context, temb)
        if self.variant == "joint":
            tokens = tokens[:, encoded["latent"].shape[1] :]
        tokens = layer_norm("norm", self.dtype)(tokens)
        return dense(self.patch_dim, "pred", self.dtype)(tokens)


class DiffMAE(PatchModel, nn.Module):
    """DiffMAE for pre-training and inpainting.

    `apply({"params": p}, images, noise=None, t=None, eps=None, train=True)`
    returns {"loss", "pred" (B, L, P): the x0 prediction at masked positions
    and the true patches at visible ones, "mask", "ids_restore", "t"}. `t`
    (B,) int32 in 0..T-1 and the masked patches' noise `eps` (B, Lm, P) are
    drawn from the "diffusion" rng when absent; `noise` fixes the mask as in MAE.
    """

    encoder_spec: ViTSpec
    decoder_spec: ViTSpec
    image_size: int
    in_channels: int = 3
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False
    variant: str = "cross_self"
    adaln: bool = False
    time_embed_dim: int = 256
    schedule_name: str = "linear_pow"
    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    rho: float = 0.8
    prediction: str = "x0"
    loss: str = "x0"
    dtype: Any = jnp.float32
    remat: bool = False
    attention_impl: str | None = None

    @property
    def schedule(self) -> diffusion.Schedule:
        return diffusion.make_schedule(
            self.schedule_name, self.timesteps, self.beta_start, self.beta_end, self.rho
        )

    def setup(self):
        self.encoder = Encoder(
            self.encoder_spec,
            self.image_size,
            dtype=self.dtype,
            remat=self.remat,
            attention_impl=self.attention_impl,
        )
        self.decoder = DiffMAEDecoder(
            self.decoder_spec,
            self.variant,
            self.num_patches,
            self.patch_dim,
            self.encoder_spec.depth,
            adaln=self.adaln,
            time_embed_dim=self.time_embed_dim,
            dtype=self.dtype,
            remat=self.remat,
            attention_impl=self.attention_impl,
        )

    def random_inputs(self, key, batch: int) -> dict:
        """Per-example random inputs of a training step: mask noise, t and eps."""
        k_mask, k_t, k_eps = jax.random.split(key, 3)
        return {
            "noise": jax.random.uniform(k_mask, (batch, self.num_patches)),
            "t": jax.random.randint(k_t, (batch,), 0, self.timesteps, jnp.int32),
            "eps": jax.random.normal(k_eps, (batch, self.num_patches - self.num_visible, self.patch_dim)),
        }

    def encode(self, images, noise=None, train: bool = False) -> dict:
        """Run the encoder once: {patches, targets, ids_keep, ids_mask, ids_restore, mask, latent, blocks}."""
        patches = masking.patchify(images, self.patch_size).astype(jnp.float32)
        m = self.make_masking(images.shape[0], noise)
        latent, blocks = self.encoder(patches, m.ids_keep, train=train, return_blocks=True)
        return {
            "targets": loss_targets(patches, self.norm_pix_loss),
            "ids_keep": m.ids_keep,
            "ids_mask": m.ids_mask,
            "ids_restore": m.ids_restore,
            "mask": m.mask,
            "latent": latent,
            "blocks": blocks,
        }

    def denoise(self, encoded: dict, x_t, t):
        """x0 estimate (B, Lm, P) of the masked patches from x_t (B, Lm, P) at timesteps t (B,)."""
        output = self.decoder(x_t, t, encoded, encoded["ids_keep"], encoded["ids_mask"]).astype(jnp.float32)
        return diffusion.x0_estimate(self.schedule, output, x_t, t, self.prediction)

    def assemble(self, encoded: dict, masked_patches):
        """(B, L, P): the given masked patches in place, the true visible ones elsewhere."""
        visible = jnp.take_along_axis(encoded["targets"], encoded["ids_keep"][..., None], axis=1)
        shuffled = jnp.concatenate([visible, masked_patches], axis=1)
        return jnp.take_along_axis(shuffled, encoded["ids_restore"][..., None], axis=1)

    def masked_targets(self, encoded: dict):
        return jnp.take_along_axis(encoded["targets"], encoded["ids_mask"][..., None], axis=1)

    def __call__(self, images, noise=None, t=None, eps=None, train: bool = True):
        encoded = self.encode(images, noise, train=train)
        x0 = self.masked_targets(encoded)
        batch = images.shape[0]
        if t is None:
            t = jax.random.randint(self.make_rng("diffusion"), (batch,), 0, self.timesteps, jnp.int32)
        if eps is None:
            eps = jax.random.normal(self.make_rng("diffusion"), x0.shape)
        x_t = diffusion.q_sample(self.schedule, x0, t, eps)
        pred = self.denoise(encoded, x_t, t)
        weights = diffusion.loss_weights(self.schedule, t, self.loss)[:, None]  # (B, 1)
        loss = reconstruction_loss(pred, x0, jnp.ones(pred.shape[:2], jnp.float32), weights)
        return {
            "loss": loss,
            "pred": self.assemble(encoded, pred),
            "mask": encoded["mask"],
            "ids_restore": encoded["ids_restore"],
            "t": t,
        }

    def reconstruct(self, images, noise):
        """The one-step x0 prediction from pure noise at t = T-1 (pictures, kNN-free previews)."""
        encoded = self.encode(images, noise)
        x_T = jax.random.normal(jax.random.key(0), self.masked_targets(encoded).shape)
        t = jnp.full((images.shape[0],), self.timesteps - 1, jnp.int32)
        return {"pred": self.assemble(encoded, self.denoise(encoded, x_T, t)), "mask": encoded["mask"]}
