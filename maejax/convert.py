"""PyTorch / safetensors / HuggingFace <-> maejax weights, under the official MAE tensor names.

Import (writes DIR/params/ (orbax) and DIR/config.json; `config.init_from=DIR`
then starts fine-tuning, linear probing or sampling from those weights):

    python -m maejax.convert --torch_checkpoint=mae_visualize_vit_base.pth \
        --config=configs/mae_vitb.py --workdir=workdirs/mae_vitb_official
    python -m maejax.convert --torch_checkpoint=FILE.safetensors --config=... --workdir=DIR
    python -m maejax.convert --hf=facebook/vit-mae-base --workdir=DIR   # or --hf=SAVE_PRETRAINED_DIR

Export (the params/ of a convert output, else the newest checkpoint of a run):

    python -m maejax.convert --from_workdir=DIR --export=FILE.pth   # or FILE.safetensors
    python -m maejax.convert --from_workdir=DIR --export_hf=HF_DIR

`params_from_torch` and `params_to_torch` are exact inverses on every
trainable tensor. The fixed sin-cos tables (`pos_embed`, `decoder_pos_embed`)
are not parameters: reading checks a checkpoint's tables against ours, writing
emits them so the file loads in the official code.

This module holds that mapping (`key_map`, `params_from_torch`,
`params_to_torch`) and the command line's flags. Reading and writing the
files is `maejax.weights_io`; what the command does with them is
`maejax.convert_cli`; HuggingFace names and config.json fields are mapped in
`maejax.hf_format`.
"""

import dataclasses
import logging
import re
import sys

import numpy as np

from maejax import hf_format
from maejax.errors import ConfigError, UserError
from maejax.models import model_config
from maejax.models.vit import sincos_2d

# How a torch tensor becomes a flax one (and back).
_TO_FLAX = {
    "linear": lambda w: w.T,  # (out, in) -> (in, out)
    "conv": lambda w: w.transpose(2, 3, 1, 0),  # (D, C, p, p) -> (p, p, C, D)
    "same": lambda w: w,
}
_TO_TORCH = {
    "linear": lambda w: w.T,
    "conv": lambda w: w.transpose(3, 2, 0, 1),
    "same": lambda w: w,
}


@dataclasses.dataclass(frozen=True)
class Entry:
    torch_key: str
    flax_path: tuple
    kind: str  # a key of _TO_FLAX
    group: str  # 'encoder' | 'decoder' | 'head'


def _linear(torch_prefix, flax_path, group):
    return [
        Entry(f"{torch_prefix}.weight", flax_path + ("kernel",), "linear", group),
        Entry(f"{torch_prefix}.bias", flax_path + ("bias",), "same", group),
    ]


def _norm(torch_prefix, flax_path, group):
    return [
        Entry(f"{torch_prefix}.weight", flax_path + ("scale",), "same", group),
        Entry(f"{torch_prefix}.bias", flax_path + ("bias",), "same", group),
    ]


def _block(torch_prefix, flax_path, group):
    return (
        _norm(f"{torch_prefix}.norm1", flax_path + ("norm1",), group)
        + _linear(f"{torch_prefix}.attn.qkv", flax_path + ("attn", "qkv"), group)
        + _linear(f"{torch_prefix}.attn.proj", flax_path + ("attn", "proj"), group)
        + _norm(f"{torch_prefix}.norm2", flax_path + ("norm2",), group)
        + _linear(f"{torch_prefix}.mlp.fc1", flax_path + ("mlp", "fc1"), group)
        + _linear(f"{torch_prefix}.mlp.fc2", flax_path + ("mlp", "fc2"), group)
    )


def key_map(resolved) -> list:
    """Every trainable tensor of the model `resolved` describes, official name <-> flax path."""
    enc = ("encoder",)
    entries = [
        Entry("cls_token", enc + ("cls_token",), "same", "encoder"),
        Entry("patch_embed.proj.weight", enc + ("patch_embed", "kernel"), "conv", "encoder"),
        Entry("patch_embed.proj.bias", enc + ("patch_embed", "bias"), "same", "encoder"),
    ]
    for i in range(resolved.encoder.depth):
        entries += _block(f"blocks.{i}", enc + (f"blocks_{i}",), "encoder")
    if resolved.name == "classifier":
        # Fine-tuned checkpoints (mae_finetuned_vit_*.pth): a learned pos_embed,
        # fc_norm after average pooling (or the encoder norm with the cls token), a head.
        entries += [Entry("pos_embed", enc + ("pos_embed",), "same", "encoder")]
        if resolved.pool == "avg":
            entries += _norm("fc_norm", ("fc_norm",), "head")
        else:
            entries += _norm("norm", enc + ("norm",), "encoder")
        entries += _linear("head", ("head",), "head")
    elif resolved.name == "mae":
        entries += _norm("norm", enc + ("norm",), "encoder")
        dec = ("decoder",)
        entries += [Entry("mask_token", dec + ("mask_token",), "same", "decoder")]
        entries += _linear("decoder_embed", dec + ("embed",), "decoder")
        for i in range(resolved.decoder.depth):
            entries += _block(f"decoder_blocks.{i}", dec + (f"blocks_{i}",), "decoder")
        entries += _norm("decoder_norm", dec + ("norm",), "decoder")
        entries += _linear("decoder_pred", dec + ("pred",), "decoder")
    else:
        raise ConfigError("model.name", resolved.name, "weight conversion supports 'mae' and 'classifier'")
    return entries


