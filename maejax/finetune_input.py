"""Host-side augmentation for fine-tuning and probing (FINETUNE.md / main_linprobe).

Per example: RandomResizedCrop + flip (+ RandAugment and random erasing when
fine-tuning) + normalise. Per batch: mixup / cutmix and label-smoothed soft
targets, drawn from an rng that is a pure function of (seed, batch index,
process), so a resumed run mixes exactly as an uninterrupted one.
"""

import dataclasses

import jax
import numpy as np

from maejax import augment, data_sources, device_input, preprocess

# Separates the batch-mixing stream from the input pipeline's per-example streams.
MIX_RNG_SALT = 0x313


@dataclasses.dataclass(frozen=True)
class TrainTransform:
    """RandomResizedCrop + flip (+ RandAugment and random erasing when fine-tuning) + normalise.

    A dataclass rather than a closure: the loader's worker processes receive it by pickle.
    """

    size: int
    channels: int
    scale: tuple
    mean: np.ndarray
    std: np.ndarray
    probe: bool
    randaug_ops: int
    randaug_magnitude: float
    randaug_mstd: float
    reprob: float

    def __call__(self, rng, image):
        image = preprocess.random_resized_crop(rng, image, self.size, self.scale)
        if rng.uniform() < 0.5:
            image = image[:, ::-1]
        if not self.probe and self.randaug_ops > 0:
            img = augment.rand_augment(
                rng,
                preprocess.to_pil(np.ascontiguousarray(image)),
                self.randaug_ops,
                self.randaug_magnitude,
                self.randaug_mstd,
            )
            image = preprocess.from_pil(img, self.channels)
        image = preprocess.normalize(image, self.mean, self.std)
        return image if self.probe else augment.random_erasing(rng, image, self.reprob)


def train_transform(config, size: int, channels: int, probe: bool) -> TrainTransform:
    mean, std = data_sources.normalization(config.dataset, channels)
    ft = config.finetune
    return TrainTransform(
        size=size,
        channels=channels,
        scale=tuple(ft.crop_scale),
        mean=mean,
        std=std,
        probe=probe,
        randaug_ops=ft.randaug_ops,
        randaug_magnitude=ft.randaug_magnitude,
        randaug_mstd=ft.randaug_mstd,
        reprob=ft.reprob,
    )


def batch_maker(config, num_classes: int, probe: bool):
    """Host-local loader batch -> {image, target}: mixup/cutmix and smoothed soft targets."""
    ft = config.finetune
    counter = {"batch": 0}

    def make(batch):
        rng = np.random.default_rng((config.seed, counter["batch"], jax.process_index(), MIX_RNG_SALT))
        counter["batch"] += 1
        if probe:
            return {
                "image": batch["image"],
                "target": augment.one_hot_smoothed(batch["label"], num_classes, 0.0),
            }
        images, targets, _ = augment.mix_batch(
            rng,
            batch["image"],
            batch["label"],
            num_classes,
            mixup=ft.mixup,
            cutmix=ft.cutmix,
            prob=ft.mixup_prob,
            switch_prob=ft.mixup_switch_prob,
            smoothing=ft.label_smoothing,
        )
        return {"image": images, "target": targets}

    return make, counter


def device_batch_maker(config, num_classes: int, probe: bool):
    """batch_maker for on-device input: a DeviceLoader batch -> {index, box, flip, target}.

    validate refuses mixup and cutmix with dataset.on_device, so the targets
    are what batch_maker makes without them: one-hot, smoothed by
    finetune.label_smoothing when fine-tuning, not at all when probing. They
    are built here on the host from the labels, with the same function.
    """
    smoothing = 0.0 if probe else config.finetune.label_smoothing

    def make(batch):
        targets = augment.one_hot_smoothed(batch["label"], num_classes, smoothing)
        return {**device_input.plan(batch), "target": targets}

    return make
