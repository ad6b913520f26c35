"""HuggingFace `ViTMAEForPreTraining` <-> the official MAE layout: tensor names and config.json.

HF splits attention into q, k and v projections; the official model fuses them
into one `qkv` ((3D, D), rows [q; k; v]). Everything else is a rename, in one
of the naming schemes HF uses:

- transformers 4.x, and every file on the hub (facebook/vit-mae-base):
  `vit.encoder.layer.N.attention.attention.query`, `...attention.output.dense`,
  `...intermediate.dense`, `...output.dense`;
- transformers 5.x modules (`model.state_dict()`): `vit.layers.N.attention.q_proj`,
  `...attention.o_proj`, `...mlp.fc1`, `...mlp.fc2`.

transformers 5 renames 4.x names when it loads a file and renames back when it
saves one, so files keep the 4.x names; its renaming back also turns
`decoder.decoder_layers.N` into `decoder.decoder_encoder.layer.N`, which it
reads back but transformers 4 does not. Reading accepts all of these; writing
uses the 4.x names, which transformers 4 and 5 both load without a warning.

All arrays are NumPy; nothing here needs torch.
"""

import re

import numpy as np

from maejax.errors import ConfigError, UserError

V4 = "transformers4"  # the hub's files
V5 = "transformers5"  # transformers 5's modules
SCHEMES = (V4, V5)

# Block tensors: official module -> HF module, per scheme. q/k/v are the thirds of `attn.qkv`.
_BLOCK_MODULES = {
    V4: {
        "norm1": "layernorm_before",
        "attn.q": "attention.attention.query",
        "attn.k": "attention.attention.key",
        "attn.v": "attention.attention.value",
        "attn.proj": "attention.output.dense",
        "norm2": "layernorm_after",
        "mlp.fc1": "intermediate.dense",
        "mlp.fc2": "output.dense",
    },
    V5: {
        "norm1": "layernorm_before",
        "attn.q": "attention.q_proj",
        "attn.k": "attention.k_proj",
        "attn.v": "attention.v_proj",
        "attn.proj": "attention.o_proj",
        "norm2": "layernorm_after",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    },
}
# Where block i lives: official prefix -> HF prefix, per scheme.
_BLOCK_PREFIXES = {
    V4: {"blocks": "vit.encoder.layer", "decoder_blocks": "decoder.decoder_layers"},
    V5: {"blocks": "vit.layers", "decoder_blocks": "decoder.decoder_layers"},
}
# Every HF block prefix that is read, with the official one it means.
_READ_PREFIXES = [
    (re.compile(r"^vit\.(?:encoder\.layer|layers)\.(\d+)\.(.+)$"), "blocks"),
    # decoder_encoder.layer: what transformers 5's save_pretrained writes (see above).
    (re.compile(r"^decoder\.(?:decoder_layers|decoder_encoder\.layer)\.(\d+)\.(.+)$"), "decoder_blocks"),
]
# Tensors outside the blocks: the same name in every scheme.
_OTHER_TENSORS = {
    "cls_token": "vit.embeddings.cls_token",
    "pos_embed": "vit.embeddings.position_embeddings",
    "patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
    "norm.weight": "vit.layernorm.weight",
    "norm.bias": "vit.layernorm.bias",
    "mask_token": "decoder.mask_token",
    "decoder_pos_embed": "decoder.decoder_pos_embed",
    "decoder_embed.weight": "decoder.decoder_embed.weight",
    "decoder_embed.bias": "decoder.decoder_embed.bias",
    "decoder_norm.weight": "decoder.decoder_norm.weight",
    "decoder_norm.bias": "decoder.decoder_norm.bias",
    "decoder_pred.weight": "decoder.decoder_pred.weight",
    "decoder_pred.bias": "decoder.decoder_pred.bias",
}
_OFFICIAL_OF_OTHER = {hf: official for official, hf in _OTHER_TENSORS.items()}
# HF block module (any scheme) -> official module.
_OFFICIAL_OF_MODULE = {
    hf: official for modules in _BLOCK_MODULES.values() for official, hf in modules.items()
}
_QKV = ("attn.q", "attn.k", "attn.v")