def fixed_tables(resolved) -> dict:
    """The non-trainable sin-cos tables, (1, 1 + L, D) each, under their official names."""
    if resolved.name == "classifier":
        return {}  # fine-tuning trains pos_embed: it is a parameter there
    grid = resolved.image_size // resolved.encoder.patch_size
    tables = {"pos_embed": sincos_2d(grid, resolved.encoder.width)[None]}
    if resolved.name == "mae":
        tables["decoder_pos_embed"] = sincos_2d(grid, resolved.decoder.width)[None]
    return tables


class WeightsError(UserError, ValueError):
    """A checkpoint that does not fit the config, or cannot be loaded safely."""


def unwrap_state_dict(checkpoint) -> dict:
    """The flat name -> tensor dict of a checkpoint, without a {'model': ...} wrapper."""
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
        checkpoint = checkpoint["model"]
    if not isinstance(checkpoint, dict):
        raise WeightsError(f"expected a state dict (name -> tensor), got {type(checkpoint).__name__}")
    return checkpoint


def _set(tree: dict, path: tuple, value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple):
    for name in path:
        tree = tree[name]
    return tree


def _summarise(keys) -> str:
    """Compress 'blocks.12.attn.qkv.weight', ... into 'blocks.12-23.*' style hints."""
    pattern = re.compile(r"^((?:decoder_)?blocks)\.(\d+)\.")
    ranges, other = {}, []
    for key in keys:
        m = pattern.match(key)
        if m:
            ranges.setdefault(m.group(1), set()).add(int(m.group(2)))
        else:
            other.append(key)
    parts = [f"{name}.{min(ids)}-{max(ids)}.*" for name, ids in ranges.items()]
    return ", ".join(parts + sorted(other)[:8] + (["..."] if len(other) > 8 else []))


def params_from_torch(state_dict, config_model) -> dict:
    """Official-name state dict -> maejax params (nested dict of float32 NumPy arrays).

    Args:
      state_dict: name -> torch tensor or array; a {'model': ...} wrapper (as in
        the official .pth files) is unwrapped.
      config_model: `config.model` of the model the weights are for.

    Returns:
      {'encoder': ..., 'decoder': ...}. An encoder-only checkpoint (the official
      `mae_pretrain_*` files) gives encoder params only, with a warning: MAE
      reconstruction and pre-training need a full (`*_full`, `mae_visualize_*`)
      checkpoint.

    Raises:
      ValueError: a missing or unexpected key, a shape that does not fit the
        config, or position tables that differ from the fixed sin-cos ones.
    """
    resolved = model_config.resolve(config_model)
    state = {k: hf_format.as_numpy(v) for k, v in unwrap_state_dict(state_dict).items()}
    entries = key_map(resolved)
    has_decoder = any(e.torch_key in state for e in entries if e.group == "decoder")
    if not has_decoder and resolved.name == "mae":
        entries = [e for e in entries if e.group != "decoder"]
        logging.warning(
            "The checkpoint has no decoder weights: returning encoder params only. "
            "MAE reconstruction needs a full checkpoint (*_full.pth or mae_visualize_*.pth)."
        )
    missing = [e.torch_key for e in entries if e.torch_key not in state]
    if missing:
        raise WeightsError(
            f"checkpoint lacks {len(missing)} tensors the config needs: {_summarise(missing)} "
            f"(config: model.encoder={resolved.encoder.to_dict()}, "
            f"decoder depth {resolved.decoder.depth})"
        )
    tables = fixed_tables(resolved)
    known = {e.torch_key for e in entries} | set(tables)
    unexpected = sorted(set(state) - known)
    if unexpected:
        raise WeightsError(
            f"checkpoint has {len(unexpected)} tensors the config does not use: "
            f"{_summarise(unexpected)}; is model.encoder/decoder set to the checkpoint's size?"
        )
    for name, table in tables.items():
        if name not in state or (name == "decoder_pos_embed" and not has_decoder):
            continue
        if state[name].shape != table.shape:
            raise WeightsError(
                f"checkpoint {name} has shape {state[name].shape}, the config needs {table.shape} "
                f"(model.image_size={resolved.image_size}, patch {resolved.encoder.patch_size})"
            )
        err = np.max(np.abs(state[name] - table))
        if err > 1e-4:
            raise WeightsError(
                f"checkpoint {name} differs from the fixed 2-D sin-cos table by {err:.3g}: "
                "it was not trained with MAE's fixed position embeddings"
            )
    params: dict = {}
    shapes = _param_shapes(resolved)
    for e in entries:
        value = _TO_FLAX[e.kind](state[e.torch_key]).astype(np.float32)
        expected = tuple(_get(shapes, e.flax_path))
        if value.shape != expected:
            raise WeightsError(
                f"checkpoint {e.torch_key} has shape {state[e.torch_key].shape}; the config needs "
                f"{_TO_TORCH[e.kind](np.empty(expected)).shape} (model.encoder={resolved.encoder.to_dict()}, "
                f"model.decoder width {resolved.decoder.width}, in_channels {resolved.in_channels})"
            )
        _set(params, e.flax_path, np.ascontiguousarray(value))
    return params


