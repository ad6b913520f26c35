"""Shared fixtures: one prepared Fashion-MNIST, tiny configs, one pre-trained workdir."""

import importlib.util
import os
import subprocess
import sys

import pytest

# gcsfs reads this once, at import: without it, it asks the storage-control API (absent on the
# fake GCS server of test_remote_workdir) for each bucket's type and logs a warning each time.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config_file(path: str):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def tiny_overrides(tfds_dir: str) -> dict:
    """A model small enough for tests, on the real (Debian) Fashion-MNIST files."""
    return {
        "model.encoder.width": 32,
        "model.encoder.depth": 2,
        "model.encoder.num_heads": 2,
        "model.encoder.mlp_dim": 64,
        "model.encoder.patch_size": 4,
        "model.decoder.width": 32,
        "model.decoder.depth": 1,
        "model.decoder.num_heads": 2,
        "model.decoder.mlp_dim": 64,
        "dataset.data_dir": tfds_dir,
        "dataset.on_device": False,  # the host loader (the recipes' on-device path: test_device_input)
        "batch_size": 64,
        "total_steps": 10,
        "log_every_steps": 5,
        "image_every_steps": 10,
        "checkpoint_every_steps": 10,
        "optimizer.warmup_steps": 5,
    }


def set_fields(config, overrides: dict):
    for field, value in overrides.items():
        *parents, name = field.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[name] = value
    return config


def tiny_config(tfds_dir: str, base: str = "configs/mae_fmnist.py", **overrides):
    config = load_config_file(os.path.join(REPO, base))
    set_fields(config, tiny_overrides(tfds_dir))
    return set_fields(config, {k.replace("__", "."): v for k, v in overrides.items()})


def run_maejax(*args, timeout=900):
    """`python -m maejax.main ARGS` in the repository, on CPU; the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", "maejax.main", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        cwd=REPO,
        timeout=timeout,
    )


def cli_overrides(tfds_dir: str, **extra) -> list:
    fields = {**tiny_overrides(tfds_dir), **{k.replace("__", "."): v for k, v in extra.items()}}
    return [f"--config.{k}={v}" for k, v in fields.items()]


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
    """Fashion-MNIST prepared once (array_record) from Debian's files, for every test."""
    from maejax import data_sources

    path = str(tmp_path_factory.mktemp("tensorflow_datasets"))
    config = tiny_config(path)
    data_sources.tfds_builder(config.dataset)
    return path


@pytest.fixture(scope="session")
def pretrained_workdir(tmp_path_factory, tfds_dir):
    """A tiny MAE pre-trained 100 steps by the CLI; later tests read it, never write it."""
    workdir = str(tmp_path_factory.mktemp("pretrained"))
    overrides = cli_overrides(
        tfds_dir,
        total_steps=100,
        log_every_steps=10,
        image_every_steps=50,
        checkpoint_every_steps=50,
        knn_every_steps=50,  # the pre-training kNN monitor, on small labelled subsets
        knn__num_train=1000,
        knn__num_eval=500,
        # Worker processes through the CLI (their batches equal the threads': test_loader_workers).
        dataset__num_workers=2,
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "maejax.main",
            "--config=configs/mae_fmnist.py",
            f"--workdir={workdir}",
            *overrides,
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        cwd=REPO,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir
