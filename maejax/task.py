"""One way to start a task: validate, take the workdir, restore or build the state, record the config.

Every task (pretrain in train.py, finetune / linprobe in finetune.py, sample
in sample.py) runs inside `begin`:

    with task.begin(config, workdir, ("mae", "diffmae")) as t:
        run = task.restore_or_init(t, init_fn, *init_args)   # training tasks
        ...

`begin` validates the whole config (before anything compiles), refuses a
workdir that is a file or read-only, and takes the workdir's lease (one run
at a time). `restore_or_init` resumes from the newest checkpoint, refusing a
checkpoint of another model with the tensors and config fields that differ,
and only then writes config.json: a refused resume leaves the workdir as it was.
"""

import contextlib
import dataclasses
import json
import logging

import jax
from ml_collections import ConfigDict

from maejax import checkpoint, data_sources, paths, sharding, validate, writers
from maejax import config as config_lib
from maejax import workdir as workdir_lib
from maejax.errors import ConfigError, UserError

CONFIG_FILE = "config.json"
# The sample task may run in a training workdir, whose config.json describes its checkpoints.
SAMPLE_CONFIG_FILE = "sample_config.json"

# Fields that only lengthen a run, change what it logs or where it reads data
# from: a resume may change them without a warning.
RESUME_MAY_CHANGE = (
    "total_steps",
    "total_epochs",
    "log_every_steps",
    "image_every_steps",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "eval_every_steps",
    "knn_every_steps",
    "knn.",
    "dataset.prefetch",
    "dataset.num_threads",
    "dataset.num_workers",
    "dataset.data_dir",
    "dataset.manual_dir",
    "mesh.",
)


@dataclasses.dataclass
class Task:
    """A validated run that holds its workdir."""

    config: ConfigDict
    workdir: str
    model: ConfigDict  # config.model with every default filled in
    lease: object
    is_main: bool


@dataclasses.dataclass
class Run:
    """A training state (restored or fresh) and what manages it."""

    state: dict
    start_step: int
    position: dict  # the input position: {"next_batch": k}
    restored: bool
    mesh: jax.sharding.Mesh
    batch_sharding: jax.sharding.NamedSharding
    state_shardings: object
    ckpt: checkpoint.Checkpointer
    writer: writers.Writer


@contextlib.contextmanager
def begin(config, workdir: str, model_names):
    """Validate `config` for a task on one of `model_names`, check and hold `workdir`; yields a Task.

    Raises:
      ConfigError: a field is invalid, or the task needs another kind of model.
      UserError: the workdir is a file, cannot be written, or another run holds it.
    """
    resolved = validate.validate(config, jax.device_count(), jax.process_count())
    if resolved.name not in model_names:
        raise ConfigError(
            "model.name", resolved.name, f"task '{config.task}' needs one of {list(model_names)}"
        )
    workdir_lib.check_usable(workdir)
    is_main = jax.process_index() == 0
    lease = workdir_lib.Lease(workdir) if is_main else workdir_lib.NoLease()
    with lease:
        yield Task(config, workdir, resolved, lease, is_main)


def sources(task: Task):
    """(train, eval) sources of config.dataset; an image folder's class list is kept in the workdir."""
    dataset, channels = task.config.dataset, task.model.in_channels
    train = data_sources.get_source(dataset, dataset.train_split, channels)
    data_sources.check_classes(task.workdir, getattr(train, "classes", None))
    return train, data_sources.get_source(dataset, dataset.eval_split, channels)


