"""Config validation covers every field, and each choice has one source of truth.

The walking test below is the guard: a field added to `base_config()` without a
rule in `maejax.validate` (and a row in BAD here) fails it.
"""

import ml_collections
import numpy as np
import pytest

from maejax import config as config_lib
from maejax import diffusion, input_pipeline, validate
from maejax.errors import ConfigError
from maejax.models import diffmae, model_config, vit
from maejax.recipes import fmnist_pretrain

# field -> (a value validate must reject, overrides that make its rule apply, if any).
SAMPLE_TASK = {"task": "sample"}
BAD = {
    "task": ("distill", {}),
    "seed": (-1, {}),
    "batch_size": (0, {}),
    "grad_accum_steps": (0, {}),
    "total_steps": (0, {}),
    "total_epochs": (-1.0, {}),
    "log_every_steps": (0, {}),
    "image_every_steps": (0, {}),
    "checkpoint_every_steps": (0, {}),
    "keep_checkpoints": (0, {}),
    "eval_every_steps": (0, {}),
    "knn_every_steps": (-5, {}),
    "model.name": ("vae", {}),
    "model.image_size": (30, {}),  # not a multiple of the patch size 4
    "model.in_channels": (0, {}),
    "model.encoder.variant": ("Q/16", {}),
    "model.encoder.width": (-8, {}),
    "model.encoder.depth": (0, {}),
    "model.encoder.num_heads": (3, {}),  # does not divide the width 128
    "model.encoder.mlp_dim": (0, {}),
    "model.encoder.patch_size": (2.5, {}),
    "model.decoder.width": (0, {}),
    "model.decoder.depth": (0, {}),
    "model.decoder.num_heads": (0, {}),
    "model.decoder.mlp_dim": (0, {}),
    "model.decoder.variant": ("self", {}),
    "model.decoder.adaln": ("yes", {}),
    "model.decoder.time_embed_dim": (255, {}),  # odd: [cos | sin] halves
    "model.mask_ratio": (1.0, {}),
    "model.norm_pix_loss": ("False", {}),  # a non-empty string is truthy
    "model.dtype": ("float16", {}),
    "model.remat": (1, {}),
    "model.attention_impl": ("flash", {}),
    "model.num_classes": (0, {}),
    "model.pool": ("max", {}),
    "model.drop_path": (1.0, {}),
    "model.head_init_std": (-0.1, {}),
    "model.diffusion.timesteps": (0, {}),
    "model.diffusion.schedule": ("sigmoid", {}),
    "model.diffusion.rho": (0.0, {}),
    "model.diffusion.prediction": ("eps", {}),
    "model.diffusion.loss": ("eps", {}),
    "model.diffusion.beta_start": (0.0, {}),
    "model.diffusion.beta_end": (5e-5, {}),  # below beta_start = 1e-4
    "dataset.name": ("", {}),
    "dataset.data_dir": ("", {}),
    "dataset.manual_dir": ("/nonexistent/maejax", {}),
    "dataset.train_split": ("", {}),
    "dataset.eval_split": (0, {}),
    "dataset.crop_scale": ((0.5, 0.2), {}),
    "dataset.flip": ("false", {}),
    "dataset.prefetch": (0, {}),
    "dataset.num_threads": (0, {}),
    "dataset.num_workers": (-1, {}),
    "dataset.bad_images": ("ignore", {}),
    "dataset.check_images": ("yes", {}),
    "dataset.on_device": ("yes", {}),
    "optimizer.name": ("sgd", {}),
    "optimizer.blr": (-1.0, {}),
    "optimizer.lr": (0.0, {}),
    "optimizer.weight_decay": (-0.1, {}),
    "optimizer.b1": (1.0, {}),
    "optimizer.b2": (1.0, {}),
    "optimizer.warmup_steps": (-1, {}),
    "optimizer.warmup_epochs": (-1.0, {}),
    "optimizer.min_lr": (-1.0, {}),
    "optimizer.grad_clip": (0.0, {}),
    "optimizer.layer_decay": (1.5, {}),
    "optimizer.momentum": (1.0, {}),
    "optimizer.trust_coefficient": (0.0, {}),
    "mesh.data": (0, {}),
    "mesh.fsdp": (1.5, {}),  # sharding.mesh_shape's int() would have made it 1
    "init_from": ("/nonexistent/maejax", {"task": "finetune"}),
    "finetune.crop_scale": ((0.0, 1.0), {}),
    "finetune.label_smoothing": (1.0, {}),
    "finetune.mixup": (-0.1, {}),
    "finetune.cutmix": (-1.0, {}),
    "finetune.mixup_prob": (1.5, {}),
    "finetune.mixup_switch_prob": (-0.5, {}),
    "finetune.randaug_ops": (-1, {}),
    "finetune.randaug_magnitude": (11, {}),
    "finetune.randaug_mstd": (-0.5, {}),
    "finetune.reprob": (1.5, {}),
    "finetune.eval_resize_ratio": (1.2, {}),  # would resize below the crop
    "knn.k": (0, {}),
    "knn.temperature": (0.0, {}),
    "knn.num_train": (0, {}),
    "knn.num_eval": (0, {}),
    "knn.pool": ("max", {}),  # silently meant average pooling before
    "sample.sampler": ("euler", {}),
    "sample.steps": (0, {}),
    "sample.eta": (2.0, {}),
    "sample.eps_scale": (0.9, {}),  # below 1 removes more noise than the model infers
    "sample.num_samples": (0, {}),
    "sample.mask": ("/nonexistent/masks.npy", SAMPLE_TASK),
    "sample.mask_ratio": (1.0, {}),
    "sample.num_images": (0, {}),
    "compare_mae_from": ("/nonexistent/maejax", SAMPLE_TASK),
}
# Rules whose overrides alone fail validation (the task needs the very field under test).
OVERRIDES_FAIL_ALONE = {"init_from"}


