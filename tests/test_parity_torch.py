"""maejax MAE == the official model (HF ViTMAEForPreTraining), number for number.

Same random weights (through `convert.params_from_torch`), same images, same
`noise`: the mask must be identical, pred and loss within 1e-5 relative and
every trainable parameter's gradient within 1e-4 relative, where relative
means max|a - b| / max|b| over a tensor.
"""

import jax
import numpy as np
import pytest
import torch

from maejax import convert, models
from tests import torch_reference

SIZES = {
    # in_channels=1, patch 4, mask 0.6, norm-pix on, several heads.
    "gray_p4_m60": dict(
        image_size=32,
        in_channels=1,
        encoder=dict(width=64, depth=2, num_heads=4, mlp_dim=256, patch_size=4),
        decoder=dict(width=32, depth=2, num_heads=2, mlp_dim=128),
        mask_ratio=0.6,
        norm_pix_loss=True,
    ),
    # RGB, patch 8, mask 0.75, pixel targets, an MLP that is not 4x wide.
    "rgb_p8_m75": dict(
        image_size=48,
        in_channels=3,
        encoder=dict(width=48, depth=3, num_heads=3, mlp_dim=96, patch_size=8),
        decoder=dict(width=64, depth=1, num_heads=4, mlp_dim=64),
        mask_ratio=0.75,
        norm_pix_loss=False,
    ),
    # A real variant from the table (ViT-Ti, 12 blocks), patch 16, mask 0.9.
    "ti16_m90": dict(
        image_size=64,
        in_channels=3,
        encoder=dict(variant="Ti/16"),
        decoder=dict(width=128, depth=2, num_heads=4),
        mask_ratio=0.9,
        norm_pix_loss=True,
    ),
}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def run_both(cfg, batch=3, seed=0):
    torch_model = torch_reference.hf_model(cfg, seed=seed)
    params = convert.params_from_torch(torch_reference.official_state_dict(torch_model), cfg)
    model = models.build_model(cfg)
    rng = np.random.default_rng(seed)
    size, channels = cfg["image_size"], cfg["in_channels"]
    images = rng.normal(size=(batch, size, size, channels)).astype(np.float32)
    noise = rng.uniform(size=(batch, model.num_patches)).astype(np.float32)
    ref = torch_reference.forward(torch_model, images, noise)
    out = jax.jit(lambda p, x, n: model.apply({"params": p}, x, noise=n, train=False))(params, images, noise)
    return torch_model, model, params, images, noise, ref, out


@pytest.mark.slow
@pytest.mark.parametrize("size", sorted(SIZES))
def test_forward_matches_official_model(size):
    _, _, _, _, _, ref, out = run_both(SIZES[size])
    np.testing.assert_array_equal(np.asarray(out["mask"]), ref.mask.numpy())
    assert rel_err(out["pred"], ref.logits.detach().numpy()) < 1e-5
    assert rel_err(out["loss"], ref.loss.detach().numpy()) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("size", sorted(SIZES))
def test_gradients_match_official_model(size):
    cfg = SIZES[size]
    torch_model, model, params, images, noise, ref, _ = run_both(cfg)
    ref.loss.backward()
    expected = torch_reference.official_grads(torch_model)

    def loss_fn(p):
        return model.apply({"params": p}, images, noise=noise, train=False)["loss"]

    grads = convert.params_to_torch(jax.jit(jax.grad(loss_fn))(params), cfg)
    trainable = {k for k in grads if k not in ("pos_embed", "decoder_pos_embed")}
    assert trainable == set(expected), set(expected) ^ trainable
    errors = {k: rel_err(grads[k], expected[k]) for k in sorted(trainable)}
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-4, (worst, errors[worst])


def test_sincos_tables_equal_the_references():
    torch_model = torch_reference.hf_model(SIZES["gray_p4_m60"])
    state = torch_reference.official_state_dict(torch_model)
    tables = convert.fixed_tables(models.resolve(SIZES["gray_p4_m60"]))
    for name in ("pos_embed", "decoder_pos_embed"):
        np.testing.assert_allclose(tables[name], state[name].numpy(), atol=1e-6, rtol=0)


def test_the_official_table_puts_columns_in_the_first_half():
    # Patch 1 is row 0, column 1: only the first half (column coordinate) changes.
    table = convert.fixed_tables(models.resolve(SIZES["gray_p4_m60"]))["pos_embed"][0]
    half = table.shape[1] // 2
    assert not np.allclose(table[1, :half], table[2, :half])
    np.testing.assert_allclose(table[1, half:], table[2, half:])


def test_torch_tensors_and_the_model_wrapper_are_accepted():
    cfg = SIZES["rgb_p8_m75"]
    state = torch_reference.official_state_dict(torch_reference.hf_model(cfg))
    from_numpy = convert.params_from_torch({k: v.numpy() for k, v in state.items()}, cfg)
    from_wrapped_tensors = convert.params_from_torch({"model": state, "epoch": 3}, cfg)
    jax.tree.map(np.testing.assert_array_equal, from_numpy, from_wrapped_tensors)
    assert isinstance(state["cls_token"], torch.Tensor)


def test_vit_b_has_the_reference_parameter_count():
    # HF's default ViTMAEConfig is the official ViT-B/16 with the dec512d8b decoder.
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    with torch.device("meta"):
        reference = ViTMAEForPreTraining(ViTMAEConfig())
    expected = sum(p.numel() for p in reference.parameters() if p.requires_grad)
    model = models.build_model({"encoder": {"variant": "B/16"}})
    images = jax.ShapeDtypeStruct((1, 224, 224, 3), np.float32)
    rngs = {"params": jax.random.key(0), "masking": jax.random.key(0)}
    shapes = jax.eval_shape(model.init, rngs, images)["params"]
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == expected