def as_numpy(value) -> np.ndarray:
    """An array of a torch tensor (bfloat16 widened to float32) or of anything array-like."""
    if hasattr(value, "detach"):  # a torch tensor; torch itself is not imported here
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def official_name(hf_name: str) -> str:
    """The official name of one HF tensor (q/k/v as `...attn.q.weight` etc.); unknown names unchanged."""
    if hf_name in _OFFICIAL_OF_OTHER:
        return _OFFICIAL_OF_OTHER[hf_name]
    for pattern, official_prefix in _READ_PREFIXES:
        m = pattern.match(hf_name)
        if m:
            module, _, kind = m.group(2).rpartition(".")
            if module in _OFFICIAL_OF_MODULE:
                return f"{official_prefix}.{m.group(1)}.{_OFFICIAL_OF_MODULE[module]}.{kind}"
    return hf_name


def hf_to_official(tensors: dict) -> dict:
    """HF names (any scheme) -> official MAE names, q/k/v fused into qkv; NumPy arrays.

    Names that are not HF MAE names are kept as they are, so that the
    converter reports them as tensors the model does not use.

    Raises:
      UserError: a block has some of q, k, v but not all three.
    """
    out, thirds = {}, {}
    for hf_name, value in tensors.items():
        name = official_name(hf_name)
        m = re.match(r"^(.*)\.attn\.([qkv])\.(weight|bias)$", name)
        if m:
            thirds.setdefault(f"{m.group(1)}.attn.qkv.{m.group(3)}", {})[m.group(2)] = as_numpy(value)
        else:
            out[name] = as_numpy(value)
    for name, parts in thirds.items():
        missing = [p for p in "qkv" if p not in parts]
        if missing:
            raise UserError(
                f"the HF checkpoint has {', '.join(sorted(parts))} but not {', '.join(missing)} "
                f"for {name} (attention projections come in threes)"
            )
        out[name] = np.concatenate([parts["q"], parts["k"], parts["v"]], axis=0)
    return out


def official_to_hf(state: dict, scheme: str = V4) -> dict:
    """Official MAE names -> HF names of `scheme`, qkv split into q, k, v; NumPy arrays.

    Raises:
      UserError: a tensor ViTMAEForPreTraining does not have (a classifier's head or fc_norm).
    """
    modules, prefixes = _BLOCK_MODULES[scheme], _BLOCK_PREFIXES[scheme]
    out = {}
    for name, value in state.items():
        value = as_numpy(value)
        m = re.match(r"^(blocks|decoder_blocks)\.(\d+)\.(.+)\.(weight|bias)$", name)
        if name in _OTHER_TENSORS:
            out[_OTHER_TENSORS[name]] = value
        elif m and m.group(3) == "attn.qkv":
            for part, third in zip(_QKV, np.split(value, 3, axis=0), strict=True):
                out[f"{prefixes[m.group(1)]}.{m.group(2)}.{modules[part]}.{m.group(4)}"] = third
        elif m and m.group(3) in modules:
            out[f"{prefixes[m.group(1)]}.{m.group(2)}.{modules[m.group(3)]}.{m.group(4)}"] = value
        else:
            raise UserError(f"ViTMAEForPreTraining has no tensor for the official {name!r}")
    return out


# --- config.json ----------------------------------------------------------------

# config.model field -> ViTMAEConfig field, for everything that decides the tensors or the loss.
MODEL_FIELDS = {
    "image_size": "image_size",
    "in_channels": "num_channels",
    "encoder.patch_size": "patch_size",
    "encoder.width": "hidden_size",
    "encoder.depth": "num_hidden_layers",
    "encoder.num_heads": "num_attention_heads",
    "encoder.mlp_dim": "intermediate_size",
    "decoder.width": "decoder_hidden_size",
    "decoder.depth": "decoder_num_hidden_layers",
    "decoder.num_heads": "decoder_num_attention_heads",
    "decoder.mlp_dim": "decoder_intermediate_size",
    "norm_pix_loss": "norm_pix_loss",
}
# maejax's ViT: exact GELU, biased qkv, LayerNorm eps 1e-6 (models/vit.py).
LAYER_NORM_EPS = 1e-6


