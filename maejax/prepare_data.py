"""Build a config's dataset once (tfds, array_record) before a long run.

    python -m maejax.prepare_data --config=configs/mae_vitl.py \
        --config.dataset.data_dir=gs://BUCKET/tensorflow_datasets \
        --config.dataset.manual_dir=/data/imagenet_tars

Training does the same on first use; running it ahead on one machine keeps
every pod worker from waiting on (or racing to build) the dataset.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from maejax.cli import run_cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "a config file (configs/*.py)", lock_config=True)
flags.mark_flag_as_required("config")


def main(argv) -> None:
    del argv
    from maejax import data_sources

    dataset = FLAGS.config.dataset
    for split in (dataset.train_split, dataset.eval_split):
        source = data_sources.get_source(dataset, split, FLAGS.config.model.in_channels)
        print(f"{dataset.name} {split}: {len(source)} examples, {source.num_classes} classes")


if __name__ == "__main__":
    sys.exit(run_cli(app, main))
