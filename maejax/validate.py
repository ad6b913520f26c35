"""Config validation, before anything compiles or touches a device.

`validate(config, num_devices, num_processes)` checks every field of
`config.base_config()` (tests/test_validate.py proves each has a rule) and
raises ConfigError naming the field, its value and what is valid. It returns
the resolved `config.model` (every default filled in).

Fields only one task reads are still checked for every task where the check
is cheap and the default passes, so a mistake surfaces before a long
pre-training run rather than at the fine-tuning that follows it. Only checks
that depend on the task (files that must exist, required fields) wait for it.
"""

import os

from maejax import augment, checks, data_sources, diffusion, paths, sharding
from maejax import config as config_lib
from maejax.errors import ConfigError
from maejax.models import model_config, vit
from maejax.pretrained import RANDOM_INIT  # init_from value: no pre-trained weights

KNOWN_DATASETS = ("fashion_mnist", "imagenet2012", "cifar10", "image_folder")
OPTIMIZERS = ("adamw", "lars")
SAMPLE_MASKS = ("random", "center")  # or a .npy file (sample.make_masks)
TASKS_FROM_WEIGHTS = ("finetune", "linprobe")  # tasks that must start from config.init_from


def _get(config, field: str):
    value = config
    for part in field.split("."):
        value = value[part]
    return value


def _check(config, field: str, check, *args, **kwargs):
    """Apply one of maejax.checks to the value at dotted `field`; returns the checked value."""
    return check(_get(config, field), field, *args, **kwargs)


def _int(config, field: str, minimum: int = 1, optional: bool = False):
    return _check(config, field, checks.integer, minimum, optional=optional)


def _number(config, field: str, low=None, high=None, low_open=False, high_open=False, optional=False):
    return _check(config, field, checks.number, low, high, low_open, high_open, optional)


def _choice(config, field: str, choices):
    return _check(config, field, checks.choice, choices)


def _existing_dir(config, field: str, valid: str) -> None:
    path = _get(config, field)
    paths.check_backend(path, f"config.{field}")
    if not paths.isdir(path):
        raise ConfigError(field, path, valid)


def validate_run(config) -> None:
    _choice(config, "task", config_lib.TASKS)
    _int(config, "seed", minimum=0)  # numpy seed sequences refuse negative seeds


