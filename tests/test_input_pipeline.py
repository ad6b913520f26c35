"""Input pipeline: real Fashion-MNIST offline, determinism, per-process shares, resume."""

import gzip

import numpy as np
import pytest

from maejax import data_sources, input_pipeline, preprocess
from maejax.errors import UserError
from tests.conftest import tiny_config


@pytest.mark.slow
def test_fashion_mnist_reads_the_debian_files_offline(tfds_dir):
    config = tiny_config(tfds_dir)
    train = data_sources.get_source(config.dataset, "train", 1)
    test = data_sources.get_source(config.dataset, "test", 1)
    assert (len(train), len(test), train.num_classes) == (60000, 10000, 10)
    with gzip.open(f"{data_sources.DEBIAN_FASHION_MNIST}/t10k-images-idx3-ubyte.gz") as f:
        raw = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28, 1)
    with gzip.open(f"{data_sources.DEBIAN_FASHION_MNIST}/t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    # tfds stores examples in its own (hashed) order: find each record in the raw file.
    position = {raw[i].tobytes(): i for i in range(len(raw))}
    for record in test.__getitems__([0, 1, 5000, 9999]):
        assert record["image"].shape == (28, 28, 1) and record["image"].dtype == np.uint8
        i = position[record["image"].tobytes()]
        assert record["label"] == labels[i]


def test_fashion_mnist_normalisation_is_measured_from_its_training_split():
    with gzip.open(f"{data_sources.DEBIAN_FASHION_MNIST}/train-images-idx3-ubyte.gz") as f:
        pixels = np.frombuffer(f.read(), np.uint8, offset=16).astype(np.float64) / 255
    (mean,), (std,) = data_sources.NORMALIZATION["fashion_mnist"]
    assert abs(pixels.mean() - mean) < 5e-5 and abs(pixels.std() - std) < 5e-5


def test_a_manual_dir_without_the_files_is_a_clear_error(tmp_path):
    config = tiny_config(str(tmp_path / "tensorflow_datasets"), dataset__manual_dir=str(tmp_path))
    with pytest.raises(UserError, match="lacks the Fashion-MNIST files"):
        data_sources.get_source(config.dataset, "train", 1)


class CountingSource:
    """An in-memory source that records which indices were read."""

    def __init__(self, n=1000, size=8):
        rng = np.random.default_rng(0)
        self.images = rng.integers(0, 256, (n, size, size, 1), dtype=np.uint8)
        self.read = []

    def __len__(self):
        return len(self.images)

    def __getitems__(self, indices):
        self.read.extend(int(i) for i in indices)
        return [{"image": self.images[i], "label": int(i)} for i in indices]


def transform(rng, image):
    return preprocess.pretrain_transform(rng, image, 8, (0.2, 1.0), True, np.float32(0.5), np.float32(0.25))


def take(loader, n):
    try:
        return [next(loader) for _ in range(n)]
    finally:
        loader.close()


def test_batches_depend_only_on_seed_and_position():
    a = take(input_pipeline.TrainLoader(CountingSource(), transform, seed=3, batch_size=32), 5)
    b = take(input_pipeline.TrainLoader(CountingSource(), transform, seed=3, batch_size=32), 5)
    c = take(input_pipeline.TrainLoader(CountingSource(), transform, seed=4, batch_size=32), 5)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
    assert not np.array_equal(a[0]["label"], c[0]["label"])


def test_resume_reads_nothing_before_its_position():
    full = take(input_pipeline.TrainLoader(CountingSource(), transform, seed=0, batch_size=32), 8)
    source = CountingSource()
    resumed = take(
        input_pipeline.TrainLoader(source, transform, seed=0, batch_size=32, start_batch=5, prefetch=1), 3
    )
    for x, y in zip(full[5:], resumed, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    first_five = {int(i) for b in full[:5] for i in b["label"]}
    # The resumed loader read none of the examples of batches 0-4 (the batches
    # of one epoch never share examples) ...
    assert not first_five & set(source.read[: 3 * 32])


def test_epochs_cover_the_dataset_once_and_reshuffle():
    per_epoch = input_pipeline.steps_per_epoch(1000, 32)
    idx = [input_pipeline.batch_indices(0, k, 32, 1000) for k in range(2 * per_epoch)]
    epoch0, epoch1 = np.concatenate(idx[:per_epoch]), np.concatenate(idx[per_epoch:])
    assert len(set(epoch0)) == len(epoch0) == per_epoch * 32
    assert not np.array_equal(epoch0, epoch1)


def test_processes_read_disjoint_shares_of_each_batch():
    whole = take(input_pipeline.TrainLoader(CountingSource(), transform, seed=0, batch_size=32), 2)
    shares = [
        take(
            input_pipeline.TrainLoader(
                CountingSource(), transform, seed=0, batch_size=32, process_index=p, process_count=4
            ),
            2,
        )
        for p in range(4)
    ]
    for step in range(2):
        labels = np.concatenate([s[step]["label"] for s in shares])
        images = np.concatenate([s[step]["image"] for s in shares])
        assert len(set(labels)) == 32
        np.testing.assert_array_equal(labels, whole[step]["label"])
        np.testing.assert_array_equal(images, whole[step]["image"])  # augmentation independent of P


@pytest.mark.parametrize("n, batch, procs", [(10, 4, 2), (10000, 96, 3), (7, 8, 4), (64, 8, 1)])
def test_padded_evaluation_counts_every_example_once(n, batch, procs):
    seen, batches = [], set()
    for p in range(procs):
        idx, valid = input_pipeline.eval_indices(n, batch, p, procs)
        seen.extend(idx[valid == 1].tolist())
        batches.add(len(idx) // (batch // procs))
    assert sorted(seen) == list(range(n))
    assert len(batches) == 1  # every process runs the same number of batches


def test_random_resized_crop_stays_in_bounds_and_in_scale():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = preprocess.random_resized_crop_box(rng, 28, 20, (0.2, 1.0))
        assert 0 <= top and top + h <= 28 and 0 <= left and left + w <= 20
        assert 0.2 * 560 * 0.8 <= h * w <= 560


def test_an_image_folder_is_a_source_with_sorted_classes(tmp_path):
    from PIL import Image

    from maejax.config import base_config

    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 2)):
        for cls in ("sandal", "boot"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (tmp_path / "train" / "boot" / "notes.txt").write_text("not an image")
    dataset = base_config().dataset
    dataset.name, dataset.manual_dir = "image_folder", str(tmp_path)
    train = data_sources.get_source(dataset, "train", 3)
    val = data_sources.get_source(dataset, "val", 3)
    assert (len(train), len(val), train.classes) == (12, 4, ["boot", "sandal"])
    records = train.__getitems__([0, 11])
    assert [r["label"] for r in records] == [0, 1] and records[0]["image"].shape == (20, 24, 3)
    grey = data_sources.get_source(dataset, "train", 1).__getitems__([0])[0]["image"]
    assert grey.shape == (20, 24, 1)
    transform = input_pipeline.pretrain_transform(dataset, 16, 3)
    batch = take(input_pipeline.TrainLoader(train, transform, seed=0, batch_size=4), 1)[0]
    assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.float32
    with pytest.raises(UserError, match="a sub-folder"):
        data_sources.get_source(dataset, "test", 3)


def image_folder(root, layout: dict):
    """Write {split: {class: count}} as root/<split>/<class>/<i>.png."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, classes in layout.items():
        for cls, count in classes.items():
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_every_split_takes_its_labels_from_the_training_classes(tmp_path):
    image_folder(tmp_path, {"train": {"a": 1, "b": 1, "c": 1}, "val": {"a": 1, "c": 1}})
    # Hidden entries are neither classes nor images.
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "val" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "train" / "a" / "._0.png").write_bytes(b"macOS resource fork")
    train = data_sources.ImageFolderSource(str(tmp_path), "train")
    val = data_sources.ImageFolderSource(str(tmp_path), "val")
    assert train.classes == val.classes == ["a", "b", "c"] and train.num_classes == val.num_classes == 3
    assert len(train) == 3
    assert [r["label"] for r in val.__getitems__(range(len(val)))] == [0, 2]


def test_a_split_with_a_class_the_training_split_lacks_is_refused(tmp_path):
    image_folder(tmp_path, {"train": {"a": 1, "b": 1}, "val": {"a": 1, "zebra": 1}})
    with pytest.raises(UserError, match=r"val has class folders \['zebra'\] .* classes \['a', 'b'\]"):
        data_sources.ImageFolderSource(str(tmp_path), "val")


def test_the_class_list_is_saved_once_and_checked_on_resume(tmp_path):
    workdir = str(tmp_path / "run")
    data_sources.check_classes(workdir, ["a", "b"])
    data_sources.check_classes(workdir, ["a", "b"])  # a resume with the same folder
    data_sources.check_classes(workdir, None)  # tfds: nothing to check
    with pytest.raises(UserError, match=r"classes\.json .*added \['c'\], missing \[\]"):
        data_sources.check_classes(workdir, ["a", "b", "c"])


def test_a_batch_larger_than_the_dataset_is_refused_when_the_loader_is_made():
    with pytest.raises(UserError, match="batch_size=32 .* the 10 training examples"):
        input_pipeline.TrainLoader(CountingSource(n=10), transform, seed=0, batch_size=32)


def test_an_out_of_order_batch_is_a_runtime_error_not_an_assert():
    loader = input_pipeline.TrainLoader(CountingSource(), transform, seed=0, batch_size=32, prefetch=1)
    try:
        next(loader)
        loader.position = 7  # what a producer bug would look like
        with pytest.raises(RuntimeError, match="produced batch 1 where batch 7 was due"):
            next(loader)
    finally:
        loader.close()


def test_the_epoch_order_salt_is_named_and_unchanged():
    # Changing it would silently change the data order of resumed runs.
    assert input_pipeline.EPOCH_ORDER_SALT == 0x5EED
    np.testing.assert_array_equal(
        input_pipeline.epoch_permutation(3, 1, 50), np.random.default_rng((3, 1, 0x5EED)).permutation(50)
    )
