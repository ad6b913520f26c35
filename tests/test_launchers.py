"""The TPU-pod and SLURM launchers, run against fake gcloud, uv, sbatch and srun.

Each fake appends one JSON line per call (its name, argv, working directory and
the environment variables the launchers set) to a log. The fake gcloud plays a
two-worker slice: `scp` copies into each worker's home, `ssh --command` runs the
command there with bash, so the install and run commands really execute.
"""

import json
import os
import shutil
import stat
import subprocess

import pytest

from tests.conftest import REPO

LAUNCHERS = ["tpu_pod.sh", "gpu_slurm.sh", "local_multiprocess.sh"]

# One bash script plays every fake (bash starts in milliseconds, Python in ~100 ms,
# and a launch makes a dozen calls); it dispatches on the name it is called by.
FAKE = r"""#!/usr/bin/env bash
set -euo pipefail
json() {
  local s=$1
  s=${s//\\/\\\\}; s=${s//\"/\\\"}; s=${s//$'\n'/\\n}; s=${s//$'\t'/\\t}
  printf '"%s"' "$s"
}
name=$(basename "$0")
argv="" env="" sep=""
for a in "$@"; do argv+="$sep$(json "$a")"; sep=,; done
sep=""
for k in MAEJAX_ROOT MAEJAX_LOCAL_DEVICES; do
  if [[ -n ${!k+set} ]]; then env+="$sep$(json "$k"):$(json "${!k}")"; sep=,; fi
done
printf '{"prog":%s,"argv":[%s],"cwd":%s,"env":{%s}}\n' \
  "$(json "$name")" "$argv" "$(json "$PWD")" "$env" >>"$FAKE_LOG"

state=$FAKE_ROOT/tpu_state
workers=("$FAKE_ROOT/worker0" "$FAKE_ROOT/worker1")
case $name in
  gcloud)
    case $4 in
      describe) [[ -f $state ]] || { echo "ERROR: NOT_FOUND" >&2; exit 1; }; cat "$state" ;;
      create) echo READY >"$state" ;;
      delete) rm "$state" ;;
      scp) for home in "${workers[@]}"; do mkdir -p "$home"; cp "$5" "$home/${6#*:}"; done ;;
      ssh)
        [[ " $* " == *" --worker=all "* ]] || { echo "fake gcloud: ssh without --worker=all" >&2; exit 9; }
        for a in "$@"; do [[ $a == --command=* ]] && command=${a#--command=}; done
        for home in "${workers[@]}"; do (cd "$home" && HOME=$home bash -c "$command"); done ;;
    esac ;;
  uv)
    if [[ $1 == venv ]]; then
      mkdir -p "${!#}/bin" && cp "$0" "${!#}/bin/python"
    fi ;;
esac
"""


