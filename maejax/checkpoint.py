"""Orbax checkpoints: params-only exports, and (train loop) state + input position."""

import contextlib
import logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from maejax.errors import UserError

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


CHECKPOINTS_DIR = "checkpoints"


class CheckpointWriteError(UserError):
    """A checkpoint could not be written; the ones before it are untouched."""


class Checkpointer:
    """Orbax CheckpointManager under WORKDIR/checkpoints: train state + input position.

    Saves are asynchronous (the step loop goes on while arrays are written) and
    atomic (a step directory appears only once complete, so a kill mid-save
    leaves the previous checkpoints as they were). `keep` newest are kept.
    """

    def __init__(self, workdir: str, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINTS_DIR))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "data"), options=options)
        self._pending = None  # the step of the save in flight

    def save(self, step: int, state, position: dict, force: bool = True) -> None:
        """Start saving `step` (asynchronously); a failure names the step and what is intact."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(position))
        self._pending = step
        with self._writing(step):
            self.manager.save(step, args=args, force=force)

    @contextlib.contextmanager
    def _writing(self, step):
        try:
            yield
        except Exception as e:
            intact = [s for s in self.all_steps() if s != step]
            raise CheckpointWriteError(
                f"writing checkpoint step {step} to {self.directory} failed ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); the earlier checkpoints {intact} are intact"
            ) from e

    def all_steps(self) -> list:
        return sorted(self.manager.all_steps())

    def restore_latest(self, abstract_state):
        """(step, state, position) of the newest usable checkpoint, or None if there is none.

        A checkpoint that fails to restore (truncated or corrupt files) is
        skipped with a warning naming it, and the previous one is tried.

        Raises:
          UserError: checkpoints exist but none can be restored.
        """
        steps = self.all_steps()
        skipped = []
        for step in reversed(steps):
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
                    ),
                )
            except Exception as e:  # orbax raises many types for damaged files
                reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                logging.warning(
                    "checkpoint step %d in %s is unusable (%s); trying an older one",
                    step,
                    self.directory,
                    reason,
                )
                skipped.append(step)
                continue
            if skipped:
                logging.warning("resumed from step %d after skipping damaged checkpoints %s", step, skipped)
                self._discard(skipped)
            return step, restored["state"], dict(restored["data"])
        if steps:
            raise UserError(
                f"none of the checkpoints {steps} in {self.directory} can be restored; "
                "move the directory away to start afresh"
            )
        return None

    def _discard(self, steps) -> None:
        """Delete damaged steps, so that the resumed run can save those steps again."""
        for step in steps:
            self.manager.delete(step)
        self.manager.reload()

    def wait(self) -> None:
        """Block until the asynchronous save in flight (if any) is on disk."""
        with self._writing(self._pending):
            self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()


def abstract_with_shardings(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings (what a restore should produce)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _latest_params(checkpoints_dir: str):
    """(step, params) of the newest checkpoint, as host NumPy arrays.

    Only the parameter subtrees are read (`params`, and a linear probe's
    `frozen` encoder), not the optimizer state: a fraction of the memory.
    """
    manager = ocp.CheckpointManager(
        checkpoints_dir,
        item_handlers={"state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(read_only=True),
    )
    step = manager.latest_step()
    if step is None:
        return None, None
    metadata = manager.item_metadata(step)["state"]
    wanted = {k: metadata[k] for k in ("frozen", "params") if k in metadata}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
    args = ocp.args.PyTreeRestore(item=wanted, restore_args=restore_args, partial_restore=True)
    restored = manager.restore(step, args=ocp.args.Composite(state=args))["state"]
    manager.close()
    return step, {**restored.get("frozen", {}), **restored["params"]}


def load_params(path: str):
    """Params (NumPy) from a maejax workdir: its params/ export, else its newest checkpoint.

    Returns:
      (params, description) where description names what was loaded.

    Raises:
      UserError: `path` holds neither.
    """
    params_dir = os.path.join(path, PARAMS_DIR)
    if os.path.isdir(params_dir):
        return load_params_dir(params_dir), f"{params_dir}"
    checkpoints_dir = os.path.abspath(os.path.join(path, CHECKPOINTS_DIR))
    if os.path.isdir(checkpoints_dir):
        step, params = _latest_params(checkpoints_dir)
        if step is not None:
            return params, f"{checkpoints_dir} step {step}"
    raise UserError(
        f"{path!r} holds no params/ (from maejax.convert) and no checkpoints/ with a saved step: "
        "point it at a maejax workdir"
    )
