"""Weight conversion: exact round trips, official files, clear errors, the CLI."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import torch

from maejax import checkpoint, convert, models, weights_io
from maejax.errors import UserError
from tests import torch_reference

CFG = dict(
    image_size=32,
    in_channels=1,
    encoder=dict(width=64, depth=2, num_heads=4, patch_size=4),
    decoder=dict(width=32, depth=2, num_heads=2),
    norm_pix_loss=True,
)


@pytest.fixture(scope="module")
def official():
    return {
        k: v.numpy() for k, v in torch_reference.official_state_dict(torch_reference.hf_model(CFG)).items()
    }


def maejax_params(seed=0):
    model = models.build_model(CFG)
    x = np.zeros((1, 32, 32, 1), np.float32)
    rngs = {"params": jax.random.key(seed), "masking": jax.random.key(1)}
    return jax.tree.map(np.asarray, jax.jit(model.init)(rngs, x)["params"])


def test_torch_to_maejax_to_torch_is_exact(official):
    back = convert.params_to_torch(convert.params_from_torch(official, CFG), CFG)
    assert set(back) == set(official)
    for name, value in official.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


@pytest.mark.slow
def test_maejax_to_torch_to_maejax_is_exact():
    params = maejax_params()
    back = convert.params_from_torch(convert.params_to_torch(params, CFG), CFG)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, back, params)


@pytest.mark.slow
def test_written_state_dict_loads_strictly_into_the_reference():
    reference = torch_reference.hf_model(CFG)
    written = torch_reference.official_to_hf(convert.params_to_torch(maejax_params(), CFG))
    reference.load_state_dict(written, strict=True)
    np.testing.assert_array_equal(
        reference.vit.layers[1].attention.k_proj.weight.detach().numpy(),
        np.split(maejax_params()["encoder"]["blocks_1"]["attn"]["qkv"]["kernel"].T, 3)[1],
    )


def test_encoder_only_checkpoint_gives_encoder_params(official, caplog):
    encoder_only = {k: v for k, v in official.items() if not k.startswith(("decoder", "mask_token"))}
    params = convert.params_from_torch(encoder_only, CFG)
    assert set(params) == {"encoder"}
    assert "no decoder weights" in caplog.text
    assert set(convert.params_to_torch(params, CFG)) == set(encoder_only)


def test_deeper_checkpoint_is_refused_with_the_extra_blocks_named(official):
    deeper = dict(official)
    for name, value in official.items():
        if name.startswith("blocks.1."):
            deeper[name.replace("blocks.1.", "blocks.2.")] = value
    with pytest.raises(UserError, match=r"blocks\.2-2\.\*"):
        convert.params_from_torch(deeper, CFG)


def test_missing_and_misshapen_tensors_are_named(official):
    missing = {k: v for k, v in official.items() if k != "blocks.0.attn.qkv.weight"}
    with pytest.raises(UserError, match="lacks 1 tensors"):
        convert.params_from_torch(missing, CFG)
    with pytest.raises(UserError, match=r"patch_embed\.proj\.weight has shape \(64, 1, 4, 4\)"):
        convert.params_from_torch(official, {**CFG, "in_channels": 3})


def test_learned_position_tables_are_refused(official):
    other = dict(official, pos_embed=official["pos_embed"] + 0.5)
    with pytest.raises(UserError, match="pos_embed differs from the fixed 2-D sin-cos table"):
        convert.params_from_torch(other, CFG)


class _RunsCode:
    """Unpickling this would create a file: the safe loader must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickles_that_run_code_are_refused(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"cls_token": torch.zeros(1)}, "x": _RunsCode(str(marker))}, path)
    with pytest.raises(UserError, match="refusing to load"):
        weights_io.load_torch_checkpoint(str(path))
    assert not marker.exists()


CONFIG_FILE = textwrap.dedent(
    """
    from maejax.config import base_config

    def get_config(arg=None):
        c = base_config()
        c.model.image_size = 32
        c.model.in_channels = 1
        c.model.encoder.width = 64
        c.model.encoder.depth = 2
        c.model.encoder.num_heads = 4
        c.model.encoder.patch_size = 4
        c.model.decoder.width = 32
        c.model.decoder.depth = 2
        c.model.decoder.num_heads = 2
        c.model.norm_pix_loss = True
        return c
    """
)


def run_convert(*args):
    """`python -m maejax.convert ARGS` on CPU, never reaching for the hub."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "maejax.convert", *args], capture_output=True, text=True, env=env, timeout=600
    )


@pytest.mark.slow
def test_cli_writes_params_and_config(tmp_path, official):
    config = tmp_path / "tiny.py"
    config.write_text(CONFIG_FILE)
    pth = tmp_path / "mae_full.pth"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in official.items()}}, pth)
    workdir = tmp_path / "converted"
    result = run_convert(f"--torch_checkpoint={pth}", f"--config={config}", f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr
    restored = checkpoint.load_params_dir(str(workdir / "params"))
    jax.tree.map(np.testing.assert_array_equal, restored, convert.params_from_torch(official, CFG))
    assert (workdir / "config.json").exists()

    # The same file against a config of another size: one line, exit code 2.
    result = run_convert(
        f"--torch_checkpoint={pth}",
        f"--config={config}",
        f"--workdir={tmp_path / 'bad'}",
        "--config.model.encoder.depth=3",
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("maejax: error: checkpoint lacks") and "blocks.2-2.*" in last
