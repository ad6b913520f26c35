"""Image grids for people: MAE reconstructions and inpainting panels, as PNG."""

import numpy as np

from maejax import paths, preprocess, tensorboard_events
from maejax.models import masking
from maejax.models.mae import denormalize_patches


def to_uint8(images) -> np.ndarray:
    return (np.clip(np.asarray(images, np.float32), 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


MIN_CELL_PIXELS = 96


def grid(columns: list, pad: int = 2, pad_value: float = 1.0) -> np.ndarray:
    """Columns of (N, H, W, C) images in [0, 1] -> one uint8 (N rows x len(columns)) picture.

    Small images (Fashion-MNIST's 28 px) are enlarged by an integer factor
    (nearest neighbour, so patches stay sharp) to at least MIN_CELL_PIXELS.
    """
    factor = max(1, -(-MIN_CELL_PIXELS // np.asarray(columns[0]).shape[1]))
    columns = [np.repeat(np.repeat(np.asarray(col), factor, axis=1), factor, axis=2) for col in columns]
    n, h, w, c = columns[0].shape
    out = np.full((n * (h + pad) + pad, len(columns) * (w + pad) + pad, c), pad_value, np.float32)
    for j, col in enumerate(columns):
        col = np.asarray(col, np.float32)
        for i in range(n):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            out[top : top + h, left : left + w] = col[i]
    return to_uint8(out)


def save_png(path: str, image: np.ndarray) -> None:
    """Write a uint8 (H, W, C) image as PNG, locally or to a store, never leaving a torn file."""
    paths.write_atomic(path, tensorboard_events.png_bytes(image))


def predicted_images(pred, images, patch_size: int, norm_pix_loss: bool):
    """Predictions (B, L, p*p*C) in loss space -> normalised images (B, H, W, C).

    Norm-pix predictions are de-normalised with each true patch's mean and
    variance, the usual way to look at such models.
    """
    channels = images.shape[-1]
    if norm_pix_loss:
        pred = denormalize_patches(pred, masking.patchify(images, patch_size))
    return masking.unpatchify(pred, patch_size, channels)


def reconstruction_columns(images, pred, mask, patch_size: int, norm_pix_loss: bool, mean, std) -> list:
    """[original | masked | reconstruction | reconstruction + visible], each (N, H, W, C) in [0, 1]."""
    images = np.asarray(images, np.float32)
    channels = images.shape[-1]
    recon = np.asarray(predicted_images(pred, images, patch_size, norm_pix_loss))
    pixel_mask = np.asarray(masking.patch_mask_to_pixels(np.asarray(mask), patch_size, channels))
    original = preprocess.denormalize(images, mean, std)
    masked = original * (1 - pixel_mask) + 0.5 * pixel_mask
    pasted = preprocess.denormalize(images * (1 - pixel_mask) + recon * pixel_mask, mean, std)
    return [original, masked, preprocess.denormalize(recon, mean, std), pasted]
