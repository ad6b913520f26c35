"""When maejax.main starts jax.distributed: JAX's own cluster detection, maejax's overrides."""

import os

import jax
import pytest
from jax._src.clusters import ClusterEnv, cloud_tpu_cluster

from maejax import main
from maejax.errors import UserError

CLUSTER_PREFIXES = ("SLURM_", "OMPI_", "TPU_", "MEGASCALE_", "KUBERNETES_", "MAEJAX_", "JAX_COORDINATOR")


@pytest.fixture(autouse=True)
def no_cluster(monkeypatch):
    """An environment with no cluster in it, whatever machine runs the tests."""
    for name in list(os.environ):
        if name.startswith(CLUSTER_PREFIXES):
            monkeypatch.delenv(name)
    # JAX's GCE TPU check asks the metadata server only on a TPU VM, and never with this set.
    monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")
    for name in ("coordinator_address", "num_processes", "process_id"):
        monkeypatch.setattr(main.FLAGS[name], "value", None)


@pytest.fixture
def initialize_calls(monkeypatch):
    """jax.distributed.initialize replaced by a recorder that restricts GPUs as JAX's SLURM path does."""
    calls = []

    def fake_initialize(**kwargs):
        calls.append(kwargs)
        jax.config.update("jax_cuda_visible_devices", "0")

    monkeypatch.setattr(jax.distributed, "initialize", fake_initialize)
    yield calls
    jax.config.update("jax_cuda_visible_devices", "all")
    jax.config.update("jax_rocm_visible_devices", "all")


def slurm(monkeypatch, ntasks):
    for name, value in {
        "SLURM_JOB_ID": "42",
        "SLURM_STEP_NODELIST": "node[001-002]",
        "SLURM_NTASKS": str(ntasks),
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
    }.items():
        monkeypatch.setenv(name, value)


def open_mpi(monkeypatch, size):
    monkeypatch.setenv("OMPI_MCA_orte_hnp_uri", "1531576320.0;tcp://10.96.0.1:34911")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", str(size))
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "0")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "0")


def gce_tpu_vm(monkeypatch, workers):
    """A Cloud TPU VM whose metadata server lists `workers` hosts in the slice."""
    metadata = {"agent-worker-number": "0", "worker-network-endpoints": ",".join(workers)}
    monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
    monkeypatch.setattr(cloud_tpu_cluster, "get_metadata", lambda key: (metadata[key], 200))
    monkeypatch.delenv("TPU_SKIP_MDS_QUERY")
    monkeypatch.setenv("MEGASCALE_NUM_SLICES", "1")


def test_jax_still_registers_the_clusters_maejax_relies_on():
    names = {env.name for env in ClusterEnv._cluster_types}
    assert {"slurm", "ompi", "gcetpu", "gketpu"} <= names


def test_no_cluster_runs_one_process(initialize_calls):
    assert main.detect_cluster() is None
    main.initialize_distributed()
    assert initialize_calls == []


def test_multi_task_slurm_job_initializes_from_the_environment(monkeypatch, initialize_calls):
    slurm(monkeypatch, ntasks=16)
    assert main.detect_cluster() == "slurm"
    main.initialize_distributed()
    assert initialize_calls == [{}]
    assert jax.config._read("jax_cuda_visible_devices") == "0"  # JAX's one GPU per task, left alone


def test_single_task_slurm_job_does_not_initialize(monkeypatch, initialize_calls):
    slurm(monkeypatch, ntasks=1)
    assert main.detect_cluster() is None
    main.initialize_distributed()
    assert initialize_calls == []


@pytest.mark.parametrize("size, expected", [(4, "ompi"), (1, None)])
def test_open_mpi_is_detected_when_it_holds_several_processes(monkeypatch, size, expected):
    open_mpi(monkeypatch, size)
    assert main.detect_cluster() == expected


@pytest.mark.parametrize("workers, expected", [(["w0", "w1", "w2", "w3"], "gcetpu"), (["w0"], None)])
def test_tpu_pod_slice_is_detected_single_host_is_not(monkeypatch, workers, expected):
    gce_tpu_vm(monkeypatch, workers)
    assert main.detect_cluster() == expected


def test_one_task_per_node_gets_every_gpu_back(monkeypatch, initialize_calls):
    slurm(monkeypatch, ntasks=4)
    monkeypatch.setenv("MAEJAX_LOCAL_DEVICES", "all")
    main.initialize_distributed()
    assert initialize_calls == [{}]
    assert jax.config._read("jax_cuda_visible_devices") == "all"


@pytest.mark.parametrize("forced, expected", [("1", True), ("0", False)])
def test_maejax_distributed_overrides_detection(monkeypatch, forced, expected):
    slurm(monkeypatch, ntasks=0 if expected else 8)  # the opposite of what detection says
    monkeypatch.setenv("MAEJAX_DISTRIBUTED", forced)
    assert main.cluster_environment() is expected


def test_flags_win_over_the_environment(monkeypatch, initialize_calls):
    monkeypatch.setenv("MAEJAX_DISTRIBUTED", "0")
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")  # not CPU: no gloo switch in this test process
    monkeypatch.setattr(main.FLAGS["coordinator_address"], "value", "10.0.0.1:1234")
    monkeypatch.setattr(main.FLAGS["num_processes"], "value", 2)
    monkeypatch.setattr(main.FLAGS["process_id"], "value", 1)
    main.initialize_distributed()
    assert initialize_calls == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}]


@pytest.mark.parametrize("name, value", [("MAEJAX_DISTRIBUTED", "yes"), ("MAEJAX_LOCAL_DEVICES", "0,1")])
def test_bad_override_values_are_user_errors(monkeypatch, initialize_calls, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match=name):
        main.initialize_distributed()
    assert initialize_calls == []


def test_a_failing_cluster_probe_stops_with_a_way_out(monkeypatch):
    slurm(monkeypatch, ntasks=4)
    monkeypatch.setenv("SLURM_NTASKS", "four")
    with pytest.raises(UserError, match="MAEJAX_DISTRIBUTED=0"):
        main.detect_cluster()
