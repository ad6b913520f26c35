"""Exact resume: stop a run at any moment and the same command continues it exactly.

The reference is one uninterrupted run; every interrupted-then-resumed run must
log the same loss at every step, bitwise (same program, same CPU), with no
batch repeated or skipped.
"""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from maejax import train
from tests.conftest import REPO, cli_overrides, tiny_config

STEPS = 40
RUN = dict(total_steps=STEPS, log_every_steps=1, checkpoint_every_steps=4, image_every_steps=STEPS)


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), "a step was logged twice"
    return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tfds_dir):
    workdir = str(tmp_path_factory.mktemp("reference"))
    train.train_and_evaluate(tiny_config(tfds_dir, **RUN), workdir)
    return losses(workdir)


def command(workdir, tfds_dir):
    return [
        sys.executable,
        "-m",
        "maejax.main",
        "--config=configs/mae_fmnist.py",
        f"--workdir={workdir}",
        *cli_overrides(tfds_dir, **RUN),
    ]


def start(workdir, tfds_dir):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        command(workdir, tfds_dir),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_until(proc, line_prefix):
    """Read the run's progress lines until one starts with `line_prefix`."""
    for line in proc.stdout:
        if line.startswith(line_prefix):
            return line
    raise AssertionError(f"the run ended before '{line_prefix}': {proc.stderr.read()[-2000:]}")


def committed_steps(workdir):
    ckpt = os.path.join(workdir, "checkpoints")
    return sorted(int(s) for s in os.listdir(ckpt) if s.isdigit()) if os.path.isdir(ckpt) else []


def kill_after_first_checkpoint(proc, workdir):
    """SIGKILL the run at the first progress line after a checkpoint is committed."""
    for line in proc.stdout:
        if line.startswith("step ") and committed_steps(workdir):
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            return int(line.split()[1].split("/")[0])
    raise AssertionError(f"the run ended before a checkpoint was committed: {proc.stderr.read()[-2000:]}")


def finish(workdir, tfds_dir):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run(
        command(workdir, tfds_dir), cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def assert_same_losses(workdir, reference):
    got = losses(workdir)
    assert sorted(got) == sorted(reference)
    mismatched = {s: (got[s], reference[s]) for s in reference if got[s] != reference[s]}
    assert not mismatched, mismatched


def saved_positions(workdir):
    ckpt = os.path.join(workdir, "checkpoints")
    out = {}
    for step in os.listdir(ckpt):
        if step.isdigit():
            with open(os.path.join(ckpt, step, "data", "metadata")) as f:
                out[int(step)] = json.load(f)["next_batch"]
    return out


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_resume_is_exact(tmp_path, tfds_dir, reference):
    workdir = str(tmp_path / "run")
    proc = start(workdir, tfds_dir)
    run_until(proc, "step 6/")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    saved = [line for line in out.splitlines() if line.startswith("preemption requested: saved step")]
    assert saved, out
    step = int(saved[0].split("saved step ")[1].split(";")[0])
    assert 6 <= step < STEPS and saved_positions(workdir)[step] == step  # batch position == updates done
    resumed = finish(workdir, tfds_dir)
    assert f"resuming at step {step} (input batch {step})" in resumed
    assert_same_losses(workdir, reference)


@pytest.mark.slow
def test_kill_9_mid_run_resumes_from_the_last_complete_checkpoint(tmp_path, tfds_dir, reference):
    workdir = str(tmp_path / "run")
    killed_at = kill_after_first_checkpoint(start(workdir, tfds_dir), workdir)
    last = committed_steps(workdir)[-1]
    assert killed_at < STEPS and last <= killed_at
    resumed = finish(workdir, tfds_dir)
    assert f"resuming at step {last} (input batch {last})" in resumed
    assert_same_losses(workdir, reference)


@pytest.mark.slow
def test_an_interrupted_save_is_ignored(tmp_path, tfds_dir, reference):
    # What kill -9 during an asynchronous save leaves: a step directory that
    # orbax never finalised (no commit marker, partial arrays).
    workdir = str(tmp_path / "run")
    kill_after_first_checkpoint(start(workdir, tfds_dir), workdir)
    ckpt = os.path.join(workdir, "checkpoints")
    complete = committed_steps(workdir)[-1]
    partial = os.path.join(ckpt, f"{complete + 4}.orbax-checkpoint-tmp")
    os.makedirs(os.path.join(partial, "state"))
    with open(os.path.join(partial, "state", "manifest.ocdbt"), "wb") as f:
        f.write(os.urandom(100))
    resumed = finish(workdir, tfds_dir)
    assert f"resuming at step {complete} " in resumed
    assert_same_losses(workdir, reference)
    assert not os.path.exists(partial)


@pytest.mark.slow
def test_the_input_position_is_saved_with_every_checkpoint(tmp_path, tfds_dir):
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(tiny_config(tfds_dir, **{**RUN, "total_steps": 8}), workdir)
    assert saved_positions(workdir) == {4: 4, 8: 8}
    np.testing.assert_array_less(0, list(losses(workdir).values()))
