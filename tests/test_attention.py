"""Attention: the padded cuDNN path equals plain attention; the default path equals the library's.

On CPU the padded path runs through XLA (`implementation='xla'`), which
honours the same sequence-length arguments cuDNN does; the last tests compare
cuDNN itself with XLA and run only where a GPU is present.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maejax import models
from maejax.models import attention as attn

# ViT lengths: 1 + 7^2 (the MAE encoder's visible tokens at 224 px), 1 + 8^2, 1 + 14^2, 1 + 16^2.
LENGTHS = (50, 65, 197, 257)
# (queries, keys/values) as cross attention has them: DiffMAE's masked tokens attend to the
# encoder's visible ones (147 of 196 masked at 224 px, 49 + cls visible), and the reverse shapes.
CROSS_LENGTHS = ((147, 50), (50, 197), (65, 17))
on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN needs an NVIDIA GPU")


def qkv(q_len, kv_len, dtype=jnp.float32, batch=2, heads=2, head_dim=16, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(batch, q_len, heads, head_dim)] + 2 * [(batch, kv_len, heads, head_dim)]
    return [jnp.asarray(rng.standard_normal(shape, np.float32), dtype) for shape in shapes]


def value_and_grads(fn, q, k, v):
    """fn's output and the gradients of <fn(q, k, v), R> w.r.t. q, k, v (R a fixed random cotangent)."""
    out = fn(q, k, v)
    cotangent = np.random.default_rng(7).standard_normal(out.shape, np.float32)
    loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * cotangent)  # noqa: E731
    return out, jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def compare(fn, reference, q, k, v):
    """(fn's, reference's) outputs and gradients, both from one compiled program."""
    return jax.jit(lambda *a: (value_and_grads(fn, *a), value_and_grads(reference, *a)))(q, k, v)


def plain(implementation=None):
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=implementation)


def assert_all_close(actual, expected, rtol, atol):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(e, np.float32), rtol=rtol, atol=atol)


def assert_close_in_norm(actual, expected, tolerance):
    """Each leaf within `tolerance` of the expected one, relative to its norm (bfloat16 rounding)."""
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        a, e = np.asarray(a, np.float32), np.asarray(e, np.float32)
        assert np.linalg.norm(a - e) <= tolerance * np.linalg.norm(e), (a.shape, np.linalg.norm(a - e))


@pytest.mark.parametrize("lengths", [(n, n) for n in LENGTHS] + list(CROSS_LENGTHS))
def test_padded_attention_equals_unpadded_forward_and_gradients(lengths):
    q, k, v = qkv(*lengths)
    actual, expected = compare(lambda *a: attn.padded_attention(*a, "xla"), plain(), q, k, v)
    assert actual[0].shape == q.shape
    assert_all_close(actual, expected, rtol=1e-5, atol=1e-6)


def xla_kernel(calls):
    """A stand-in for the cuDNN kernel on CPU: records (T, S, kwargs), then computes through XLA."""

    def kernel(q, k, v, **kwargs):
        calls.append((q.shape[1], k.shape[1], kwargs))
        return jax.nn.dot_product_attention(q, k, v, **{**kwargs, "implementation": "xla"})

    return kernel


def test_padding_reaches_the_kernel_as_sequence_lengths_not_a_mask(monkeypatch):
    calls = []
    monkeypatch.setattr(attn, "_dot_product_attention", xla_kernel(calls))
    jax.eval_shape(lambda *a: attn.attention(*a, "cudnn"), *qkv(197, 50))
    ((q_len, kv_len, kwargs),) = calls
    assert (q_len, kv_len) == (256, 64)
    assert kwargs["implementation"] == "cudnn"
    assert "mask" not in kwargs and "bias" not in kwargs
    assert kwargs["query_seq_lengths"].shape == kwargs["key_value_seq_lengths"].shape == (2,)

    calls.clear()
    jax.eval_shape(lambda *a: attn.attention(*a, "cudnn"), *qkv(128, 64))
    # Already multiples of 64: the kernel gets the call as it was.
    assert calls == [(128, 64, {"implementation": "cudnn"})]


@pytest.mark.parametrize(
    "length,multiple,expected", [(197, 64, 256), (50, 64, 64), (64, 64, 64), (65, 2, 66)]
)
def test_padded_length_is_the_next_multiple(length, multiple, expected):
    assert attn.padded_length(length, multiple) == expected


def packed(q, k, v):
    """Self-attention's packed path: queries, keys and values in one (B, T, 3, H, d) array."""
    return attn.self_attention(jnp.stack([q, k, v], axis=2))


@pytest.mark.parametrize("lengths", [(n, n) for n in LENGTHS] + list(CROSS_LENGTHS))
def test_the_default_path_on_cpu_equals_the_library_forward_and_gradients(lengths):
    q, k, v = qkv(*lengths)
    actual, expected = compare(attn.attention, plain(), q, k, v)
    assert_all_close(actual, expected, rtol=1e-5, atol=2e-6)
    if lengths[0] == lengths[1]:
        actual, expected = compare(packed, plain(), q, k, v)
        assert_all_close(actual, expected, rtol=1e-5, atol=2e-6)


def test_the_default_path_on_cpu_keeps_bfloat16_and_its_accuracy():
    q, k, v = qkv(197, 197, dtype=jnp.bfloat16)
    for fn in (attn.attention, packed):
        actual, expected = compare(fn, plain(), q, k, v)
        assert actual[0].dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in actual[1])
        assert_close_in_norm(actual, expected, 1e-2)


