"""The official recipes (REFERENCE: MAE PRETRAIN.md / FINETUNE.md), one function each.

The files in configs/ call these with the model size and state what differs
per size, so each recipe is written once.
"""

from maejax.config import base_config
from maejax.errors import UserError


def no_argument(arg) -> None:
    """Refuse a `--config=FILE:ARG` argument (these recipes take none) instead of ignoring it."""
    if arg:
        raise UserError(
            f"--config: this config file takes no argument (got {arg!r} after ':'); "
            "change fields with --config.FIELD=VALUE"
        )


def mae_pretrain_imagenet(variant: str):
    """MAE pre-training on ImageNet-1k: 800 epochs, batch 4096, blr 1.5e-4, norm-pix."""
    c = base_config()
    c.task = "pretrain"
    c.model.name = "mae"
    c.model.encoder.variant = variant
    c.model.image_size = 224
    c.model.in_channels = 3
    c.model.mask_ratio = 0.75
    c.model.norm_pix_loss = True
    c.model.dtype = "bfloat16"

    c.dataset.name = "imagenet2012"
    c.dataset.crop_scale = (0.2, 1.0)
    c.batch_size = 4096
    c.total_epochs = 800.0
    c.optimizer.name = "adamw"
    c.optimizer.blr = 1.5e-4
    c.optimizer.b1, c.optimizer.b2 = 0.9, 0.95
    c.optimizer.weight_decay = 0.05
    c.optimizer.warmup_epochs = 40.0
    c.optimizer.min_lr = 0.0
    c.log_every_steps = 100
    c.image_every_steps = 5000
    c.checkpoint_every_steps = 1000
    c.knn_every_steps = 10000
    return c


def diffmae_pretrain_imagenet(variant: str):
    """DiffMAE pre-training on ImageNet-1k, on MAE's recipe.

    What the DiffMAE paper fixes is kept (noise on masked patches only,
    x0-prediction, cross-self decoder wired top-down, mask ratio 0.75); the
    rest follows MAE's pre-training recipe, since the paper's exact schedule
    and epochs are not verified here. Pixel targets (no norm-pix): inpainting
    needs real pixels.
    """
    c = mae_pretrain_imagenet(variant)
    c.model.name = "diffmae"
    c.model.norm_pix_loss = False
    c.model.decoder.variant = "cross_self"
    c.model.diffusion.timesteps = 1000
    c.model.diffusion.schedule = "linear_pow"
    c.model.diffusion.rho = 0.8
    return c


def fmnist_pretrain():
    """CPU-sized MAE pre-training on Fashion-MNIST (the embedded default, `make demo`).

    A 6-block, 128-wide ViT with patch 7 on 28x28 grey images (16 patches, 4
    visible) and a 64-wide 2-block decoder; pixel targets; batch 256 for 400
    steps (1.7 epochs), blr 1.5e-3 with 50 warmup steps. Patch 7 rather than 4:
    a third of the compute per image, and the quick check of
    experiments/fmnist_sweep.py (round 5) fine-tuned to 75.9 % instead of 70.6 %
    from it (79.0 % instead of 69.4 % from random init). The training split
    lives on the device (dataset.on_device: 47 MB of uint8), which on 2 CPU
    cores also trains about 2x faster than the host loader (1,100 against 520
    img/s). Reads Debian's
    Fashion-MNIST files offline when present.
    """
    c = base_config()
    c.task = "pretrain"
    c.model.name = "mae"
    c.model.image_size = 28
    c.model.in_channels = 1
    c.model.encoder.variant = None
    c.model.encoder.width = 128
    c.model.encoder.depth = 6
    c.model.encoder.num_heads = 4
    c.model.encoder.mlp_dim = 512
    c.model.encoder.patch_size = 7
    c.model.decoder.width = 64
    c.model.decoder.depth = 2
    c.model.decoder.num_heads = 4
    c.model.mask_ratio = 0.75
    c.model.norm_pix_loss = False
    c.model.dtype = "float32"

    c.dataset.name = "fashion_mnist"
    c.dataset.train_split = "train"
    c.dataset.eval_split = "test"
    c.dataset.crop_scale = (0.35, 1.0)
    c.dataset.num_threads = 4
    c.dataset.on_device = True

    c.batch_size = 256
    c.total_steps = 400
    c.optimizer.blr = 1.5e-3
    c.optimizer.warmup_steps = 50
    c.log_every_steps = 20
    c.image_every_steps = 100
    c.checkpoint_every_steps = 100
    c.keep_checkpoints = 2
    return c


def fmnist_diffmae():
    """CPU-sized DiffMAE pre-training on Fashion-MNIST: fmnist_pretrain's data and encoder.

    A 64-wide 2-block cross-self decoder wired top-down to the encoder, T = 1000
    'linear_pow' (rho 0.8) noise on the masked patches, x0-prediction; the sample
    task draws 4 DDPM samples of 50 steps for 8 held-out images, 75 % masked at random.
    """
    c = fmnist_pretrain()
    c.model.name = "diffmae"
    c.model.decoder.variant = "cross_self"
    c.model.diffusion.timesteps = 1000
    c.model.diffusion.schedule = "linear_pow"
    c.model.diffusion.rho = 0.8
    c.sample.sampler = "ddpm"
    c.sample.steps = 50
    c.sample.num_samples = 4
    c.sample.num_images = 8
    c.sample.mask = "random"
    c.sample.mask_ratio = 0.75
    return c


