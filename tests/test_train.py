"""Pre-training end to end: the CLI on real Fashion-MNIST, resume, falling loss, configs."""

import glob
import json
import os

import numpy as np
import pytest
from PIL import Image

from maejax import validate
from tests.conftest import REPO, cli_overrides, load_config_file, run_maejax


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_cli_pretrains_writes_everything_and_continues(tmp_path, tfds_dir):
    workdir = str(tmp_path / "run")
    args = ["--config=configs/mae_fmnist.py", f"--workdir={workdir}", *cli_overrides(tfds_dir)]
    first = run_maejax(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "step 10/10" in first.stdout and "from scratch" in first.stdout
    rows = read_metrics(workdir)
    assert [r["step"] for r in rows] == [5, 10]
    for key in ("loss", "lr", "grad_norm", "param_norm", "img_per_s"):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
    png = Image.open(os.path.join(workdir, "images", "recon_0000010.png"))
    assert png.size[0] > 4 * 96 and png.size[1] > 8 * 96  # 8 rows x 4 columns, enlarged
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10"]
    config = json.load(open(os.path.join(workdir, "config.json")))
    assert config["model"]["encoder"]["width"] == 32 and config["model"]["decoder"]["mlp_dim"] == 64

    # The same command with a longer schedule continues from step 10.
    second = run_maejax(*args, "--config.total_steps=20")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming at step 10 (input batch 10)" in second.stdout
    assert [r["step"] for r in read_metrics(workdir)] == [5, 10, 15, 20]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "20"]


def test_the_default_workdir_is_named_after_the_config(tmp_path, tfds_dir):
    from maejax import main

    assert main.default_workdir("configs/mae_vitb.py") == os.path.join("workdirs", "mae_vitb")
    assert main.default_workdir("/x/configs/mae_fmnist.py:arg") == os.path.join("workdirs", "mae_fmnist")


@pytest.mark.slow
def test_loss_falls_over_100_steps_on_real_data(pretrained_workdir):
    rows = [r for r in read_metrics(pretrained_workdir) if "loss" in r]
    assert rows[-1]["step"] == 100
    first, last = rows[0]["loss"], np.mean([r["loss"] for r in rows[-3:]])
    assert last < 0.75 * first, (first, last)


@pytest.mark.slow
def test_knn_monitor_logs_during_pretraining(pretrained_workdir):
    knn = [r for r in read_metrics(pretrained_workdir) if "knn_top1" in r]
    assert [r["step"] for r in knn] == [50, 100]
    # 10 balanced classes: a random guess scores 0.1; features of a trained encoder do better.
    assert all(0.2 < r["knn_top1"] <= 1.0 for r in knn), knn


@pytest.mark.parametrize(
    "path", sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))), ids=os.path.basename
)
def test_every_config_loads_and_validates(path):
    config = load_config_file(path)
    if config.task in ("finetune", "linprobe"):
        config.init_from = "random"  # what their docstring commands pass as a workdir
    assert config.task in ("pretrain", "finetune", "linprobe", "sample")
    resolved = validate.validate(config, num_devices=1, num_processes=1)
    assert resolved.encoder.width > 0
    with open(path) as f:
        doc = f.read()
    assert f"--config=configs/{os.path.basename(path)}" in doc.split('"""')[1]
