"""`config.model`: defaults for every field, validation, and the resolved sizes.

`resolve(model_config)` returns a complete copy (every field present, encoder
sizes spelled out), or raises `ConfigError` naming the field, its value and
what is valid. `build_model` and the checkpoint converter both start here.
"""

import copy

import ml_collections

from maejax import checks
from maejax.diffusion import LOSSES, PREDICTIONS, SCHEDULES
from maejax.errors import ConfigError
from maejax.models.diffmae import VARIANTS as DECODER_VARIANTS
from maejax.models.vit import POOLS, VARIANTS, ViTSpec, decode_variant

# Each list of choices lives once, in the module that implements it (schedules in diffusion,
# decoder variants in diffmae, pools in vit); these three are implemented by build_model.
MODEL_NAMES = ("mae", "diffmae", "classifier")
DTYPES = ("float32", "bfloat16")
ATTENTION_IMPLS = ("xla", "cudnn")

# The official MAE model's defaults (ViT-B/16 encoder, 512x8 decoder).
DEFAULTS = {
    "name": "mae",
    "image_size": 224,
    "in_channels": 3,
    "encoder": {
        "variant": "B/16",
        "width": None,
        "depth": None,
        "num_heads": None,
        "mlp_dim": None,
        "patch_size": None,
    },
    "decoder": {
        "width": 512,
        "depth": 8,
        "num_heads": 16,
        "mlp_dim": None,  # 4 * width
        "variant": "cross_self",  # DiffMAE only
        "adaln": False,  # DiffMAE only: adaLN-Zero timestep modulation
        "time_embed_dim": 256,  # DiffMAE only: sinusoidal timestep features
    },
    "mask_ratio": 0.75,
    "norm_pix_loss": False,
    "dtype": "float32",
    "remat": False,
    "attention_impl": "xla",
    # Classifier (fine-tuning and linear probing).
    "num_classes": 1000,
    "pool": "avg",
    "drop_path": 0.0,
    "head_init_std": 2e-5,
    # DiffMAE.
    "diffusion": {
        "timesteps": 1000,
        "schedule": "linear_pow",
        "rho": 0.8,
        "beta_start": 1e-4,
        "beta_end": 0.02,
        "prediction": "x0",  # what the decoder outputs: 'x0' (DiffMAE's) or 'v'
        "loss": "x0",  # which error the loss squares: the x0 estimate's (DiffMAE's) or its v's
    },
}


def _merge(defaults: dict, given: dict, prefix: str) -> dict:
    out = copy.deepcopy(defaults)
    for key, value in given.items():
        field = f"{prefix}.{key}"
        if key not in defaults:
            raise ConfigError(field, value, f"unknown field; valid fields: {sorted(defaults)}")
        if isinstance(defaults[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(field, value, "must be a group of fields")
            out[key] = _merge(defaults[key], value, field)
        else:
            out[key] = value
    return out


def _resolve_encoder(enc: dict) -> dict:
    base = {}
    if enc["variant"] is not None:
        try:
            base = decode_variant(enc["variant"])
        except (ValueError, TypeError):  # TypeError: not a string
            raise ConfigError(
                "model.encoder.variant",
                enc["variant"],
                f"one of {list(VARIANTS)} with an optional '/<patch size>', e.g. 'B/16'",
            ) from None
    explicit = {k: v for k, v in enc.items() if k != "variant" and v is not None}
    sizes = {**base, **explicit}
    if "width" in explicit and "mlp_dim" not in explicit:
        sizes["mlp_dim"] = 4 * sizes["width"]
    sizes.setdefault("patch_size", 16)
    for key in ("width", "depth", "num_heads", "mlp_dim", "patch_size"):
        if key not in sizes:
            raise ConfigError(f"model.encoder.{key}", None, "set it, or set model.encoder.variant")
        checks.integer(sizes[key], f"model.encoder.{key}")
    return {"variant": enc["variant"], **sizes}


def _check_heads(width: int, heads: int, prefix: str) -> None:
    if width % heads:
        raise ConfigError(f"{prefix}.num_heads", heads, f"must divide {prefix}.width={width}")
    if width % 4:
        raise ConfigError(f"{prefix}.width", width, "must be divisible by 4 (sin-cos position tables)")


def resolve(model_config) -> ml_collections.ConfigDict:
    """Fill defaults into `config.model` and validate it.

    Args:
      model_config: a ConfigDict or dict with any subset of the fields in
        DEFAULTS (the README, "Using the model").

    Returns:
      A new ConfigDict with every field set; `encoder` carries explicit
      width/depth/num_heads/mlp_dim/patch_size, `decoder.mlp_dim` is set.

    Raises:
      ConfigError: an unknown field or an invalid value.
    """
    given = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config or {})
    cfg = _merge(DEFAULTS, given, "model")
    checks.choice(cfg["name"], "model.name", MODEL_NAMES)
    checks.integer(cfg["image_size"], "model.image_size")
    checks.integer(cfg["in_channels"], "model.in_channels")
    cfg["encoder"] = enc = _resolve_encoder(cfg["encoder"])
    _check_heads(enc["width"], enc["num_heads"], "model.encoder")
    if cfg["image_size"] % enc["patch_size"]:
        raise ConfigError(
            "model.image_size",
            cfg["image_size"],
            f"must be divisible by the patch size model.encoder.patch_size={enc['patch_size']}",
        )
    cfg["decoder"] = _resolve_decoder(cfg["decoder"])
    checks.choice(cfg["dtype"], "model.dtype", DTYPES)
    checks.choice(cfg["attention_impl"], "model.attention_impl", ATTENTION_IMPLS)
    checks.boolean(cfg["remat"], "model.remat")
    checks.boolean(cfg["norm_pix_loss"], "model.norm_pix_loss")
    checks.choice(cfg["pool"], "model.pool", POOLS)
    checks.integer(cfg["num_classes"], "model.num_classes")
    checks.number(cfg["drop_path"], "model.drop_path", 0, 1, high_open=True)
    checks.number(cfg["head_init_std"], "model.head_init_std", 0, None)
    if cfg["name"] != "classifier":  # the classifier never masks
        _check_mask_ratio(cfg["mask_ratio"], (cfg["image_size"] // enc["patch_size"]) ** 2)
    _check_diffusion(cfg["diffusion"])
    return ml_collections.ConfigDict(cfg)


def _resolve_decoder(dec: dict) -> dict:
    """Check the decoder fields (DiffMAE's too, also for MAE: they are cheap) and fill mlp_dim."""
    for key in ("width", "depth", "num_heads"):
        checks.integer(dec[key], f"model.decoder.{key}")
    if dec["mlp_dim"] is None:
        dec["mlp_dim"] = 4 * dec["width"]
    checks.integer(dec["mlp_dim"], "model.decoder.mlp_dim")
    _check_heads(dec["width"], dec["num_heads"], "model.decoder")
    checks.choice(dec["variant"], "model.decoder.variant", DECODER_VARIANTS)
    checks.boolean(dec["adaln"], "model.decoder.adaln")
    # The timestep features are [cos | sin] halves: an odd size would silently lose one feature.
    dim = checks.integer(dec["time_embed_dim"], "model.decoder.time_embed_dim", minimum=2)
    if dim % 2:
        raise ConfigError("model.decoder.time_embed_dim", dim, "must be an even integer >= 2")
    return dec


def _check_diffusion(diff: dict) -> None:
    checks.integer(diff["timesteps"], "model.diffusion.timesteps")
    checks.choice(diff["schedule"], "model.diffusion.schedule", SCHEDULES)
    checks.number(diff["rho"], "model.diffusion.rho", 0, None, low_open=True)
    checks.choice(diff["prediction"], "model.diffusion.prediction", PREDICTIONS)
    checks.choice(diff["loss"], "model.diffusion.loss", LOSSES)
    # Betas are probabilities that must grow: 0 < beta_start < beta_end < 1 (unused by 'cosine',
    # checked anyway so a switch of schedule never meets a bad value).
    start = checks.number(
        diff["beta_start"], "model.diffusion.beta_start", 0, 1, low_open=True, high_open=True
    )
    end = checks.number(diff["beta_end"], "model.diffusion.beta_end", 0, 1, low_open=True, high_open=True)
    if end <= start:
        raise ConfigError("model.diffusion.beta_end", end, f"must exceed model.diffusion.beta_start={start}")


def _check_mask_ratio(ratio, num_patches: int) -> None:
    checks.number(ratio, "model.mask_ratio", 0, 1, low_open=True, high_open=True)
    keep = int(num_patches * (1 - ratio))
    if keep < 1 or keep >= num_patches:
        raise ConfigError(
            "model.mask_ratio",
            ratio,
            f"must leave at least one visible and one masked patch of {num_patches} (it keeps {keep})",
        )


def encoder_spec(resolved) -> ViTSpec:
    e = resolved.encoder
    return ViTSpec(e.width, e.depth, e.num_heads, e.mlp_dim, e.patch_size)


def decoder_spec(resolved) -> ViTSpec:
    d = resolved.decoder
    return ViTSpec(d.width, d.depth, d.num_heads, d.mlp_dim, resolved.encoder.patch_size)
