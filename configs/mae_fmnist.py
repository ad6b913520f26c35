"""MAE pre-training on Fashion-MNIST, CPU-sized: the embedded default (`make demo`).

    python -m maejax.main --config=configs/mae_fmnist.py --workdir=workdirs/mae_fmnist

A small ViT (width 128, 6 blocks, patch 4 on 28x28 grey images: 49 patches,
12 visible) with a 64-wide 2-block decoder, batch 256, pixel targets, 400
steps (1.7 epochs): about six minutes on 2 CPU cores. Reads Debian's dataset-fashion-mnist files (or
dataset.manual_dir) and never the network when they exist.
"""

from maejax.config import base_config


def get_config(arg=None):
    del arg
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
    c.model.encoder.patch_size = 4
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
    c.dataset.shuffle_buffer = 0

    c.batch_size = 256
    c.total_steps = 400
    c.optimizer.blr = 1.5e-3
    c.optimizer.warmup_steps = 50
    c.log_every_steps = 20
    c.image_every_steps = 100
    c.checkpoint_every_steps = 100
    c.keep_checkpoints = 2
    return c
