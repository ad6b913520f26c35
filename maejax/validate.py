"""Config validation, before anything compiles or touches a device.

`validate(config, num_devices, num_processes)` checks every field a run uses
and raises ConfigError naming the field, its value and what is valid. It
returns the resolved `config.model` (every default filled in).
"""

import numbers
import os

from maejax import config as config_lib
from maejax import data_sources, sharding
from maejax.errors import ConfigError
from maejax.models import model_config

KNOWN_DATASETS = ("fashion_mnist", "imagenet2012", "cifar10", "image_folder")
OPTIMIZERS = ("adamw", "lars")
SAMPLERS = ("ddpm", "ddim", "renoise")


def _int(config, field: str, minimum: int = 1) -> int:
    value = _get(config, field)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(field, value, f"must be an integer >= {minimum}")
    return int(value)


def _number(config, field: str, low=None, high=None, low_open=False, high_open=False, optional=False):
    value = _get(config, field)
    if value is None and optional:
        return None
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        interval = (
            f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        )
        raise ConfigError(field, value, f"must be a number in {interval}")
    return float(value)


def _choice(config, field: str, choices) -> str:
    value = _get(config, field)
    if value not in choices:
        raise ConfigError(field, value, f"must be one of {list(choices)}")
    return value


def _get(config, field: str):
    value = config
    for part in field.split("."):
        value = value[part]
    return value


def validate_schedule(config) -> None:
    if config.total_steps is None and config.total_epochs is None:
        raise ConfigError("total_steps", None, "set total_steps (optimizer updates) or total_epochs")
    if config.total_steps is not None:
        _int(config, "total_steps")
    else:
        _number(config, "total_epochs", 0, None, low_open=True)
    for field in ("log_every_steps", "image_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        _int(config, field)
    for field in ("eval_every_steps", "knn_every_steps"):
        if _get(config, field) is not None:
            _int(config, field)


def validate_batch(config, num_devices: int, num_processes: int) -> None:
    batch = _int(config, "batch_size")
    accum = _int(config, "grad_accum_steps")
    if batch % accum:
        raise ConfigError("batch_size", batch, f"must be divisible by grad_accum_steps={accum}")
    micro = batch // accum
    if micro % num_devices:
        raise ConfigError(
            "batch_size",
            batch,
            f"each micro-batch (batch_size / grad_accum_steps = {micro}) must split evenly over the "
            f"{num_devices} devices",
        )
    if batch % num_processes:
        raise ConfigError("batch_size", batch, f"must be divisible by the {num_processes} processes")


def validate_optimizer(config) -> None:
    _choice(config, "optimizer.name", OPTIMIZERS)
    if config.optimizer.lr is None:
        _number(config, "optimizer.blr", 0, None, low_open=True)
    else:
        _number(config, "optimizer.lr", 0, None, low_open=True)
    _number(config, "optimizer.weight_decay", 0, None)
    _number(config, "optimizer.b1", 0, 1, high_open=True)
    _number(config, "optimizer.b2", 0, 1, high_open=True)
    _number(config, "optimizer.min_lr", 0, None)
    _number(config, "optimizer.grad_clip", 0, None, low_open=True, optional=True)
    _number(config, "optimizer.layer_decay", 0, 1, low_open=True, optional=True)
    if config.optimizer.warmup_steps is not None:
        _int(config, "optimizer.warmup_steps", minimum=0)
    else:
        _number(config, "optimizer.warmup_epochs", 0, None, optional=True)


def validate_dataset(config) -> None:
    ds = config.dataset
    if ds.name not in KNOWN_DATASETS:
        import tensorflow_datasets as tfds

        if ds.name not in tfds.list_builders():
            raise ConfigError(
                "dataset.name", ds.name, f"one of {list(KNOWN_DATASETS)} or another tfds dataset name"
            )
    scale = tuple(ds.crop_scale)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ConfigError("dataset.crop_scale", scale, "two numbers (low, high) with 0 < low <= high <= 1")
    _int(config, "dataset.prefetch")
    _int(config, "dataset.num_threads")
    if ds.name == "image_folder" and not (ds.manual_dir and os.path.isdir(ds.manual_dir)):
        raise ConfigError(
            "dataset.manual_dir",
            ds.manual_dir,
            "an existing folder of images, as <split>/<class>/<image> or <class>/<image>",
        )
    if ds.name == "fashion_mnist":
        data_sources.fashion_mnist_local_dir(ds.manual_dir)  # raises when the given folder lacks the files
    if ds.manual_dir and not os.path.isdir(ds.manual_dir):
        raise ConfigError("dataset.manual_dir", ds.manual_dir, "an existing folder")


def validate(config, num_devices: int = 1, num_processes: int = 1):
    """Check the whole run config; return the resolved config.model.

    Raises:
      ConfigError: the first invalid field found.
    """
    _choice(config, "task", config_lib.TASKS)
    if not isinstance(config.seed, numbers.Integral) or isinstance(config.seed, bool):
        raise ConfigError("seed", config.seed, "must be an integer")
    resolved = model_config.resolve(config.model)
    validate_batch(config, num_devices, num_processes)
    validate_schedule(config)
    validate_optimizer(config)
    validate_dataset(config)
    sharding.mesh_shape(config.mesh, num_devices)
    if config.task in ("finetune", "linprobe"):
        if not config.init_from:
            raise ConfigError(
                "init_from",
                config.init_from,
                f"task '{config.task}' needs a pre-training workdir, a maejax.convert output, or 'random'",
            )
        if config.init_from != "random" and not os.path.isdir(config.init_from):
            raise ConfigError("init_from", config.init_from, "an existing maejax workdir, or 'random'")
        scale = tuple(config.finetune.crop_scale)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ConfigError(
                "finetune.crop_scale", scale, "two numbers (low, high) with 0 < low <= high <= 1"
            )
        _number(config, "finetune.label_smoothing", 0, 1, high_open=True)
        _number(config, "finetune.mixup", 0, None)
        _number(config, "finetune.cutmix", 0, None)
        _number(config, "finetune.reprob", 0, 1)
    if config.task == "sample":
        _choice(config, "sample.sampler", SAMPLERS)
        _int(config, "sample.steps")
        _int(config, "sample.num_samples")
        _int(config, "sample.num_images")
        _number(config, "sample.eta", 0, 1)
        _number(config, "sample.mask_ratio", 0, 1, low_open=True, high_open=True)
    return resolved
