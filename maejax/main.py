"""maejax's entry point.

    python -m maejax.main --config=configs/mae_vitb.py [--workdir=DIR] [--config.FIELD=VALUE ...]

Dispatches on config.task ('pretrain', 'finetune', 'linprobe', 'sample').
Without --workdir, runs go to workdirs/<config file stem>. Multi-process
runs initialise jax.distributed from --coordinator_address / --num_processes
/ --process_id, or from the TPU-pod or SLURM environment.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from maejax.cli import run_cli

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


def cluster_environment() -> bool:
    """True on a Cloud TPU VM or in a multi-task SLURM job: jax.distributed configures itself there.

    MAEJAX_DISTRIBUTED=0 or 1 overrides the detection.
    """
    forced = os.environ.get("MAEJAX_DISTRIBUTED")
    if forced is not None:
        return forced == "1"
    vfio = os.listdir("/dev/vfio") if os.path.isdir("/dev/vfio") else []
    on_tpu_vm = os.path.exists("/dev/accel0") or any(name.isdigit() for name in vfio)
    in_slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ
    return on_tpu_vm or in_slurm


def initialize_distributed() -> None:
    import jax

    if FLAGS.coordinator_address:
        if jax.config.jax_platforms in (None, "", "cpu") and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=FLAGS.coordinator_address,
            num_processes=FLAGS.num_processes,
            process_id=FLAGS.process_id,
        )
    elif cluster_environment():
        jax.distributed.initialize()


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
    sys.exit(run_cli(app, main))
