"""maejax.plan: the pod dry run compiles the real step on forced CPU devices and estimates the target.

The CLI runs in a subprocess (it forces its own device count, which a
process can do only before JAX starts); the estimate's formula, the flag
checks and the report are pure functions tested in-process.
"""

import json
import os
import subprocess
import sys

import jax
import pytest

from maejax import models, plan, plan_memory
from maejax.errors import ConfigError, UserError
from maejax.recipes import diffmae_pretrain_imagenet, fmnist_pretrain, mae_pretrain_imagenet
from tests.conftest import REPO, load_config_file, set_fields

DEVICES = 8
BATCH = 64
# A ViT small enough to compile in seconds: one encoder block, one decoder block.
TINY = {
    "model.encoder.width": 32,
    "model.encoder.depth": 1,
    "model.encoder.num_heads": 2,
    "model.encoder.mlp_dim": 64,
    "model.decoder.width": 32,
    "model.decoder.depth": 1,
    "model.decoder.num_heads": 2,
    "batch_size": BATCH,
}


def run_plan(*args):
    return subprocess.run(
        [sys.executable, "-m", "maejax.plan", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        timeout=600,
    )


def plan_json(config: str, **overrides):
    fields = {**TINY, **{k.replace("__", "."): v for k, v in overrides.items()}}
    result = run_plan(
        f"--config={config}",
        f"--devices={DEVICES}",
        "--json",
        *(f"--config.{k}={v}" for k, v in fields.items()),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def param_count(config_file: str, overrides=None) -> int:
    """Parameters of the model the config builds, counted here without the plan's code."""
    config = set_fields(load_config_file(os.path.join(REPO, config_file)), {**TINY, **(overrides or {})})
    model, size = models.build_model(config.model), config.model.image_size
    rngs = {name: jax.random.key(0) for name in ("params", "masking", "dropout", "diffusion")}
    variables = jax.eval_shape(lambda: model.init(rngs, jax.numpy.zeros((1, size, size, 1))))
    return sum(x.size for x in jax.tree.leaves(variables["params"]))


def check_compiled_bytes(out, batch_bytes_per_device: int) -> None:
    """memory_analysis is per device: its arguments are exactly this device's state and batch shards."""
    c = out["cpu_compile"]
    for name in ("argument", "output", "alias", "temp"):
        assert c[name] > 0, name
    step_counter = 4  # the int32 step
    assert c["argument"] == c["params"] + c["optimizer"] + step_counter + batch_bytes_per_device
    assert c["alias"] >= c["params"] + c["optimizer"]  # the donated state is reused in place
    assert c["total"] == c["argument"] + c["output"] - c["alias"] + c["temp"] + c["generated_code"]


@pytest.mark.slow
def test_mae_plan_on_8_devices_reports_replicated_params_and_the_batch_split():
    out = plan_json("configs/mae_fmnist.py")
    count = param_count("configs/mae_fmnist.py")
    assert out["devices"] == DEVICES and out["mesh"] == {"data": DEVICES, "fsdp": 1}
    assert out["batch"]["per_device"] == BATCH // DEVICES
    assert out["params"]["count"] == count
    # fsdp=1: every device holds every float32 parameter, and AdamW's two float32 moments.
    assert out["cpu_compile"]["params"] == out["analytic"]["params"] == count * 4
    assert 0 <= out["cpu_compile"]["optimizer"] - 2 * count * 4 <= 16  # plus the optimizer's step counts
    assert out["analytic"]["optimizer"] == 2 * count * 4
    check_compiled_bytes(out, BATCH // DEVICES * 28 * 28 * 1 * 4)
    report = plan.render(out)
    cpu, analytic = report.index("CPU COMPILE"), report.index("ANALYTIC ESTIMATE")
    assert plan.human(out["cpu_compile"]["temp"]) in report[cpu:analytic]  # labelled as compiled
    assert plan.human(out["analytic"]["total"]) in report[analytic:]  # labelled as estimated


@pytest.mark.slow
def test_diffmae_plan_with_fsdp_shards_the_large_kernels_over_4_devices():
    # mlp_dim 2048 makes fc1 and fc2 (32 x 2048 = 65536 values) just large enough to shard.
    out = plan_json("configs/diffmae_fmnist.py", mesh__fsdp=4, model__encoder__mlp_dim=2048)
    count = param_count("configs/diffmae_fmnist.py", {"model.encoder.mlp_dim": 2048})
    assert out["mesh"] == {"data": 2, "fsdp": 4}
    assert out["batch"]["per_device"] == BATCH // DEVICES
    # Each device keeps a quarter of the two 65536-value kernels and all of every other tensor.
    sharded = 2 * 65536 * 4
    expected = count * 4 - sharded + sharded // 4
    assert out["cpu_compile"]["params"] == out["analytic"]["params"] == expected
    assert out["analytic"]["gradients"] == expected
    check_compiled_bytes(out, BATCH // DEVICES * 28 * 28 * 1 * 4)


@pytest.mark.slow
def test_finetune_plan_counts_the_classifier_and_its_soft_targets():
    out = plan_json("configs/finetune_fmnist.py")
    count = param_count("configs/finetune_fmnist.py")
    assert out["task"] == "finetune" and out["params"] == {"count": count, "trainable": count}
    assert out["batch"]["per_device"] == BATCH // DEVICES
    assert out["cpu_compile"]["params"] == out["analytic"]["params"] == count * 4
    per_device = BATCH // DEVICES
    check_compiled_bytes(out, per_device * (28 * 28 * 1 + 10) * 4)  # images and 10-class targets
    assert any("init_from" in note for note in out["notes"])
    report = plan.render(out)
    assert "CPU COMPILE" in report and "ANALYTIC ESTIMATE" in report and "loss:" not in report


# --- the analytic estimate against hand counts -------------------------------------------


def vit_block_bytes(tokens, width, mlp, heads, e):
    """The docstring's count for one ViT block, written out independently of maejax.plan."""
    layer_norms = 2 * 4 * width  # both LayerNorms' centred inputs, float32
    matmul_inputs_and_gelu = (6 * width + 2 * mlp) * e
    probabilities = heads * tokens * (4 + e if e == 2 else 4)  # float32 softmax output (+ its bf16 copy)
    return tokens * (layer_norms + matmul_inputs_and_gelu + probabilities)


def test_mae_vitb_activations_match_a_hand_count():
    resolved = models.resolve(mae_pretrain_imagenet("B/16").model)  # bfloat16, norm-pix, no remat
    # Encoder: 1 cls + 49 visible of 196 patches, width 768, MLP 3072, 12 heads, 2-byte values.
    encoder_block = vit_block_bytes(50, 768, 3072, 12, 2)
    # Decoder: 1 + 196 tokens, width 512, MLP 2048, 16 heads.
    decoder_block = vit_block_bytes(197, 512, 2048, 16, 2)
    # float32 patches and norm-pix targets (196 x 768), the prediction head's and decoder's inputs.
    loss = 2 * 196 * 768 * 4 + 197 * 512 * 2 + 50 * 768 * 2
    assert (encoder_block, decoder_block, loss) == (1_562_400, 7_356_768, 1_482_752)
    assert plan_memory.activation_bytes(resolved, "pretrain") == 12 * encoder_block + 8 * decoder_block + loss
    assert plan_memory.activation_bytes(resolved, "pretrain") == VITB_MAE_PER_EXAMPLE

    # remat: each block keeps its input; the largest block is live once while recomputed.
    resolved.remat = True
    kept_inputs = 12 * 50 * 768 * 2 + 8 * 197 * 512 * 2
    assert plan_memory.activation_bytes(resolved, "pretrain") == kept_inputs + decoder_block + loss


VITB_MAE_PER_EXAMPLE = 79_085_696  # the hand count above


def test_float32_block_is_the_textbook_count():
    # In float32: (8 D + 2 M) 4 bytes per token and 4 per attention probability.
    assert vit_block_bytes(50, 768, 3072, 12, 4) == 50 * ((8 * 768 + 2 * 3072) * 4 + 12 * 50 * 4)
    config = mae_pretrain_imagenet("B/16")
    config.model.dtype = "float32"
    encoder = plan_memory.stacks(models.resolve(config.model))[0]
    assert encoder.block_bytes == vit_block_bytes(50, 768, 3072, 12, 4)


def test_diffmae_cross_self_decoder_block_matches_a_hand_count():
    resolved = models.resolve(diffmae_pretrain_imagenet("B/16").model)  # bfloat16
    decoder = next(s for s in plan_memory.stacks(resolved) if s.name == "decoder")
    q, c = 147, 50  # masked tokens; cls + visible encoder tokens (width 768)
    self_attention = q * (4 * 512 + 5 * 512 * 2) + 16 * q * q * 6
    cross = q * (4 * 512 + 3 * 512 * 2) + c * (4 * 768 + (768 + 2 * 512) * 2) + 16 * q * c * 6
    mlp = q * (4 * 512 + (512 + 2 * 2048) * 2)
    assert (decoder.tokens, decoder.block_bytes) == (q, self_attention + cross + mlp) == (147, 6_575_008)


def test_cudnn_attention_keeps_no_probabilities_and_a_probe_keeps_one_block():
    config = mae_pretrain_imagenet("B/16")
    config.model.attention_impl = "cudnn"
    encoder = plan_memory.stacks(models.resolve(config.model))[0]
    assert encoder.block_bytes == 50 * (2 * 4 * 768 + (6 * 768 + 2 * 3072) * 2)
    config.model.name = "classifier"  # sees all 1 + 196 tokens; a probe keeps one block's working set
    resolved = models.resolve(config.model)
    one_block = 197 * (2 * 4 * 768 + (6 * 768 + 2 * 3072) * 2)
    assert plan_memory.activation_bytes(resolved, "linprobe") == one_block


def test_vitb_estimate_on_32_devices_adds_state_gradients_activations_and_batch():
    config = mae_pretrain_imagenet("B/16")  # batch 4096, AdamW, mesh.fsdp=1, bfloat16
    count = 111_655_680
    params = {"all": jax.ShapeDtypeStruct((count,), jax.numpy.float32)}
    batch = {"image": jax.ShapeDtypeStruct((4096, 224, 224, 3), jax.numpy.float32)}
    program = plan.Program(step_fn=None, state={}, batch=batch, params=params, trainable=params)
    est = plan_memory.analytic_estimate(config, models.resolve(config.model), program, 32)
    per_device = 4096 // 32
    assert est["params"] == 4 * count and est["optimizer"] == 8 * count and est["gradients"] == 4 * count
    assert est["weight_copies"] == 2 * count  # bfloat16 copies, no remat
    assert est["activations"] == per_device * VITB_MAE_PER_EXAMPLE
    assert est["input_batch"] == per_device * 224 * 224 * 3 * 4
    assert est["total"] == 18 * count + est["activations"] + est["input_batch"]
    config.grad_accum_steps, config.model.remat = 4, True  # micro-batches of 32 per device
    est = plan_memory.analytic_estimate(config, models.resolve(config.model), program, 32)
    assert est["gradients"] == 8 * count  # the running sum too
    assert est["weight_copies"] == 0  # remat casts again in the backward pass
    assert est["activations"] == 32 * plan_memory.activation_bytes(models.resolve(config.model), "pretrain")


def test_per_device_bytes_follow_the_fsdp_rule_without_devices():
    tree = {
        "kernel": jax.ShapeDtypeStruct((1024, 256), jax.numpy.float32),  # 262144 values: split 4 ways
        "bias": jax.ShapeDtypeStruct((256,), jax.numpy.float32),  # too small: replicated
    }
    assert plan_memory.per_device_bytes(tree, 4) == 1024 * 256 * 4 // 4 + 256 * 4
    assert plan_memory.per_device_bytes(tree, 1) == (1024 * 256 + 256) * 4
    assert plan_memory.per_device_bytes(tree, 4, bytes_per_element=8) == 1024 * 256 * 8 // 4 + 256 * 8


# --- targets, verdicts and bad input -----------------------------------------------------


@pytest.mark.parametrize(
    "name, kind, devices",
    [("v4-64", "v4", 32), ("v5p-128", "v5p", 64), ("v5e-16", "v5e", 16), ("v5litepod-8", "v5e", 8),
     ("v6e-256", "v6e", 256), ("8xH100-80GB", "H100-80GB", 8), ("16xA100-40GB", "A100-40GB", 16)],
)  # fmt: skip
def test_targets_name_their_device_kind_and_count(name, kind, devices):
    assert plan.parse_target(name) == plan.Target(name, kind, devices)


@pytest.mark.parametrize("name", ["v9-8", "v4-63", "v4-0", "8xH100", "0xH100-80GB", "tpu", "8xv4"])
def test_unknown_targets_are_refused_naming_the_valid_forms(name):
    with pytest.raises(UserError) as e:
        plan.parse_target(name)
    assert f"--target={name!r}" in str(e.value) and "v4-64" in str(e.value) and "H100-80GB" in str(e.value)


def test_verdicts_and_gpu_memory_that_xla_may_use(monkeypatch):
    assert plan.verdict(70, 100) == "fits (70%)"
    assert plan.verdict(90, 100) == "tight (90%)"
    assert plan.verdict(130, 100) == "does not fit (130%)"
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    assert plan.usable_bytes("v4") == 32 * plan.GiB
    assert plan.usable_bytes("H100-80GB") == 60 * plan.GiB
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    assert plan.usable_bytes("H100-80GB") == int(72 * plan.GiB)


def test_devices_that_do_not_split_the_batch_are_refused_with_the_valid_counts():
    config = fmnist_pretrain()
    config.batch_size = 64
    with pytest.raises(UserError) as e:
        plan.check_devices(config, 7)
    assert "--devices=7" in str(e.value) and "valid for this config: 1, 2, 4, 8, 16, 32, 64" in str(e.value)
    config.grad_accum_steps = 4  # micro-batches of 16
    with pytest.raises(UserError, match="= 16 must split evenly.*: 1, 2, 4, 8, 16$"):
        plan.check_devices(config, 32)
    config.grad_accum_steps, config.mesh.fsdp = 1, 4
    with pytest.raises(UserError, match=r"--devices=2 .*fsdp=4\) cannot be laid out.*: 4, 8, 16, 32, 64$"):
        plan.check_devices(config, 2)
    with pytest.raises(UserError, match="--devices=0 is invalid: a positive number"):
        plan.check_devices(config, 0)
    plan.check_devices(config, 8)


def test_devices_come_from_the_flag_or_the_target_and_must_agree():
    v4 = plan.parse_target("v4-64")
    assert plan.device_count(None, v4) == 32 and plan.device_count(8, None) == 8
    with pytest.raises(UserError, match="--devices=16 but --target=v4-64 has 32 TPU v4 devices"):
        plan.device_count(16, v4)
    with pytest.raises(UserError, match="--devices=N"):
        plan.device_count(None, None)


def test_prepare_refuses_non_training_tasks_and_bad_fields_before_any_compile():
    config = fmnist_pretrain()
    config.task = "sample"
    with pytest.raises(UserError, match="config.task='sample'"):
        plan.prepare(config, 8, None)
    config.task, config.model.mask_ratio = "pretrain", 1.5
    with pytest.raises(ConfigError, match="model.mask_ratio"):
        plan.prepare(config, 8, None)


def test_a_process_whose_jax_already_started_refuses_to_plan():
    jax.devices()  # this test process has started JAX
    with pytest.raises(UserError, match="fresh process"):
        plan.force_cpu_devices(jax.device_count() + 1)


def test_cli_bad_devices_is_one_line_and_exit_code_2():  # about 2 s: it stops before any compile
    result = run_plan("--config=configs/mae_fmnist.py", "--devices=7", "--config.batch_size=64")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "maejax: error: --devices=7 is invalid: the micro-batch batch_size / grad_accum_steps = 64 / 1 = 64 "
        "must split evenly over the devices; valid for this config: 1, 2, 4, 8, 16, 32, 64"
    ]
