"""experiments/inpainting_table.py: its Frechet distance, controls, table and flags.

The end-to-end run (with and without an MAE) is in test_diffmae.py's sample-task test, on its
CLI-trained DiffMAE.
"""

import os
import sys

import numpy as np
import pytest
import scipy.linalg

from tests.conftest import REPO

sys.path.insert(0, os.path.join(REPO, "experiments"))
import inpainting_table as table  # noqa: E402


def test_frechet_distance_matches_the_closed_form_for_diagonal_covariances():
    mu_a, mu_b = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    var_a, var_b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    fd = table.frechet_distance((mu_a, np.diag(var_a)), (mu_b, np.diag(var_b)))
    expected = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum()
    assert fd == pytest.approx(expected)  # 5 + (4 + 1 + 0) = 10


@pytest.mark.parametrize("num_points", [200, 10])  # full rank; fewer points than the 16 dimensions
def test_frechet_distance_agrees_with_scipy_sqrtm(num_points):
    rng = np.random.default_rng(0)
    a = table.gaussian_fit(rng.normal(size=(num_points, 16)) @ rng.normal(size=(16, 16)))
    b = table.gaussian_fit(rng.normal(size=(300, 16)) + 0.5)
    cross = scipy.linalg.sqrtm(a[1] @ b[1]).real
    expected = ((a[0] - b[0]) ** 2).sum() + np.trace(a[1] + b[1] - 2 * cross)
    assert table.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert table.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6 * np.trace(a[1]))


def _two_pattern_images(rng, n):
    """4x4 images: a random left half; each pixel of the right half 0.2 or 0.8, plus a little noise."""
    images = np.empty((n, 4, 4, 1))
    images[:, :, :2] = rng.uniform(size=(n, 4, 2, 1))
    images[:, :, 2:] = rng.choice([0.2, 0.8], size=(n, 4, 2, 1)) + 0.02 * rng.normal(size=(n, 4, 2, 1))
    return images


def test_fd_prefers_a_sharp_wrong_fill_that_psnr_punishes():
    rng = np.random.default_rng(0)
    truth, other = _two_pattern_images(rng, 400), _two_pattern_images(rng, 400)
    reference = table.gaussian_fit(_two_pattern_images(rng, 5000).reshape(5000, -1))
    pixel_mask = np.zeros_like(truth)
    pixel_mask[:, :, 2:] = 1.0  # the right half is inpainted
    labels = np.zeros(len(truth), int)

    def pixel_features(images):
        return images.reshape(len(images), -1), np.zeros(len(images), int)

    def score(fill):
        images = truth * (1 - pixel_mask) + fill * pixel_mask
        return table.measure(images[None], truth, pixel_mask, labels, pixel_features, reference)

    real, blur, swap = score(truth), score(np.full_like(truth, 0.5)), score(other)
    assert blur["psnr"] > swap["psnr"] + 2  # PSNR rewards the mean of the two values...
    assert blur["fd"] > 5 * swap["fd"]  # ...FD rewards values that occur, true or not
    assert swap["fd"] < 2 * real["fd"] + 0.01
    assert blur["hf_ratio"] < 0.5 < swap["hf_ratio"]
    assert real["diversity"] is None and real["top1"] == 1.0


def test_controls_keep_visible_pixels_and_fill_from_the_true_class():
    rng = np.random.default_rng(0)
    pool_labels = np.repeat(np.arange(3), 5)
    pool = pool_labels[:, None, None, None] + rng.uniform(0, 0.5, size=(15, 2, 2, 1))
    labels = np.array([2, 0, 1, 2])
    truth = -np.ones((4, 2, 2, 1))
    pixel_mask = np.zeros_like(truth)
    pixel_mask[:, 0] = 1.0
    fills = table.control_fills(truth, labels, pool, pool_labels, pixel_mask, seed=0)
    for filled in fills.values():
        np.testing.assert_array_equal(filled[:, 1], -1.0)  # visible: untouched
        assert (np.floor(filled[:, 0]) == labels[:, None, None]).all()  # from the true class
    class_means = np.stack([pool[pool_labels == c].mean(axis=0) for c in labels])
    np.testing.assert_allclose(fills["classmean"][:, 0], class_means[:, 0])
    swapped = fills["swap"][:, 0]
    assert all(any(np.array_equal(s, p[0]) for p in pool) for s in swapped)  # one real pool image each