def test_off_cpu_the_default_path_is_the_library_call(monkeypatch):
    calls = []
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, **kw: calls.append(kw) or a[0])
    q, k, v = qkv(17, 17)
    attn.attention(q, k, v)
    packed(q, k, v)
    assert calls == [{"implementation": None}] * 2


MAE_TINY = dict(
    image_size=32,  # 8 x 8 patches: the encoder sees 1 + 16 tokens, the decoder 1 + 64
    in_channels=1,
    encoder=dict(variant="mu/4"),
    decoder=dict(width=32, depth=1, num_heads=2),
)
DIFFMAE_TINY = dict(
    name="diffmae",
    image_size=28,  # 7 x 7 patches: 1 + 12 visible and 37 masked tokens ('joint': 50 together)
    in_channels=1,
    encoder=dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=4),
    decoder=dict(width=32, depth=1, num_heads=2, mlp_dim=64),
    diffusion=dict(timesteps=100),
)


def diffmae_tiny(**decoder):
    return {**DIFFMAE_TINY, "decoder": {**DIFFMAE_TINY["decoder"], **decoder}}


def models_compared(cfg, other):
    """((loss, pred), parameter gradients) of the model cfg describes and of other's, same params."""
    model, other_model = models.build_model(cfg), models.build_model(other)
    rng = np.random.default_rng(4)
    size, channels = model.image_size, cfg.get("in_channels", 3)
    images = jnp.asarray(rng.uniform(size=(2, size, size, channels)), jnp.float32)
    # Inputs from NumPy, not jax.random, so the test compiles one program (the two models) only.
    inputs = {"noise": jnp.asarray(rng.uniform(size=(2, model.num_patches)), jnp.float32)}
    if cfg.get("name") == "diffmae":
        masked = (2, model.num_patches - model.num_visible, model.patch_dim)
        inputs["t"] = jnp.asarray(rng.integers(0, model.timesteps, 2), jnp.int32)
        inputs["eps"] = jnp.asarray(rng.standard_normal(masked), jnp.float32)
    # Random parameters, not the initialisation: nothing to compile, and no zero-initialised
    # adaLN gate that would hide the attention output from the comparison.
    shapes = jax.eval_shape(model.init, {"params": jax.random.key(0)}, images, **inputs)["params"]
    params = jax.tree.map(lambda x: jnp.asarray(0.2 * rng.standard_normal(x.shape), jnp.float32), shapes)

    def run(m, p):
        def loss(p):
            out = m.apply({"params": p}, images, **inputs)
            return out["loss"], out["pred"]

        return jax.value_and_grad(loss, has_aux=True)(p)

    return jax.jit(lambda p: (run(model, p), run(other_model, p)))(params)


# Each tiny model with its number of attention calls: MAE's one encoder and one decoder block;
# DiffMAE's two encoder blocks and one decoder block of each kind (cross_self has two).
MODELS = {
    "mae": (MAE_TINY, 2),
    "diffmae_cross_self": (diffmae_tiny(), 4),
    "diffmae_joint": (diffmae_tiny(variant="joint"), 3),
    "diffmae_cross_adaln": (diffmae_tiny(variant="cross", adaln=True), 3),
}


@pytest.mark.parametrize("name", MODELS)
def test_every_attention_of_a_cudnn_model_is_padded_and_none_of_the_default(name, monkeypatch):
    cfg, expected_calls = MODELS[name]
    calls = []
    monkeypatch.setattr(attn, "_dot_product_attention", xla_kernel(calls))
    for impl in ("xla", "cudnn"):
        model = models.build_model({**cfg, "attention_impl": impl})
        size = model.image_size
        images = jnp.zeros((2, size, size, cfg["in_channels"]))
        rngs = {"params": jax.random.key(0), "masking": jax.random.key(1), "diffusion": jax.random.key(2)}
        jax.eval_shape(model.init, rngs, images)  # traces, compiles nothing
        if impl == "xla":
            assert calls == []
    assert len(calls) == expected_calls
    for q_len, kv_len, kwargs in calls:  # no tiny-model length is a multiple of 64
        assert q_len % 64 == 0 and kv_len % 64 == 0
        assert {"query_seq_lengths", "key_value_seq_lengths"} <= set(kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_a_cudnn_model_equals_the_default_one_with_the_kernel_run_by_xla(name, monkeypatch):
    cfg, _ = MODELS[name]
    monkeypatch.setattr(attn, "_dot_product_attention", xla_kernel([]))
    actual, expected = models_compared({**cfg, "attention_impl": "cudnn"}, cfg)
    assert_all_close(actual, expected, rtol=1e-5, atol=1e-6)


@on_gpu
@pytest.mark.parametrize("lengths", [(n, n) for n in LENGTHS] + list(CROSS_LENGTHS))
def test_cudnn_matches_xla_in_bfloat16_forward_and_gradients(lengths):
    q, k, v = qkv(*lengths, dtype=jnp.bfloat16, batch=4, heads=4, head_dim=64)
    actual, expected = compare(lambda *a: attn.attention(*a, "cudnn"), plain("xla"), q, k, v)
    assert actual[0].dtype == jnp.bfloat16
    assert_close_in_norm(actual, expected, 2e-2)


@on_gpu
def test_a_bfloat16_cudnn_mae_trains_at_224_pixels_like_xla():
    cfg = dict(image_size=224, in_channels=3, encoder=dict(variant="mu/16"), dtype="bfloat16")
    cfg["decoder"] = dict(width=64, depth=1, num_heads=2)  # head dim 32: cuDNN needs a multiple of 8
    actual, expected = models_compared({**cfg, "attention_impl": "cudnn"}, cfg)
    assert_close_in_norm(actual, expected, 5e-2)
