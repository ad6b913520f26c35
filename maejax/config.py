"""The run config: one `base_config()` every recipe in configs/ starts from.

Every field exists here with a default, so `--config.FIELD=VALUE` works for
all of them, and a config file only states what its recipe changes. Fields
whose default is "unset" are typed placeholders (None until given).
"""

import json
import math

import ml_collections
from ml_collections import config_dict

from maejax import input_pipeline, paths
from maejax.models import model_config

TASKS = ("pretrain", "finetune", "linprobe", "sample")


def _model_fields(defaults: dict) -> ml_collections.ConfigDict:
    """config.model with every field of the model defaults, None as typed placeholders."""
    out = ml_collections.ConfigDict()
    for key, value in defaults.items():
        if isinstance(value, dict):
            out[key] = _model_fields(value)
        elif value is None:
            out[key] = config_dict.placeholder(int)
        else:
            out[key] = value
    return out


def base_config() -> ml_collections.ConfigDict:
    """Defaults for every field (the official ViT-B/16 MAE pre-training recipe)."""
    c = ml_collections.ConfigDict()
    c.task = "pretrain"
    c.seed = 0
    c.batch_size = 4096  # global, per optimizer update
    c.grad_accum_steps = 1
    c.total_steps = config_dict.placeholder(int)  # optimizer updates; or:
    c.total_epochs = config_dict.placeholder(float)
    c.log_every_steps = 50
    c.image_every_steps = 1000
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.eval_every_steps = config_dict.placeholder(int)  # fine-tune / linprobe; default: at the end
    c.knn_every_steps = config_dict.placeholder(int)  # pre-training kNN monitor; off when unset

    c.model = _model_fields(model_config.DEFAULTS)
    c.model.encoder.variant = "B/16"

    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = "imagenet2012"
    c.dataset.data_dir = config_dict.placeholder(str)
    c.dataset.manual_dir = config_dict.placeholder(str)
    c.dataset.train_split = "train"
    c.dataset.eval_split = "validation"
    c.dataset.crop_scale = (0.2, 1.0)  # RandomResizedCrop area range for pre-training
    c.dataset.flip = True
    c.dataset.prefetch = 2  # batches prepared ahead by a background thread
    c.dataset.num_threads = 8  # threads decoding and augmenting examples
    # > 0: that many worker processes decode and augment instead of the threads (for
    # hosts with many cores per accelerator: threads share Python's GIL).
    c.dataset.num_workers = 0
    # Keep the whole training split on every device as uint8 and crop, resize, flip and
    # normalise inside the train step (maejax/device_input.py): for datasets that fit in
    # device memory (Fashion-MNIST: 47 MB), which the host pipeline cannot keep up with.
    c.dataset.on_device = False
    # image_folder: an unreadable image stops the run naming it ('error'), or is
    # replaced by the next readable one with a warning naming it ('skip').
    c.dataset.bad_images = "error"
    c.dataset.check_images = False  # image_folder: open every image at start, listing the unreadable ones

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adamw"  # 'adamw' | 'lars'
    c.optimizer.blr = 1.5e-4  # lr = blr * batch_size / 256
    c.optimizer.lr = config_dict.placeholder(float)  # absolute lr; overrides blr
    c.optimizer.weight_decay = 0.05
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.95
    c.optimizer.warmup_steps = config_dict.placeholder(int)
    c.optimizer.warmup_epochs = 40.0
    c.optimizer.min_lr = 0.0
    c.optimizer.grad_clip = config_dict.placeholder(float)
    c.optimizer.layer_decay = config_dict.placeholder(float)
    c.optimizer.momentum = 0.9  # LARS
    c.optimizer.trust_coefficient = 0.001  # LARS

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1

    c.init_from = config_dict.placeholder(str)  # fine-tune / probe / sample start; 'random' = no weights

    c.finetune = ml_collections.ConfigDict()
    c.finetune.crop_scale = (0.08, 1.0)  # RandomResizedCrop area range (timm's default)
    c.finetune.label_smoothing = 0.1
    c.finetune.mixup = 0.8
    c.finetune.cutmix = 1.0
    c.finetune.mixup_prob = 1.0
    c.finetune.mixup_switch_prob = 0.5
    c.finetune.randaug_ops = 2
    c.finetune.randaug_magnitude = 9
    c.finetune.randaug_mstd = 0.5
    c.finetune.reprob = 0.25
    c.finetune.eval_resize_ratio = 224 / 256  # eval: resize to size / ratio, centre crop

    c.knn = ml_collections.ConfigDict()
    c.knn.k = 20
    c.knn.temperature = 0.07
    c.knn.num_train = 10000
    c.knn.num_eval = 2000
    c.knn.pool = "cls"  # 'cls' (the linear probe's feature) or 'avg' of patch tokens

    c.sample = ml_collections.ConfigDict()
    c.sample.sampler = "ddpm"  # 'ddpm' | 'ddim' | 'renoise'
    c.sample.steps = 50
    c.sample.eta = 0.0  # DDIM
    c.sample.eps_scale = 1.0  # divide each step's inferred noise by this; 1 = off (see diffusion.py)
    c.sample.num_samples = 4
    c.sample.mask = "random"  # 'random' | 'center' | a .npy file of (L,) or (N, L) masks
    c.sample.mask_ratio = 0.75
    c.sample.num_images = 8
    c.compare_mae_from = config_dict.placeholder(str)
    return c


def total_steps(config, num_train_examples: int) -> int:
    """Optimizer updates for the run: `total_steps`, or `total_epochs` converted.

    The one place epochs become steps (rounded up, so no epoch is cut short).

    Raises:
      ConfigError: `batch_size` exceeds `num_train_examples` (input_pipeline.steps_per_epoch).
    """
    if config.total_steps is not None:
        return int(config.total_steps)
    return math.ceil(
        config.total_epochs * input_pipeline.steps_per_epoch(num_train_examples, config.batch_size)
    )


def warmup_steps(config, num_train_examples: int) -> int:
    """Warm-up updates: `optimizer.warmup_steps`, or `optimizer.warmup_epochs` converted (rounded up)."""
    opt = config.optimizer
    if opt.warmup_steps is not None:
        return int(opt.warmup_steps)
    per_epoch = input_pipeline.steps_per_epoch(num_train_examples, config.batch_size)
    return math.ceil((opt.warmup_epochs or 0.0) * per_epoch)


def learning_rate(config) -> float:
    """Peak lr: `optimizer.lr`, or the official linear scaling blr * batch_size / 256."""
    opt = config.optimizer
    return opt.lr if opt.lr is not None else opt.blr * config.batch_size / 256


def apply_overrides(config, overrides: dict) -> ml_collections.ConfigDict:
    """Set dotted fields, as --config.FIELD=VALUE does: {"model.encoder.depth": 2, ...}.

    Raises:
      KeyError: a field the config does not have (no field is created).
    """
    for field, value in overrides.items():
        *parents, name = field.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        if name not in node:
            raise KeyError(f"the config has no field {field!r}")
        node[name] = value
    return config


def with_resolved_model(config) -> ml_collections.ConfigDict:
    """A copy of `config` whose `model` has every field filled (what really runs)."""
    out = ml_collections.ConfigDict(config.to_dict())
    out.model = model_config.resolve(config.model)
    return out


def write_config_json(config, workdir: str, filename: str = "config.json") -> str:
    path = paths.join(workdir, filename)
    paths.write_atomic(path, config.to_json_best_effort(indent=2, sort_keys=True))
    return path


def read_config_json(workdir: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(json.loads(paths.read_text(paths.join(workdir, "config.json"))))
