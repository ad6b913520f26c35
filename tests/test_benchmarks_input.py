"""benchmarks/input_pipeline.py at a tiny size, and the host normalisation it led to."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest

from maejax import preprocess
from tests.conftest import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import input_pipeline as bench  # noqa: E402


def test_generated_photos_compress_like_imagenet_jpegs():
    sizes = []
    for i in range(3):
        buffer = io.BytesIO()
        bench.synthetic_photo(np.random.default_rng(i), 500, 375).save(buffer, "JPEG", quality=90)
        sizes.append(len(buffer.getvalue()))
    assert 90e3 < np.mean(sizes) < 150e3  # an average ImageNet training JPEG is about 110 KB


@pytest.mark.parametrize("channels", [1, 3])
def test_normalisation_matches_the_expression_bit_for_bit(channels):
    image = np.random.default_rng(0).integers(0, 256, (9, 7, channels), dtype=np.uint8)
    mean = np.linspace(0.3, 0.5, channels).astype(np.float32)
    std = np.linspace(0.2, 0.3, channels).astype(np.float32)
    for view in (image, image[:, ::-1]):
        out = preprocess.normalize(view, mean, std)
        expected = (view.astype(np.float32) / 255.0 - mean) / std
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, expected)
    assert image.dtype == np.uint8  # the input is untouched


@pytest.mark.slow  # the benchmark in a subprocess, which starts two more
def test_the_benchmark_prints_a_table_and_a_projection(tmp_path):
    args = ["--images", "8", "--classes", "2", "--batch_size", "4", "--batches", "1", "--repeats", "1"]
    args += ["--cores", "1", "--no_grain", "--data_dir", str(tmp_path)]
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "input_pipeline.py"), *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    assert "first batch identical across every loader and core count: True" in out
    assert "maejax: 16-core host ~ 15 cores x" in out and "processes: 16-core host ~ 15 cores x" in out
    assert len([f for _, _, fs in os.walk(tmp_path) for f in fs if f.endswith(".jpg")]) == 8
