"""A run's workdir: one run at a time, checked before work, nothing lost on doubt."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maejax import checkpoint, sample, task, train
from maejax import workdir as workdir_lib
from maejax.errors import UserError
from tests.conftest import REPO, cli_overrides, tiny_config


def write_lease(workdir, **fields):
    holder = {"id": "other", "host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    holder.update({"heartbeat": time.time(), **fields})
    with open(os.path.join(workdir, workdir_lib.LEASE_FILE), "w") as f:
        json.dump(holder, f)


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# --- the lease ------------------------------------------------------------------------


def test_a_live_holder_refuses_a_second_run_naming_it(tmp_path):
    with workdir_lib.Lease(str(tmp_path)):
        with pytest.raises(
            workdir_lib.WorkdirInUse, match=rf"in use by another run \(host \S+ pid {os.getpid()}"
        ):
            workdir_lib.Lease(str(tmp_path)).acquire()
    assert not os.path.exists(os.path.join(tmp_path, workdir_lib.LEASE_FILE))  # released
    workdir_lib.Lease(str(tmp_path)).acquire().release()  # and free again


def test_a_holder_on_another_host_is_live_until_its_heartbeat_is_stale(tmp_path, caplog):
    write_lease(tmp_path, host="elsewhere", pid=1, heartbeat=time.time() - 10)
    with pytest.raises(workdir_lib.WorkdirInUse, match="host elsewhere pid 1"):
        workdir_lib.Lease(str(tmp_path)).acquire()
    write_lease(tmp_path, host="elsewhere", pid=1, heartbeat=time.time() - workdir_lib.STALE_AFTER_S - 5)
    lease = workdir_lib.Lease(str(tmp_path)).acquire()
    assert "heartbeat is" in caplog.text and "took over" in caplog.text
    with open(lease.path) as f:
        assert json.load(f)["pid"] == os.getpid()
    lease.release()


def test_a_dead_holder_on_this_host_is_taken_over_at_once(tmp_path, caplog):
    write_lease(tmp_path, pid=dead_pid())
    workdir_lib.Lease(str(tmp_path)).acquire().release()
    assert "its process no longer exists" in caplog.text


def test_the_heartbeat_renews_and_notices_a_takeover(tmp_path):
    lease = workdir_lib.Lease(str(tmp_path), heartbeat_every_s=0.05).acquire()
    with open(lease.path) as f:
        first = json.load(f)["heartbeat"]
    time.sleep(0.3)
    with open(lease.path) as f:
        assert json.load(f)["heartbeat"] > first
    # A beat that read our lease just before the intruder wrote may write over it once: a real
    # takeover happens only after STALE_AFTER_S of silence, so write until the lease is noticed lost.
    for _ in range(20):
        write_lease(tmp_path, id="intruder", host="elsewhere", pid=7)
        time.sleep(0.2)
        if lease.lost:
            break
    with pytest.raises(workdir_lib.WorkdirInUse, match="took over workdir .*host elsewhere pid 7"):
        lease.check()
    lease.release()
    assert os.path.exists(lease.path)  # the new holder's lease is not ours to remove


@pytest.mark.slow
def test_a_second_cli_run_on_a_busy_workdir_is_refused_in_one_line(tmp_path, tfds_dir):
    workdir = str(tmp_path / "run")
    args = [
        f"--workdir={workdir}",
        *cli_overrides(tfds_dir, total_steps=100000, checkpoint_every_steps=100000),
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    command = [sys.executable, "-m", "maejax.main", "--config=configs/mae_fmnist.py"]
    first = subprocess.Popen(
        [*command, *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        lease_path = os.path.join(workdir, workdir_lib.LEASE_FILE)
        deadline = time.time() + 120
        while not os.path.exists(lease_path) and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert os.path.exists(lease_path), (
            first.stderr.read().decode()[-2000:] if first.poll() else "no lease"
        )
        second = subprocess.run(
            [*command, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
        )
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"pid {first.pid}" in lines[0] and "in use by another run" in lines[0]
        deadline = time.time() + 120  # SIGTERM saves once the step loop runs: wait for it
        while not os.path.exists(os.path.join(workdir, "metrics.jsonl")) and time.time() < deadline:
            time.sleep(0.2)
    finally:
        first.send_signal(signal.SIGTERM)  # saves and exits cleanly, releasing the workdir
        first.wait(timeout=120)
    assert first.returncode == 0 and not os.path.exists(lease_path)


# --- the workdir itself ------------------------------------------------------------------


def test_an_unreachable_store_workdir_fails_in_one_line_and_no_local_folder_appears(tmp_path, monkeypatch):
    gcsfs = pytest.importorskip("gcsfs")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{closed}")
    monkeypatch.setenv("FSSPEC_GCS_TOKEN", "anon")
    monkeypatch.setattr(workdir_lib, "STORE_PROBE_TIMEOUT_S", 3.0)
    monkeypatch.chdir(tmp_path)
    gcsfs.GCSFileSystem.clear_instance_cache()
    try:
        with pytest.raises(UserError, match=r"workdir 'gs://bucket/run' cannot be written \(") as e:
            workdir_lib.check_usable("gs://bucket/run")
    finally:
        gcsfs.GCSFileSystem.clear_instance_cache()
    assert "\n" not in str(e.value)
    assert os.listdir(tmp_path) == []  # no local "gs:" folder


@pytest.mark.slow
def test_a_gs_workdir_without_gcsfs_fails_in_one_line_before_compiling(tmp_path, tfds_dir):
    run = (
        "import sys, runpy; import tests.helpers.no_tensorflow; "
        "sys.argv = ['maejax.main', *sys.argv[1:]]; runpy.run_module('maejax.main', run_name='__main__')"
    )
    result = subprocess.run(
        [sys.executable, "-c", run, f"--config={REPO}/configs/mae_fmnist.py", "--workdir=gs://bucket/run"]
        + cli_overrides(tfds_dir),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, MAEJAX_TEST_ABSENT="gcsfs"),
        timeout=300,
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("maejax: error")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
    assert "needs the package gcsfs" in errors[0] and "Traceback" not in result.stderr
    assert "step " not in result.stdout  # nothing compiled, nothing ran
    assert os.listdir(tmp_path) == []  # no local "gs:" folder


def test_a_url_with_an_unknown_scheme_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"ftp:// is not supported.*gs://"):
        workdir_lib.check_usable("ftp://host/run")
    assert os.listdir(tmp_path) == []


def test_a_workdir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        workdir_lib.check_usable(str(path))


def test_a_workdir_that_cannot_be_written_is_refused(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    # Permission bits do not stop root, so the refusal the OS would give is injected.
    monkeypatch.setattr(workdir_lib.tempfile, "NamedTemporaryFile", read_only)
    with pytest.raises(UserError, match="cannot be written \\(Permission denied\\)"):
        workdir_lib.check_usable(str(tmp_path))


# --- checkpoints: nothing deleted on doubt --------------------------------------------------


def small_state(value, width=8):
    return {"step": jnp.asarray(value, jnp.int32), "params": {"w": jnp.full((4, width), float(value))}}


def abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def saved(workdir, steps=(1, 2)):
    ckpt = checkpoint.Checkpointer(str(workdir), keep=5)
    for step in steps:
        ckpt.save(step, small_state(step), {"next_batch": step})
    ckpt.close()
    return checkpoint.Checkpointer(str(workdir), keep=5)


def test_a_transient_read_error_propagates_and_moves_nothing(tmp_path, monkeypatch):
    ckpt = saved(tmp_path)

    def unavailable(*args, **kwargs):
        raise ValueError("UNAVAILABLE: Error reading from the bucket: connection reset")

    monkeypatch.setattr(ckpt.manager, "restore", unavailable)
    with pytest.raises(ValueError, match="UNAVAILABLE"):
        ckpt.restore_latest(abstract(small_state(0)))
    assert ckpt.all_steps() == [1, 2]
    assert not os.path.exists(os.path.join(ckpt.directory, checkpoint.DAMAGED_DIR))


def test_a_checkpoint_of_another_shape_is_named_and_nothing_falls_back(tmp_path):
    ckpt = saved(tmp_path)
    with pytest.raises(
        checkpoint.CheckpointMismatch, match=r"params/w is \(4, 8\) float32 in the checkpoint, \(4, 16\)"
    ):
        ckpt.restore_latest(abstract(small_state(0, width=16)))
    assert ckpt.all_steps() == [1, 2]


def test_a_failed_background_save_is_reported_as_its_own_step_once(tmp_path, monkeypatch):
    ckpt = saved(tmp_path, steps=(2, 4))
    ckpt._pending = 6  # step 6 is being written in the background ...

    def disk_full():
        monkeypatch.undo()  # ... and fails once
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.manager, "wait_until_finished", disk_full)
    with pytest.raises(checkpoint.CheckpointWriteError, match=r"step 6 .* No space .* \[2, 4\] are intact"):
        ckpt.save(8, small_state(8), {"next_batch": 8})
    ckpt.close()  # reported once: closing does not raise it again


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tfds_dir):
    """A tiny MAE trained 10 steps in-process (checkpoint at step 10)."""
    workdir = str(tmp_path_factory.mktemp("trained"))
    train.train_and_evaluate(tiny_config(tfds_dir), workdir)
    return workdir


def snapshot(workdir):
    with open(os.path.join(workdir, "config.json")) as f:
        config_json = f.read()
    return config_json, sorted(os.listdir(os.path.join(workdir, "checkpoints")))


@pytest.mark.slow
def test_resuming_with_another_width_names_the_change_and_keeps_everything(tmp_path, tfds_dir, trained):
    workdir = str(tmp_path / "copy")
    shutil.copytree(trained, workdir)
    before = snapshot(workdir)
    config = tiny_config(tfds_dir, model__encoder__width=48, model__encoder__mlp_dim=96, total_steps=20)
    with pytest.raises(UserError) as e:
        train.train_and_evaluate(config, workdir)
    message = str(e.value)
    assert "\n" not in message and "does not match the config" in message
    assert "params/encoder" in message and "in the checkpoint" in message
    assert "model.encoder.width" in message and "model.encoder.mlp_dim" in message
    assert snapshot(workdir) == before  # config.json and every checkpoint as they were
    assert not os.path.exists(os.path.join(workdir, workdir_lib.LEASE_FILE))


@pytest.mark.slow
def test_config_json_is_rewritten_only_after_a_resume_succeeds(tmp_path, tfds_dir, trained):
    workdir = str(tmp_path / "copy")
    shutil.copytree(trained, workdir)
    train.train_and_evaluate(tiny_config(tfds_dir, total_steps=12, log_every_steps=6), workdir)
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["total_steps"] == 12


# --- inputs checked before the work starts -------------------------------------------------


def diffmae_sample_config(tfds_dir, **overrides):
    return tiny_config(tfds_dir, base="configs/diffmae_fmnist.py", task="sample", **overrides)


@pytest.mark.slow
def test_sampling_an_mae_workdir_is_refused_before_any_work(tmp_path, tfds_dir, trained):
    with pytest.raises(UserError, match=r"holds a 'mae' model .* needs a 'diffmae' model"):
        sample.run(diffmae_sample_config(tfds_dir), trained)


@pytest.mark.slow
def test_the_mae_to_compare_with_is_checked_before_sampling(tmp_path, trained):
    with pytest.raises(UserError, match=r"compare_mae_from='.*absent' does not exist"):
        sample.load_mae(str(tmp_path / "absent"))
    not_mae = str(tmp_path / "diffmae")
    shutil.copytree(trained, not_mae)
    with open(os.path.join(not_mae, "config.json")) as f:
        saved_config = json.load(f)
    saved_config["model"]["name"] = "diffmae"
    with open(os.path.join(not_mae, "config.json"), "w") as f:
        json.dump(saved_config, f)
    with pytest.raises(UserError, match="holds a 'diffmae' model"):
        sample.load_mae(not_mae)
    mae, params = sample.load_mae(trained)
    assert mae.norm_pix_loss is not None and "decoder" in params


@pytest.mark.slow
def test_init_from_falls_back_past_a_damaged_newest_checkpoint(tmp_path, tfds_dir, trained, caplog):
    workdir = str(tmp_path / "copy")
    shutil.copytree(trained, workdir)
    train.train_and_evaluate(tiny_config(tfds_dir, total_steps=20, checkpoint_every_steps=10), workdir)
    for root, _, files in os.walk(os.path.join(workdir, "checkpoints", "20", "state")):
        for name in files:
            os.truncate(os.path.join(root, name), 0)
    params, loaded = checkpoint.load_params(workdir)
    assert loaded.endswith("step 10") and "step 20" in caplog.text and "damaged" in caplog.text
    assert np.isfinite(params["encoder"]["norm"]["scale"]).all()
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "20"]  # read-only: untouched


def test_the_sample_config_does_not_replace_the_training_config(tmp_path):
    t = task.Task(diffmae_sample_config(str(tmp_path / "data")), str(tmp_path), None, None, True)
    task.record_config(t, filename=task.SAMPLE_CONFIG_FILE)
    assert os.listdir(tmp_path) == [task.SAMPLE_CONFIG_FILE]


def test_a_field_added_after_a_config_was_saved_counts_as_its_default():
    from maejax import config as config_lib
    from maejax.recipes import fmnist_diffmae

    config = fmnist_diffmae()
    saved = json.loads(config_lib.with_resolved_model(config).to_json_best_effort())
    del saved["model"]["diffusion"]["prediction"]  # a config.json written before the field existed
    assert task.changed_fields(saved, config) == []
    config.model.diffusion.prediction = "v"
    assert task.changed_fields(saved, config) == ["model.diffusion.prediction"]
