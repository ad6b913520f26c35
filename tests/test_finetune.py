"""Fine-tuning and linear probing: the official rules, augmentations, and runs from a CLI workdir."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from maejax import augment, checkpoint, convert, finetune, models, optim
from maejax.models.classifier import interpolate_pos_embed
from maejax.models.vit import sincos_2d
from tests.conftest import cli_overrides, run_maejax

CLASSIFIER = dict(
    name="classifier",
    image_size=28,
    in_channels=1,
    num_classes=10,
    encoder=dict(width=32, depth=3, num_heads=2, mlp_dim=64, patch_size=4),
)


def classifier_params(cfg=CLASSIFIER, probe=False):
    model = models.build_model(cfg).clone(probe=probe)
    variables = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((2, 28, 28, 1))))()
    return model, variables


def official_layer_id(name: str, num_layers: int) -> int:
    """main_finetune's get_layer_id_for_vit, on official parameter names."""
    if name in ("cls_token", "pos_embed"):
        return 0
    if name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    return num_layers


def test_layer_decay_follows_the_official_rule_for_every_parameter():
    _, variables = classifier_params()
    params = variables["params"]
    depth, decay = 3, 0.65
    scales = optim.layer_decay_scales(params, depth, decay)
    resolved = models.resolve(CLASSIFIER)
    checked = 0
    for entry in convert.key_map(resolved):
        scale = convert._get(scales, entry.flax_path)
        expected = decay ** (depth + 1 - official_layer_id(entry.torch_key, depth + 1))
        assert scale == pytest.approx(expected, rel=1e-12), entry.torch_key
        checked += 1
    assert checked == len(jax.tree.leaves(params))  # every parameter has an official name


def test_finetuning_exempts_biases_norms_pos_embed_and_cls_token_from_decay():
    _, variables = classifier_params()
    mask = optim.decay_mask(variables["params"], optim.FINETUNE_NO_DECAY)
    assert not mask["encoder"]["pos_embed"] and not mask["encoder"]["cls_token"]
    assert not mask["fc_norm"]["scale"] and not mask["head"]["bias"]
    assert mask["head"]["kernel"] and mask["encoder"]["blocks_2"]["mlp"]["fc2"]["kernel"]


