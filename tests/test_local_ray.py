"""A laptop run starts a Ray of its own even where `ray start` left a cluster running (regression test, 49cddca).

A plain `ray.init()` joins the cluster that the last `ray start` recorded in `<Ray temp dir>/ray_current_cluster`;
a laptop run once joined a test's half-stopped cluster that way and lost its actors. `nullbooth.cluster.connect`
therefore asks for `ray.init(address="local")` when no address is configured. Here a private `ray start --head`
records its address where this process's Ray looks (RAY_TMPDIR points Ray's default temp dir at a private folder,
so /tmp/ray and other sessions are untouched), the test checks that Ray's own lookup would pick that head, and then
`connect` must start a new local Ray: another GCS, other nodes, and the head still has only its own node and has
seen no driver. Token authentication is off on both sides (RAY_AUTH_MODE=disabled), so that joining the head would
succeed silently, as it did on the laptop, instead of failing on a token mismatch.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import urllib.request
from pathlib import Path

import pytest
import ray
from ray._private.services import get_ray_address_from_environment
from ray_heads import head_nodes, private_head

from nullbooth.cluster import connect
from nullbooth.config.sections import RayConfig

pytestmark = pytest.mark.cluster  # it starts a `ray start --head` of its own, like the other cluster tests


def head_jobs(head: dict) -> list[dict]:
    """Every job the head knows, drivers that merely connected included (type DRIVER)."""
    request = urllib.request.Request(f"{head['address']}/api/jobs/",
                                     headers={"Authorization": f"Bearer {head['token']}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def running_head():
    """A `ray start --head` left running, recorded as this machine's current cluster for this module's Ray."""
    if ray.is_initialized():
        ray.shutdown()
    root = tempfile.mkdtemp(prefix="nblr-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_TMPDIR", root)
        patch.setenv("RAY_AUTH_MODE", "disabled")
        patch.delenv("RAY_ADDRESS", raising=False)
        try:
            with private_head(num_cpus=1, extra_env={"RAY_AUTH_MODE": "disabled"},
                              temp=str(Path(root) / "ray")) as head:
                yield head
                ray.shutdown()  # our local Ray goes first: the head's teardown kills what mentions its temp dir
        finally:
            ray.shutdown()
            shutil.rmtree(root, ignore_errors=True)


def test_a_local_run_starts_its_own_ray_not_the_running_cluster(running_head):
    head = running_head
    gcs_port = head["gcs_port"]
    # A plain ray.init() would join the head: Ray's own lookup (address=None) finds it.
    found = get_ray_address_from_environment(None, None)
    assert found is not None and found.endswith(f":{gcs_port}"), found
    head_node_ids = {n["node_id"] for n in head_nodes(head)}
    jobs_before = head_jobs(head)
    assert len(head_node_ids) == 1

    connect(RayConfig())  # a laptop run's defaults (tiny.yaml sets no ray section)

    assert ray.is_initialized()
    ours = ray.get_runtime_context().gcs_address
    assert not ours.endswith(f":{gcs_port}"), (ours, found)
    our_nodes = {n["NodeID"] for n in ray.nodes()}
    assert len(our_nodes) == 1 and not our_nodes & head_node_ids
    assert ray.get(ray.remote(lambda: ray.get_runtime_context().get_node_id()).remote()) in our_nodes
    # The head saw nothing of us: still its one node, and no new job (a driver that joins is listed as one).
    assert {n["node_id"] for n in head_nodes(head)} == head_node_ids
    assert head_jobs(head) == jobs_before
