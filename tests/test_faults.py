"""Faults and bad input: damaged checkpoints, failed writes, divergence, config errors."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maejax import checkpoint, loop, train, validate
from maejax.errors import ConfigError, UserError
from tests.conftest import cli_overrides, run_maejax, set_fields, tiny_config


def small_state(value):
    return {"step": jnp.asarray(value, jnp.int32), "params": {"w": jnp.full((4, 8), float(value))}}


def abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def saved_checkpointer(workdir, steps=(1, 2, 3)):
    ckpt = checkpoint.Checkpointer(str(workdir), keep=5)
    for step in steps:
        ckpt.save(step, small_state(step), {"next_batch": step})
    ckpt.close()
    return checkpoint.Checkpointer(str(workdir), keep=5)


def damage(workdir, step, how):
    state_dir = os.path.join(workdir, "checkpoints", str(step), "state")
    for root, _, files in os.walk(state_dir):
        for name in files:
            path = os.path.join(root, name)
            if how == "truncate":
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 3)
            else:
                os.remove(path)


@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, how, caplog):
    ckpt = saved_checkpointer(tmp_path)
    damage(str(tmp_path), 3, how)
    step, state, position = ckpt.restore_latest(abstract(small_state(0)))
    assert (step, position) == (2, {"next_batch": 2})
    np.testing.assert_array_equal(state["params"]["w"], np.full((4, 8), 2.0))
    assert "checkpoint step 3" in caplog.text and "is damaged" in caplog.text
    # Moved aside, never deleted: the files are still there, under checkpoints/damaged/.
    aside = os.listdir(os.path.join(tmp_path, "checkpoints", "damaged"))
    assert len(aside) == 1 and aside[0].startswith("3-")
    target = os.path.join(ckpt.directory, "damaged", aside[0])
    assert f"moved damaged checkpoint step 3 to {target}" in caplog.text
    assert os.path.exists(os.path.join(target, "state"))
    assert ckpt.all_steps() == [1, 2]


def test_no_usable_checkpoint_is_a_clear_error(tmp_path):
    ckpt = saved_checkpointer(tmp_path, steps=(1, 2))
    damage(str(tmp_path), 1, "truncate")
    damage(str(tmp_path), 2, "delete")
    with pytest.raises(UserError, match=r"none of the checkpoints \[1, 2\] .* can be restored"):
        ckpt.restore_latest(abstract(small_state(0)))


def test_a_failed_write_is_named_and_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    ckpt = saved_checkpointer(tmp_path, steps=(1,))

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.manager, "save", no_space)
    with pytest.raises(
        checkpoint.CheckpointWriteError, match=r"checkpoint step 2 .* No space left .* \[1\] are intact"
    ):
        ckpt.save(2, small_state(2), {"next_batch": 2})
    step, state, _ = checkpoint.Checkpointer(str(tmp_path), keep=5).restore_latest(abstract(small_state(0)))
    assert step == 1 and float(state["params"]["w"][0, 0]) == 1.0


@pytest.mark.slow
def test_a_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tfds_dir):
    config = tiny_config(tfds_dir, total_steps=40, log_every_steps=1, checkpoint_every_steps=2)
    config.optimizer.blr = 1e9  # diverges within a few steps
    config.optimizer.warmup_steps = 0
    with pytest.raises(
        loop.TrainingDiverged, match=r"non-finite loss/gradients at step \d+.*optimizer.grad_clip"
    ) as e:
        train.train_and_evaluate(config, str(tmp_path))
    bad_step = int(str(e.value).split("at step ")[1].split()[0])
    steps = checkpoint.Checkpointer(str(tmp_path), keep=3).all_steps()
    assert all(s < bad_step for s in steps)


# --- bad input: validated in-process, before anything compiles -----------------


# Validation reads no data: these configs point at a data_dir that was never prepared.
UNPREPARED = "/nonexistent/tensorflow_datasets"


def base():
    return tiny_config(UNPREPARED)


BAD = [
    ({"model.image_size": 30}, "model.image_size"),
    ({"model.mask_ratio": 0.0}, "model.mask_ratio"),
    ({"model.mask_ratio": 1.5}, "model.mask_ratio"),
    ({"model.mask_ratio": 0.99}, "model.mask_ratio"),  # 49 patches: none left visible
    ({"model.encoder.width": -8}, "model.encoder.width"),
    ({"model.encoder.variant": "XL/16", "model.encoder.width": None}, "model.encoder.variant"),
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": 60, "grad_accum_steps": 8}, "batch_size"),
    ({"total_steps": 0}, "total_steps"),
    ({"log_every_steps": -1}, "log_every_steps"),
    ({"task": "distill"}, "task"),
    ({"dataset.name": "no_such_dataset"}, "dataset.name"),
    ({"dataset.name": "image_folder", "dataset.manual_dir": "/nonexistent"}, "dataset.manual_dir"),
    ({"dataset.crop_scale": (0.5, 0.2)}, "dataset.crop_scale"),
    ({"optimizer.name": "sgd"}, "optimizer.name"),
    ({"optimizer.blr": -1.0}, "optimizer.blr"),
    ({"optimizer.b2": 1.0}, "optimizer.b2"),
    ({"mesh.fsdp": 3}, "mesh.fsdp"),
    ({"task": "finetune"}, "init_from"),
]


@pytest.mark.parametrize("overrides, field", BAD, ids=[f for _, f in BAD])
def test_bad_configs_name_the_field_value_and_what_is_valid(overrides, field):
    config = set_fields(base(), overrides)
    with pytest.raises(ConfigError) as err:
        validate.validate(config, num_devices=1, num_processes=1)
    assert err.value.field == field
    message = str(err.value)
    assert message.startswith(f"config.{field}=") and " is invalid: " in message and "\n" not in message


def test_batch_must_split_over_devices_and_processes():
    config = base()
    with pytest.raises(ConfigError, match="split evenly over the 3 devices"):
        validate.validate(config, num_devices=3, num_processes=1)
    config.batch_size, config.mesh.data = 66, 2
    with pytest.raises(ConfigError, match="divisible by the 4 processes"):
        validate.validate(config, num_devices=2, num_processes=4)


def test_missing_manual_data_says_how_to_get_it(tmp_path):
    config = set_fields(base(), {"dataset.manual_dir": str(tmp_path)})
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        validate.validate(config)


@pytest.mark.slow
@pytest.mark.parametrize(
    "flag, expected",
    [
        (
            "--config.model.image_size=30",
            "maejax: error: config.model.image_size=30 is invalid: must be divisible",
        ),
        ("--config.batch_size=many", "batch_size"),
        ("--config.no_such_field=1", "no_such_field"),
    ],
)
def test_the_cli_reports_bad_input_in_one_line_without_a_traceback(tmp_path, tfds_dir, flag, expected):
    result = run_maejax(
        "--config=configs/mae_fmnist.py", f"--workdir={tmp_path}", *cli_overrides(tfds_dir), flag
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if expected in line]
    assert errors, result.stderr[-2000:]
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))
