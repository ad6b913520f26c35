"""Sharded steps: several meshes on 8 forced CPU devices, and two real processes."""

import json
import os
import signal
import subprocess
import sys

import pytest

from maejax import train
from tests.conftest import REPO, cli_overrides, tiny_config
from tests.helpers.mesh_runs import config_for


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def assert_close(got, want, rel=1e-5):
    assert sorted(got) == sorted(want)
    for step in want:
        assert abs(got[step] - want[step]) <= rel * abs(want[step]), (step, got[step], want[step])


@pytest.fixture(scope="module")
def single_device(tmp_path_factory, tfds_dir):
    workdir = str(tmp_path_factory.mktemp("single_device"))
    config = config_for(tfds_dir, 1, 1)
    train.train_and_evaluate(config, workdir)
    return losses(workdir)


@pytest.mark.slow
def test_meshes_give_the_same_losses_and_really_shard(tmp_path, tfds_dir, single_device):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    result = subprocess.run(
        [sys.executable, "-m", "tests.helpers.mesh_runs", tfds_dir, str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    for mesh in ("8x1", "2x4"):
        assert_close(losses(str(tmp_path / mesh)), single_device)
    layout = json.loads(result.stdout.strip().splitlines()[-1])
    assert layout["devices"] == 8
    assert layout["global_shape"] == [128, 512] and "fsdp" in layout["spec"]
    assert layout["shard_shapes"] == [[128, 128]]  # 512 / fsdp 4
    assert layout["adam_mu_shard_shapes"] == [[128, 128]]  # optimizer state follows the params
    assert layout["bias_spec"] == []  # small tensors are replicated


def launch(*args, workdir, tfds_dir, steps):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [
        os.path.join(REPO, "launch", "local_multiprocess.sh"),
        "2",
        "--config=configs/mae_fmnist.py",
        f"--workdir={workdir}",
        *cli_overrides(
            tfds_dir, total_steps=steps, log_every_steps=1, checkpoint_every_steps=3, image_every_steps=steps
        ),
        *args,
    ]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_processes_train_save_on_sigterm_and_resume(tmp_path, tfds_dir):
    steps = 30
    reference = str(tmp_path / "reference")
    train.train_and_evaluate(
        tiny_config(
            tfds_dir, total_steps=steps, log_every_steps=1, checkpoint_every_steps=3, image_every_steps=steps
        ),
        reference,
    )
    workdir = str(tmp_path / "two_processes")
    proc = launch(workdir=workdir, tfds_dir=tfds_dir, steps=steps)
    for line in proc.stdout:  # only process 0 prints progress
        if line.startswith("step 5/"):
            break
    proc.send_signal(signal.SIGTERM)  # the launcher forwards it to both processes
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    assert "preemption requested: saved step" in out, out + err[-3000:]
    resumed = launch(workdir=workdir, tfds_dir=tfds_dir, steps=steps)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-4000:]
    assert "resuming at step" in out and f"step {steps}/{steps}" in out
    assert_close(losses(workdir), losses(reference))


@pytest.mark.slow
def test_the_launcher_fails_when_a_process_fails(tmp_path, tfds_dir):
    proc = launch("--config.model.image_size=30", workdir=str(tmp_path), tfds_dir=tfds_dir, steps=3)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "model.image_size" in err
