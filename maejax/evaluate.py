"""Evaluation metrics: reconstruction quality of inpainting; kNN accuracy of frozen features.

Image metrics take pixels in [0, 1] of shape (N, H, W, C) and a pixel mask of
the same shape (1 = masked, i.e. the region that was predicted).
"""

import jax
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


def knn_top1(
    train_feats, train_labels, eval_feats, eval_labels, num_classes: int, k=20, temperature=0.07
) -> float:
    """Weighted kNN accuracy of frozen features (cosine similarity, exp(sim / T) votes).

    The usual self-supervised monitor (as in DINO): each eval feature votes with
    its k most similar training features.
    """
    normalize = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # noqa: E731
    train_feats, eval_feats = (
        normalize(np.asarray(train_feats, np.float32)),
        normalize(np.asarray(eval_feats, np.float32)),
    )
    train_labels = np.asarray(train_labels)
    k = min(k, len(train_feats))
    correct = 0
    for start in range(0, len(eval_feats), 1024):
        sims = eval_feats[start : start + 1024] @ train_feats.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        weights = np.exp(np.take_along_axis(sims, top, axis=1) / temperature)
        votes = np.zeros((len(sims), num_classes))
        np.add.at(votes, (np.arange(len(sims))[:, None], train_labels[top]), weights)
        correct += int((votes.argmax(axis=1) == np.asarray(eval_labels)[start : start + 1024]).sum())
    return correct / len(eval_feats)


def extract_features(features_fn, params, batches, to_global):
    """(features, labels) of every valid example in `batches`, on every process.

    features_fn: jitted (params, global batch) -> {"feature", "label", "valid"}
    with replicated outputs, so each process reads the whole global batch.
    """
    feats, labels = [], []
    for batch in batches:
        out = jax.device_get(features_fn(params, to_global(batch)))
        valid = np.asarray(out["valid"]) > 0
        feats.append(np.asarray(out["feature"])[valid])
        labels.append(np.asarray(out["label"])[valid])
    return np.concatenate(feats), np.concatenate(labels)
