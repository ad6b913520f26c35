"""The official recipes (REFERENCE: MAE PRETRAIN.md / FINETUNE.md), one function each.

The files in configs/ call these with the model size and state what differs
per size, so each recipe is written once.
"""

from maejax.config import base_config


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
