"""The executable reference: HuggingFace `ViTMAEForPreTraining` (PyTorch, CPU).

HF implements the official MAE model (unbiased norm-pix variance, the
official position-table layout, `noise` for a fixed mask). Its transformers
5.x module names differ from the official ones; `maejax.hf_format` maps them
(the converter reads HF checkpoints with it), with HF's separate q/k/v
projections concatenated into the official fused `qkv`.
"""

import numpy as np
import torch
from transformers import ViTMAEConfig, ViTMAEForPreTraining

from maejax import hf_format
from maejax.models import model_config


def hf_model(config_model, seed: int = 0) -> ViTMAEForPreTraining:
    """A randomly initialised HF MAE of the size `config_model` describes, in eval mode."""
    r = model_config.resolve(config_model)
    cfg = ViTMAEConfig(
        hidden_size=r.encoder.width,
        num_hidden_layers=r.encoder.depth,
        num_attention_heads=r.encoder.num_heads,
        intermediate_size=r.encoder.mlp_dim,
        decoder_hidden_size=r.decoder.width,
        decoder_num_hidden_layers=r.decoder.depth,
        decoder_num_attention_heads=r.decoder.num_heads,
        decoder_intermediate_size=r.decoder.mlp_dim,
        image_size=r.image_size,
        patch_size=r.encoder.patch_size,
        num_channels=r.in_channels,
        mask_ratio=r.mask_ratio,
        norm_pix_loss=r.norm_pix_loss,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        qkv_bias=True,
    )
    torch.manual_seed(seed)
    model = ViTMAEForPreTraining(cfg)
    # transformers 5.x leaves the fixed tables zero after a random init; run
    # HF's own table code so they are the reference's, not ours.
    embeddings = model.vit.embeddings
    if hasattr(embeddings.patch_embeddings.projection, "_is_hf_initialized"):
        del embeddings.patch_embeddings.projection._is_hf_initialized
    embeddings.initialize_weights()
    model.decoder.initialize_weights(embeddings.patch_embeddings.num_patches)
    randomize(model, seed)
    return model.eval()


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Give every trainable tensor random values (LayerNorm scales around 1).

    Init schemes leave biases at 0 and LayerNorm at 1/0, which would hide a
    wrongly mapped bias or scale; random values exercise every tensor.
    """
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            noise = torch.randn(param.shape, generator=gen)
            is_norm_scale = ("layernorm" in name or "norm" in name.split(".")[-2]) and name.endswith("weight")
            param.copy_(1.0 + 0.1 * noise if is_norm_scale else 0.05 * noise)


def hf_to_official(tensors: dict) -> dict:
    """HF names -> official MAE names; q/k/v fused into qkv ([q; k; v] rows); torch tensors."""
    return {k: torch.from_numpy(v) for k, v in hf_format.hf_to_official(tensors).items()}


def official_state_dict(model: ViTMAEForPreTraining) -> dict:
    return hf_to_official(dict(model.state_dict()))


def official_grads(model: ViTMAEForPreTraining) -> dict:
    """Gradients of the trainable tensors after backward(), under official names, NumPy."""
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().numpy() for k, v in hf_to_official(grads).items()}


def forward(model: ViTMAEForPreTraining, images_nhwc: np.ndarray, noise: np.ndarray):
    pixels = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
    return model(pixel_values=pixels, noise=torch.from_numpy(noise))


def official_to_hf(state: dict) -> dict:
    """Official names -> the names of the 5.x modules (the inverse of hf_to_official), torch tensors."""
    return {k: torch.tensor(v) for k, v in hf_format.official_to_hf(state, hf_format.V5).items()}
