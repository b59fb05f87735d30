"""Test helpers: a private `ray start --head` on free loopback ports, and the loopback switch for in-process nodes.

`ray stop` has no `--address` in Ray 2.60 and would stop every Ray on the machine, so a head runs as
`ray start --head --block`, a process the test owns: SIGTERM makes it take down exactly the processes it started;
stragglers (worker nodes it spawned, e.g. the fake autoscaler's) are recognised by our private temp dir on their
command line. Token authentication is on with a private token passed through the environment (no
~/.ray/auth_token involved). Every node binds 127.0.0.1 only: Ray's single-machine switch
(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, the one nullbooth.cluster uses) is set for the head and everything it starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

PORTS = ("port", "dashboard-port", "ray-client-server-port", "node-manager-port", "object-manager-port",
         "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port")
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# A busy 2-core machine can take Ray past its own start-up deadlines (a worker process registering, the dashboard,
# a raylet waiting for its agent's ports, which otherwise aborts the raylet): allow minutes, so a slow start is waited
# for instead of failing the node or the actor.
PATIENT_ENV = {"RAY_worker_register_timeout_seconds": "600", "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "600",
               "RAY_agent_register_timeout_ms": "600000"}
# On SIGTERM a `ray start --block` head first drains its node for up to 30 s (Ray's default, for Serve traffic), even
# when idle; our private heads serve no traffic, so they stop at once (the same processes go, 30 s sooner).
QUICK_STOP_ENV = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains `text` (our unique temp dir): the processes of our head only."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if text.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            pass
    return found


def wait_until(condition, what: str, timeout_s: float = 300, every_s: float = 0.5):
    """Poll `condition()` until it returns something truthy (returned); a guard against a hang, not a timing check."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"gave up after {timeout_s:.0f} s waiting for {what}"
        time.sleep(every_s)


@contextlib.contextmanager
def private_head(num_cpus: float = 2, extra_args: tuple[str, ...] = (), extra_env: dict | None = None,
                 ports: dict[str, int] | None = None, temp: str | None = None) -> Iterator[dict]:
    """A Ray head of our own; on exit it is stopped, with every process it (or its autoscaler) started.

    `temp`: its Ray temp dir (removed on exit), a fresh private one by default; `ray start` writes the head's address
    there (`ray_current_cluster`), where a plain `ray.init()` using that temp dir would find and join it.
    Yields {"address": dashboard URL, "env": the environment clients need, "temp", "gcs_port", "ports", "token"}.
    """
    temp = temp or tempfile.mkdtemp(prefix="nbjob-", dir="/tmp")  # short: socket paths must fit in 107 bytes
    os.makedirs(temp, exist_ok=True)
    ports = ports or dict(zip(PORTS, free_ports(len(PORTS))))
    token = secrets.token_hex(16)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0",
           **LOOPBACK_ENV, **PATIENT_ENV, **QUICK_STOP_ENV, **(extra_env or {}),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    cmd = ["ray", "start", "--head", "--block", f"--temp-dir={temp}", "--dashboard-host=127.0.0.1",
           "--include-dashboard=true", f"--num-cpus={num_cpus}", "--disable-usage-stats",
           *[f"--{name}={port}" for name, port in ports.items()], *extra_args]
    log = open(Path(temp) / "head.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline = time.time() + 180
        while True:
            request = urllib.request.Request(f"{address}/api/version", headers={"Authorization": f"Bearer {token}"})
            try:
                urllib.request.urlopen(request, timeout=5)
                break
            except (urllib.error.URLError, OSError):
                assert proc.poll() is None, (Path(temp) / "head.log").read_text()[-3000:]
                assert time.time() < deadline, "the Ray head did not come up in 180 s"
                time.sleep(1)
        # The dashboard can answer before the head's raylet has registered; `ray start` records the head's address
        # (`ray_current_cluster`) only once its node is up, or exits if it never comes up.
        while not (Path(temp) / "ray_current_cluster").exists():
            assert proc.poll() is None, (Path(temp) / "head.log").read_text()[-3000:]
            assert time.time() < deadline, "the Ray head's node did not come up in 180 s"
            time.sleep(0.5)
        yield {"address": address, "env": env, "temp": temp, "gcs_port": ports["port"], "ports": ports,
               "token": token}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for pid in processes_mentioning(temp):  # stragglers of OUR head only (their command line names our dir)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def submit_job(client, **kwargs) -> str:
    """`client.submit_job(**kwargs)`, retried while the head's job agent is still starting (a busy machine)."""

    def attempt():
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as err:
            if "No available agent" not in str(err):
                raise
            return None

    return wait_until(attempt, "the head's job agent to accept a job", 300, every_s=2)


def head_nodes(head: dict) -> list[dict]:
    """Every node the head's state API knows, dead ones included (node_id, state, resources_total, ...)."""
    request = urllib.request.Request(f"{head['address']}/api/v0/nodes?limit=1000&detail=true",
                                     headers={"Authorization": f"Bearer {head['token']}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["data"]["result"]["result"]


@contextlib.contextmanager
def loopback_nodes() -> Iterator[None]:
    """Nodes started in this process (ray.cluster_utils.Cluster, a driver's ray.init) and every process they start
    take 127.0.0.1 as their address, as nullbooth's own local Ray does (nullbooth.cluster.loopback_only), and wait
    patiently for their processes to start (PATIENT_ENV)."""
    from nullbooth.cluster import loopback_only

    saved = {key: os.environ.get(key) for key in {**LOOPBACK_ENV, **PATIENT_ENV}}
    os.environ.update({**LOOPBACK_ENV, **PATIENT_ENV})
    try:
        with loopback_only():
            yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