def _square(value, field: str, source: str) -> int:
    """An int from HF's int-or-[h, w] size fields; maejax's images and patches are square."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise UserError(f"{source}: {field}={value} is not square; maejax supports square sizes only")
        value = value[0]
    return value


def model_from_hf_config(hf: dict, source: str) -> dict:
    """The `config.model` fields an HF ViTMAEForPreTraining config.json describes.

    `layer_norm_eps` is not compared: the hub's files say 1e-12 (a HF default)
    for weights the official code trained with 1e-6, which maejax uses; on
    activations of unit variance the two normalise within 1e-6 relative of each other.

    Args:
      hf: the parsed config.json.
      source: where it came from, for messages.

    Raises:
      UserError: not a ViT-MAE config, or one maejax's model cannot reproduce
        (another activation, no qkv bias, non-square sizes).
    """
    if hf.get("model_type") != "vit_mae":
        raise UserError(
            f"{source} is a {hf.get('model_type')!r} config, not 'vit_mae' (ViTMAEForPreTraining)"
        )
    if hf.get("hidden_act", "gelu") != "gelu":
        raise UserError(f"{source}: hidden_act={hf['hidden_act']!r}; maejax's ViT uses the exact 'gelu'")
    if not hf.get("qkv_bias", True):
        raise UserError(f"{source}: qkv_bias=false; maejax's attention always has a qkv bias")
    missing = [name for name in MODEL_FIELDS.values() if name not in hf and name != "norm_pix_loss"]
    if missing:
        raise UserError(f"{source} lacks {', '.join(missing)}: is it a ViTMAEForPreTraining config.json?")
    model = {"name": "mae", "encoder": {"variant": None}, "decoder": {}}
    for field, hf_field in MODEL_FIELDS.items():
        value = hf.get(hf_field, False)  # norm_pix_loss: HF's default
        if hf_field in ("image_size", "patch_size"):
            value = _square(value, hf_field, source)
        group, _, name = field.rpartition(".")
        (model[group] if group else model)[name] = value
    if "mask_ratio" in hf:
        model["mask_ratio"] = hf["mask_ratio"]
    return model


def hf_config_from_model(resolved) -> dict:
    """The config.json of a ViTMAEForPreTraining equal to the MAE `resolved` describes."""
    hf = {
        "architectures": ["ViTMAEForPreTraining"],
        "model_type": "vit_mae",
        "hidden_act": "gelu",
        "qkv_bias": True,
        "layer_norm_eps": LAYER_NORM_EPS,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "mask_ratio": resolved.mask_ratio,
        "dtype": "float32",
    }
    for field, hf_field in MODEL_FIELDS.items():
        hf[hf_field] = model_field(resolved, field)
    return hf


def model_field(resolved, dotted: str):
    value = resolved
    for name in dotted.split("."):
        value = value[name]
    return value


def check_same_model(resolved, from_hf: dict, source: str) -> None:
    """Refuse a `--config` whose model differs from the HF config.json's, naming the first field.

    Args:
      resolved: the resolved `config.model` of --config.
      from_hf: `model_from_hf_config` of the checkpoint, resolved.
      source: the checkpoint, for the message.

    Raises:
      ConfigError: a field that decides the tensors or the loss differs.
    """
    if resolved.name != "mae":
        raise ConfigError("model.name", resolved.name, f"{source} holds an MAE ('mae') model")
    for field, hf_field in MODEL_FIELDS.items():
        mine, theirs = model_field(resolved, field), model_field(from_hf, field)
        if mine != theirs:
            raise ConfigError(
                f"model.{field}",
                mine,
                f"{source} has {hf_field}={theirs!r}; set --config.model.{field}={theirs} or drop --config",
            )