def leaves(config, prefix: str = "") -> set:
    """Dotted paths of every non-group field (tuples such as crop_scale are one field)."""
    out = set()
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            out |= leaves(value, f"{path}.")
        else:
            out.add(path)
    return out


def with_fields(config, overrides: dict) -> ml_collections.ConfigDict:
    """A copy with `overrides` set, without ConfigDict's type locks (so wrong types can be tried)."""
    raw = config.to_dict()
    for field, value in overrides.items():
        *parents, name = field.split(".")
        node = raw
        for parent in parents:
            node = node[parent]
        node[name] = value
    return ml_collections.ConfigDict(raw)


def cheap_base() -> ml_collections.ConfigDict:
    """The CPU-sized Fashion-MNIST recipe: valid, and validating it reads no data."""
    return with_fields(fmnist_pretrain(), {"dataset.manual_dir": None, "dataset.data_dir": None})


def test_every_field_of_base_config_has_a_bad_value_row():
    fields = leaves(config_lib.base_config())
    assert set(BAD) == fields, {
        "fields without a rule row": sorted(fields - set(BAD)),
        "rows for no field": sorted(set(BAD) - fields),
    }


def test_the_cheap_base_is_valid():
    validate.validate(cheap_base(), num_devices=1, num_processes=1)


@pytest.mark.parametrize("field", sorted(BAD))
def test_each_field_rejects_a_bad_value_naming_the_field(field):
    bad, overrides = BAD[field]
    base = with_fields(cheap_base(), overrides)
    if field not in OVERRIDES_FAIL_ALONE:
        validate.validate(base)  # the overrides alone are valid: the bad value is what fails
    with pytest.raises(ConfigError) as err:
        validate.validate(with_fields(base, {field: bad}), num_devices=1, num_processes=1)
    assert err.value.field == field, str(err.value)
    message = str(err.value)
    assert message.startswith(f"config.{field}=") and " is invalid: " in message and "\n" not in message


def test_sample_files_are_checked_only_for_the_sample_task():
    config = with_fields(cheap_base(), {"sample.mask": "/nonexistent/masks.npy"})
    validate.validate(config)  # pre-training never reads the mask file


def test_pool_tokens_refuses_an_unknown_pool_instead_of_averaging():
    tokens = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    np.testing.assert_array_equal(vit.pool_tokens(tokens, "cls"), tokens[:, 0])
    np.testing.assert_allclose(vit.pool_tokens(tokens, "avg"), tokens[:, 1:].mean(axis=1))
    with pytest.raises(ValueError, match="unknown pool 'max'"):
        vit.pool_tokens(tokens, "max")


def test_each_choice_list_lives_in_the_module_that_implements_it(monkeypatch):
    assert model_config.SCHEDULES is diffusion.SCHEDULES
    assert model_config.PREDICTIONS is diffusion.PREDICTIONS
    assert model_config.DECODER_VARIANTS is diffmae.VARIANTS
    assert model_config.POOLS is vit.POOLS
    assert not hasattr(validate, "SAMPLERS")
    # validate reads diffusion's list itself: a sampler added there is accepted, no second list.
    monkeypatch.setattr(diffusion, "SAMPLERS", (*diffusion.SAMPLERS, "euler"))
    validate.validate(with_fields(cheap_base(), {"sample.sampler": "euler"}))


def test_steps_per_epoch_is_one_function_that_refuses_a_batch_larger_than_the_data():
    assert not hasattr(config_lib, "steps_per_epoch")
    assert input_pipeline.steps_per_epoch(1000, 32) == 31  # the last partial batch is dropped
    assert input_pipeline.steps_per_epoch(32, 32) == 1
    with pytest.raises(ConfigError) as err:
        input_pipeline.steps_per_epoch(10, 32)
    assert err.value.field == "batch_size"

    config = config_lib.base_config()
    config.batch_size, config.total_epochs = 32, 2.0
    assert config_lib.total_steps(config, 1000) == 62
    assert config_lib.warmup_steps(config, 1000) == 40 * 31
    # Formerly max(10 // 32, 1) = 1 step per epoch, silently.
    with pytest.raises(ConfigError, match="batch_size"):
        config_lib.total_steps(config, 10)
    with pytest.raises(ConfigError, match="batch_size"):
        config_lib.warmup_steps(config, 10)


def test_cudnn_attention_needs_bfloat16_before_anything_compiles():
    needs_bfloat16 = r"config.model.attention_impl='cudnn' is invalid: needs model.dtype"
    with pytest.raises(ConfigError, match=needs_bfloat16):
        validate.validate(with_fields(cheap_base(), {"model.attention_impl": "cudnn"}))
    validate.validate(with_fields(cheap_base(), {"model.attention_impl": "cudnn", "model.dtype": "bfloat16"}))
