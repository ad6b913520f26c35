"""Model layer: variants, shapes, masking invariants, initialisation, config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

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


# (width, depth, heads, MLP size), from the papers: ViT (Dosovitskiy et al. 2021, Table 1) for B, L
# and H, DeiT (Touvron et al. 2021, Table 1) for Ti and S. 'mu' (tests) and 'M' are maejax's own sizes.
PAPER_SIZES = {
    "mu": (32, 1, 2, 128),
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "M": (512, 12, 8, 2048),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
}
# Published parameter counts of the ImageNet-1k classifiers at 224 px (timm's vit_tiny_patch16_224
# ... vit_huge_patch14_224; ViT paper Table 1: 86M, 307M, 632M): a learned (1 + N, D) position table
# and a 1000-class head included, which MAE's encoder does not have (its positions are fixed).
PUBLISHED_CLASSIFIER_PARAMS = {
    "Ti/16": 5_717_416,
    "S/16": 22_050_664,
    "B/16": 86_567_656,
    "L/16": 304_326_632,
    "H/14": 632_045_800,
}


def vit_encoder_params(width, depth, mlp, patch, channels=3):
    """Parameters of a timm/MAE ViT encoder without position table or head, from the architecture.

    Patch embedding (p*p*C*D + D), cls token (D), per block: two LayerNorms (4D), qkv (3D^2 + 3D),
    proj (D^2 + D), fc1 (D*M + M), fc2 (M*D + D); the final LayerNorm (2D).
    """
    d, m = width, mlp
    block = 4 * d + 3 * d * d + 3 * d + d * d + d + d * m + m + m * d + d
    return patch * patch * channels * d + d + d + depth * block + 2 * d


def count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("variant", ["mu/16", "Ti/16", "S/16", "M/16", "B/16", "L/16", "H/14"])
def test_every_variant_has_the_official_shapes(variant):
    size = 224
    name, p = variant.split("/")
    p = int(p)
    width, depth, heads, mlp = PAPER_SIZES[name]
    resolved = models.resolve({"encoder": {"variant": variant}, "image_size": size})
    assert (resolved.encoder.width, resolved.encoder.depth, resolved.encoder.num_heads) == (
        width,
        depth,
        heads,
    )
    assert (resolved.encoder.mlp_dim, resolved.encoder.patch_size) == (mlp, p)
    model = models.build_model({"encoder": {"variant": variant}, "image_size": size})
    images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    rngs = {"params": jax.random.key(0), "masking": jax.random.key(1)}
    variables = jax.eval_shape(model.init, rngs, images)  # shapes only: H/14 needs no memory
    out = jax.eval_shape(lambda v, x: model.apply(v, x, rngs=rngs), variables, images)
    num_patches = (size // p) ** 2
    keep = int(num_patches * 0.25)
    assert out["pred"].shape == (2, num_patches, p * p * 3)
    assert out["mask"].shape == (2, num_patches)
    assert out["latent"].shape == (2, 1 + keep, width)
    enc = variables["params"]["encoder"]
    assert len([k for k in enc if k.startswith("blocks_")]) == depth
    assert enc["blocks_0"]["attn"]["qkv"]["kernel"].shape == (width, 3 * width)
    assert enc["blocks_0"]["mlp"]["fc1"]["kernel"].shape == (width, mlp)
    assert count(enc) == vit_encoder_params(width, depth, mlp, p)
    if variant in PUBLISHED_CLASSIFIER_PARAMS:
        position_table, head = (1 + num_patches) * width, width * 1000 + 1000
        assert count(enc) + position_table + head == PUBLISHED_CLASSIFIER_PARAMS[variant]
    # MAE's decoder (He et al. 2021, section 3): 8 blocks of width 512 (16 heads, MLP 2048), on
    # top of an embedding of the encoder's width, a mask token, a final norm and a pixel head.
    dec = variables["params"]["decoder"]
    assert dec["blocks_7"]["attn"]["qkv"]["kernel"].shape == (512, 1536) and "blocks_8" not in dec
    blocks = vit_encoder_params(512, 8, 2048, 0) - 2 * 512 - 2 * 512  # blocks only
    pixels = p * p * 3
    assert count(dec) == width * 512 + 512 + 512 + blocks + 2 * 512 + 512 * pixels + pixels


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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_position_tables_are_constants_not_params():
    _, params = init(TINY)
    names = {
        "/".join(str(getattr(k, "key", k)) for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(params)
    }
    assert not any("pos" in n for n in names)


@pytest.mark.slow
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


@pytest.mark.slow
def test_remat_gives_the_same_loss_and_gradients():
    _, params = init(TINY)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 1))
    noise = jax.random.uniform(jax.random.key(1), (2, 64))

    def grads(cfg):
        model = models.build_model(cfg)
        return jax.jit(jax.grad(lambda p: model.apply({"params": p}, x, noise=noise)["loss"]))(params)

    plain, remat = grads(TINY), grads({**TINY, "remat": True})
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), plain, remat)


def numpy_vit_encoder(params, images, patch, num_heads, final_norm):
    """A float64 NumPy ViT encoder on whole images (no masking): (B, 1 + L, D) tokens, cls first."""
    p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
    b, h, w, c = images.shape
    g = h // patch
    patches = images.reshape(b, g, patch, g, patch, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, -1)
    kernel = p["patch_embed"]["kernel"]
    width = kernel.shape[-1]
    x = patches @ kernel.reshape(-1, width) + p["patch_embed"]["bias"]
    pos = p["pos_embed"][0] if "pos_embed" in p else vit.sincos_2d(g, width)
    cls = np.broadcast_to(p["cls_token"][0] + pos[:1], (b, 1, width))
    x = np.concatenate([cls, x + pos[1:]], axis=1)

    def norm(x, q):
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + 1e-6) * q["scale"] + q["bias"]

    def linear(x, q):
        return x @ q["kernel"] + q["bias"]

    head_dim = width // num_heads
    for i in range(len([k for k in p if k.startswith("blocks_")])):
        q = p[f"blocks_{i}"]
        qkv = linear(norm(x, q["norm1"]), q["attn"]["qkv"]).reshape(b, -1, 3, num_heads, head_dim)
        logits = np.einsum("bqhd,bkhd->bhqk", qkv[:, :, 0], qkv[:, :, 1]) / np.sqrt(head_dim)
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        attended = np.einsum("bhqk,bkhd->bqhd", weights, qkv[:, :, 2]).reshape(b, -1, width)
        x = x + linear(attended, q["attn"]["proj"])
        hidden = linear(norm(x, q["norm2"]), q["mlp"]["fc1"])
        hidden = 0.5 * hidden * (1 + scipy.special.erf(hidden / np.sqrt(2)))  # exact GELU
        x = x + linear(hidden, q["mlp"]["fc2"])
    return (norm(x, p["norm"]) if final_norm else x), (norm, p)


@pytest.mark.parametrize("name", ["mae", "classifier"])
@pytest.mark.parametrize("pool", ["cls", "avg"])
def test_features_pool_the_unmasked_encoder(name, pool):
    # Every parameter random (biases, norms, the classifier's learned position table too), so a
    # missing bias, a skipped norm or the wrong position table shows; only their shapes come from init.
    encoder = dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=4)
    cfg = dict(name=name, image_size=16, in_channels=3, encoder=encoder, pool=pool, num_classes=10)
    if name == "mae":
        del cfg["pool"], cfg["num_classes"]
        cfg["decoder"] = dict(width=32, depth=1, num_heads=2)
    model = models.build_model(cfg)
    rngs = {"params": jax.random.key(0), "masking": jax.random.key(1)}
    shapes = jax.eval_shape(model.init, rngs, jnp.zeros((2, 16, 16, 3)))["params"]
    leaves, treedef = jax.tree.flatten(shapes)
    rng = np.random.default_rng(0)
    params = jax.tree.unflatten(
        treedef, [jnp.asarray(0.3 * rng.normal(size=v.shape), jnp.float32) for v in leaves]
    )
    x = rng.normal(size=(3, 16, 16, 3)).astype(np.float32)
    kwargs = {"pool": pool} if name == "mae" else {}
    feats = jax.jit(lambda p: model.apply({"params": p}, x, method=model.features, **kwargs))(params)
    # MAE: the final norm, then cls or the mean of the 16 patch tokens. The classifier's 'avg' drops
    # the final norm and normalises the mean with fc_norm (official fine-tuning).
    final_norm = name == "mae" or pool == "cls"
    tokens, (norm, p) = numpy_vit_encoder(params["encoder"], x.astype(np.float64), 4, 2, final_norm)
    assert tokens.shape == (3, 1 + 16, 32)
    if pool == "cls":
        expected = tokens[:, 0]
    else:
        expected = tokens[:, 1:].mean(axis=1)
        if name == "classifier":
            expected = norm(expected, jax.tree.map(lambda v: np.asarray(v, np.float64), params["fc_norm"]))
    assert feats.shape == (3, 32)
    np.testing.assert_allclose(feats, expected, rtol=1e-4, atol=1e-4)