def _row(setting, label, psnr, fd, top1=0.5, diversity=None):
    row = {"setting": setting, "mask": setting.split("_")[0], "label": label, "psnr": psnr, "fd": fd}
    return {**row, "hf_ratio": 0.5, "top1": top1, "diversity": diversity}


HEADER = {
    "num_images": 64,
    "num_samples": 4,
    "checkpoint": "d/checkpoints step 400",
    "mae": "m",
    "commit": "abc123-dirty",
    "classifier": {"dims": [784, 256, 64, 10], "epochs": 5, "test_top1": 0.873},
    "reference_images": 9936,
    "eta": 0.0,
}


def test_the_table_puts_the_real_images_first_and_names_the_commit():
    real = {**_row("real", "real images (sanity)", None, 3.0, top1=0.9), "fd_reference_halves": 0.1}
    rows = [
        _row("random_mae", "random: MAE", 13.5, 40.0),
        _row("random_ddpm50", "random: DDPM 50", 10.3, 9.0, top1=0.8, diversity=0.11),
        _row("random_classmean", "random: blur", 13.0, 25.0),
        _row("random_swap", "random: swap", 11.0, 4.0),
    ]
    text = table.render_table(rows, real, HEADER)
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert lines[0] == "| " + " | ".join(table.COLUMNS) + " |"
    assert lines[2] == "| real images (sanity) | - | 0.500 | - | 90.0 | 3.00 |"
    assert lines[3] == "| random: MAE | 13.50 | 0.500 | 0 (deterministic) | 50.0 | 40.00 |"
    assert lines[4] == "| random: DDPM 50 | 10.30 | 0.500 | 0.110 | 80.0 | 9.00 |"
    assert len(lines) == 2 + 1 + len(rows)
    assert "commit abc123-dirty" in text and "87.3 %" in text
    assert "random yes" in text and "too noisy" not in text


def test_the_table_says_when_fd_is_too_noisy_to_order_the_controls():
    rows = [
        _row("random_classmean", "random: blur", 13.0, 25.0),
        _row("random_swap", "random: swap", 11.0, 4.0),
        _row("center_classmean", "center: blur", 13.0, 25.0),
        _row("center_swap", "center: swap", 11.0, 30.0),  # FD prefers the blur: noise
    ]
    assert table.controls_ordered(rows) == {"random": True, "center": False}
    real = {**_row("real", "real images (sanity)", None, 3.0), "fd_reference_halves": 0.1}
    text = table.render_table(rows, real, HEADER)
    assert "random yes, center NO" in text and "too noisy" in text


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--samplers=ddpm,euler", "'euler'"),
        ("--masks=random,square", "'square'"),
        ("--steps=10,0", "at least 1"),
        ("--steps=ten", "comma-separated integers"),
        ("--num_samples=1", "diversity"),
        ("--eps_scales=1,0.9", "each in [1, 2]"),
        ("--eps_scales=one", "comma-separated numbers"),
    ],
)
def test_bad_flags_are_refused_with_the_flag_named(flag, message, capsys):
    with pytest.raises(SystemExit) as e:
        table.parse_args(["--diffmae=d", "--mae=m", "--out=o", flag])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert flag.split("=")[0] in err and message in err


def test_a_non_finite_measure_stops_the_run_naming_the_setting():
    with pytest.raises(RuntimeError, match=r"setting center_ddpm5 failed: .*\['fd'\] not finite"):
        with table.setting("center_ddpm5"):
            table.check_finite("center_ddpm5", {"psnr": 7.0, "fd": float("nan"), "diversity": None})


def test_each_noise_scale_gets_its_own_method_and_row_label():
    args = table.parse_args(["--diffmae=d", "--out=o", "--eps_scales=1,1.15,1.0"])
    assert args.eps_scales == [1.0, 1.15]  # repeats dropped, order kept
    assert [table.method_name("ddpm", 250, e) for e in args.eps_scales] == ["ddpm250", "ddpm250_eps1.15"]
    assert table.row_label("random", "ddpm250", 12, 16) == "random (12/16 patches): DiffMAE DDPM 250 steps"
    assert table.row_label("center", "ddim50_eps1.02", 9, 16) == (
        "center (9/16 patches): DiffMAE DDIM 50 steps, noise estimate / 1.02"
    )
