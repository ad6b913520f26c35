"""The training loader's worker processes: the threads' batches, from any position; clear refusals."""

import pickle

import numpy as np
import pytest

from maejax import data_sources, finetune_input, input_pipeline
from maejax.errors import ConfigError, UserError
from tests.conftest import tiny_config


def batches(source, transform, start, n, **kwargs):
    loader = input_pipeline.TrainLoader(
        source, transform, seed=5, batch_size=12, start_batch=start, prefetch=2, **kwargs
    )
    try:
        return [next(loader) for _ in range(n)]
    finally:
        loader.close()


@pytest.mark.slow
def test_worker_processes_make_the_threads_batches_from_any_position(tfds_dir):
    """Real Fashion-MNIST through the fine-tuning transform (crop, flip, RandAugment, erasing)."""
    config = tiny_config(tfds_dir, base="configs/finetune_fmnist.py")
    config.finetune.randaug_ops, config.finetune.reprob = 2, 0.5
    source = data_sources.get_source(config.dataset, "train", 1)
    transform = finetune_input.train_transform(config, 28, 1, probe=False)
    threads = batches(source, transform, 0, 4, num_threads=2)
    workers = batches(source, transform, 1, 3, num_workers=2)  # resumed at batch 1, in 2 processes
    for a, b in zip(threads[1:], workers, strict=True):
        assert b["image"].dtype == np.float32 and b["image"].shape == (12, 28, 28, 1)
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def test_a_transform_a_process_cannot_receive_is_refused_before_any_worker_starts(tfds_dir):
    source = data_sources.get_source(tiny_config(tfds_dir).dataset, "train", 1)
    with pytest.raises(ConfigError, match=r"config.dataset.num_workers=3 is invalid: 0 \(threads\) for this"):
        input_pipeline.TrainLoader(source, lambda rng, image: image, seed=0, batch_size=8, num_workers=3)


def test_sources_transforms_and_errors_cross_to_a_worker_intact(tmp_path):
    from PIL import Image

    from maejax.config import base_config

    for cls in ("a", "b"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        Image.fromarray(np.full((6, 6, 3), 9, np.uint8)).save(tmp_path / "train" / cls / "0.png")
    (tmp_path / "train" / "b" / "1.png").write_bytes(b"not a png")
    folder = data_sources.ImageFolderSource(str(tmp_path), "train")
    copy = pickle.loads(pickle.dumps(folder))
    assert copy.files == folder.files and copy.__getitems__([0])[0]["label"] == 0
    with pytest.raises(UserError, match="cannot read image .*1.png"):
        copy.__getitems__([2])  # the copy has its own lock and still refuses a bad image

    dataset = base_config().dataset
    transform = pickle.loads(pickle.dumps(input_pipeline.pretrain_transform(dataset, 4, 3)))
    image = folder.__getitems__([0])[0]["image"]
    expected = input_pipeline.pretrain_transform(dataset, 4, 3)(np.random.default_rng(1), image)
    np.testing.assert_array_equal(transform(np.random.default_rng(1), image), expected)

    error = pickle.loads(pickle.dumps(ConfigError("dataset.name", "x", "a name")))
    assert (error.field, error.value) == ("dataset.name", "x")
    assert str(error) == "config.dataset.name='x' is invalid: a name"


def test_a_workers_error_reaches_the_training_process_and_close_frees_the_buffers(tmp_path, monkeypatch):
    from PIL import Image

    from maejax import loader_pools
    from maejax.config import base_config

    images = tmp_path / "images" / "a"
    images.mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((6, 6, 3), i, np.uint8)).save(images / f"{i}.png")
    (images / "9.png").write_bytes(b"not a png")  # in every epoch's first batch of 5
    buffers = tmp_path / "shm"
    buffers.mkdir()
    monkeypatch.setattr(loader_pools, "shared_memory_dir", lambda: str(buffers))
    source = data_sources.ImageFolderSource(str(tmp_path / "images"), "train")
    transform = input_pipeline.pretrain_transform(base_config().dataset, 4, 3)
    loader = input_pipeline.TrainLoader(source, transform, seed=0, batch_size=5, num_workers=1)
    assert len(list(buffers.iterdir())) == 1  # the loader's folder of batch buffers
    with pytest.raises(UserError, match=r"cannot read image .*9.png"):
        next(loader)
    loader.close()
    assert not list(buffers.iterdir())


WORKERS_SCRIPT = """
import multiprocessing, sys, time
import numpy as np
from maejax import input_pipeline
from tests.test_input_pipeline import CountingSource, transform

if __name__ == "__main__":
    loader = input_pipeline.TrainLoader(CountingSource(), transform, seed=0, batch_size=32, num_workers=2)
    next(loader)
    print(*[p.pid for p in multiprocessing.active_children()], flush=True)
    time.sleep(300)
"""


def ignores_sigterm(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        mask = next(line.split()[1] for line in f if line.startswith("SigIgn:"))
    return bool(int(mask, 16) >> (15 - 1) & 1)


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_workers_leave_when_the_training_process_is_killed(tmp_path):
    import glob
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

    from maejax import loader_pools
    from tests.conftest import REPO

    script = tmp_path / "train.py"
    script.write_text(WORKERS_SCRIPT)
    env = {**os.environ, "PYTHONPATH": REPO}
    command = [sys.executable, str(script)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)
    try:
        workers = [int(pid) for pid in proc.stdout.readline().split()]
        assert len(workers) == 2
        deadline = time.time() + 60
        while not all(ignores_sigterm(pid) for pid in workers) and time.time() < deadline:
            time.sleep(0.2)  # a worker still importing has not installed its handlers yet
        for pid in workers:
            os.kill(pid, signal.SIGTERM)  # a preemption is the training process's to handle
        time.sleep(1)
        assert all(running(pid) for pid in workers)
        proc.kill()  # no chance to close the pool
        proc.wait()
        deadline = time.time() + 30
        while any(running(pid) for pid in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(running(pid) for pid in workers)
    finally:
        proc.kill()
        # SIGKILL leaves the batch buffers' folder, named by the training process's pid.
        for left in glob.glob(os.path.join(loader_pools.shared_memory_dir(), f"maejax-batches-{proc.pid}-*")):
            shutil.rmtree(left)