def _abstract_params(resolved) -> dict:
    """The model's params as ShapeDtypeStructs, from an abstract init (no FLOPs, no memory)."""
    import jax

    from maejax.models import build_model

    model = build_model(resolved)
    size = resolved.image_size
    images = jax.ShapeDtypeStruct((1, size, size, resolved.in_channels), np.float32)
    rngs = {"params": jax.random.key(0), "masking": jax.random.key(0), "dropout": jax.random.key(0)}
    return jax.eval_shape(lambda x: model.init(rngs, x), images)["params"]


def _param_shapes(resolved) -> dict:
    import jax

    return jax.tree.map(lambda s: s.shape, _abstract_params(resolved))


def params_to_torch(params, config_model) -> dict:
    """maejax params -> flat dict of official names to NumPy arrays (float32).

    Includes the fixed sin-cos tables so that the result loads into the
    official model with `load_state_dict` (after `torch.from_numpy`).
    Encoder-only params give an encoder-only state dict.
    """
    resolved = model_config.resolve(config_model)
    has_decoder = "decoder" in params
    out = {}
    if resolved.name == "classifier" and "head" not in params:
        raise WeightsError(
            "classifier params without a head: convert the pre-training model with its MAE config"
        )
    for e in key_map(resolved):
        if e.group == "decoder" and not has_decoder:
            continue
        out[e.torch_key] = np.ascontiguousarray(_TO_TORCH[e.kind](np.asarray(_get(params, e.flax_path))))
    for name, table in fixed_tables(resolved).items():
        if name != "decoder_pos_embed" or has_decoder:
            out[name] = table
    return out


def check_params_fit(params, resolved, loaded: str) -> None:
    """Refuse params with a tensor missing, extra or of another shape than the model's.

    Export writes what key_map names and nothing else: this makes sure that
    is all of `params`. Encoder-only params are checked against the encoder.
    """
    import jax

    from maejax import checkpoint

    abstract = _abstract_params(resolved)
    if "decoder" in abstract and "decoder" not in params:
        abstract = {k: v for k, v in abstract.items() if k != "decoder"}
    have = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), params)
    differences = checkpoint.tree_differences(have, abstract)
    if differences:
        raise WeightsError(f"{loaded} does not fit its model config ({checkpoint.summarize(differences)})")


# --- the CLI: its flags and entry point (what it does is in maejax.convert_cli) -------


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    flags.DEFINE_string("torch_checkpoint", None, "import: an official MAE .pth or .safetensors file")
    flags.DEFINE_string("hf", None, "import: a ViTMAEForPreTraining save_pretrained folder or hub id")
    flags.DEFINE_string("workdir", None, "import: output directory (params/ and config.json)")
    flags.DEFINE_string("from_workdir", None, "export: a maejax workdir (params/ or checkpoints/)")
    flags.DEFINE_string("export", None, "export: a .pth or .safetensors file, official names")
    flags.DEFINE_string("export_hf", None, "export: a folder ViTMAEForPreTraining.from_pretrained loads")
    config_flags.DEFINE_config_file(
        "config",
        None,
        "config file whose model the weights are for (needed with --torch_checkpoint; "
        "with --hf or --from_workdir, checked against the model they describe)",
        lock_config=True,
    )


if __name__ == "__main__":
    from absl import app

    from maejax import convert_cli
    from maejax.cli import run_cli

    _define_flags()
    sys.exit(run_cli(app, convert_cli.main))
