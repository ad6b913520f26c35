"""Orbax checkpoints: params-only exports, and (train loop) state + input position."""

import contextlib
import json
import logging
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from maejax import paths
from maejax.errors import UserError

PARAMS_DIR = "params"


def save_params(workdir: str, params) -> str:
    """Write a params-only checkpoint to WORKDIR/params (replacing an old one)."""
    path = paths.absolute(paths.join(workdir, PARAMS_DIR))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, jax.tree.map(np.asarray, params), force=True)
    checkpointer.wait_until_finished()
    return path


def load_params_dir(path: str):
    """Params from a params-only checkpoint directory, as NumPy arrays."""
    return ocp.StandardCheckpointer().restore(paths.absolute(path))


CHECKPOINTS_DIR = "checkpoints"
DAMAGED_DIR = "damaged"  # under checkpoints/: orbax only lists integer-named step folders

# tensorstore status codes of errors that come and go (storage, network, memory):
# never a reason to call a checkpoint damaged.
TRANSIENT_CODES = (
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "RESOURCE_EXHAUSTED",
    "ABORTED",
    "CANCELLED",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
)
# What unreadable files look like through orbax / tensorstore / json.
DAMAGE_MARKERS = (
    "NOT_FOUND",
    "OUT_OF_RANGE",
    "DATA_LOSS",
    "Error reading",
    "Error opening",
    "does not exist",
)


class CheckpointWriteError(UserError):
    """A checkpoint could not be written; the ones before it are untouched."""


class CheckpointMismatch(UserError):
    """A checkpoint holds another model or optimizer than the current config builds.

    `differences` lists one line per tensor that is missing, extra or of
    another shape or dtype.
    """

    def __init__(self, step: int, directory: str, differences: list):
        self.step = step
        self.directory = directory
        self.differences = differences
        super().__init__(
            f"checkpoint step {step} in {directory} does not match the config ({summarize(differences)}); "
            "every checkpoint is left as it was"
        )


class _Damaged(Exception):
    """A step's files are missing, truncated or undecodable."""


def is_damage(error: BaseException) -> bool:
    """True when `error` says a step's files are missing or unreadable, not that reading failed for now."""
    if isinstance(error, (FileNotFoundError, json.JSONDecodeError)):
        return True
    if not isinstance(error, ValueError):
        return False  # memory errors, interrupts, programming errors: not the files' fault
    message = str(error)
    if message.startswith(TRANSIENT_CODES):
        return False
    return any(marker in message for marker in DAMAGE_MARKERS)


