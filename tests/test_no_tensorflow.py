"""A whole run without TensorFlow: train, checkpoint, resume, TensorBoard events (dataset prepared before)."""

import glob
import os
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing import event_accumulator

from maejax import data_sources
from tests.conftest import REPO, cli_overrides, tiny_config

RUN_WITHOUT_TENSORFLOW = (
    "import sys, runpy; import tests.helpers.no_tensorflow; "
    "sys.argv = ['maejax.main', *sys.argv[1:]]; runpy.run_module('maejax.main', run_name='__main__')"
)


def run_without_tensorflow(*args):
    return subprocess.run(
        [sys.executable, "-c", RUN_WITHOUT_TENSORFLOW, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        timeout=600,
    )


@pytest.mark.slow
def test_training_resuming_and_logging_import_no_tensorflow(tmp_path, tfds_dir):
    workdir = str(tmp_path / "run")
    common = ["--config=configs/mae_fmnist.py", f"--workdir={workdir}"]
    first = run_without_tensorflow(
        *common, *cli_overrides(tfds_dir, total_steps=10, checkpoint_every_steps=5)
    )
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_without_tensorflow(*common, *cli_overrides(tfds_dir, total_steps=15, image_every_steps=5))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming at step 10" in second.stdout
    for result in (first, second):
        assert "TENSORFLOW_MODULES=[]" in result.stderr
    assert {"10", "15"} <= set(os.listdir(os.path.join(workdir, "checkpoints")))

    # The event files open in TensorBoard: every logged loss, and the reconstruction images.
    events = event_accumulator.EventAccumulator(workdir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [5, 10, 15]
    images = events.Images("reconstructions")
    assert [e.step for e in images] == [10, 15] and images[0].encoded_image_string.startswith(b"\x89PNG")
    assert len(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))) == 2


def test_building_a_dataset_without_tensorflow_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setattr(data_sources.importlib.util, "find_spec", lambda name: None)
    config = tiny_config(str(tmp_path / "empty_data_dir"))
    with pytest.raises(data_sources.UserError, match=r"needs TensorFlow: pip install 'maejax\[data\]'"):
        data_sources.get_source(config.dataset, "train", 1)
