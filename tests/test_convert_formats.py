"""Weights in every form: .pth, .safetensors, HuggingFace folders (all naming schemes), exports, the CLI.

Every round trip is exact (each trainable tensor equal); an HF model and
maejax given the same weights, images and noise agree as in
test_parity_torch.py (pred and loss within 1e-5 relative).
"""

import functools
import json
import logging
import os
import re
import sys
import types
import warnings

import jax
import ml_collections
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from transformers import ViTMAEForPreTraining

from maejax import checkpoint, convert, convert_cli, hf_format, models, weights_io
from maejax.config import base_config
from maejax.errors import ConfigError, UserError
from tests import torch_reference
from tests.test_convert import run_convert

CFG = dict(
    image_size=16,
    in_channels=1,
    encoder=dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=4),
    decoder=dict(width=16, depth=2, num_heads=2, mlp_dim=48),
    mask_ratio=0.75,
    norm_pix_loss=True,
)
TABLES = ("pos_embed", "decoder_pos_embed")


@pytest.fixture(scope="module")
def hf_model():
    return torch_reference.hf_model(CFG, seed=3)


@pytest.fixture(scope="module")
def official(hf_model):
    return {k: v.numpy() for k, v in torch_reference.official_state_dict(hf_model).items()}


@pytest.fixture(scope="module")
def params(official):
    return convert.params_from_torch(official, CFG)


def assert_same_params(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@functools.cache
def maejax_forward():
    model = models.build_model(CFG)
    return jax.jit(lambda p, x, n: model.apply({"params": p}, x, noise=n, train=False))


def images_and_noise(batch=2, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch, 16, 16, 1)).astype(np.float32)
    noise = rng.uniform(size=(batch, 16)).astype(np.float32)
    return images, noise


def assert_same_outputs(hf, params):
    images, noise = images_and_noise()
    ref = torch_reference.forward(hf, images, noise)
    out = maejax_forward()(params, images, noise)
    np.testing.assert_array_equal(np.asarray(out["mask"]), ref.mask.numpy())
    assert rel_err(out["pred"], ref.logits.detach().numpy()) < 1e-5
    assert rel_err(out["loss"], ref.loss.detach().numpy()) < 1e-5


# --- official names: .pth and .safetensors --------------------------------------------


def test_pth_to_maejax_to_safetensors_to_maejax_is_exact(tmp_path, official, params):
    pth = tmp_path / "mae_full.pth"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in official.items()}, "epoch": 7}, pth)
    from_pth = convert.params_from_torch(weights_io.load_weights_file(str(pth)), CFG)
    assert_same_params(from_pth, params)

    exported = tmp_path / "out" / "mae.safetensors"
    weights_io.write_weights_file(convert.params_to_torch(from_pth, CFG), str(exported))
    written = safetensors.numpy.load_file(str(exported))
    assert set(written) == set(official)  # the fixed tables too: the official code loads them
    for name, value in official.items():
        np.testing.assert_array_equal(written[name], value, err_msg=name)
    assert_same_params(convert.params_from_torch(weights_io.load_weights_file(str(exported)), CFG), params)


def test_exported_pth_holds_the_official_wrapper(tmp_path, official, params):
    path = tmp_path / "mae.pth"
    weights_io.write_weights_file(convert.params_to_torch(params, CFG), str(path))
    saved = torch.load(path, weights_only=True)
    assert set(saved) == {"model"} and set(saved["model"]) == set(official)
    for name, value in official.items():
        np.testing.assert_array_equal(saved["model"][name].numpy(), value, err_msg=name)
    with pytest.raises(UserError, match=r"--export=.*mae\.npz: name a file ending in \.pth"):
        weights_io.write_weights_file({}, str(tmp_path / "mae.npz"))