def tree_differences(saved, wanted) -> list:
    """One line per leaf that differs between the saved metadata tree and the abstract state."""
    saved_leaves = {_key(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(saved)}
    wanted_leaves = {_key(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(wanted)}
    out = []
    # Parameters first: the optimizer's moments repeat their differences.
    for name in sorted(set(saved_leaves) | set(wanted_leaves), key=lambda n: (not n.startswith("params"), n)):
        if name not in wanted_leaves:
            out.append(f"{name} is in the checkpoint but not in what the config builds")
        elif name not in saved_leaves:
            out.append(f"{name} is missing from the checkpoint")
        else:
            have, want = saved_leaves[name], wanted_leaves[name]
            if tuple(have.shape) != tuple(want.shape) or np.dtype(have.dtype) != np.dtype(want.dtype):
                out.append(
                    f"{name} is {tuple(have.shape)} {np.dtype(have.dtype).name} in the checkpoint, "
                    f"{tuple(want.shape)} {np.dtype(want.dtype).name} in the config"
                )
    return out


def summarize(differences: list, limit: int = 4) -> str:
    """The first `limit` differences, and how many more."""
    more = len(differences) - limit
    return "; ".join(differences[:limit]) + (f"; and {more} more" if more > 0 else "")


def _key(path) -> str:
    """'opt/1/0/mu/w' for a key path: dict keys, sequence indices and named-tuple fields alike
    (orbax's metadata spells named tuples as dicts)."""
    parts = (getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)
    return "/".join(str(p) for p in parts)


class Checkpointer:
    """Orbax CheckpointManager under WORKDIR/checkpoints: train state + input position.

    Saves are asynchronous (the step loop goes on while arrays are written) and
    atomic (a step directory appears only once complete, so a kill mid-save
    leaves the previous checkpoints as they were). `keep` newest are kept.
    Nothing is deleted on doubt: a step whose files are damaged is moved to
    checkpoints/damaged/ once an older step has restored.
    """

    def __init__(self, workdir: str, keep: int, async_save: bool = True):
        self.directory = paths.absolute(paths.join(workdir, CHECKPOINTS_DIR))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "data"), options=options)
        self._pending = None  # the step of the save in flight

    def save(self, step: int, state, position: dict, force: bool = True) -> None:
        """Start saving `step` (asynchronously); a failure names the step that failed and what is intact."""
        self.wait()  # a failed save in flight is reported as itself, not as this one
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(position))
        self._pending = step
        with self._writing():
            self.manager.save(step, args=args, force=force)

    @contextlib.contextmanager
    def _writing(self):
        try:
            yield
        except Exception as e:
            failed, self._pending = self._pending, None  # reported once
            with contextlib.suppress(Exception):
                self.manager.reload()
            intact = [s for s in self.all_steps() if s != failed]
            raise CheckpointWriteError(
                f"writing checkpoint step {failed} to {self.directory} failed ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); the earlier checkpoints {intact} are intact"
            ) from e

    def all_steps(self) -> list:
        return sorted(self.manager.all_steps())

    def restore_latest(self, abstract_state):
        """(step, state, position) of the newest usable checkpoint, or None if there is none.

        A step whose files are missing, truncated or undecodable is skipped
        with a warning and the previous one is tried; once one restores, the
        damaged steps are moved to checkpoints/damaged/<step>-<time> (never
        deleted). Other errors (storage not reachable, memory) propagate, and
        a checkpoint of another model is an error, not a reason to fall back.

        Raises:
          CheckpointMismatch: the newest readable step holds other tensors than
            `abstract_state` (a config change); nothing is moved.
          UserError: checkpoints exist but none can be restored; nothing is moved.
        """
        steps = self.all_steps()
        damaged = {}
        for step in reversed(steps):
            try:
                restored = self._restore(step, abstract_state)
            except _Damaged as e:
                logging.warning("checkpoint step %d in %s is damaged (%s)", step, self.directory, e)
                damaged[step] = str(e)
                continue
            if damaged:
                self._move_aside(sorted(damaged))
                logging.warning("resumed from step %d after setting aside damaged checkpoints", step)
            return step, restored["state"], dict(restored["data"])
        if steps:
            reasons = "; ".join(f"step {s}: {r}" for s, r in sorted(damaged.items()))
            raise UserError(
                f"none of the checkpoints {steps} in {self.directory} can be restored ({reasons}); "
                "move the directory away to start afresh"
            )
        return None

    def _restore(self, step: int, abstract_state) -> dict:
        """Restore one step; raises _Damaged or CheckpointMismatch, lets other errors through."""
        try:
            saved = read_tree_metadata(paths.join(self.directory, str(step), "state"))
        except Exception as e:
            if is_damage(e):
                raise _Damaged(_first_line(e)) from e
            raise
        differences = tree_differences(saved, abstract_state)
        if differences:
            raise CheckpointMismatch(step, self.directory, differences)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
        try:
            return self.manager.restore(step, args=args)
        except Exception as e:
            if is_damage(e):
                raise _Damaged(_first_line(e)) from e
            raise

    def _move_aside(self, steps) -> None:
        """Move damaged steps to checkpoints/damaged/, so the resumed run can save those steps again."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for step in steps:
            target = paths.join(self.directory, DAMAGED_DIR, f"{step}-{stamp}")
            paths.makedirs(paths.join(self.directory, DAMAGED_DIR))
            paths.move(paths.join(self.directory, str(step)), target)
            logging.warning("moved damaged checkpoint step %d to %s", step, target)
        self.manager.reload()

    def wait(self) -> None:
        """Block until the asynchronous save in flight (if any) is on disk."""
        if self._pending is None:
            return
        with self._writing():
            self.manager.wait_until_finished()
        self._pending = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()


def read_tree_metadata(state_dir: str):
    """The saved tree of a step's state item: leaves with .shape and .dtype, nothing read but metadata."""
    handler = ocp.PyTreeCheckpointHandler()
    try:
        return handler.metadata(epath.Path(state_dir)).tree
    finally:
        handler.close()


def _first_line(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text[:200]


def abstract_with_shardings(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings (what a restore should produce)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _latest_params(checkpoints_dir: str):
    """(step, params) of the newest readable checkpoint, as host NumPy arrays; (None, None) if none.

    Only the parameter subtrees are read (`params`, and a linear probe's
    `frozen` encoder), not the optimizer state: a fraction of the memory. A
    damaged newest step falls back to the previous one with a warning; the
    folder is only read (it belongs to another run), so nothing is moved.
    """
    manager = ocp.CheckpointManager(
        checkpoints_dir,
        item_handlers={"state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(read_only=True),
    )
    steps = sorted(manager.all_steps(), reverse=True)
    try:
        for step in steps:
            try:
                return step, _read_params(manager, step)
            except Exception as e:
                if not is_damage(e):
                    raise
                logging.warning(
                    "checkpoint step %d in %s is damaged (%s); trying an older one",
                    step,
                    checkpoints_dir,
                    _first_line(e),
                )
    finally:
        manager.close()
    if steps:
        raise UserError(f"none of the checkpoints {sorted(steps)} in {checkpoints_dir} can be read")
    return None, None


def _read_params(manager, step: int) -> dict:
    metadata = manager.item_metadata(step)["state"]
    wanted = {k: metadata[k] for k in ("frozen", "params") if k in metadata}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
    args = ocp.args.PyTreeRestore(item=wanted, restore_args=restore_args, partial_restore=True)
    restored = manager.restore(step, args=ocp.args.Composite(state=args))["state"]
    return {**restored.get("frozen", {}), **restored["params"]}


def load_params(path: str):
    """Params (NumPy) from a maejax workdir: its params/ export, else its newest checkpoint.

    Returns:
      (params, description) where description names what was loaded.

    Raises:
      UserError: `path` holds neither.
    """
    params_dir = paths.join(path, PARAMS_DIR)
    if paths.isdir(params_dir):
        return load_params_dir(params_dir), f"{params_dir}"
    checkpoints_dir = paths.absolute(paths.join(path, CHECKPOINTS_DIR))
    if paths.isdir(checkpoints_dir):
        step, params = _latest_params(checkpoints_dir)
        if step is not None:
            return params, f"{checkpoints_dir} step {step}"
    raise UserError(
        f"{path!r} holds no params/ (from maejax.convert) and no checkpoints/ with a saved step: "
        "point it at a maejax workdir"
    )
