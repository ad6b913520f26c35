"""maejax's entry point.

    python -m maejax.main --config=configs/mae_vitb.py [--workdir=DIR] [--config.FIELD=VALUE ...]

Dispatches on config.task ('pretrain', 'finetune', 'linprobe', 'sample').
Without --workdir, runs go to workdirs/<config file stem>.

Multi-process runs initialise jax.distributed from --coordinator_address /
--num_processes / --process_id when given, else from any cluster JAX itself
recognises (Cloud TPU pod slice, SLURM, Open MPI, Kubernetes) when it holds
more than one process. Environment overrides:
  MAEJAX_DISTRIBUTED=1|0   initialise (JAX detects the rest) | never initialise
  MAEJAX_LOCAL_DEVICES=all each process drives every GPU it sees (one task per
                           node) instead of JAX's one GPU per local rank
  MAEJAX_HUGE_PAGES=0      do not restart with glibc's huge-page tunable
                           (maejax/host_memory.py)
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from maejax import host_memory
from maejax.cli import run_cli
from maejax.errors import UserError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "a config file (configs/*.py)", lock_config=True)
flags.DEFINE_string(
    "workdir", None, "where checkpoints, metrics and images go (default workdirs/<config stem>)"
)
flags.DEFINE_string("coordinator_address", None, "multi-process: host:port of process 0")
flags.DEFINE_integer("num_processes", None, "multi-process: number of processes")
flags.DEFINE_integer("process_id", None, "multi-process: this process's index")
flags.mark_flag_as_required("config")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def default_workdir(config_path: str) -> str:
    stem = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
    return os.path.join("workdirs", stem)


def _jax_cluster_types() -> list:
    """JAX's cluster environments, in the order jax.distributed.initialize() tries them.

    They live in a private module (jax._src.clusters). Asking them, rather than
    keeping our own copy of their environment checks, keeps maejax's decision
    identical to JAX's as JAX adds clusters or changes a check; a test pins the
    names maejax relies on, so a jax release that moves them fails there first.
    """
    try:
        from jax._src.clusters import ClusterEnv

        return list(ClusterEnv._cluster_types)
    except (ImportError, AttributeError) as e:
        logging.warning(
            "cannot read JAX's cluster list (%s): no automatic jax.distributed; "
            "set MAEJAX_DISTRIBUTED=1 or pass --coordinator_address/--num_processes/--process_id",
            e,
        )
        return []


def detect_cluster() -> str | None:
    """JAX's name for the cluster this process runs in ('slurm', 'ompi', 'gcetpu', ...), or None.

    None also when the cluster holds a single process (a one-task SLURM job,
    `mpirun -np 1`, a single-host TPU VM): it needs no coordinator. Opt-in
    methods (mpi4py, which is "present" wherever mpi4py is installed) are
    skipped, as jax.distributed.initialize() skips them.
    """
    for env in _jax_cluster_types():
        if getattr(env, "opt_in_only_method", False):
            continue
        try:
            present = env.is_env_present() and env.get_process_count() > 1
        except Exception as e:
            # A half-visible cluster: running on as one process would let every
            # process write the same workdir, so stop and say how to choose.
            raise UserError(
                f"detecting the {env.name or env.__name__} cluster failed ({e}); set MAEJAX_DISTRIBUTED=0 "
                "to run as one process, or pass --coordinator_address/--num_processes/--process_id"
            ) from e
        if present:
            return env.name or env.__name__
    return None


def cluster_environment() -> bool:
    """Whether to call jax.distributed.initialize() with no arguments (JAX fills them in).

    MAEJAX_DISTRIBUTED=1 or 0 overrides the detection (detect_cluster).
    """
    forced = os.environ.get("MAEJAX_DISTRIBUTED")
    if forced is not None:
        if forced not in ("0", "1"):
            raise UserError(f"MAEJAX_DISTRIBUTED={forced!r} is invalid: use 1 (initialise) or 0 (never)")
        return forced == "1"
    return detect_cluster() is not None


def _own_all_local_gpus() -> bool:
    """MAEJAX_LOCAL_DEVICES=all: this process drives every GPU it can see.

    JAX's SLURM and Open MPI detection restricts each process to the GPU at its
    local rank (SLURM_LOCALID), right for one task per GPU but, with one task per
    node, leaving every GPU but the first idle. launch/gpu_slurm.sh sets this
    variable when it starts one task per node.
    """
    value = os.environ.get("MAEJAX_LOCAL_DEVICES")
    if value not in (None, "", "all"):
        raise UserError(
            f"MAEJAX_LOCAL_DEVICES={value!r} is invalid: use 'all' or leave it unset "
            "(for a list of device ids, JAX reads JAX_LOCAL_DEVICE_IDS=0,1,...)"
        )
    return value == "all"


def initialize_distributed() -> None:
    """Starts jax.distributed for a multi-process run; a single process skips it."""
    import jax

    own_all_gpus = _own_all_local_gpus()
    explicit = {
        name: FLAGS[name].value
        for name in ("coordinator_address", "num_processes", "process_id")
        if FLAGS[name].value is not None
    }
    if explicit:
        # Flags win over the environment; JAX detects whatever they leave out.
        if jax.config.jax_platforms in (None, "", "cpu") and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(**explicit)
    elif cluster_environment():
        jax.distributed.initialize()
    else:
        return
    if own_all_gpus:
        # initialize() restricts this process's GPUs only through these two
        # options (set from SLURM_LOCALID); no backend exists yet, so putting
        # back JAX's default "all" leaves every visible GPU to this process.
        # Counting GPUs to pass local_device_ids would need CUDA before the
        # backend, or CUDA_VISIBLE_DEVICES, which SLURM sets only with gres.
        jax.config.update("jax_cuda_visible_devices", "all")
        jax.config.update("jax_rocm_visible_devices", "all")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        # Libraries (orbax, tfds) log every detail at INFO; --verbosity=0 brings it back.
        logging.set_verbosity(logging.WARNING)
    config = FLAGS.config
    workdir = FLAGS.workdir or default_workdir(config_flags.get_config_filename(FLAGS["config"]))
    from maejax import validate

    validate.validate(config)  # cheap checks first: a typo costs no distributed start-up
    initialize_distributed()
    if config.task == "pretrain":
        from maejax import train

        train.train_and_evaluate(config, workdir)
    elif config.task in ("finetune", "linprobe"):
        from maejax import finetune

        finetune.train_and_evaluate(config, workdir)
    else:
        from maejax import sample

        sample.run(config, workdir)


if __name__ == "__main__":
    host_memory.reexec_with_huge_pages()
    sys.exit(run_cli(app, main))