# Official fine-tuning per size (FINETUNE.md): epochs, blr, layer decay, drop path.
FINETUNE_BY_SIZE = {
    "B": dict(epochs=100.0, blr=5e-4, layer_decay=0.65, drop_path=0.1),
    "L": dict(epochs=50.0, blr=1e-3, layer_decay=0.75, drop_path=0.2),
    "H": dict(epochs=50.0, blr=1e-3, layer_decay=0.75, drop_path=0.3),
}


def classifier_imagenet(variant: str):
    """The ViT classifier on ImageNet-1k (224 px, 1000 classes, bfloat16)."""
    c = base_config()
    c.model.name = "classifier"
    c.model.encoder.variant = variant
    c.model.image_size = 224
    c.model.in_channels = 3
    c.model.num_classes = 1000
    c.model.dtype = "bfloat16"
    c.dataset.name = "imagenet2012"
    c.finetune.eval_resize_ratio = 224 / 256  # resize 256, centre crop 224
    c.log_every_steps = 100
    c.checkpoint_every_steps = 1000
    return c


def finetune_imagenet(variant: str):
    """Official end-to-end fine-tuning: AdamW (0.9, 0.999), wd 0.05, layer decay,
    batch 1024, 5 warmup epochs, min lr 1e-6, RandAugment m9-mstd0.5, label
    smoothing 0.1, mixup 0.8, cutmix 1.0, random erasing 0.25, average pooling."""
    size = FINETUNE_BY_SIZE[variant.split("/")[0]]
    c = classifier_imagenet(variant)
    c.task = "finetune"
    c.model.pool = "avg"
    c.model.drop_path = size["drop_path"]
    c.batch_size = 1024
    c.total_epochs = size["epochs"]
    c.optimizer.name = "adamw"
    c.optimizer.blr = size["blr"]
    c.optimizer.b1, c.optimizer.b2 = 0.9, 0.999
    c.optimizer.weight_decay = 0.05
    c.optimizer.layer_decay = size["layer_decay"]
    c.optimizer.warmup_epochs = 5.0
    c.optimizer.min_lr = 1e-6
    c.eval_every_steps = 1250  # about an epoch at batch 1024
    return c


def linprobe_imagenet(variant: str):
    """Official linear probing: frozen encoder, cls token, BatchNorm + Linear head,
    LARS (momentum 0.9), blr 0.1, batch 16384, wd 0, 10 warmup of 90 epochs."""
    c = classifier_imagenet(variant)
    c.task = "linprobe"
    c.model.pool = "cls"
    c.batch_size = 16384
    c.total_epochs = 90.0
    c.optimizer.name = "lars"
    c.optimizer.blr = 0.1
    c.optimizer.weight_decay = 0.0
    c.optimizer.warmup_epochs = 10.0
    c.optimizer.min_lr = 0.0
    c.finetune.label_smoothing = 0.0
    c.eval_every_steps = 80  # about an epoch at batch 16384
    return c


def fmnist_classifier(task: str):
    """CPU-sized fine-tuning / linear probing on Fashion-MNIST, for the encoder of fmnist_pretrain.

    Same data and encoder as mae_fmnist / diffmae_fmnist; batch 256, 470 steps
    (2 epochs). Chosen by the sweep in experiments/fmnist_sweep.py (100 steps of
    mae_fmnist, then 150-step schedules; its numbers are in
    experiments/results/fmnist_sweep.jsonl), not the official ImageNet recipe:
    - fine-tuning: AdamW, blr 2e-3, no layer decay, whole images (flip only),
      and none of the ImageNet regularisation (mixup/cutmix, RandAugment,
      random erasing, label smoothing, drop path), which is built for 100
      epochs of 224 px images and held a short run on 28 px images at 25 %
      top-1; crops of 35-100 % cost a 150-step run 18 points at blr 1e-3, and
      blr 3e-3 without them diverged from a 100-step MAE;
    - linear probing: BatchNorm + Linear on the frozen cls feature (as the
      official probe) trained with AdamW (blr 0.1, 10 warmup steps) and no
      weight decay, on whole images (flip only: crops the probe never sees at
      test time cost it 15 points).
    """
    pre = fmnist_pretrain()
    c = base_config()
    c.task = task
    c.model.name = "classifier"
    c.model.image_size = pre.model.image_size
    c.model.in_channels = pre.model.in_channels
    c.model.encoder = pre.model.encoder
    c.model.num_classes = 10
    c.dataset = pre.dataset
    c.finetune.eval_resize_ratio = 1.0
    c.finetune.label_smoothing = 0.0
    c.batch_size = 256
    c.total_steps = 470  # 2 epochs
    c.eval_every_steps = 235
    c.log_every_steps = 20
    c.checkpoint_every_steps = 200
    c.keep_checkpoints = 2
    c.optimizer.name = "adamw"
    c.optimizer.weight_decay = 0.0
    if task == "finetune":
        c.model.pool = "avg"
        c.model.drop_path = 0.0
        c.finetune.crop_scale = (1.0, 1.0)
        c.finetune.mixup = 0.0
        c.finetune.cutmix = 0.0
        c.finetune.randaug_ops = 0
        c.finetune.reprob = 0.0
        c.optimizer.blr = 2e-3
        c.optimizer.b1, c.optimizer.b2 = 0.9, 0.999
        c.optimizer.weight_decay = 0.05
        c.optimizer.layer_decay = 1.0
        c.optimizer.warmup_steps = 47
        c.optimizer.min_lr = 1e-6
    else:
        c.model.pool = "cls"
        c.finetune.crop_scale = (1.0, 1.0)
        c.optimizer.blr = 0.1  # lr 0.1 at batch 256: a convex problem on standardised features
        c.optimizer.warmup_steps = 10
    return c
