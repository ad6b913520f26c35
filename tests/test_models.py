"""Model layer: variants, shapes, masking invariants, initialisation, config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maejax import models
from maejax.errors import ConfigError
from maejax.models import masking, vit

TINY = dict(
    image_size=32,
    in_channels=1,
    encoder=dict(variant="mu/4"),
    decoder=dict(width=32, depth=1, num_heads=2),
)


def init(cfg, batch=2, seed=0):
    model = models.build_model(cfg)
    size = model.image_size
    x = jnp.zeros((batch, size, size, cfg.get("in_channels", 3)))
    rngs = {"params": jax.random.key(seed), "masking": jax.random.key(seed + 1)}
    return model, jax.jit(model.init)(rngs, x)["params"]


@pytest.mark.parametrize("variant", ["mu/16", "Ti/16", "S/16", "B/16", "L/16", "H/14"])
def test_every_variant_has_the_official_shapes(variant):
    size = 224
    model = models.build_model({"encoder": {"variant": variant}, "image_size": size})
    images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    rngs = {"params": jax.random.key(0), "masking": jax.random.key(1)}
    variables = jax.eval_shape(model.init, rngs, images)
    out = jax.eval_shape(lambda v, x: model.apply(v, x, rngs=rngs), variables, images)
    spec = vit.decode_variant(variant)
    p = spec["patch_size"]
    num_patches = (size // p) ** 2
    keep = int(num_patches * 0.25)
    assert out["pred"].shape == (2, num_patches, p * p * 3)
    assert out["mask"].shape == (2, num_patches)
    assert out["latent"].shape == (2, 1 + keep, spec["width"])
    enc = variables["params"]["encoder"]
    assert len([k for k in enc if k.startswith("blocks_")]) == spec["depth"]
    assert enc["blocks_0"]["attn"]["qkv"]["kernel"].shape == (spec["width"], 3 * spec["width"])
    assert enc["blocks_0"]["mlp"]["fc1"]["kernel"].shape == (spec["width"], spec["mlp_dim"])
    assert variables["params"]["decoder"]["blocks_7"]["attn"]["qkv"]["kernel"].shape == (512, 1536)


def test_explicit_sizes_override_the_variant():
    cfg = models.resolve({"encoder": {"variant": "B/16", "depth": 3, "width": 96, "num_heads": 4}})
    assert (cfg.encoder.width, cfg.encoder.depth, cfg.encoder.num_heads) == (96, 3, 4)
    assert cfg.encoder.mlp_dim == 384  # 4 x the overridden width
    assert cfg.encoder.patch_size == 16
    assert cfg.decoder.mlp_dim == 2048


def test_minimal_config_gets_every_default():
    cfg = models.resolve({})
    assert cfg.name == "mae" and cfg.image_size == 224 and cfg.in_channels == 3
    assert (cfg.encoder.width, cfg.encoder.depth, cfg.encoder.patch_size) == (768, 12, 16)
    assert (cfg.decoder.width, cfg.decoder.depth, cfg.decoder.num_heads) == (512, 8, 16)
    assert cfg.mask_ratio == 0.75 and cfg.dtype == "float32" and not cfg.remat


@pytest.mark.parametrize(
    "override, field",
    [
        ({"image_size": 30, "encoder": {"variant": "mu/4"}}, "model.image_size"),
        ({"encoder": {"variant": "Q/16"}}, "model.encoder.variant"),
        ({"encoder": {"width": 100, "num_heads": 3}}, "model.encoder.num_heads"),
        ({"mask_ratio": 1.0}, "model.mask_ratio"),
        ({"mask_ratio": 0.8, "image_size": 32, "encoder": {"variant": "mu/16"}}, "model.mask_ratio"),
        ({"dtype": "float16"}, "model.dtype"),
        ({"decoder": {"depth": 0}}, "model.decoder.depth"),
        ({"encoder_width": 3}, "model.encoder_width"),
    ],
)
def test_bad_model_configs_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        models.build_model(override)
    assert err.value.field == field
    assert f"config.{field}=" in str(err.value)


def test_patchify_matches_the_official_layout_and_inverts():
    images = np.arange(2 * 8 * 8 * 3, dtype=np.float32).reshape(2, 8, 8, 3)
    patches = masking.patchify(images, 4)
    assert patches.shape == (2, 4, 48)
    # Patch 1 is row 0, column 1; inside it, (row, column, channel) order.
    np.testing.assert_array_equal(patches[0, 1, :3], images[0, 0, 4])
    np.testing.assert_array_equal(patches[0, 1, 12:15], images[0, 1, 4])
    np.testing.assert_array_equal(masking.unpatchify(patches, 4, 3), images)


def test_masking_keeps_int_l_times_one_minus_ratio_per_row():
    for ratio, length in [(0.75, 196), (0.6, 64), (0.9, 16), (0.5, 49)]:
        m = masking.random_masking(jax.random.key(0), 5, length, ratio)
        keep = int(length * (1 - ratio))
        np.testing.assert_array_equal(np.asarray(m.mask).sum(1), length - keep)
        assert m.ids_keep.shape == (5, keep)
        # the kept ids are exactly the visible positions
        visible = np.zeros((5, length))
        np.put_along_axis(visible, np.asarray(m.ids_keep), 1.0, axis=1)
        np.testing.assert_array_equal(visible, 1 - np.asarray(m.mask))


def test_masking_rows_differ_without_noise_and_repeat_with_it():
    m = masking.random_masking(jax.random.key(1), 8, 64, 0.75)
    rows = {tuple(r) for r in np.asarray(m.mask)}
    assert len(rows) == 8
    model, params = init(TINY, batch=4)
    noise = jax.random.uniform(jax.random.key(3), (4, model.num_patches))
    apply = jax.jit(lambda p, x, n: model.apply({"params": p}, x, noise=n))
    a = apply(params, jnp.ones((4, 32, 32, 1)), noise)
    b = apply(params, jnp.ones((4, 32, 32, 1)), noise)
    np.testing.assert_array_equal(a["mask"], b["mask"])
    np.testing.assert_array_equal(a["pred"], b["pred"])


def test_noise_from_mask_reproduces_a_given_mask():
    mask = np.stack([masking.center_block_mask(8, 4)] * 3)
    m = masking.masking_from_noise(jnp.asarray(masking.noise_from_mask(mask)), 64 - 16)
    np.testing.assert_array_equal(np.asarray(m.mask), mask)


def _xavier_bound(fan_in, fan_out):
    return np.sqrt(6.0 / (fan_in + fan_out))


def test_initialisation_follows_the_official_scheme():
    cfg = dict(image_size=64, in_channels=3, encoder=dict(width=128, depth=2, num_heads=4, patch_size=8))
    _, params = init(cfg)
    flat = {
        "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
        for path, v in jax.tree_util.tree_leaves_with_path(params)
    }
    for name, value in flat.items():
        if name.endswith("kernel") and "patch_embed" not in name:
            fan_in, fan_out = value.shape  # includes the fused qkv (D, 3D)
            bound = _xavier_bound(fan_in, fan_out)
            assert np.abs(value).max() <= bound, name
            assert abs(value.std() - bound / np.sqrt(3)) < 0.1 * bound / np.sqrt(3), name
        elif name.endswith("bias"):
            assert np.all(value == 0), name
        elif name.endswith("scale"):
            assert np.all(value == 1), name
    qkv = flat["encoder/blocks_0/attn/qkv/kernel"]
    assert np.abs(qkv).max() > 0.9 * _xavier_bound(128, 384)  # one fused xavier, not three
    patch = flat["encoder/patch_embed/kernel"]  # (p, p, C, D) ~ Linear(C*p*p -> D)
    bound = _xavier_bound(8 * 8 * 3, 128)
    assert np.abs(patch).max() <= bound and np.abs(patch).max() > 0.9 * bound
    for token in ("encoder/cls_token", "decoder/mask_token"):
        assert abs(flat[token].std() - 0.02) < 0.006, token


def test_position_tables_are_constants_not_params():
    _, params = init(TINY)
    names = {
        "/".join(str(getattr(k, "key", k)) for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(params)
    }
    assert not any("pos" in n for n in names)


def test_bfloat16_compute_keeps_float32_params_and_close_loss():
    _, params = init(TINY)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 1))
    noise = jax.random.uniform(jax.random.key(1), (2, 64))

    def run(cfg):
        model = models.build_model(cfg)
        return jax.jit(lambda p: model.apply({"params": p}, x, noise=noise))(params)

    f32, out = run(TINY), run({**TINY, "dtype": "bfloat16"})
    assert out["pred"].dtype == jnp.float32
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(params))
    assert abs(float(out["loss"]) - float(f32["loss"])) < 0.05 * float(f32["loss"])


def test_remat_gives_the_same_loss_and_gradients():
    _, params = init(TINY)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 1))
    noise = jax.random.uniform(jax.random.key(1), (2, 64))

    def grads(cfg):
        model = models.build_model(cfg)
        return jax.jit(jax.grad(lambda p: model.apply({"params": p}, x, noise=noise)["loss"]))(params)

    plain, remat = grads(TINY), grads({**TINY, "remat": True})
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), plain, remat)


def test_features_pool_the_unmasked_encoder():
    model, params = init(TINY)
    x = jax.random.normal(jax.random.key(0), (3, 32, 32, 1))
    for pool in ("cls", "avg"):
        feats = jax.jit(lambda p, pool=pool: model.apply({"params": p}, x, pool=pool, method=model.features))(
            params
        )
        assert feats.shape == (3, 32)