def test_bfloat16_safetensors_are_widened_and_bad_files_named(tmp_path, official, params):
    path = tmp_path / "bf16.safetensors"
    safetensors.torch.save_file({k: torch.from_numpy(v).bfloat16() for k, v in official.items()}, str(path))
    loaded = weights_io.load_weights_file(str(path))
    assert loaded["cls_token"].dtype == np.float32
    expected = torch.from_numpy(official["blocks.1.mlp.fc1.weight"]).bfloat16().float().numpy()
    np.testing.assert_array_equal(loaded["blocks.1.mlp.fc1.weight"], expected)

    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(UserError, match=r"cannot read .*cut\.safetensors .*truncated or not a safetensors"):
        weights_io.load_weights_file(str(truncated))
    with pytest.raises(UserError, match="no such file"):
        weights_io.load_weights_file(str(tmp_path / "missing.safetensors"))


# --- HuggingFace folders --------------------------------------------------------------

# transformers 5 module names -> the 4.x names of the hub's files, written out here on
# purpose (not with maejax.hf_format) so the test checks the map, not itself.
TO_TRANSFORMERS4 = [
    (r"^vit\.layers\.", "vit.encoder.layer."),
    (r"\.attention\.q_proj\.", ".attention.attention.query."),
    (r"\.attention\.k_proj\.", ".attention.attention.key."),
    (r"\.attention\.v_proj\.", ".attention.attention.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
]


def transformers4_name(name: str) -> str:
    for pattern, repl in TO_TRANSFORMERS4:
        name = re.sub(pattern, repl, name)
    return name


def write_folder(folder, config_json: dict, tensors: dict, filename="model.safetensors"):
    os.makedirs(folder, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_json))
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    if filename.endswith(".bin"):
        torch.save(tensors, folder / filename)
    else:
        safetensors.torch.save_file(tensors, str(folder / filename), metadata={"format": "pt"})
    return str(folder)


