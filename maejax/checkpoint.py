"""Orbax checkpoints: params-only exports, and (train loop) state + input position."""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp

PARAMS_DIR = "params"


def save_params(workdir: str, params) -> str:
    """Write a params-only checkpoint to WORKDIR/params (replacing an old one)."""
    path = os.path.abspath(os.path.join(workdir, PARAMS_DIR))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, jax.tree.map(np.asarray, params), force=True)
    checkpointer.wait_until_finished()
    return path


def load_params_dir(path: str):
    """Params from a params-only checkpoint directory, as NumPy arrays."""
    return ocp.StandardCheckpointer().restore(os.path.abspath(path))
