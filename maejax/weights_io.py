"""Weights files in and out: PyTorch .pth, .safetensors and HuggingFace save_pretrained folders.

Reading gives a flat name -> array state dict (`maejax.convert` maps the
official names to params); writing takes one. A .pth is loaded with
torch.load(weights_only=True), never running code; HuggingFace folders may
come from the hub (`hf_folder`), and their names are mapped by
`maejax.hf_format`. Errors are `WeightsError`s naming the file.
"""

import json
import os
import re
import struct
import zipfile

import numpy as np

from maejax import hf_format
from maejax.convert import WeightsError, unwrap_state_dict

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