@pytest.fixture(scope="module")
def saved_pretrained(hf_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "save_pretrained"
    hf_model.save_pretrained(folder)
    return str(folder)


def test_a_save_pretrained_folder_gives_the_hf_models_outputs(hf_model, saved_pretrained):
    state, model = weights_io.read_hf_folder(saved_pretrained)
    resolved = models.resolve(model)
    for field in ("name", *hf_format.MODEL_FIELDS):
        assert hf_format.model_field(resolved, field) == hf_format.model_field(models.resolve(CFG), field)
    assert_same_outputs(hf_model, convert.params_from_torch(state, resolved))


def test_every_hf_naming_scheme_gives_identical_params(hf_model, saved_pretrained, params, tmp_path):
    config_json = json.loads(open(os.path.join(saved_pretrained, "config.json")).read())
    modules = dict(hf_model.state_dict())  # transformers 5 module names
    hub = {transformers4_name(k): v for k, v in modules.items()}
    assert "decoder.decoder_layers.1.attention.attention.query.weight" in hub
    folders = {
        "save_pretrained": saved_pretrained,
        "transformers5": write_folder(tmp_path / "v5", config_json, modules),
        "transformers4": write_folder(tmp_path / "v4", config_json, hub),
        "transformers4_bin": write_folder(tmp_path / "bin", config_json, hub, "pytorch_model.bin"),
    }
    for scheme, folder in folders.items():
        state, model = weights_io.read_hf_folder(folder)
        assert_same_params(convert.params_from_torch(state, models.resolve(model)), params)
        assert not any(k.startswith(("vit.", "decoder.")) for k in state), scheme
    # The same file through --torch_checkpoint: HF names are recognised there too.
    file_state = weights_io.load_weights_file(os.path.join(folders["transformers4"], "model.safetensors"))
    assert_same_params(convert.params_from_torch(weights_io.with_official_names(file_state), CFG), params)


def test_hf_folders_that_do_not_fit_are_refused_in_one_line(saved_pretrained, tmp_path, hf_model):
    config_json = json.loads(open(os.path.join(saved_pretrained, "config.json")).read())
    modules = dict(hf_model.state_dict())
    no_k = {k: v for k, v in modules.items() if k != "vit.layers.1.attention.k_proj.bias"}
    with pytest.raises(UserError, match=r"has q, v but not k for blocks\.1\.attn\.qkv\.bias"):
        weights_io.read_hf_folder(write_folder(tmp_path / "no_k", config_json, no_k))
    vit = dict(config_json, model_type="vit")
    with pytest.raises(UserError, match="is a 'vit' config, not 'vit_mae'"):
        weights_io.read_hf_folder(write_folder(tmp_path / "vit", vit, modules))
    with pytest.raises(UserError, match="holds none of model.safetensors"):
        os.makedirs(tmp_path / "empty")
        (tmp_path / "empty" / "config.json").write_text(json.dumps(config_json))
        weights_io.read_hf_folder(str(tmp_path / "empty"))
    learned = dict(modules)
    learned["vit.embeddings.position_embeddings"] = modules["vit.embeddings.position_embeddings"] + 0.5
    state, model = weights_io.read_hf_folder(write_folder(tmp_path / "learned", config_json, learned))
    with pytest.raises(UserError, match="pos_embed differs from the fixed 2-D sin-cos table"):
        convert.params_from_torch(state, models.resolve(model))


def test_a_config_that_disagrees_with_the_folder_is_refused_naming_the_field(saved_pretrained):
    _, model = weights_io.read_hf_folder(saved_pretrained)
    from_hf = models.resolve(model)
    hf_format.check_same_model(models.resolve(CFG), from_hf, "--hf=X")  # agrees: no error
    deeper = {**CFG, "encoder": {**CFG["encoder"], "depth": 3}}
    with pytest.raises(ConfigError, match=r"config\.model\.encoder\.depth=3 .*num_hidden_layers=2"):
        hf_format.check_same_model(models.resolve(deeper), from_hf, "--hf=X")
    with pytest.raises(ConfigError, match=r"config\.model\.norm_pix_loss=False"):
        hf_format.check_same_model(models.resolve({**CFG, "norm_pix_loss": False}), from_hf, "--hf=X")


def test_a_hub_id_without_the_hub_says_what_to_do(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError, match=r"fetching it from the hub failed .*pass --hf=DIR"):
        weights_io.hf_folder("facebook/vit-mae-base")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(UserError, match=r"pip install huggingface_hub, or download it .*--hf=DIR"):
        weights_io.hf_folder("facebook/vit-mae-base")
    with pytest.raises(UserError, match="not a folder"):
        weights_io.hf_folder(str(tmp_path / "no" / "such" / "folder"))


# --- HuggingFace export -----------------------------------------------------------------


def test_export_hf_loads_strictly_in_transformers_and_predicts_the_same(
    tmp_path, hf_model, params, caplog, monkeypatch
):
    folder = tmp_path / "exported"
    resolved = models.resolve(CFG)
    weights_io.write_hf_folder(convert.params_to_torch(params, resolved), resolved, str(folder))
    names = set(safetensors.numpy.load_file(str(folder / "model.safetensors")))
    assert "vit.encoder.layer.1.attention.attention.value.weight" in names  # the hub's names
    # transformers logs its load report (missing, unexpected keys) as a warning of its own
    # logger, which does not propagate to pytest's handler unless told to.
    monkeypatch.setattr(logging.getLogger("transformers"), "propagate", True)
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as python_warnings:
        warnings.simplefilter("always")
        loaded, info = ViTMAEForPreTraining.from_pretrained(str(folder), output_loading_info=True)
    assert not any(info.values()), info
    assert not [r for r in caplog.records if r.name.startswith("transformers")], caplog.text
    assert not [w for w in python_warnings if w.category is not DeprecationWarning], python_warnings
    for name, value in hf_model.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[name].numpy(), value.numpy(), err_msg=name)
    assert_same_outputs(loaded.eval(), params)
    assert weights_io.read_hf_folder(str(folder))[1]["mask_ratio"] == CFG["mask_ratio"]


def test_export_hf_refuses_what_vitmae_cannot_hold(tmp_path, official):
    encoder_only = {k: v for k, v in official.items() if not k.startswith(("decoder", "mask_token"))}
    with pytest.raises(UserError, match="encoder-only weights: use --export=FILE.pth"):
        weights_io.write_hf_folder(encoder_only, models.resolve(CFG), str(tmp_path / "x"))
    classifier = models.resolve({**CFG, "name": "classifier"})
    with pytest.raises(UserError, match="this is a 'classifier' model"):
        weights_io.write_hf_folder(official, classifier, str(tmp_path / "x"))