def validate_schedule(config) -> None:
    if config.total_steps is None and config.total_epochs is None:
        raise ConfigError("total_steps", None, "set total_steps (optimizer updates) or total_epochs")
    _int(config, "total_steps", optional=True)
    _number(config, "total_epochs", 0, None, low_open=True, optional=True)
    for field in ("log_every_steps", "image_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        _int(config, field)
    for field in ("eval_every_steps", "knn_every_steps"):
        _int(config, field, optional=True)


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
    _number(config, "optimizer.blr", 0, None, low_open=True)
    _number(config, "optimizer.lr", 0, None, low_open=True, optional=True)  # overrides blr when set
    _number(config, "optimizer.weight_decay", 0, None)
    _number(config, "optimizer.b1", 0, 1, high_open=True)
    _number(config, "optimizer.b2", 0, 1, high_open=True)
    _number(config, "optimizer.min_lr", 0, None)
    _number(config, "optimizer.grad_clip", 0, None, low_open=True, optional=True)
    _number(config, "optimizer.layer_decay", 0, 1, low_open=True, optional=True)
    _int(config, "optimizer.warmup_steps", minimum=0, optional=True)  # overrides warmup_epochs when set
    _number(config, "optimizer.warmup_epochs", 0, None, optional=True)
    _number(config, "optimizer.momentum", 0, 1, high_open=True)  # LARS
    _number(config, "optimizer.trust_coefficient", 0, None, low_open=True)  # LARS


def validate_dataset(config) -> None:
    ds = config.dataset
    _check(config, "dataset.name", checks.string)
    if ds.name not in KNOWN_DATASETS:
        import tensorflow_datasets as tfds

        if ds.name not in tfds.list_builders():
            raise ConfigError(
                "dataset.name", ds.name, f"one of {list(KNOWN_DATASETS)} or another tfds dataset name"
            )
    _check(config, "dataset.data_dir", checks.string, optional=True)
    _check(config, "dataset.manual_dir", checks.string, optional=True)
    _check(config, "dataset.train_split", checks.string)
    _check(config, "dataset.eval_split", checks.string)
    _check(config, "dataset.crop_scale", checks.area_range)
    _check(config, "dataset.flip", checks.boolean)
    _int(config, "dataset.prefetch")
    _int(config, "dataset.num_threads")
    _int(config, "dataset.num_workers", minimum=0)
    if ds.name == "image_folder" and not (ds.manual_dir and os.path.isdir(ds.manual_dir)):
        raise ConfigError(
            "dataset.manual_dir",
            ds.manual_dir,
            "an existing folder of images, as <split>/<class>/<image> or <class>/<image>",
        )
    if ds.manual_dir and not os.path.isdir(ds.manual_dir):
        raise ConfigError("dataset.manual_dir", ds.manual_dir, "an existing folder")
    if ds.name == "fashion_mnist":
        data_sources.fashion_mnist_local_dir(ds.manual_dir)  # raises when the given folder lacks the files
    _choice(config, "dataset.bad_images", data_sources.BAD_IMAGE_POLICIES)
    _check(config, "dataset.check_images", checks.boolean)
    _check(config, "dataset.on_device", checks.boolean)


# Fine-tuning augmentations that only the host pipeline implements (PIL or whole-batch NumPy):
# field -> what it does, for the refusal. The linear probe applies none of them.
HOST_ONLY_AUGMENTATIONS = {
    "finetune.randaug_ops": "RandAugment",
    "finetune.reprob": "random erasing",
    "finetune.mixup": "mixup",
    "finetune.cutmix": "cutmix",
}


def validate_on_device(config) -> None:
    """dataset.on_device: no fine-tuning augmentation that only the host implements.

    Whether the split fits the one-uint8-array model (every image the same
    size) is known only from the images: device_input.read_split checks it as
    it reads them, still before anything compiles.
    """
    if not config.dataset.on_device or config.task != "finetune":
        return
    for field, name in HOST_ONLY_AUGMENTATIONS.items():
        value = _get(config, field)
        if value > 0:
            raise ConfigError(
                field, value, f"must be 0 with dataset.on_device=True ({name} runs on the host only)"
            )


def validate_mesh(config, num_devices: int) -> None:
    for field in ("mesh.data", "mesh.fsdp"):
        # An integer first: sharding.mesh_shape's int() would silently truncate 1.5 to 1.
        if _int(config, field, minimum=-1) == 0:
            raise ConfigError(field, 0, "a positive device count or -1 (the remaining devices)")
    sharding.mesh_shape(config.mesh, num_devices)


def validate_init_from(config) -> None:
    """init_from: required by fine-tuning and probing; for sampling, a workdir other than --workdir."""
    init_from = _check(config, "init_from", checks.string, optional=True)
    if config.task in TASKS_FROM_WEIGHTS:
        if not init_from:
            raise ConfigError(
                "init_from",
                init_from,
                f"task '{config.task}' needs a pre-training workdir, a maejax.convert output, "
                f"or '{RANDOM_INIT}'",
            )
        if init_from != RANDOM_INIT:
            _existing_dir(config, "init_from", f"an existing maejax workdir, or '{RANDOM_INIT}'")
    elif config.task == "sample" and init_from is not None:
        _existing_dir(config, "init_from", "an existing DiffMAE workdir (or unset: the run's workdir)")


def validate_finetune(config) -> None:
    """config.finetune: read by fine-tuning and probing, checked for every task (cheap)."""
    _check(config, "finetune.crop_scale", checks.area_range)
    _number(config, "finetune.label_smoothing", 0, 1, high_open=True)
    _number(config, "finetune.mixup", 0, None)  # Beta(alpha, alpha); 0 turns it off
    _number(config, "finetune.cutmix", 0, None)
    _number(config, "finetune.mixup_prob", 0, 1)
    _number(config, "finetune.mixup_switch_prob", 0, 1)
    _int(config, "finetune.randaug_ops", minimum=0)  # 0 turns RandAugment off
    _number(config, "finetune.randaug_magnitude", 0, augment.MAX_LEVEL)
    _number(config, "finetune.randaug_mstd", 0, None)
    _number(config, "finetune.reprob", 0, 1)
    # Eval resizes the short side to size / ratio, then centre-crops size: a ratio above 1
    # would resize below the crop.
    _number(config, "finetune.eval_resize_ratio", 0, 1, low_open=True)


def validate_knn(config) -> None:
    """config.knn: the pre-training kNN monitor (on when knn_every_steps is set), checked always."""
    _int(config, "knn.k")
    _number(config, "knn.temperature", 0, None, low_open=True)
    _int(config, "knn.num_train")
    _int(config, "knn.num_eval")
    _choice(config, "knn.pool", vit.POOLS)


def validate_sample(config) -> None:
    """config.sample and compare_mae_from: ranges always; files only for the sample task."""
    _choice(config, "sample.sampler", diffusion.SAMPLERS)
    _int(config, "sample.steps")  # at most model.diffusion.timesteps: sample.run checks it
    _number(config, "sample.eta", 0, 1)
    _number(config, "sample.eps_scale", *diffusion.EPS_SCALE_RANGE)
    _int(config, "sample.num_samples")
    _int(config, "sample.num_images")
    _number(config, "sample.mask_ratio", 0, 1, low_open=True, high_open=True)
    mask = _check(config, "sample.mask", checks.string)
    compare = _check(config, "compare_mae_from", checks.string, optional=True)
    if config.task != "sample":
        return
    if mask not in SAMPLE_MASKS and not os.path.isfile(mask):
        raise ConfigError(
            "sample.mask", mask, f"one of {list(SAMPLE_MASKS)} or an existing .npy file of masks"
        )
    if compare is not None:
        _existing_dir(config, "compare_mae_from", "an existing MAE workdir, or unset")


def validate_attention(model) -> None:
    """cuDNN's fused attention computes in 16 bits only: a float32 run would fail inside the compile.

    Checked for runs, not in build_model: tests build float32 'cudnn' models
    to check the padding logic with XLA standing in for the kernel.
    """
    if model.attention_impl == "cudnn" and model.dtype != "bfloat16":
        raise ConfigError(
            "model.attention_impl", "cudnn", f"needs model.dtype='bfloat16' (it is {model.dtype!r})"
        )


def validate(config, num_devices: int = 1, num_processes: int = 1):
    """Check the whole run config; return the resolved config.model.

    Raises:
      ConfigError: the first invalid field found.
    """
    validate_run(config)
    resolved = model_config.resolve(config.model)
    validate_attention(resolved)
    validate_batch(config, num_devices, num_processes)
    validate_schedule(config)
    validate_optimizer(config)
    validate_dataset(config)
    validate_mesh(config, num_devices)
    validate_init_from(config)
    validate_finetune(config)
    validate_on_device(config)
    validate_knn(config)
    validate_sample(config)
    return resolved