def test_lars_matches_a_hand_computed_update():
    params = {"w": jnp.asarray(np.arange(12.0).reshape(3, 4) / 10), "b": jnp.asarray([0.5, -1.0, 2.0, 0.0])}
    grads = [
        {"w": jnp.full((3, 4), 0.3), "b": jnp.asarray([1.0, 2.0, 3.0, 4.0])},
        {"w": jnp.full((3, 4), -0.1), "b": jnp.asarray([0.5, 0.5, 0.5, 0.5])},
    ]
    lr, momentum, trust, wd = 0.5, 0.9, 0.001, 0.1
    tx = optim.lars(lr, momentum, trust, wd, params)
    state = tx.init(params)
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    mu = {k: np.zeros_like(v) for k, v in p.items()}
    current = params
    for g in grads:
        updates, state = tx.update(g, state, current)
        current = optax.apply_updates(current, updates)
        for name in p:
            d = np.asarray(g[name], np.float64)
            if p[name].ndim > 1:  # official: decay and trust ratio only for ndim > 1
                d = d + wd * p[name]
                d = d * (trust * np.linalg.norm(p[name]) / np.linalg.norm(d))
            mu[name] = momentum * mu[name] + d
            p[name] = p[name] - lr * mu[name]
    for name in p:
        np.testing.assert_allclose(current[name], p[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mixup, cutmix", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixup_and_cutmix_keep_the_label_mass(mixup, cutmix):
    images = np.random.default_rng(0).normal(size=(8, 28, 28, 1)).astype(np.float32)
    labels = np.arange(8) % 10
    for seed in range(20):
        rng = np.random.default_rng(seed)
        mixed, targets, lam = augment.mix_batch(
            rng, images, labels, 10, mixup=mixup, cutmix=cutmix, smoothing=0.1
        )
        np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)
        on, off = 1 - 0.1 + 0.01, 0.01
        i = 0  # row 0 is mixed with row 7
        assert targets[i, labels[0]] == pytest.approx(lam * on + (1 - lam) * off, abs=1e-6)
        assert targets[i, labels[7]] == pytest.approx(lam * off + (1 - lam) * on, abs=1e-6)
        if not np.allclose(mixed, images) and np.isin(mixed, np.concatenate([images, images[::-1]])).all():
            # cutmix: the fraction of pixels taken from the partner is exactly 1 - lam
            from_partner = np.mean(mixed[0] != images[0])
            assert from_partner == pytest.approx(1 - lam, abs=1e-6)


def test_rand_augment_and_random_erasing_run_on_grey_and_rgb_images():
    from PIL import Image

    rng = np.random.default_rng(0)
    for mode, shape in (("L", (28, 28)), ("RGB", (32, 32, 3))):
        img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
        for name, op in augment.OPS.items():
            out = op(img, rng, 10.0)
            assert out.size == img.size and out.mode == mode, name
    erased = augment.random_erasing(np.random.default_rng(1), np.zeros((28, 28, 1), np.float32), prob=1.0)
    assert 0.02 * 784 * 0.5 <= np.count_nonzero(erased) <= 784 / 3 + 28


def test_a_pretrained_encoder_loads_into_the_classifier(pretrained_workdir):
    encoder, loaded = finetune.pretrained_encoder(pretrained_workdir)
    assert loaded.endswith("step 100")
    config = json.load(open(os.path.join(pretrained_workdir, "config.json")))["model"]
    cfg = {
        **CLASSIFIER,
        "encoder": {
            k: config["encoder"][k] for k in ("width", "depth", "num_heads", "mlp_dim", "patch_size")
        },
    }
    _, variables = classifier_params(cfg)
    params = finetune.load_encoder(variables["params"], encoder, 7)
    np.testing.assert_array_equal(
        params["encoder"]["blocks_1"]["attn"]["qkv"]["kernel"], encoder["blocks_1"]["attn"]["qkv"]["kernel"]
    )
    # The fixed table the encoder trained with becomes the trainable pos_embed's start.
    np.testing.assert_allclose(params["encoder"]["pos_embed"], sincos_2d(7, 32)[None], atol=1e-7)
    assert "norm" not in params["encoder"]  # average pooling uses fc_norm instead, as the official code


def test_position_tables_interpolate_to_another_grid():
    table = sincos_2d(7, 32)[None]
    assert interpolate_pos_embed(table, 7) is not None
    np.testing.assert_array_equal(interpolate_pos_embed(table, 7), table)
    bigger = interpolate_pos_embed(table, 14)
    assert bigger.shape == (1, 1 + 196, 32)
    np.testing.assert_array_equal(bigger[0, 0], table[0, 0])


def test_finetuned_checkpoints_convert_both_ways_exactly():
    _, variables = classifier_params()
    params = jax.tree.map(np.asarray, variables["params"])
    state = convert.params_to_torch(params, CLASSIFIER)
    assert {"fc_norm.weight", "head.weight", "pos_embed"} <= set(state) and "norm.weight" not in state
    jax.tree.map(np.testing.assert_array_equal, convert.params_from_torch(state, CLASSIFIER), params)


def rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("task", ["finetune", "linprobe"])
def test_the_tasks_run_from_a_cli_pretraining_and_evaluate_every_test_image(
    tmp_path, tfds_dir, pretrained_workdir, task
):
    overrides = cli_overrides(tfds_dir, total_steps=6, log_every_steps=3, checkpoint_every_steps=6)
    result = run_maejax(
        f"--config=configs/{task}_fmnist.py",
        f"--workdir={tmp_path}",
        *overrides,
        f"--config.init_from={pretrained_workdir}",
        "--config.eval_every_steps=6",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{task} from {pretrained_workdir}/checkpoints step 100" in result.stdout
    logged = rows(tmp_path)
    evals = [r for r in logged if "eval_top1" in r]
    assert [r["step"] for r in evals] == [6]
    assert evals[0]["eval_examples"] == 10000  # 10,000 = 156 batches of 64 + 16, padded
    assert 0.0 <= evals[0]["eval_top1"] <= evals[0]["eval_top5"] <= 1.0
    # The same command with a longer schedule resumes (the state holds empty
    # `frozen` / `batch_stats` groups when fine-tuning, full ones when probing).
    again = run_maejax(
        f"--config=configs/{task}_fmnist.py",
        f"--workdir={tmp_path}",
        *overrides,
        f"--config.init_from={pretrained_workdir}",
        "--config.eval_every_steps=6",
        "--config.total_steps=8",
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming at step 6 (input batch 6)" in again.stdout
    if task == "linprobe":
        assert 0.0 < [r for r in logged if "knn_top1" in r][0]["knn_top1"] <= 1.0
        # the encoder stayed frozen
        tuned, _ = checkpoint.load_params(str(tmp_path))
        encoder, _ = finetune.pretrained_encoder(pretrained_workdir)
        np.testing.assert_array_equal(
            tuned["encoder"]["blocks_0"]["mlp"]["fc1"]["kernel"], encoder["blocks_0"]["mlp"]["fc1"]["kernel"]
        )
