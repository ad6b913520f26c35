"""Per-example image transforms on the host (NumPy + PIL), seeded per example.

Pre-training: RandomResizedCrop(size, scale, ratio 3/4-4/3, bicubic) + random
horizontal flip + normalisation, as the official torchvision pipeline.
Evaluation: resize the short side to size / crop_ratio (bicubic) and take the
centre size x size crop. Every random choice comes from the `rng` passed in,
so a batch is a pure function of (seed, position) and resumes exactly.
"""

import math

import numpy as np
from PIL import Image

_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def to_pil(image: np.ndarray) -> Image.Image:
    """(H, W, C) uint8 -> PIL image (mode L for one channel)."""
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def from_pil(img: Image.Image, channels: int) -> np.ndarray:
    arr = np.asarray(img)
    return arr.reshape(arr.shape[:2] + (channels,))


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int, scale, ratio=_RATIO):
    """torchvision's RandomResizedCrop.get_params: (top, left, h, w) of the crop."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # Fallback: the largest centred crop with an in-range aspect ratio.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(rng, image: np.ndarray, size: int, scale) -> np.ndarray:
    top, left, h, w = random_resized_crop_box(rng, image.shape[0], image.shape[1], scale)
    img = to_pil(image).resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
    return from_pil(img, image.shape[-1])


def center_crop(image: np.ndarray, size: int, crop_ratio: float = 1.0) -> np.ndarray:
    """Resize the short side to round(size / crop_ratio) (bicubic), then centre-crop size x size."""
    h, w = image.shape[:2]
    short = int(round(size / crop_ratio))
    if (h, w) != (short, short) or short != size:
        if h <= w:
            new_h, new_w = short, max(short, int(round(w * short / h)))
        else:
            new_h, new_w = max(short, int(round(h * short / w))), short
        if (new_h, new_w) != (h, w):
            image = from_pil(to_pil(image).resize((new_w, new_h), Image.BICUBIC), image.shape[-1])
        top, left = (new_h - size) // 2, (new_w - size) // 2
        image = image[top : top + size, left : left + size]
    return image


def normalize(image: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """uint8 (H, W, C) -> float32 (x / 255 - mean) / std, for float32 `mean` and `std`."""
    # In place on the one float32 copy: the same float32 operations, in the same order, as
    # (x / 255 - mean) / std, without its two temporary images.
    out = image.astype(np.float32)
    out /= 255.0
    out -= mean
    out /= std
    return out


def pretrain_transform(rng, image, size: int, scale, flip: bool, mean, std) -> np.ndarray:
    image = random_resized_crop(rng, image, size, scale)
    if flip and rng.uniform() < 0.5:
        image = image[:, ::-1]
    return normalize(image, mean, std)


def eval_transform(image, size: int, mean, std, crop_ratio: float = 1.0) -> np.ndarray:
    return normalize(center_crop(image, size, crop_ratio), mean, std)


def denormalize(images: np.ndarray, mean, std) -> np.ndarray:
    """Normalised float images -> [0, 1] floats (clipped), for pictures."""
    return np.clip(np.asarray(images) * std + mean, 0.0, 1.0)
