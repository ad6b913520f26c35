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
emits them so the file loads in the official code. HuggingFace names and
config.json fields are mapped in `maejax.hf_format`.
"""

import dataclasses
import json
import logging
import os
import re
import struct
import sys
import zipfile

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


# --- files: .safetensors, .pth, HuggingFace folders ---------------------------------

SAFETENSORS = ".safetensors"
EXPORT_SUFFIXES = (".pth", ".pt", SAFETENSORS)


def load_safetensors(path: str) -> dict:
    """A .safetensors file as name -> array, read with safetensors.numpy (torch not needed).

    bfloat16 and float16 tensors are widened to float32, exactly.
    """
    try:
        import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy, so safetensors.numpy can read it)
        import safetensors
        import safetensors.numpy
    except ImportError:
        raise WeightsError(f"reading {path} needs the safetensors package: pip install safetensors") from None
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: no such file")
    try:
        arrays = safetensors.numpy.load_file(path)
    except (safetensors.SafetensorError, OSError, ValueError, TypeError) as e:
        raise WeightsError(
            f"cannot read {path} ({os.path.getsize(path)} bytes): it is truncated or not a safetensors "
            f"file (safetensors said: {first_line(e)})"
        ) from None
    return {name: _widened(value) for name, value in arrays.items()}


def _widened(value: np.ndarray) -> np.ndarray:
    # NumPy calls ml_dtypes' bfloat16 kind 'V', not 'f': name it.
    if value.dtype.name in ("bfloat16", "float16"):
        return value.astype(np.float32)
    return value


def load_weights_file(path: str) -> dict:
    """The state dict of a .safetensors file or a .pth (any other name is read as a .pth)."""
    if path.endswith(SAFETENSORS):
        return load_safetensors(path)
    return load_torch_checkpoint(path)


def with_official_names(state: dict) -> dict:
    """`state` under the official names: HF names (`vit.`, `decoder.` prefixes) are mapped."""
    if any(name.startswith(("vit.", "decoder.")) for name in state):
        return hf_format.hf_to_official(state)
    return state


# What a save_pretrained folder holds its weights in, in the order transformers prefers them.
HF_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def hf_weight_files(folder: str) -> list:
    """The weight files of a save_pretrained folder: one file, or the shards its index lists."""
    for name in HF_WEIGHTS:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if not name.endswith(".index.json"):
            return [path]
        try:
            with open(path) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise WeightsError(f"cannot read the shard index {path} ({first_line(e)})") from None
        paths = [os.path.join(folder, shard) for shard in shards]
        absent = [p for p in paths if not os.path.isfile(p)]
        if absent:
            raise WeightsError(f"{path} lists shards that are not there: {', '.join(absent)}")
        return paths
    raise WeightsError(f"{folder} holds none of {', '.join(HF_WEIGHTS)}: is it a save_pretrained folder?")


def read_hf_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise WeightsError(f"{folder} has no config.json: is it a save_pretrained folder?") from None
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot read {path} ({first_line(e)})") from None


def read_hf_folder(folder: str):
    """(official-name state dict, config.model fields) of a ViTMAEForPreTraining save_pretrained folder."""
    model = hf_format.model_from_hf_config(read_hf_config(folder), os.path.join(folder, "config.json"))
    state = {}
    for path in hf_weight_files(folder):
        state.update(load_weights_file(path))
    return hf_format.hf_to_official(state), model


# A hub id: 'name' or 'owner/name' (anything else given to --hf is meant as a folder).
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def hf_folder(source: str) -> str:
    """A local folder for --hf: `source` itself, or the hub id `source` downloaded (or cached).

    Only config.json and the safetensors weights are fetched, or the .bin
    weights when a repository has no safetensors.
    """
    if os.path.isdir(source):
        return source
    if os.path.exists(source) or not HUB_ID.match(source):
        raise WeightsError(
            f"--hf={source}: not a folder (give a save_pretrained folder or a hub id; a single weights "
            "file goes to --torch_checkpoint with --config)"
        )
    advice = (
        f"download it where the hub can be reached (hf download {source} --local-dir DIR), "
        "copy DIR here and pass --hf=DIR"
    )
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise WeightsError(
            f"--hf={source} is no folder here, and huggingface_hub is not installed to fetch it from the "
            f"hub: pip install huggingface_hub, or {advice}"
        ) from None
    try:
        folder = snapshot_download(
            source, allow_patterns=["config.json", "*.safetensors", "*.safetensors.index.json"]
        )
        if not any(os.path.isfile(os.path.join(folder, n)) for n in HF_WEIGHTS[:2]):
            folder = snapshot_download(source, allow_patterns=["config.json", "*.bin", "*.bin.index.json"])
    # huggingface_hub reports being offline, an unknown or gated repository and network
    # failures with many exception types (its own, httpx's, OSError): all mean "not from here".
    except Exception as e:
        raise WeightsError(
            f"--hf={source} is no folder here and fetching it from the hub failed "
            f"({type(e).__name__}: {first_line(e)}); {advice}"
        ) from None
    return folder


def write_weights_file(state: dict, path: str) -> None:
    """Write an official-name state dict to a .safetensors file, or a .pth as {'model': state}.

    The {'model': ...} wrapper is how the official code's main_finetune.py
    and its released files hold the weights. Written to a temporary name and
    renamed, so a failed write never leaves half a file under `path`.
    """
    if not path.endswith(EXPORT_SUFFIXES):
        raise WeightsError(f"--export={path}: name a file ending in {', '.join(EXPORT_SUFFIXES)}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}
    tmp = path + ".tmp"
    if path.endswith(SAFETENSORS):
        _save_safetensors(arrays, tmp)
    else:
        try:
            import torch
        except ImportError:
            raise WeightsError(
                f"writing {path} needs torch (pip install torch); a {SAFETENSORS} file does not"
            ) from None
        torch.save({"model": {k: torch.from_numpy(v) for k, v in arrays.items()}}, tmp)
    os.replace(tmp, path)


def _save_safetensors(arrays: dict, path: str) -> None:
    try:
        import safetensors.numpy
    except ImportError:
        raise WeightsError(f"writing {path} needs the safetensors package: pip install safetensors") from None
    # format=pt: what transformers and safetensors.torch expect of a PyTorch model's file.
    safetensors.numpy.save_file(arrays, path, metadata={"format": "pt"})


def write_hf_folder(state: dict, resolved, folder: str) -> None:
    """Write config.json + model.safetensors: a folder `ViTMAEForPreTraining.from_pretrained` loads."""
    if resolved.name != "mae":
        raise WeightsError(
            f"--export_hf writes ViTMAEForPreTraining, an MAE; this is a {resolved.name!r} model: "
            "use --export=FILE.pth for the official layout"
        )
    if "decoder_embed.weight" not in state:
        raise WeightsError(
            "--export_hf needs the decoder, and these are encoder-only weights: use --export=FILE.pth"
        )
    os.makedirs(folder, exist_ok=True)
    _save_safetensors(
        hf_format.official_to_hf(state, hf_format.V4), os.path.join(folder, "model.safetensors.tmp")
    )
    os.replace(os.path.join(folder, "model.safetensors.tmp"), os.path.join(folder, "model.safetensors"))
    path = os.path.join(folder, "config.json")
    with open(path + ".tmp", "w") as f:
        json.dump(hf_format.hf_config_from_model(resolved), f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


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


# --- the CLI -------------------------------------------------------------------------


def _model_of_workdir(workdir: str, config):
    """The resolved model of a maejax workdir: its config.json, checked against --config if both exist."""
    from maejax import config as config_lib

    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        if config is None:
            raise WeightsError(f"{workdir} has no config.json: pass --config=FILE naming its model")
        return model_config.resolve(config.model)
    saved = model_config.resolve(config_lib.read_config_json(workdir).model)
    if config is not None:
        given = model_config.resolve(config.model)
        for field in ("name", *hf_format.MODEL_FIELDS):
            if hf_format.model_field(given, field) != hf_format.model_field(saved, field):
                raise ConfigError(
                    f"model.{field}",
                    hf_format.model_field(given, field),
                    f"{path} has {hf_format.model_field(saved, field)!r}; drop --config",
                )
    return saved


def import_weights(flags_) -> None:
    """--torch_checkpoint or --hf -> WORKDIR/params and WORKDIR/config.json."""
    from maejax import checkpoint
    from maejax import config as config_lib

    cfg = flags_.config
    if flags_.torch_checkpoint:
        if cfg is None:
            raise UserError("--torch_checkpoint needs --config=FILE naming the model the weights are for")
        state = with_official_names(load_weights_file(flags_.torch_checkpoint))
    else:
        folder = hf_folder(flags_.hf)
        state, hf_model = read_hf_folder(folder)
        from_hf = model_config.resolve(hf_model)
        if cfg is None:
            cfg = config_lib.base_config()
            cfg.model = from_hf
        else:
            hf_format.check_same_model(model_config.resolve(cfg.model), from_hf, f"--hf={flags_.hf}")
    resolved = model_config.resolve(cfg.model)
    params = params_from_torch(state, resolved)
    checkpoint.save_params(flags_.workdir, params)
    config_lib.write_config_json(config_lib.with_resolved_model(cfg), flags_.workdir)
    n = sum(np.asarray(v).size for v in _leaves(params))
    print(f"wrote {n / 1e6:.1f}M parameters ({', '.join(sorted(params))}) to {flags_.workdir}/params")


def export_weights(flags_) -> None:
    """--from_workdir's params -> --export (official names) and/or --export_hf (a HF folder)."""
    from maejax import checkpoint

    resolved = _model_of_workdir(flags_.from_workdir, flags_.config)
    params, loaded = checkpoint.load_params(flags_.from_workdir)
    check_params_fit(params, resolved, loaded)
    state = params_to_torch(params, resolved)
    if flags_.export:
        write_weights_file(state, flags_.export)
        print(f"wrote {len(state)} tensors from {loaded} to {flags_.export}")
    if flags_.export_hf:
        write_hf_folder(state, resolved, flags_.export_hf)
        print(f"wrote a ViTMAEForPreTraining of {loaded} to {flags_.export_hf}")