def restore_or_init(task: Task, init_fn, *init_args) -> Run:
    """Resume from the newest checkpoint in the workdir, or build the state with `init_fn(*init_args)`.

    The state is laid out on the config's mesh (parameters sharded by
    sharding.py's rules). config.json is written once the state exists.

    Raises:
      UserError: the newest checkpoint holds another model or optimizer; the
        message names the tensors and the config fields that differ.
    """
    config = task.config
    abstract_state = jax.eval_shape(init_fn, *init_args)
    mesh = sharding.make_mesh(config.mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    state_shardings = sharding.tree_shardings(abstract_state, mesh)
    ckpt = checkpoint.Checkpointer(task.workdir, config.keep_checkpoints)
    try:
        restored = ckpt.restore_latest(checkpoint.abstract_with_shardings(abstract_state, state_shardings))
    except checkpoint.CheckpointMismatch as e:
        ckpt.close()
        changed = changed_fields(saved_config(task.workdir), config)
        hint = f"; config fields changed since it was written: {changed}" if changed else ""
        raise UserError(
            f"{e}{hint}. Resume with the config in {paths.join(task.workdir, CONFIG_FILE)}, "
            "or pass another --workdir"
        ) from None
    if restored:
        start_step, state, position = restored
    else:
        state = jax.jit(init_fn, out_shardings=state_shardings)(*init_args)
        start_step, position = 0, {"next_batch": 0}
    record_config(task, resumed=bool(restored))
    writer = writers.Writer(task.workdir, enabled=task.is_main, resumed_at=start_step if restored else None)
    writer.truncate_after(start_step)
    return Run(
        state, start_step, position, bool(restored), mesh, batch_sharding, state_shardings, ckpt, writer
    )


def record_config(task: Task, resumed: bool = False, filename: str = CONFIG_FILE) -> None:
    """Write the resolved config (process 0); on a resume, warn about fields that change the run."""
    if not task.is_main:
        return
    if resumed:
        changed = [f for f in changed_fields(saved_config(task.workdir), task.config) if not _may_change(f)]
        if changed:
            logging.warning("resuming with config fields changed since the last run: %s", changed)
    config_lib.write_config_json(config_lib.with_resolved_model(task.config), task.workdir, filename)


def saved_config(workdir: str, filename: str = CONFIG_FILE) -> dict | None:
    """The config a workdir was last run with (as JSON), or None."""
    path = paths.join(workdir, filename)
    if not paths.exists(path):
        return None
    try:
        return json.loads(paths.read_text(path))
    except (OSError, ValueError):
        logging.warning("cannot read %s; not comparing configs", path)
        return None


def changed_fields(saved: dict | None, config) -> list:
    """Dotted names of the leaves that differ between a saved config.json and `config`.

    A field the saved config lacks was added to maejax after it was written:
    that run had the field's default, so only another value counts as a change.
    """
    if saved is None:
        return []
    resolved_json = lambda c: json.loads(config_lib.with_resolved_model(c).to_json_best_effort())  # noqa: E731
    old, new = dict(_leaves(saved)), dict(_leaves(resolved_json(config)))
    defaults = dict(_leaves(resolved_json(config_lib.base_config())))
    return sorted(k for k in set(old) | set(new) if old.get(k, defaults.get(k)) != new.get(k))


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _may_change(field: str) -> bool:
    return any(field == f or (f.endswith(".") and field.startswith(f)) for f in RESUME_MAY_CHANGE)


def source_model(path: str, expected_name: str, label: str) -> ConfigDict | None:
    """The model config a workdir was trained with, refused unless it is `expected_name`.

    Lets a task check its input workdir before any work (a sample task on an
    MAE workdir, an MAE comparison against a DiffMAE). None when the folder
    has no config.json (a maejax.convert output written by an older version).

    Args:
      label: how the user gave `path` ('config.init_from', '--workdir'), for the message.

    Raises:
      UserError: `path` does not exist or holds another kind of model.
    """
    paths.check_backend(path, label)
    if not paths.isdir(path):
        raise UserError(f"{label}={path!r} does not exist: point it at a maejax workdir")
    saved = saved_config(path)
    if saved is None:
        return None
    name = saved.get("model", {}).get("name")
    if name != expected_name:
        raise UserError(
            f"{label}={path!r} holds a {name!r} model (its {CONFIG_FILE}); "
            f"this needs a '{expected_name}' model"
        )
    return ConfigDict(saved["model"])


def check_params_match(params, abstract_params, loaded: str) -> None:
    """Refuse params (from a workdir or convert output) whose tensors differ from the model's."""
    differences = checkpoint.tree_differences(
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params), abstract_params
    )
    if differences:
        raise UserError(f"{loaded} does not match the config's model ({checkpoint.summarize(differences)})")
