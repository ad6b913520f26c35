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
