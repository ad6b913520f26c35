"""Patchify / unpatchify and the masks MAE and DiffMAE train and inpaint with.

Images are NHWC. A patch is flattened in (row p, column q, channel c) order,
channel last, exactly as the official code's patchify (which takes NCHW).
Mask convention everywhere: 1 = masked (removed, to predict), 0 = visible.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def patchify(images, patch_size: int):
    """(B, H, W, C) -> (B, L, p*p*C) with L = (H/p) * (W/p), patches row-major."""
    b, h, w, c = images.shape
    p = patch_size
    x = images.reshape(b, h // p, p, w // p, p, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches, patch_size: int, channels: int):
    """(B, L, p*p*C) -> (B, H, W, C) for a square grid; the inverse of patchify."""
    b, length, _ = patches.shape
    p, g = patch_size, int(round(length**0.5))
    if g * g != length:
        raise ValueError(f"unpatchify needs a square number of patches, got {length}")
    x = patches.reshape(b, g, g, p, p, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, g * p, g * p, channels)


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Patches the encoder sees: int(L * (1 - mask_ratio)), as the official code."""
    return int(num_patches * (1 - mask_ratio))


class Masking(NamedTuple):
    """Per-example masking of L patches with Lk kept.

    ids_keep: (B, Lk) indices of the visible patches, in shuffled order.
    ids_restore: (B, L) undoes the shuffle (visible first, then masked).
    mask: (B, L) float, 1 = masked, in original patch order.
    ids_mask: (B, L - Lk) indices of the masked patches, in shuffled order.
    """

    ids_keep: jax.Array
    ids_restore: jax.Array
    mask: jax.Array
    ids_mask: jax.Array


def masking_from_noise(noise, len_keep: int) -> Masking:
    """The official random_masking rule: keep the `len_keep` lowest-noise patches.

    Args:
      noise: (B, L) floats; argsort ascending decides the shuffle, so any
        per-example ranking (uniform noise, or a hand-made score) works.
      len_keep: number of visible patches per example.
    """
    length = noise.shape[1]
    ids_shuffle = jnp.argsort(noise, axis=1)
    ids_restore = jnp.argsort(ids_shuffle, axis=1)
    shuffled_mask = (jnp.arange(length) >= len_keep).astype(jnp.float32)
    mask = jnp.take_along_axis(jnp.broadcast_to(shuffled_mask, noise.shape), ids_restore, axis=1)
    return Masking(ids_shuffle[:, :len_keep], ids_restore, mask, ids_shuffle[:, len_keep:])


def random_masking(rng, batch: int, num_patches: int, mask_ratio: float) -> Masking:
    """Per-example uniform random masking: every row gets its own permutation."""
    noise = jax.random.uniform(rng, (batch, num_patches))
    return masking_from_noise(noise, num_visible(num_patches, mask_ratio))


def noise_from_mask(mask) -> np.ndarray:
    """A `noise` array that reproduces a given binary mask through masking_from_noise.

    Visible patches (0) get noise below every masked patch (1), keeping their
    patch order, so `apply(..., noise=noise_from_mask(m))` masks exactly `m`.
    Every row must mask the same number of patches.
    """
    mask = np.asarray(mask, dtype=np.float64)
    counts = mask.sum(axis=1)
    if not np.all(counts == counts[0]):
        raise ValueError(f"every mask row must hide the same number of patches, got {sorted(set(counts))}")
    length = mask.shape[1]
    return (mask + np.arange(length) / (2.0 * length)).astype(np.float32)


def center_block_mask(grid_size: int, block: int) -> np.ndarray:
    """(L,) mask hiding a centred `block` x `block` square of patches (inpainting)."""
    if not 0 < block < grid_size:
        raise ValueError(f"centre block must be between 1 and {grid_size - 1} patches, got {block}")
    start = (grid_size - block) // 2
    grid = np.zeros((grid_size, grid_size), np.float32)
    grid[start : start + block, start : start + block] = 1.0
    return grid.reshape(-1)


def patch_mask_to_pixels(mask, patch_size: int, channels: int = 1):
    """(B, L) patch mask -> (B, H, W, channels) pixel mask, 1 = masked."""
    patches = jnp.repeat(mask[..., None], patch_size * patch_size * channels, axis=-1)
    return unpatchify(patches, patch_size, channels)
