"""Device mesh and sharding rules.

The mesh has axes ('data', 'fsdp'). Batches are split over both axes.
Parameters and optimizer state are sharded over 'fsdp': each tensor of at
least `MIN_SHARDED_SIZE` elements is split along its largest dimension that
'fsdp' divides; smaller tensors (biases, norms, tokens) are replicated. With
fsdp=1 (the default) this is plain data parallelism.
"""

import logging

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from maejax.errors import ConfigError

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
MIN_SHARDED_SIZE = 2**16


def mesh_shape(mesh_config, num_devices: int) -> tuple:
    """(data, fsdp) from config.mesh, where -1 takes the remaining devices."""
    data, fsdp = int(mesh_config.data), int(mesh_config.fsdp)
    for field, value in (("mesh.data", data), ("mesh.fsdp", fsdp)):
        if value == 0 or value < -1:
            raise ConfigError(field, value, "a positive device count or -1 (the remaining devices)")
    if data == -1 and fsdp == -1:
        raise ConfigError("mesh.fsdp", fsdp, "at most one of mesh.data and mesh.fsdp may be -1")
    if data == -1 or fsdp == -1:
        known = fsdp if data == -1 else data
        if num_devices % known:
            field = "mesh.fsdp" if data == -1 else "mesh.data"
            raise ConfigError(field, known, f"must divide the {num_devices} devices")
        data, fsdp = (num_devices // known, known) if data == -1 else (known, num_devices // known)
    if data * fsdp != num_devices:
        raise ConfigError("mesh", f"{data}x{fsdp}", f"data * fsdp must equal the {num_devices} devices")
    return data, fsdp


def make_mesh(mesh_config, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_config, len(devices))
    try:
        grid = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, AssertionError, NotImplementedError) as e:
        # Still correct, but devices in plain order may put neighbours in the
        # mesh far apart in the interconnect: slower collectives, so say so.
        logging.warning(
            "mesh_utils.create_device_mesh could not lay out a %s mesh (data, fsdp) over %d %s devices "
            "(%s: %s); using the devices in their listed order",
            "x".join(map(str, shape)),
            len(devices),
            devices[0].platform if devices else "",
            type(e).__name__,
            str(e) or "no message",
        )
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every mesh axis."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def leaf_spec(shape: tuple, fsdp: int) -> P:
    """Shard the largest dimension divisible by `fsdp`, or replicate small/indivisible leaves."""
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < MIN_SHARDED_SIZE:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def tree_shardings(tree, mesh: Mesh):
    """NamedShardings for a pytree of arrays / ShapeDtypeStructs (params, optimizer state)."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, leaf_spec(tuple(x.shape), fsdp)), tree)
