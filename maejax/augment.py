"""Fine-tuning augmentations of the official recipe (timm's), on the host in NumPy/PIL.

- RandAugment 'rand-m9-mstd0.5-inc1': 2 ops per image from timm's
  "increasing" list, each applied with probability 0.5, magnitude drawn from
  N(9, 0.5) clipped to [0, 10], bicubic resampling for geometric ops (MAE
  passes interpolation='bicubic');
- random erasing (prob 0.25, 'pixel' mode: normal noise in normalised units);
- batch-mode mixup (alpha 0.8) / cutmix (alpha 1.0) with switch prob 0.5,
  mixing each batch with its reverse, and label smoothing folded into the targets.
Every random choice comes from the numpy Generator passed in.
"""

import math

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

MAX_LEVEL = 10.0


def _sign(rng) -> float:
    return -1.0 if rng.uniform() < 0.5 else 1.0


def _fill(img: Image.Image):
    return 128 if img.mode == "L" else (124, 116, 104)  # timm's mean colour


def _affine(img, rng, matrix):
    return img.transform(img.size, Image.AFFINE, matrix, resample=Image.BICUBIC, fillcolor=_fill(img))


def _solarize_add(img, add: int, threshold: int = 128):
    lut = [min(255, i + add) if i < threshold else i for i in range(256)] * len(img.getbands())
    return img.point(lut)


def _enhance(enhancer):
    def op(img, rng, level):
        return enhancer(img).enhance(1.0 + _sign(rng) * level / MAX_LEVEL * 0.9)

    return op


# name -> fn(img, rng, level in [0, 10]): timm's _RAND_INCREASING_TRANSFORMS.
OPS = {
    "AutoContrast": lambda img, rng, level: ImageOps.autocontrast(img),
    "Equalize": lambda img, rng, level: ImageOps.equalize(img),
    "Invert": lambda img, rng, level: ImageOps.invert(img),
    "Rotate": lambda img, rng, level: img.rotate(
        _sign(rng) * level / MAX_LEVEL * 30.0, resample=Image.BICUBIC, fillcolor=_fill(img)
    ),
    # timm reaches 0 bits at level 10; PIL needs at least 1.
    "PosterizeIncreasing": lambda img, rng, level: ImageOps.posterize(
        img, max(1, 4 - int(level / MAX_LEVEL * 4))
    ),
    "SolarizeIncreasing": lambda img, rng, level: ImageOps.solarize(img, 256 - int(level / MAX_LEVEL * 256)),
    "SolarizeAdd": lambda img, rng, level: _solarize_add(img, int(level / MAX_LEVEL * 110)),
    "ColorIncreasing": _enhance(ImageEnhance.Color),
    "ContrastIncreasing": _enhance(ImageEnhance.Contrast),
    "BrightnessIncreasing": _enhance(ImageEnhance.Brightness),
    "SharpnessIncreasing": _enhance(ImageEnhance.Sharpness),
    "ShearX": lambda img, rng, level: _affine(
        img, rng, (1, _sign(rng) * level / MAX_LEVEL * 0.3, 0, 0, 1, 0)
    ),
    "ShearY": lambda img, rng, level: _affine(
        img, rng, (1, 0, 0, _sign(rng) * level / MAX_LEVEL * 0.3, 1, 0)
    ),
    "TranslateXRel": lambda img, rng, level: _affine(
        img, rng, (1, 0, _sign(rng) * level / MAX_LEVEL * 0.45 * img.size[0], 0, 1, 0)
    ),
    "TranslateYRel": lambda img, rng, level: _affine(
        img, rng, (1, 0, 0, 0, 1, _sign(rng) * level / MAX_LEVEL * 0.45 * img.size[1])
    ),
}


def rand_augment(
    rng, img: Image.Image, num_ops: int = 2, magnitude: float = 9.0, mstd: float = 0.5, prob=0.5
):
    names = list(OPS)
    for index in rng.choice(len(names), size=num_ops, replace=True):
        if rng.uniform() > prob:
            continue
        level = float(np.clip(rng.normal(magnitude, mstd) if mstd > 0 else magnitude, 0.0, MAX_LEVEL))
        img = OPS[names[index]](img, rng, level)
    return img


ERASE_LOG_RATIO = (math.log(0.3), math.log(1 / 0.3))


def random_erasing(
    rng,
    image: np.ndarray,
    prob: float = 0.25,
    area=(0.02, 1 / 3),
    log_ratio=ERASE_LOG_RATIO,
):
    """timm RandomErasing, mode 'pixel': one box of per-pixel N(0, 1) on a normalised image."""
    if prob <= 0 or rng.uniform() >= prob:
        return image
    h, w, c = image.shape
    for _ in range(10):
        target = rng.uniform(*area) * h * w
        aspect = math.exp(rng.uniform(*log_ratio))
        eh, ew = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < eh < h and 0 < ew < w:
            top, left = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
            image = image.copy()
            image[top : top + eh, left : left + ew] = rng.normal(size=(eh, ew, c)).astype(image.dtype)
            return image
    return image


def one_hot_smoothed(labels, num_classes: int, smoothing: float) -> np.ndarray:
    off = smoothing / num_classes
    targets = np.full((len(labels), num_classes), off, np.float32)
    targets[np.arange(len(labels)), labels] = 1.0 - smoothing + off
    return targets


def cutmix_box(rng, height: int, width: int, lam: float):
    """timm's rand_bbox: a box of area (1 - lam) centred uniformly, clipped to the image."""
    ratio = math.sqrt(1.0 - lam)
    ch, cw = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    y0, y1 = np.clip(cy - ch // 2, 0, height), np.clip(cy + ch // 2, 0, height)
    x0, x1 = np.clip(cx - cw // 2, 0, width), np.clip(cx + cw // 2, 0, width)
    return int(y0), int(y1), int(x0), int(x1)


def mix_batch(
    rng, images, labels, num_classes: int, *, mixup=0.8, cutmix=1.0, prob=1.0, switch_prob=0.5, smoothing=0.1
):
    """Batch-mode mixup / cutmix against the reversed batch, with smoothed soft targets.

    Returns (images, targets (B, num_classes), lam); lam = 1 when nothing was mixed.
    """
    targets = one_hot_smoothed(labels, num_classes, smoothing)
    if (mixup <= 0 and cutmix <= 0) or rng.uniform() >= prob:
        return images, targets, 1.0
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.uniform() < switch_prob)
    flipped = images[::-1]
    if use_cutmix:
        lam = float(rng.beta(cutmix, cutmix))
        y0, y1, x0, x1 = cutmix_box(rng, images.shape[1], images.shape[2], lam)
        images = images.copy()
        images[:, y0:y1, x0:x1] = flipped[:, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (images.shape[1] * images.shape[2])
    else:
        lam = float(rng.beta(mixup, mixup))
        images = (lam * images + (1.0 - lam) * flipped).astype(images.dtype)
    return images, (lam * targets + (1.0 - lam) * targets[::-1]).astype(np.float32), lam
