"""PyTorch <-> maejax weights, under the official MAE state-dict key names.

    python -m maejax.convert --torch_checkpoint=mae_pretrain_vit_base.pth \
        --config=configs/mae_vitb.py --workdir=workdirs/mae_vitb_official

writes DIR/params/ (orbax) and DIR/config.json; `config.init_from=DIR` then
starts fine-tuning, linear probing or sampling from those weights.

`params_from_torch` and `params_to_torch` are exact inverses on every
trainable tensor. The fixed sin-cos tables (`pos_embed`, `decoder_pos_embed`)
are not parameters: reading checks a checkpoint's tables against ours, writing
emits them so the file loads in the official code.
"""

import dataclasses
import logging
import os
import re
import struct
import sys
import zipfile

import numpy as np

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


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; torch itself is not needed here
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


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
    state = {k: _to_numpy(v) for k, v in unwrap_state_dict(state_dict).items()}
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


def _param_shapes(resolved) -> dict:
    """Parameter shapes from an abstract init (no FLOPs, no memory)."""
    import jax

    from maejax.models import build_model

    model = build_model(resolved)
    size = resolved.image_size
    images = jax.ShapeDtypeStruct((1, size, size, resolved.in_channels), np.float32)
    rngs = {"params": jax.random.key(0), "masking": jax.random.key(0), "dropout": jax.random.key(0)}
    shapes = jax.eval_shape(lambda x: model.init(rngs, x), images)["params"]
    return jax.tree.map(lambda s: s.shape, shapes)


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


# How torch.load(weights_only=True) begins its message when it refuses a pickle
# that needs code, as opposed to one it cannot parse at all.
WEIGHTS_ONLY_REFUSAL = "Weights only load failed"


def load_torch_checkpoint(path: str) -> dict:
    """Load a .pth without running code: torch.load(weights_only=True).

    A .pth is a pickle; a file that needs anything beyond tensors and plain
    containers is refused with a clear error instead of being executed.
    """
    import pickle

    import torch

    if not os.path.isfile(path):
        raise WeightsError(f"--torch_checkpoint={path}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if WEIGHTS_ONLY_REFUSAL not in str(e):
            raise not_a_checkpoint(path, e) from None
        raise WeightsError(
            f"refusing to load {path}: it needs arbitrary code to unpickle, which maejax never "
            f"runs (torch.load weights_only=True said: {first_line(e)})"
        ) from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, struct.error, zipfile.BadZipFile) as e:
        # How torch reports a cut-off zip archive (OSError, RuntimeError), a cut-off
        # legacy pickle (RuntimeError, EOFError, struct.error) or another file (KeyError).
        raise not_a_checkpoint(path, e) from None
    return unwrap_state_dict(checkpoint)


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def not_a_checkpoint(path: str, error: Exception) -> WeightsError:
    size = os.path.getsize(path)
    return WeightsError(
        f"cannot read {path} ({size} bytes): it is truncated or not a PyTorch checkpoint "
        f"(torch.load said: {type(error).__name__}: {first_line(error)})"
    )


def main(argv) -> None:
    from absl import flags

    from maejax import checkpoint
    from maejax import config as config_lib

    flags_ = flags.FLAGS
    del argv
    cfg = flags_.config
    resolved = model_config.resolve(cfg.model)
    params = params_from_torch(load_torch_checkpoint(flags_.torch_checkpoint), resolved)
    workdir = flags_.workdir
    checkpoint.save_params(workdir, params)
    cfg = config_lib.with_resolved_model(cfg)
    config_lib.write_config_json(cfg, workdir)
    n = sum(np.asarray(v).size for v in _leaves(params))
    print(f"wrote {n / 1e6:.1f}M parameters ({', '.join(sorted(params))}) to {workdir}/params")


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    flags.DEFINE_string("torch_checkpoint", None, "official MAE .pth file", required=True)
    flags.DEFINE_string("workdir", None, "output directory (params/ and config.json)", required=True)
    config_flags.DEFINE_config_file(
        "config", None, "config file whose model the weights are for", lock_config=True
    )


if __name__ == "__main__":
    from absl import app

    from maejax.cli import run_cli

    _define_flags()
    sys.exit(run_cli(app, main))