def check_flags(flags_) -> None:
    """One source, and the outputs that go with it."""
    sources = [f"--{n}" for n in ("torch_checkpoint", "hf", "from_workdir") if getattr(flags_, n)]
    if len(sources) != 1:
        raise UserError(
            "give one of --torch_checkpoint, --hf (import) or --from_workdir (export); "
            f"got {', '.join(sources) or 'none'}"
        )
    if flags_.from_workdir:
        if not (flags_.export or flags_.export_hf):
            raise UserError("--from_workdir needs --export=FILE.pth|FILE.safetensors and/or --export_hf=DIR")
        if flags_.workdir:
            raise UserError("--workdir is where an import writes; an export reads --from_workdir")
    else:
        if not flags_.workdir:
            raise UserError(f"{sources[0]} needs --workdir=DIR to write the params to")
        if flags_.export or flags_.export_hf:
            raise UserError("--export and --export_hf read --from_workdir=DIR (run the import first)")


def main(argv) -> None:
    from absl import flags

    del argv
    check_flags(flags.FLAGS)
    if flags.FLAGS.from_workdir:
        export_weights(flags.FLAGS)
    else:
        import_weights(flags.FLAGS)


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree


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

    from maejax.cli import run_cli

    _define_flags()
    sys.exit(run_cli(app, main))
