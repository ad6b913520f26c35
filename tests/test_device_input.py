"""On-device input (dataset.on_device): the host loader's batches, exact resume, the refusals."""

import gzip
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from maejax import data_sources, device_input, finetune, input_pipeline, loop, train, validate
from maejax.errors import ConfigError
from tests.conftest import tiny_config
from tests.test_validate import cheap_base, with_fields

FMNIST_MEAN, FMNIST_STD = (np.float32(m) for m in data_sources.NORMALIZATION["fashion_mnist"])
augment = jax.jit(device_input.augment, static_argnums=4)


class ArraySource:
    """An in-memory source over (N, H, W, C) uint8 images that records the indices read."""

    def __init__(self, images, labels):
        self.images, self.labels, self.read = images, labels, []

    def __len__(self):
        return len(self.images)

    def __getitems__(self, indices):
        self.read.extend(indices)
        return [{"image": self.images[i], "label": int(self.labels[i])} for i in indices]


@pytest.fixture(scope="module")
def fmnist():
    """Fashion-MNIST's training split from Debian's IDX files (no tfds: under a second)."""
    folder = data_sources.DEBIAN_FASHION_MNIST
    with gzip.open(f"{folder}/train-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28, 1)
    with gzip.open(f"{folder}/train-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int32)
    return images, labels


def host_and_device_batches(fmnist, batch_index, scale, flip, seed=7, batch_size=64):
    """Batch `batch_index` from TrainLoader (PIL on the host) and from the on-device path."""
    images, labels = fmnist
    dataset = tiny_config(None).dataset
    dataset.crop_scale, dataset.flip = scale, flip
    loader = input_pipeline.TrainLoader(
        ArraySource(images, labels),
        input_pipeline.pretrain_transform(dataset, 28, 1),
        seed=seed,
        batch_size=batch_size,
        prefetch=1,
        num_threads=1,
    )
    try:
        host = loader.make_batch(batch_index)
    finally:
        loader.close()
    plan = device_input.DeviceLoader(
        labels, (28, 28, 1), seed=seed, batch_size=batch_size, scale=scale, flip=flip
    ).make_batch(batch_index)
    made = np.asarray(augment(images, plan["index"], plan["box"], plan["flip"], 28, FMNIST_MEAN, FMNIST_STD))
    return host, plan, made


@pytest.mark.parametrize("flip", [True, False])
def test_uncropped_images_at_size_equal_the_host_loaders(fmnist, flip):
    # crop_scale (1, 1) on 28x28 images: every box is the whole image, nothing is resampled.
    host, plan, made = host_and_device_batches(fmnist, 5, (1.0, 1.0), flip)
    order = input_pipeline.batch_indices(7, 5, 64, 60000)  # what the host loader reads
    np.testing.assert_array_equal(plan["index"], order)
    np.testing.assert_array_equal(plan["label"], host["label"])
    assert (plan["box"] == [0, 0, 28, 28]).all()
    assert 10 < plan["flip"].sum() < 54 if flip else not plan["flip"].any()
    np.testing.assert_allclose(made, host["image"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("scale, batch_index", [((0.35, 1.0), 0), ((0.08, 1.0), 123)])
def test_resized_crops_match_pils_bicubic_but_for_rounding(fmnist, scale, batch_index):
    host, plan, made = host_and_device_batches(fmnist, batch_index, scale, True)
    np.testing.assert_array_equal(plan["label"], host["label"])
    assert (plan["box"][:, 2:] < 28).any()  # some crops really are resized
    levels = np.abs(made - host["image"]) * FMNIST_STD * 255  # difference in uint8 grey levels
    # Same kernel and passes as PIL, float32 instead of its fixed point: measured 0.1 % of the
    # pixels 1-2 levels apart. A wrong box, flip or pass order moves thousands by tens of levels.
    assert levels.max() < 3.5 and np.mean(levels > 0.5) < 0.01, (levels.max(), np.mean(levels > 0.5))


def test_processes_plan_disjoint_rows_and_resume_starts_at_its_position(fmnist):
    _, labels = fmnist

    def loader(**kwargs):
        return device_input.DeviceLoader(
            labels, (28, 28, 1), seed=0, batch_size=32, scale=(0.2, 1), flip=True, **kwargs
        )

    whole = loader().make_batch(3)
    shares = [loader(process_index=p, process_count=4).make_batch(3) for p in range(4)]
    for key in ("index", "box", "flip", "label"):
        np.testing.assert_array_equal(np.concatenate([s[key] for s in shares]), whole[key])
    resumed = loader(start_batch=3)
    assert resumed.position == 3
    batch = next(resumed)
    assert resumed.position == 4
    for key in whole:
        np.testing.assert_array_equal(batch[key], whole[key])
    resumed.close()


def test_read_split_returns_every_example_in_order(fmnist):
    images, labels = fmnist
    source = ArraySource(images[:2500], labels[:2500])
    split = device_input.read_split(source, num_threads=2)
    np.testing.assert_array_equal(split.images, images[:2500])
    np.testing.assert_array_equal(split.labels, labels[:2500])
    assert split.images.dtype == np.uint8 and split.labels.dtype == np.int32


def test_images_of_different_sizes_are_refused_before_the_rest_is_read(tmp_path, monkeypatch):
    for size in ((8, 8), (8, 12)):  # two sizes in class 'a'
        folder = tmp_path / "train" / "a"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros(size, np.uint8)).save(folder / f"{size[1]}.png")
    source = data_sources.ImageFolderSource(str(tmp_path), "train", 1)
    with pytest.raises(ConfigError) as err:
        device_input.read_split(source)
    assert err.value.field == "dataset.on_device" and "dataset.on_device=False" in str(err.value)
    # A mismatch in the first chunk stops the read there.
    monkeypatch.setattr(device_input, "READ_CHUNK", 4)
    images = np.zeros((40, 8, 8, 1), np.uint8)
    mixed = ArraySource([*images[:3], np.zeros((9, 8, 1), np.uint8), *images[4:]], np.zeros(40))
    with pytest.raises(ConfigError, match="dataset.on_device"):
        device_input.read_split(mixed, num_threads=1)
    assert sorted(mixed.read) == [0, 1, 2, 3]


# --- validation ----------------------------------------------------------------------------

FINETUNE_ON_DEVICE = {
    "task": "finetune",
    "init_from": "random",
    "model.name": "classifier",
    "model.num_classes": 10,
    "dataset.on_device": True,
    "finetune.randaug_ops": 0,
    "finetune.reprob": 0.0,
    "finetune.mixup": 0.0,
    "finetune.cutmix": 0.0,
}


@pytest.mark.parametrize(
    "field, value",
    [
        ("finetune.randaug_ops", 2),
        ("finetune.reprob", 0.25),
        ("finetune.mixup", 0.8),
        ("finetune.cutmix", 1.0),
    ],
)
def test_host_only_finetuning_augmentations_are_refused_naming_the_field(field, value):
    validate.validate(with_fields(cheap_base(), FINETUNE_ON_DEVICE))  # valid without it
    with pytest.raises(ConfigError) as err:
        validate.validate(with_fields(cheap_base(), {**FINETUNE_ON_DEVICE, field: value}))
    message = str(err.value)
    assert err.value.field == field and "\n" not in message
    assert message.startswith(f"config.{field}={value!r} is invalid: must be 0 with dataset.on_device=True")
    # The same value is fine on the host, and for tasks that never apply it (the probe ignores them).
    validate.validate(
        with_fields(cheap_base(), {**FINETUNE_ON_DEVICE, field: value, "dataset.on_device": False})
    )
    probe = {**FINETUNE_ON_DEVICE, "task": "linprobe", field: value}
    validate.validate(with_fields(cheap_base(), probe))
    validate.validate(with_fields(cheap_base(), {"dataset.on_device": True, field: value}))  # pretrain


# --- runs ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def read_once():
    """device_input.read_split reading the 60,000 tfds images (~8 s) once for this module's runs."""
    cache = {}
    real = device_input.read_split

    def read(source, num_threads=1, verbose=False):
        if len(source) not in cache:
            cache[len(source)] = real(source, num_threads, verbose)
        return cache[len(source)]

    patch = pytest.MonkeyPatch()
    patch.setattr(device_input, "read_split", read)
    yield
    patch.undo()


def metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


STEPS = 12
RUN = dict(
    dataset__on_device=True,
    total_steps=STEPS,
    log_every_steps=1,
    checkpoint_every_steps=4,
    image_every_steps=STEPS,
)


@pytest.mark.slow
def test_an_interrupted_on_device_pretraining_resumes_bitwise(
    tmp_path, tfds_dir, read_once, monkeypatch, capsys
):
    reference = str(tmp_path / "reference")
    train.train_and_evaluate(tiny_config(tfds_dir, **RUN), reference)
    expected = {r["step"]: r["loss"] for r in metrics(reference)}
    assert sorted(expected) == list(range(1, STEPS + 1))

    # A preemption request at step 6 (what SIGTERM sets): the loop saves step 6 and stops.
    workdir = str(tmp_path / "run")
    with monkeypatch.context() as patch:
        patch.setattr(loop.PreemptionWatcher, "reached", lambda self, step: step == 6)
        train.train_and_evaluate(tiny_config(tfds_dir, **RUN), workdir)
    saved = {}
    for step in os.listdir(os.path.join(workdir, "checkpoints")):
        with open(os.path.join(workdir, "checkpoints", step, "data", "metadata")) as f:
            saved[int(step)] = json.load(f)["next_batch"]
    assert saved == {4: 4, 6: 6}
    capsys.readouterr()
    train.train_and_evaluate(tiny_config(tfds_dir, **RUN), workdir)
    assert "resuming at step 6 (input batch 6)" in capsys.readouterr().out
    got = {r["step"]: r["loss"] for r in metrics(workdir)}
    assert got == expected  # bitwise, every step


@pytest.mark.slow
def test_diffmae_pretrains_on_device(tmp_path, tfds_dir, read_once):
    config = tiny_config(tfds_dir, base="configs/diffmae_fmnist.py", **{**RUN, "total_steps": 3})
    last = train.train_and_evaluate(config, str(tmp_path))
    assert last["step"] == 3 and np.isfinite(last["loss"])


@pytest.mark.slow
def test_on_device_finetuning_follows_the_host_paths_losses(tmp_path, tfds_dir, read_once):
    # Uncropped 28 px images: both paths feed the same pixels, targets and order, so the losses
    # agree to float rounding (the programs differ: the device one makes its images inside).
    steps = 6
    losses = {}
    for on_device in (False, True):
        config = tiny_config(
            tfds_dir,
            base="configs/finetune_fmnist.py",
            init_from="random",
            total_steps=steps,
            log_every_steps=1,
            checkpoint_every_steps=steps,
            optimizer__blr=4e-2,
            optimizer__warmup_steps=1,
            finetune__crop_scale=(1.0, 1.0),
            finetune__mixup=0.0,
            finetune__cutmix=0.0,
            finetune__randaug_ops=0,
            finetune__reprob=0.0,
            dataset__on_device=on_device,
        )
        workdir = str(tmp_path / str(on_device))
        last = finetune.train_and_evaluate(config, workdir)
        losses[on_device] = [r["loss"] for r in metrics(workdir) if "loss" in r]
        assert len(losses[on_device]) == steps and np.isfinite(losses[on_device]).all()
        assert 0.0 <= last["eval_top1"] <= 1.0 and last["eval_examples"] == 10000
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)
    assert losses[True][-1] < losses[True][0]
