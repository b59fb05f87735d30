"""A laptop run starts a Ray of its own even where `ray start` left a cluster running (regression test, 49cddca).

A plain `ray.init()` joins the cluster that the last `ray start` recorded in `<Ray temp dir>/ray_current_cluster`;
a laptop run once joined a test's half-stopped cluster that way and lost its actors. `nullbooth.cluster.connect`
therefore asks for `ray.init(address="local")` when no address is configured. Here a private `ray start --head`
records its address where this process's Ray looks (RAY_TMPDIR points Ray's default temp dir at a private folder,
so /tmp/ray and other sessions are untouched), the test checks that Ray's own lookup would pick that head, and then
`connect` must start a new local Ray: another GCS, other nodes, and the head still has only its own node and has
seen no driver. Token authentication is off on both sides (RAY_AUTH_MODE=disabled), so that joining the head would
succeed silently, as it did on the laptop, instead of failing on a token mismatch.

The client side runs in a process of its own: Ray keeps its authentication mode per process, so a driver that ran
with RAY_AUTH_MODE=disabled would fail every later module's token-authenticated Ray ("InvalidAuthToken").
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import pytest
from ray_heads import head_nodes, private_head

pytestmark = pytest.mark.cluster  # it starts a `ray start --head` of its own, like the other cluster tests

# What a laptop run does, in a fresh process: Ray's own lookup of a cluster, then `connect` with a laptop's defaults
# (tiny.yaml sets no ray section), then where its tasks run.
CLIENT = """
import json, ray
from ray._private.services import get_ray_address_from_environment
from nullbooth.cluster import connect
from nullbooth.config.sections import RayConfig

found = get_ray_address_from_environment(None, None)
connect(RayConfig())
nodes = [n["NodeID"] for n in ray.nodes()]
task_node = ray.get(ray.remote(lambda: ray.get_runtime_context().get_node_id()).remote())
print("RESULT " + json.dumps({"found": found, "gcs": ray.get_runtime_context().gcs_address, "nodes": nodes,
                              "task_node": task_node}))
ray.shutdown()
"""


def head_jobs(head: dict) -> list[dict]:
    """Every job the head knows, drivers that merely connected included (type DRIVER)."""
    request = urllib.request.Request(f"{head['address']}/api/jobs/",
                                     headers={"Authorization": f"Bearer {head['token']}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def running_head():
    """A `ray start --head` left running, recorded as the current cluster in a private Ray temp dir, and the
    environment in which a client process's Ray looks there."""
    root = tempfile.mkdtemp(prefix="nblr-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    try:
        with private_head(num_cpus=1, extra_env={"RAY_AUTH_MODE": "disabled"}, temp=str(Path(root) / "ray")) as head:
            client_env = {**os.environ, "RAY_TMPDIR": root, "RAY_AUTH_MODE": "disabled"}
            client_env.pop("RAY_ADDRESS", None)
            yield {**head, "client_env": client_env}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_local_run_starts_its_own_ray_not_the_running_cluster(running_head):
    head = running_head
    gcs_port = head["gcs_port"]
    head_node_ids = {n["node_id"] for n in head_nodes(head)}
    jobs_before = head_jobs(head)
    assert len(head_node_ids) == 1

    done = subprocess.run([sys.executable, "-c", CLIENT], env=head["client_env"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    client = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])

    # A plain ray.init() would join the head: Ray's own lookup (address=None) finds it.
    assert client["found"] is not None and client["found"].endswith(f":{gcs_port}"), client
    assert not client["gcs"].endswith(f":{gcs_port}"), client
    assert len(client["nodes"]) == 1 and not set(client["nodes"]) & head_node_ids
    assert client["task_node"] in client["nodes"]
    # The head saw nothing of us: still its one node, and no new job (a driver that joins is listed as one).
    assert {n["node_id"] for n in head_nodes(head)} == head_node_ids
    assert head_jobs(head) == jobs_before
