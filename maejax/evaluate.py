"""Evaluation metrics: reconstruction quality of inpainting; classification accuracy and kNN.

Image metrics take pixels in [0, 1] of shape (N, H, W, C) and a pixel mask of
the same shape (1 = masked, i.e. the region that was predicted).
"""

import numpy as np

LAPLACIAN = np.array([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def psnr_masked(pred, target, pixel_mask) -> np.ndarray:
    """(N,) PSNR in dB over the masked pixels of each image (peak 1.0)."""
    err = ((pred - target) ** 2 * pixel_mask).sum(axis=(1, 2, 3)) / np.maximum(
        pixel_mask.sum(axis=(1, 2, 3)), 1
    )
    return 10.0 * np.log10(1.0 / np.maximum(err, 1e-12))


def laplacian(images) -> np.ndarray:
    """3x3 Laplacian of (N, H, W, C) images, edges replicated."""
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = images.shape[1:3]
    out = np.zeros_like(images, dtype=np.float64)
    for dy in range(3):
        for dx in range(3):
            if LAPLACIAN[dy, dx]:
                out += LAPLACIAN[dy, dx] * padded[:, dy : dy + h, dx : dx + w]
    return out


def high_frequency_ratio(pred, target, pixel_mask) -> float:
    """Laplacian energy of the masked region, prediction over ground truth (1.0 = as detailed).

    Both images are complete (visible pixels are the true ones in both), so
    the ratio measures only the detail of what was predicted. Blurry
    predictions score below 1, noisy ones above.
    """
    energy = lambda x: float(((laplacian(x) ** 2) * pixel_mask).sum())  # noqa: E731
    return energy(pred) / max(energy(target), 1e-12)


def sample_diversity(samples, pixel_mask) -> float:
    """Mean over masked pixels of the per-pixel standard deviation across samples.

    Args:
      samples: (S, N, H, W, C) pixels in [0, 1], S samples of the same images.
      pixel_mask: (N, H, W, C).
    """
    spread = np.std(samples, axis=0)
    return float((spread * pixel_mask).sum() / max(pixel_mask.sum(), 1))


def topk_correct(logits, labels, k: int) -> np.ndarray:
    """(B,) 1.0 where the label is among the k highest logits."""
    top = np.argsort(-np.asarray(logits), axis=-1)[:, :k]
    return (top == np.asarray(labels)[:, None]).any(axis=-1).astype(np.float64)
