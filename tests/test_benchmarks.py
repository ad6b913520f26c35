"""benchmarks/train_step.py: its FLOP count, and that it runs where only jax and torch exist."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "train_step.py")


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import train_step as module
    finally:
        sys.path.pop(0)
    return module


@pytest.mark.parametrize(
    "variant, sizes, published",
    [("B/16", (768, 12, 3072, 16), 5.8e10), ("L/16", (1024, 24, 4096, 16), 1.24e11)],
)
def test_traced_flop_count_equals_the_closed_form_and_the_published_count(bench, variant, sizes, published):
    args = bench.parse_args([f"--variant={variant}", "--batch=2"])
    traced = bench.step_flops_per_image(bench.build_model(args, "mae"), bench.image_shape(args))
    width, depth, mlp, patch = sizes
    assert traced == bench.mae_flops_formula(width, depth, mlp, patch, 224, 3, 0.75, 512, 8, 2048)
    assert traced == pytest.approx(published, rel=0.015)


@pytest.mark.slow
def test_tiny_run_without_ml_collections_prints_every_row():
    """The GPU machine has no ml_collections: block it and run MAE, DiffMAE and both references."""
    code = (
        "import runpy, sys; sys.modules['ml_collections'] = None; "
        f"sys.argv = [{SCRIPT!r}, '--tiny', '--models=mae,diffmae', '--reference=both', "
        "'--compile_backend=eager', '--dtype=bfloat16', '--warmup=1', '--steps=1']; "
        f"runpy.run_path({SCRIPT!r}, run_name='__main__')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for row in (
        "maejax MAE (xla)",
        "maejax DiffMAE (xla)",
        "reference HF eager",
        "reference HF + torch.compile",
    ):
        assert row in out.stdout
    assert "speed maejax MAE (xla) / reference HF + torch.compile" in out.stdout
    assert "time per FLOP maejax DiffMAE (xla) / maejax MAE (xla)" in out.stdout
    assert "FAILED" not in out.stdout