@pytest.fixture
def fakes(tmp_path):
    """A bin folder of fakes, the log they write, and a base environment that finds them first."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("gcloud", "uv", "sbatch", "srun"):
        path = bin_dir / name
        path.write_text(FAKE)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "calls.jsonl"
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path / "home"),
        "FAKE_LOG": str(log),
        "FAKE_ROOT": str(tmp_path),
    }

    def calls(prog=None):
        if not log.exists():
            return []
        entries = [json.loads(line) for line in log.read_text().splitlines()]
        return [e for e in entries if prog is None or e["prog"] == prog]

    return env, calls


def git(repo, *args):
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True, capture_output=True
    )


@pytest.fixture
def checkout(tmp_path):
    """A small maejax-like git checkout holding copies of the launchers."""
    repo = tmp_path / "repo"
    (repo / "launch").mkdir(parents=True)
    (repo / "maejax").mkdir()
    for name in LAUNCHERS:
        shutil.copy(os.path.join(REPO, "launch", name), repo / "launch" / name)
    (repo / "setup.py").write_text("# dependencies v1\n")
    (repo / "maejax" / "__init__.py").write_text("")
    (repo / "old.txt").write_text("deleted before the second launch\n")
    (repo / ".gitignore").write_text("ignored.txt\n.venv/\n")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "first")
    return repo


def launch(repo, name, args, env):
    return subprocess.run(
        ["bash", str(repo / "launch" / name), *args], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launchers_parse(name):
    result = subprocess.run(
        ["bash", "-n", os.path.join(REPO, "launch", name)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------- TPU pod

TPU_ENV = {"TPU_NAME": "mae-pod", "ZONE": "us-central2-b", "ACCELERATOR": "v4-16"}
TPU_ARGS = ["--config=configs/mae_vitl.py", "--workdir=/mnt/bucket/run", "--config.note=it's here"]


@pytest.mark.parametrize(
    "script, usage, variable",
    [
        ("tpu_pod.sh", "usage: TPU_NAME=NAME ZONE=ZONE", "WORKER_SETUP"),
        ("gpu_slurm.sh", "usage: launch/gpu_slurm.sh [SBATCH_OPTION...] -- --config=CONFIG", "MAEJAX_VENV"),
    ],
)
def test_help_prints_usage_and_runs_nothing(checkout, fakes, script, usage, variable):
    env, calls = fakes
    result = launch(checkout, script, ["--help"], env)
    assert result.returncode == 0
    assert result.stdout.startswith(usage)
    assert variable in result.stdout
    assert calls() == []


@pytest.mark.parametrize("missing", ["TPU_NAME", "ZONE"])
def test_tpu_pod_missing_variable_is_one_line_before_gcloud(checkout, fakes, missing):
    env, calls = fakes
    env = {**env, **{k: v for k, v in TPU_ENV.items() if k != missing}}
    result = launch(checkout, "tpu_pod.sh", TPU_ARGS, env)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"tpu_pod: error: set {missing} ")
    assert calls() == []


def test_tpu_pod_refuses_a_run_without_shared_workdir(checkout, fakes):
    env, calls = fakes
    result = launch(checkout, "tpu_pod.sh", ["--config=configs/mae_vitl.py"], {**env, **TPU_ENV})
    assert result.returncode == 2
    assert "--workdir" in result.stderr
    assert calls() == []


def test_tpu_pod_creates_ships_installs_and_runs_on_every_worker(checkout, fakes, tmp_path):
    env, calls = fakes
    (checkout / "notes.txt").write_text("untracked, not ignored\n")
    (checkout / "ignored.txt").write_text("ignored\n")
    (checkout / "setup.py").write_text("# dependencies v1, edited\n")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=checkout, capture_output=True, text=True)
    env = {**env, **TPU_ENV, "PROJECT": "my-project", "TPU_CREATE_FLAGS": "--spot --network=mae"}
    result = launch(checkout, "tpu_pod.sh", TPU_ARGS, env)
    assert result.returncode == 0, result.stderr
    assert f"shipping commit {commit.stdout.strip()}, working tree dirty" in result.stderr

    gcloud = [c["argv"] for c in calls("gcloud")]
    verbs = [argv[3] for argv in gcloud]
    assert verbs == ["describe", "create", "scp", "ssh", "ssh"]
    assert all(
        argv[:3] == ["compute", "tpus", "tpu-vm"] and "--zone=us-central2-b" in argv for argv in gcloud
    )
    assert "--accelerator-type=v4-16" in gcloud[1]
    assert gcloud[2][5:7] == ["mae-pod:maejax.tar.gz", "--worker=all"]
    assert all(argv[4] == "mae-pod" and "--worker=all" in argv for argv in gcloud[3:])

    for worker in ("worker0", "worker1"):
        tree = tmp_path / worker / "maejax"
        assert (tree / "notes.txt").exists() and (tree / "launch" / "tpu_pod.sh").exists()
        assert (
            tree / "setup.py"
        ).read_text() == "# dependencies v1, edited\n"  # as on disk, not as committed
        assert not (tree / "ignored.txt").exists()
    uv = [c["argv"] for c in calls("uv")]
    assert [argv[:4] for argv in uv if argv[0] == "venv"] == [["venv", "-q", "--python", "3.11"]] * 2
    installs = [argv for argv in uv if argv[:2] == ["pip", "install"]]
    assert [argv[-2:] for argv in installs] == [
        ["-e", f"{tmp_path / w / 'maejax'}[tpu]"] for w in ("worker0", "worker1")
    ]
    runs = calls("python")
    assert [r["argv"] for r in runs] == [["-m", "maejax.main", *TPU_ARGS]] * 2
    assert [r["cwd"] for r in runs] == [str(tmp_path / w / "maejax") for w in ("worker0", "worker1")]


def test_tpu_pod_rerun_after_preemption_recreates_reships_and_skips_the_install(checkout, fakes, tmp_path):
    env, calls = fakes
    env = {**env, **TPU_ENV, "WORKER_SETUP": "echo mounted >> ~/setup.log"}
    assert launch(checkout, "tpu_pod.sh", TPU_ARGS, env).returncode == 0
    (tmp_path / "tpu_state").write_text("PREEMPTED")
    (checkout / "old.txt").unlink()
    git(checkout, "commit", "-q", "-am", "second")
    result = launch(checkout, "tpu_pod.sh", TPU_ARGS, env)
    assert result.returncode == 0, result.stderr
    assert "working tree clean" in result.stderr

    verbs = [c["argv"][3] for c in calls("gcloud")]
    assert verbs[5:] == ["describe", "delete", "create", "scp", "ssh", "ssh"]
    installs = [c for c in calls("uv") if c["argv"][:2] == ["pip", "install"]]
    assert len(installs) == 2  # one per worker, on the first launch only: setup.py did not change
    assert len(calls("python")) == 4
    for worker in ("worker0", "worker1"):
        assert not (tmp_path / worker / "maejax" / "old.txt").exists()
        assert (tmp_path / worker / "setup.log").read_text() == "mounted\nmounted\n"


def test_tpu_pod_reuses_a_ready_slice_and_reinstalls_when_setup_changes(checkout, fakes, tmp_path):
    env, calls = fakes
    (tmp_path / "tpu_state").write_text("READY")
    env = {k: v for k, v in {**env, **TPU_ENV}.items() if k != "ACCELERATOR"}
    assert launch(checkout, "tpu_pod.sh", TPU_ARGS, env).returncode == 0
    (checkout / "setup.py").write_text("# dependencies v2\n")
    assert launch(checkout, "tpu_pod.sh", TPU_ARGS, env).returncode == 0
    assert "create" not in [c["argv"][3] for c in calls("gcloud")]
    installs = [c for c in calls("uv") if c["argv"][:2] == ["pip", "install"]]
    assert len(installs) == 4


def test_tpu_pod_needs_accelerator_only_to_create(checkout, fakes):
    env, calls = fakes
    env = {k: v for k, v in {**env, **TPU_ENV}.items() if k != "ACCELERATOR"}
    result = launch(checkout, "tpu_pod.sh", TPU_ARGS, env)
    assert result.returncode == 2
    assert "set ACCELERATOR" in result.stderr
    assert [c["argv"][3] for c in calls("gcloud")] == ["describe"]


# ---------------------------------------------------------------------------- SLURM

RUN_ARGS = ["--config=configs/mae_vitl.py", "--workdir=/shared/run"]


def job_env(env, checkout, tasks_per_node, gpus="8"):
    return {
        **env,
        "SLURM_JOB_ID": "42",
        "SLURM_SUBMIT_DIR": str(checkout),
        "SLURM_TASKS_PER_NODE": tasks_per_node,
        "SLURM_GPUS_ON_NODE": gpus,
        "MAEJAX_LOCAL_DEVICES": "left over from the caller",
    }


def test_gpu_slurm_one_task_per_gpu_installs_then_sruns(checkout, fakes):
    env, calls = fakes
    result = launch(checkout, "gpu_slurm.sh", RUN_ARGS, job_env(env, checkout, "8(x2)"))
    assert result.returncode == 0, result.stderr
    uv = [c["argv"] for c in calls("uv")]
    assert uv[0][:4] == ["venv", "-q", "--python", "3.11"]
    assert uv[1][-2:] == ["-e", f"{checkout}[cuda12]"]
    (srun,) = calls("srun")
    assert srun["argv"] == [
        "--kill-on-bad-exit=1",
        f"{checkout}/.venv/bin/python",
        "-m",
        "maejax.main",
        *RUN_ARGS,
    ]
    assert srun["cwd"] == str(checkout)
    assert "MAEJAX_LOCAL_DEVICES" not in srun["env"]  # JAX's default: the GPU at SLURM_LOCALID


def test_gpu_slurm_one_task_per_node_gives_each_process_all_gpus(checkout, fakes):
    env, calls = fakes
    result = launch(checkout, "gpu_slurm.sh", RUN_ARGS, job_env(env, checkout, "1(x4)"))
    assert result.returncode == 0, result.stderr
    (srun,) = calls("srun")
    assert srun["env"]["MAEJAX_LOCAL_DEVICES"] == "all"
    assert "one process per node" in result.stderr


def test_gpu_slurm_requeued_job_does_not_reinstall(checkout, fakes):
    env, calls = fakes
    for _ in range(2):
        assert launch(checkout, "gpu_slurm.sh", RUN_ARGS, job_env(env, checkout, "8")).returncode == 0
    assert len(calls("uv")) == 2  # venv + install, first job only
    assert len(calls("srun")) == 2


@pytest.mark.parametrize(
    "tasks, message",
    [("4(x2)", "4 tasks per node but 8 GPUs per node"), ("2(x3),1", "nodes run different numbers of tasks")],
)
def test_gpu_slurm_refuses_layouts_that_idle_gpus(checkout, fakes, tasks, message):
    env, calls = fakes
    result = launch(checkout, "gpu_slurm.sh", RUN_ARGS, job_env(env, checkout, tasks))
    assert result.returncode == 2
    assert message in result.stderr
    assert calls("srun") == []


def test_gpu_slurm_uses_a_named_environment_untouched(checkout, fakes, tmp_path):
    env, calls = fakes
    venv = tmp_path / "site-env"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    (venv / "bin" / "python").chmod(0o755)
    result = launch(
        checkout, "gpu_slurm.sh", RUN_ARGS, {**job_env(env, checkout, "8"), "MAEJAX_VENV": str(venv)}
    )
    assert result.returncode == 0, result.stderr
    assert calls("uv") == []
    assert calls("srun")[0]["argv"][1] == f"{venv}/bin/python"


def test_gpu_slurm_missing_named_environment_is_one_line(checkout, fakes, tmp_path):
    env, calls = fakes
    env = {**job_env(env, checkout, "8"), "MAEJAX_VENV": str(tmp_path / "nowhere")}
    result = launch(checkout, "gpu_slurm.sh", RUN_ARGS, env)
    assert result.returncode == 2
    assert result.stderr.strip() == f"gpu_slurm: error: MAEJAX_VENV={tmp_path / 'nowhere'} has no bin/python"
    assert calls() == []


def test_gpu_slurm_from_a_login_node_installs_then_submits_itself(checkout, fakes):
    env, calls = fakes
    options = ["--nodes=2", "--gpus-per-node=8", "--ntasks-per-node=1"]
    result = launch(checkout, "gpu_slurm.sh", [*options, "--", *RUN_ARGS], env)
    assert result.returncode == 0, result.stderr
    assert [c["argv"][0] for c in calls("uv")] == ["venv", "pip"]
    (sbatch,) = calls("sbatch")
    assert sbatch["argv"] == [*options, f"{checkout}/launch/gpu_slurm.sh", *RUN_ARGS]
    assert sbatch["env"]["MAEJAX_ROOT"] == str(checkout)
    assert sbatch["cwd"] == str(checkout)
    assert calls("srun") == []


def test_gpu_slurm_outside_a_job_without_separator_is_one_line(checkout, fakes):
    env, calls = fakes
    result = launch(checkout, "gpu_slurm.sh", RUN_ARGS, env)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "not inside a SLURM job" in result.stderr
    assert calls() == []
