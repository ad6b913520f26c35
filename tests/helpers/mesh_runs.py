"""Run in a process with 8 forced CPU devices: train the same tiny run on several meshes.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.helpers.mesh_runs TFDS_DIR OUT_DIR

Writes OUT_DIR/<data>x<fsdp>/ workdirs and prints one JSON line with the
sharding of a large kernel under the (2, 4) mesh.
"""

import json
import os
import sys

import jax

from maejax import models, optim, sharding, train, train_step
from tests.conftest import tiny_config

MESHES = [(8, 1), (2, 4)]
WIDE = {"model.encoder.width": 128, "model.encoder.mlp_dim": 512, "model.encoder.num_heads": 4}


def config_for(tfds_dir, data, fsdp):
    config = tiny_config(
        tfds_dir, total_steps=6, log_every_steps=1, checkpoint_every_steps=6, image_every_steps=6
    )
    for field, value in WIDE.items():
        *parents, name = field.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[name] = value
    config.mesh.data, config.mesh.fsdp = data, fsdp
    return config


def kernel_sharding(config):
    """Materialise the initial state on the mesh; report how fc1's kernel is laid out."""
    mesh = sharding.make_mesh(config.mesh)
    model = models.build_model(config.model)
    shape = (config.batch_size, 28, 28, 1)
    key = jax.random.key(0)
    params = jax.eval_shape(lambda: train_step.init_params(model, key, shape))
    tx, _ = optim.build_optimizer(config, params, 60000)
    init = lambda k: train_step.init_state(model, tx, k, shape)  # noqa: E731
    shardings = sharding.tree_shardings(jax.eval_shape(init, key), mesh)
    state = jax.jit(init, out_shardings=shardings)(key)
    kernel = state["params"]["encoder"]["blocks_0"]["mlp"]["fc1"]["kernel"]
    adam_mu = next(
        leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(state["opt"])[0]
        if "mu" in jax.tree_util.keystr(path)
        and "['encoder']['blocks_0']['mlp']['fc1']['kernel']" in jax.tree_util.keystr(path)
    )
    return {
        "global_shape": list(kernel.shape),
        "spec": [str(s) for s in kernel.sharding.spec],
        "shard_shapes": sorted({tuple(s.data.shape) for s in kernel.addressable_shards}),
        "adam_mu_shard_shapes": sorted({tuple(s.data.shape) for s in adam_mu.addressable_shards}),
        "bias_spec": [
            str(s) for s in state["params"]["encoder"]["blocks_0"]["mlp"]["fc1"]["bias"].sharding.spec
        ],
        "devices": jax.device_count(),
    }


def main(tfds_dir, out_dir):
    for data, fsdp in MESHES:
        train.train_and_evaluate(config_for(tfds_dir, data, fsdp), os.path.join(out_dir, f"{data}x{fsdp}"))
    print(json.dumps(kernel_sharding(config_for(tfds_dir, 2, 4))))


if __name__ == "__main__":
    main(*sys.argv[1:3])