# --- the CLI --------------------------------------------------------------------------


def cli_flags(**given):
    names = ("torch_checkpoint", "hf", "workdir", "from_workdir", "export", "export_hf", "config")
    return types.SimpleNamespace(**{n: given.get(n) for n in names})


@pytest.mark.parametrize(
    "given, message",
    [
        ({}, "give one of --torch_checkpoint, --hf .* got none"),
        ({"hf": "a", "torch_checkpoint": "b", "workdir": "w"}, "got --torch_checkpoint, --hf"),
        ({"hf": "a"}, "--hf needs --workdir"),
        ({"hf": "a", "workdir": "w", "export": "x.pth"}, "read --from_workdir"),
        ({"from_workdir": "w"}, "--from_workdir needs --export"),
    ],
)
def test_flag_combinations_are_checked(given, message):
    with pytest.raises(UserError, match=message):
        convert_cli.check_flags(cli_flags(**given))


def test_import_without_a_config_takes_the_folders_and_export_checks_it(tmp_path, saved_pretrained, params):
    workdir = str(tmp_path / "imported")
    convert_cli.import_weights(cli_flags(hf=saved_pretrained, workdir=workdir))
    assert_same_params(checkpoint.load_params_dir(os.path.join(workdir, "params")), params)
    written = json.loads(open(os.path.join(workdir, "config.json")).read())["model"]
    assert written["encoder"]["depth"] == 2 and written["decoder"]["mlp_dim"] == 48
    assert written["norm_pix_loss"] is True

    config = base_config()
    config.model = ml_collections.ConfigDict(models.resolve({**CFG, "image_size": 32}).to_dict())
    with pytest.raises(ConfigError, match=r"config\.model\.image_size=32 .*config\.json has 16"):
        convert_cli.export_weights(
            cli_flags(from_workdir=workdir, export=str(tmp_path / "x.pth"), config=config)
        )


CONFIG_FILE = """
from maejax.config import base_config

def get_config(arg=None):
    c = base_config()
    c.model.image_size = 16
    c.model.in_channels = 1
    c.model.encoder.variant = None
    c.model.encoder.width = 32
    c.model.encoder.depth = 2
    c.model.encoder.num_heads = 2
    c.model.encoder.mlp_dim = 64
    c.model.encoder.patch_size = 4
    c.model.decoder.width = 16
    c.model.decoder.depth = 2
    c.model.decoder.num_heads = 2
    c.model.decoder.mlp_dim = 48
    c.model.norm_pix_loss = True
    return c
"""


@pytest.mark.slow
def test_cli_imports_a_folder_and_exports_every_form(tmp_path, saved_pretrained, official, params):
    config = tmp_path / "tiny.py"
    config.write_text(CONFIG_FILE)
    workdir = tmp_path / "imported"
    result = run_convert(f"--hf={saved_pretrained}", f"--config={config}", f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr
    assert_same_params(checkpoint.load_params_dir(str(workdir / "params")), params)

    exported, hf_dir = tmp_path / "mae.safetensors", tmp_path / "hf"
    result = run_convert(f"--from_workdir={workdir}", f"--export={exported}", f"--export_hf={hf_dir}")
    assert result.returncode == 0, result.stderr
    written = safetensors.numpy.load_file(str(exported))
    assert set(written) == set(official)
    for name, value in official.items():
        np.testing.assert_array_equal(written[name], value, err_msg=name)
    state, model = weights_io.read_hf_folder(str(hf_dir))
    assert_same_params(convert.params_from_torch(state, models.resolve(model)), params)

    # A --config of another size: one line naming the field, exit code 2.
    result = run_convert(
        f"--hf={saved_pretrained}",
        f"--config={config}",
        f"--workdir={tmp_path / 'bad'}",
        "--config.model.encoder.depth=3",
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("maejax: error: config.model.encoder.depth=3 is invalid"), last
