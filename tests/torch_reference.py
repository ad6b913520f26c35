"""The executable reference: HuggingFace `ViTMAEForPreTraining` (PyTorch, CPU).

HF implements the official MAE model (unbiased norm-pix variance, the
official position-table layout, `noise` for a fixed mask). Its transformers
5.x key names differ from the official ones; `hf_to_official` maps them, with
HF's separate q/k/v projections concatenated into the official fused `qkv`.
"""

import re

import numpy as np
import torch
from transformers import ViTMAEConfig, ViTMAEForPreTraining

from maejax.models import model_config

_RENAMES = [
    (r"^vit\.embeddings\.cls_token$", "cls_token"),
    (r"^vit\.embeddings\.position_embeddings$", "pos_embed"),
    (r"^vit\.embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^vit\.layers\.(\d+)\.", r"blocks.\1."),
    (r"^vit\.layernorm\.", "norm."),
    (r"^decoder\.decoder_layers\.(\d+)\.", r"decoder_blocks.\1."),
    (r"^decoder\.", ""),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
    (r"\.attention\.o_proj\.", ".attn.proj."),
]


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
    """HF 5.x names -> official MAE names; q/k/v fused into qkv ([q; k; v] rows)."""
    out, qkv = {}, {}
    for name, value in tensors.items():
        for pattern, repl in _RENAMES:
            name = re.sub(pattern, repl, name)
        m = re.match(r"^(.*)\.attention\.([qkv])_proj\.(weight|bias)$", name)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
        else:
            out[name] = value
    for (prefix, kind), parts in qkv.items():
        out[f"{prefix}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


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
    """Official names -> HF 5.x names (the inverse of hf_to_official), torch tensors."""
    reverse = [
        (r"^cls_token$", "vit.embeddings.cls_token"),
        (r"^pos_embed$", "vit.embeddings.position_embeddings"),
        (r"^patch_embed\.proj\.", "vit.embeddings.patch_embeddings.projection."),
        (r"^blocks\.(\d+)\.", r"vit.layers.\1."),
        (r"^norm\.", "vit.layernorm."),
        (r"^decoder_blocks\.(\d+)\.", r"decoder.decoder_layers.\1."),
        (r"^(mask_token|decoder_pos_embed|decoder_embed|decoder_norm|decoder_pred)", r"decoder.\1"),
        (r"\.norm1\.", ".layernorm_before."),
        (r"\.norm2\.", ".layernorm_after."),
        (r"\.attn\.proj\.", ".attention.o_proj."),
    ]
    out = {}
    for name, value in state.items():
        value = torch.as_tensor(np.array(value))
        for pattern, repl in reverse:
            name = re.sub(pattern, repl, name)
        m = re.match(r"^(.*)\.attn\.qkv\.(weight|bias)$", name)
        if m:
            for part, chunk in zip("qkv", torch.chunk(value, 3, dim=0), strict=True):
                out[f"{m.group(1)}.attention.{part}_proj.{m.group(2)}"] = chunk
        else:
            out[name] = value
    return out
