"""Damaged or unusual input is named in one line, or skipped with a warning, never a traceback."""

import logging
import re
import struct
import zlib

import numpy as np
import pytest

from maejax import data_sources, input_pipeline, sharding, writers
from maejax.errors import UserError


def save_images(folder, count, size=(12, 10), seed=0):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(folder / f"{i}.png")


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def png_16_bit_rgb(path, pixels: np.ndarray) -> None:
    """Write (H, W, 3) uint16 pixels as a 16-bit RGB PNG by hand: PIL cannot write one."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)  # filter 0 per row
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


# --- 16-bit images ----------------------------------------------------------------


def test_a_16_bit_greyscale_png_is_scaled_not_clipped(tmp_path):
    from PIL import Image

    pixels = np.linspace(0, 65535, 12 * 10).astype(np.uint16).reshape(12, 10)
    (tmp_path / "a").mkdir()
    Image.fromarray(pixels).save(tmp_path / "a" / "deep.png")
    assert Image.open(tmp_path / "a" / "deep.png").mode.startswith("I")  # really 16-bit on disk
    expected = np.round(pixels / 257.0).astype(np.uint8)
    grey = data_sources.ImageFolderSource(str(tmp_path), "train", 1).__getitems__([0])[0]["image"]
    np.testing.assert_array_equal(grey[..., 0], expected)
    rgb = data_sources.ImageFolderSource(str(tmp_path), "train", 3).__getitems__([0])[0]["image"]
    np.testing.assert_array_equal(rgb, np.repeat(expected[..., None], 3, axis=-1))


def test_a_16_bit_rgb_png_keeps_its_range(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 65536, (6, 8, 3), dtype=np.uint16)
    (tmp_path / "a").mkdir()
    png_16_bit_rgb(tmp_path / "a" / "deep.png", pixels)
    image = data_sources.ImageFolderSource(str(tmp_path), "train", 3).__getitems__([0])[0]["image"]
    assert image.dtype == np.uint8
    # PIL keeps each sample's high byte: within one level of value / 257.
    assert np.abs(image.astype(int) - np.round(pixels / 257.0)).max() <= 1


# --- corrupt images -----------------------------------------------------------------


@pytest.fixture
def folder_with_a_truncated_image(tmp_path):
    save_images(tmp_path / "train" / "a", 4)
    save_images(tmp_path / "train" / "b", 4, seed=1)
    bad = tmp_path / "train" / "a" / "1.png"
    truncate(bad)
    return tmp_path, str(bad)


def test_a_truncated_image_is_refused_naming_it(folder_with_a_truncated_image):
    root, bad = folder_with_a_truncated_image
    source = data_sources.ImageFolderSource(str(root), "train")
    with pytest.raises(
        UserError, match=rf"cannot read image {re.escape(bad)}: .*truncated.*bad_images='skip'"
    ):
        source.__getitems__([1])
    # Through the loader the same error reaches the caller (from its thread), not an OSError.
    loader = input_pipeline.TrainLoader(source, lambda rng, image: image, seed=0, batch_size=8)
    try:
        with pytest.raises(UserError, match=re.escape(bad)):
            next(loader)
    finally:
        loader.close()


def test_skip_replaces_a_bad_image_by_the_next_readable_one(folder_with_a_truncated_image, caplog):
    root, bad = folder_with_a_truncated_image
    source = data_sources.ImageFolderSource(str(root), "train", bad_images="skip")
    with caplog.at_level(logging.WARNING):
        first = source.__getitems__([1, 1])
        again = source.__getitems__([1])
    substitute = source.__getitems__([2])[0]
    for record in first + again:
        np.testing.assert_array_equal(record["image"], substitute["image"])
    warnings = [r.getMessage() for r in caplog.records if bad in r.getMessage()]
    assert len(warnings) == 1  # once per file, however often it is drawn


def test_skipping_keeps_batches_a_function_of_seed_and_position(folder_with_a_truncated_image):
    root, _ = folder_with_a_truncated_image

    def batches(start, n):
        source = data_sources.ImageFolderSource(str(root), "train", bad_images="skip")
        loader = input_pipeline.TrainLoader(
            source, lambda rng, image: image, seed=5, batch_size=4, start_batch=start, prefetch=1
        )
        try:
            return [next(loader) for _ in range(n)]
        finally:
            loader.close()

    full, resumed = batches(0, 6), batches(3, 3)
    for x, y in zip(full[3:], resumed, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


def test_check_images_lists_every_unreadable_file_at_start(folder_with_a_truncated_image):
    root, bad = folder_with_a_truncated_image
    other = root / "train" / "b" / "3.png"
    other.write_bytes(b"not a png at all")
    with pytest.raises(
        UserError, match=rf"2 of 8 images cannot be read: .*{re.escape(bad)}.*{re.escape(str(other))}"
    ):
        data_sources.ImageFolderSource(str(root), "train", check_images=True)


# --- metrics.jsonl ------------------------------------------------------------------


def test_a_torn_metrics_line_is_skipped_with_its_line_number(tmp_path, caplog):
    writer = writers.Writer(str(tmp_path), enabled=False)  # no TensorBoard writer needed here
    writer.enabled = True
    (tmp_path / writers.METRICS_FILE).write_text(
        '{"step": 5, "loss": 1.0}\n{"step": 10, "lo\n{"step": 10, "loss": 0.5}\n{"step": 15, "loss": 0.2}\n'
    )
    with caplog.at_level(logging.WARNING):
        writer.truncate_after(10)
    assert (tmp_path / writers.METRICS_FILE).read_text() == (
        '{"step": 5, "loss": 1.0}\n{"step": 10, "loss": 0.5}\n'
    )
    assert any("line 2" in r.getMessage() and writer.metrics_path in r.getMessage() for r in caplog.records)


# --- PyTorch checkpoints ------------------------------------------------------------


def test_a_truncated_pth_is_named_in_one_line(tmp_path):
    torch = pytest.importorskip("torch")
    from maejax import weights_io

    path = tmp_path / "mae.pth"
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 64), "w": torch.randn(64, 64)}}, path)
    truncate(path)
    with pytest.raises(
        UserError, match=rf"cannot read {re.escape(str(path))} .*truncated or not a PyTorch checkpoint"
    ):
        weights_io.load_torch_checkpoint(str(path))
    path.write_text("hello, not a checkpoint")
    with pytest.raises(UserError, match="truncated or not a PyTorch checkpoint"):
        weights_io.load_torch_checkpoint(str(path))
    with pytest.raises(UserError, match="no such file"):
        weights_io.load_torch_checkpoint(str(tmp_path / "missing.pth"))


# --- device mesh --------------------------------------------------------------------


def test_the_mesh_fallback_is_logged_with_shape_and_reason(monkeypatch, caplog):
    import jax

    from maejax.config import base_config

    def fail(shape, devices):
        raise ValueError("no physical layout for this slice")

    monkeypatch.setattr(sharding.mesh_utils, "create_device_mesh", fail)
    devices = jax.devices()[:1]
    with caplog.at_level(logging.WARNING):
        mesh = sharding.make_mesh(base_config().mesh, devices)
    assert mesh.devices.shape == (1, 1)
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "1x1" in message and "no physical layout for this slice" in message


# --- config ------------------------------------------------------------------------


def test_an_unknown_bad_images_policy_is_refused():
    from maejax import validate
    from maejax.config import base_config
    from maejax.errors import ConfigError

    config = base_config()
    config.dataset.bad_images = "ignore"
    with pytest.raises(
        ConfigError, match=r"config\.dataset\.bad_images='ignore' is invalid: .*'error', 'skip'"
    ):
        validate.validate_dataset(config)
