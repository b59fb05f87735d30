"""Scale from zero and back with Ray's own autoscaler and fake multi-node provider, node types from cluster.yaml (slow).

The statistics job asks each collector for a GPU (`covariance.gpus_per_worker: 1`). The cluster starts as
cluster.yaml's head alone (`CPU: 0`, no GPU), so nothing can run until the autoscaler launches `gpu_worker` nodes;
they must come up from zero, carry the job to SUCCEEDED, and be terminated after the idle timeout. The GPU is only a
resource here: the CPU build of torch runs inside, through the device selection's CPU fallback (`model.device: auto`
picks cuda only where torch sees one), and the manifest records the device the collectors used.

The node types come from cluster.yaml itself: the head's resources, each worker type's min/max workers, the
cluster's max_workers and upscaling speed; a worker type's CPU and GPU counts come from its instance type, which Ray
detects on AWS (INSTANCE_RESOURCES: add a row when cluster.yaml changes instance type). Only the idle timeout is
shortened (10 minutes there).

Why not `ray.cluster_utils.AutoscalingCluster`: as shipped in Ray 2.60.0 it cannot be constructed (its config
template, ray/autoscaler/_private/fake_multi_node/example.yaml, is missing from the wheel: FileNotFoundError, pinned by
`test_ray_autoscalingcluster_cannot_be_built_from_the_wheel`), and its start()/shutdown() run `ray stop --force`, which
would stop every Ray on the machine. This module does what its start() does — `ray start --head
--autoscaling-config=<a fake_multinode config>` with RAY_FAKE_CLUSTER=1 and AUTOSCALER_UPDATE_INTERVAL_S=1 — on a head
of its own (tests/ray_heads.py): Ray's real autoscaler launches and terminates real raylets on this machine through
`FakeMultiNodeProvider`.

Training with `train.use_gpu` on these fake GPUs cannot work cleanly, so it is not run: Ray Train gives workers that
hold a GPU the NCCL backend (TorchConfig picks nccl when a worker has a GPU) and the CPU build of torch has no NCCL
(`torch.distributed.is_nccl_available()` is False here), so the process group fails to form before the training loop
starts; forcing gloo would test something a real GPU cluster does not run. Training across nodes, and surviving the
loss of one, is shown on `Cluster` nodes in test_multinode.py.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_TYPE
from ray.cluster_utils import AutoscalingCluster
from ray.job_submission import JobStatus, JobSubmissionClient
from ray_heads import (
    PORTS,
    free_ports,
    head_nodes,
    private_head,
    submit_job,
    wait_until,
)

from nullbooth.stats import manifest as manifest_module
from nullbooth.storage import RunDir

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parent.parent
# What Ray's AWS provider detects for an instance type (vCPUs, GPUs); the fake provider must be told.
INSTANCE_RESOURCES = {"g5.2xlarge": {"CPU": 8, "GPU": 1}}
IDLE_TIMEOUT_MINUTES = 0.1
STATS = ["preserve.max_prompts=6", "preserve.holdout=2", "sampling.num_inference_steps=2", "covariance.num_workers=2",
         "covariance.batch_size=2", "covariance.gpus_per_worker=1", "covariance.eigh_group_size=64"]


def fake_cluster_config(shipped: dict, gcs_address: str) -> dict:
    """cluster.yaml's node types and limits, for Ray's fake multi-node provider."""
    head_type = shipped["head_node_type"]
    types = {}
    for name, node in shipped["available_node_types"].items():
        if name == head_type:
            continue
        detected = INSTANCE_RESOURCES[node["node_config"]["InstanceType"]]
        types[name] = {"resources": {**detected, **node.get("resources", {}), "object_store_memory": 200 * 2**20},
                       "node_config": {}, "min_workers": node.get("min_workers", 0),
                       "max_workers": node.get("max_workers", shipped["max_workers"])}
    # The fake provider names its head type itself; its resources are cluster.yaml's head's.
    types[FAKE_HEAD_NODE_TYPE] = {"resources": dict(shipped["available_node_types"][head_type]["resources"]),
                                  "node_config": {}, "max_workers": 0}
    empty = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
             "head_start_ray_commands", "worker_start_ray_commands", "cluster_synced_files", "rsync_exclude",
             "rsync_filter")
    return {"cluster_name": shipped["cluster_name"], "max_workers": shipped["max_workers"],
            "upscaling_speed": shipped["upscaling_speed"], "idle_timeout_minutes": IDLE_TIMEOUT_MINUTES,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": gcs_address},
            "available_node_types": types, "head_node_type": FAKE_HEAD_NODE_TYPE, "auth": {}, "docker": {},
            "file_mounts": {}, "file_mounts_sync_continuously": False, **{key: [] for key in empty}}


def test_ray_autoscalingcluster_cannot_be_built_from_the_wheel():
    """Why this module starts the fake autoscaling head itself (the module's docstring); when this fails, Ray ships
    the template again and AutoscalingCluster may be used (minding its `ray stop --force`)."""
    with pytest.raises(FileNotFoundError, match="fake_multi_node/example.yaml"):
        AutoscalingCluster(head_resources={"CPU": 0}, worker_node_types={})


@pytest.fixture(scope="module")
def shipped() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def autoscaling(shipped, tmp_path_factory):
    """The head (cluster.yaml's, CPU 0) with Ray's autoscaler running the fake provider."""
    ports = dict(zip(PORTS, free_ports(len(PORTS))))
    config = fake_cluster_config(shipped, f"127.0.0.1:{ports['port']}")
    path = tmp_path_factory.mktemp("autoscaling") / "fake-cluster.yaml"
    path.write_text(json.dumps(config))
    head_cpus = config["available_node_types"][FAKE_HEAD_NODE_TYPE]["resources"]["CPU"]
    with private_head(num_cpus=head_cpus, ports=ports,
                      extra_args=("--num-gpus=0", f"--autoscaling-config={path}"),
                      extra_env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}) as head:
        yield head, config


def workers(head: dict, alive: bool | None = None) -> list[dict]:
    """The non-head nodes the cluster has had (alive=None), or those alive (True) or gone (False)."""
    return [n for n in head_nodes(head)
            if not n["is_head_node"] and (alive is None or (n["state"] == "ALIVE") == alive)]


@pytest.fixture(scope="module")
def stats_job(autoscaling, tmp_path_factory):
    head, config = autoscaling
    before = wait_until(lambda: head_nodes(head), "the head to list itself")
    run_dir = tmp_path_factory.mktemp("autoscaling-run") / "run"
    client = JobSubmissionClient(head["address"], headers={"Authorization": f"Bearer {head['token']}"})
    args = [arg for override in [f"run_dir={run_dir}", *STATS] for arg in ("--set", override)]
    job = submit_job(client, entrypoint=shlex.join(["python", str(ROOT / "jobs" / "build_cov.py"), "--config",
                                                     str(ROOT / "configs" / "tiny.yaml"), *args]),
                     runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    status = wait_until(lambda: (s := client.get_job_status(job)).is_terminal() and s, "the statistics job", 1200)
    finished = {"status": status, "logs": client.get_job_logs(job), "workers": workers(head)}
    wait_until(lambda: not workers(head, alive=True), "the idle GPU nodes to be terminated", 600)
    return before, finished, workers(head), run_dir, config


def test_the_cluster_starts_as_the_head_alone_and_it_takes_no_work(stats_job):
    before, _, _, _, config = stats_job
    assert config["available_node_types"][FAKE_HEAD_NODE_TYPE]["resources"] == {"CPU": 0}
    [head] = before  # scale from zero: no worker node
    assert head["is_head_node"] and head["state"] == "ALIVE"
    assert not head["resources_total"].get("CPU") and not head["resources_total"].get("GPU")


def test_gpu_workers_come_from_zero_carry_the_job_and_go_after_the_idle_timeout(stats_job, shipped):
    _, finished, after, run_dir, _ = stats_job
    assert finished["status"] == JobStatus.SUCCEEDED, finished["logs"][-3000:]
    assert "statistics written at" in finished["logs"]
    worker = shipped["available_node_types"]["gpu_worker"]
    assert worker["min_workers"] == 0
    launched = finished["workers"]
    # Two collectors of one GPU each on one-GPU nodes: two nodes at least, within the type's ceiling, each as
    # cluster.yaml describes it (its instance type's CPUs and GPU).
    assert 2 <= len(launched) <= worker["max_workers"]
    for node in launched:
        assert node["resources_total"]["GPU"] == 1 and node["resources_total"]["CPU"] == 8
    # After the idle timeout every one of them is gone, and no other was launched.
    assert {n["node_id"] for n in after} == {n["node_id"] for n in launched}
    assert all(n["state"] == "DEAD" for n in after)
    manifest = manifest_module.read_manifest(RunDir(str(run_dir)))
    assert manifest.collection["device"] == "cpu"  # a GPU resource, CPU torch: the device selection fell back
    assert manifest.text_rows == 4 * 32 * 2 and manifest.collection["actor_failures"] == 0
