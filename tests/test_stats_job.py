"""`ray job submit` end to end (slow): a private Ray head on free loopback ports and a temporary folder, the
statistics job and then the whole pipeline submitted with `--working-dir`, the run checked, then that head — and
only that head — stopped.

`ray stop` has no `--address` in Ray 2.60 and would stop every Ray on the machine, so the head runs as
`ray start --head --block`, a process this test owns: SIGTERM makes it take down exactly the processes it started.
Token authentication is on with a private token passed through the environment (no ~/.ray/auth_token involved).
"""

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
from contextlib import contextmanager
from pathlib import Path

from nullbooth.report.schema import read_report
from nullbooth.stats import manifest as manifest_module
from nullbooth.stats import store
from nullbooth.storage import RunDir

ROOT = Path(__file__).resolve().parent.parent
PORTS = ("port", "dashboard-port", "ray-client-server-port", "node-manager-port", "object-manager-port",
         "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port")


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


@contextmanager
def private_head():
    """A Ray head of our own; on exit it is stopped, with every process it started."""
    temp = tempfile.mkdtemp(prefix="nbjob-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    ports = dict(zip(PORTS, free_ports(len(PORTS))))
    token = secrets.token_hex(16)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    cmd = ["ray", "start", "--head", "--block", f"--temp-dir={temp}", "--dashboard-host=127.0.0.1",
           "--include-dashboard=true", "--num-cpus=2", "--disable-usage-stats",
           *[f"--{name}={port}" for name, port in ports.items()]]
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
        yield {"address": address, "env": env, "temp": temp, "gcs_port": ports["port"]}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for pid in processes_mentioning(temp):  # stragglers of OUR head only (their command line names our dir)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


SMALL = ["preserve.max_prompts=8", "preserve.holdout=2", "sampling.num_inference_steps=2",
         "covariance.num_workers=2", "covariance.batch_size=3"]


def run_job(head: dict, script: str, run_dir: Path, overrides: list[str]) -> str:
    """Submit `python <script>` with --working-dir, wait for it, check it SUCCEEDED; returns the job's output."""
    submission = f"nullbooth-{Path(script).stem}-{secrets.token_hex(4)}"
    runtime_env = {"env_vars": {"NULLBOOTH_CACHE": os.environ["NULLBOOTH_CACHE"], "HF_HUB_OFFLINE": "1",
                                "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}}
    cmd = ["ray", "job", "submit", "--address", head["address"], "--submission-id", submission,
           "--working-dir", str(ROOT), "--runtime-env-json", json.dumps(runtime_env), "--",
           "python", script, "--config", "configs/tiny.yaml", "--set", f"run_dir={run_dir}",
           *[arg for override in overrides for arg in ("--set", override)]]
    result = subprocess.run(cmd, env=head["env"], capture_output=True, text=True, timeout=400, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    request = urllib.request.Request(f"{head['address']}/api/jobs/{submission}",
                                     headers={"Authorization": f"Bearer {head['env']['RAY_AUTH_TOKEN']}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert json.loads(response.read())["status"] == "SUCCEEDED"
    return result.stdout


def test_ray_job_submit_builds_the_run_then_only_our_head_stops(tmp_path):
    """The statistics job, then the whole pipeline as a second job on the same run: it reuses the statistics,
    trains and writes the report."""
    run_dir = tmp_path / "run"
    with private_head() as head:
        assert processes_mentioning(head["temp"])  # the head's processes are recognisable by our folder
        stats_output = run_job(head, "jobs/build_cov.py", run_dir, SMALL)
        assert "statistics written at" in stats_output  # the job's own summary table, streamed back
        manifest_bytes = (run_dir / "covariance" / "manifest.json").read_bytes()
        pipeline_output = run_job(head, "jobs/pipeline.py", run_dir,
                                  [*SMALL, "train.max_train_steps=4", "train.checkpoint_every=2",
                                   "generate.batch_size=8"])
    assert processes_mentioning(head["temp"]) == []
    with socket.socket() as s:  # the GCS port is closed again
        assert s.connect_ex(("127.0.0.1", head["gcs_port"])) != 0

    run = RunDir(str(run_dir))
    manifest = manifest_module.read_manifest(run)
    demo = [p for p in (ROOT / "nullbooth" / "data" / "preserve_prompts.txt").read_text().splitlines()
            if p.strip() and not p.startswith("#")][:8]
    assert manifest.prompts == demo[:6] and manifest.holdout_prompts == demo[6:]
    assert manifest.text_rows == 6 * 32 * 2
    assert manifest.collection["num_workers"] == 2 and manifest.collection["batches"] == 2
    bases = store.load_bases(run, manifest, "global")
    assert set(bases) == set(manifest.layers)
    expected = {f"t{t:04d}.safetensors" for t in manifest.timesteps} | {"text.safetensors", "global.safetensors"}
    assert {p.name for p in (run_dir / "projection").iterdir()} == expected

    # The pipeline job reused the statistics untouched, then trained and reported on them.
    assert "reused complete run" in pipeline_output
    assert (run_dir / "covariance" / "manifest.json").read_bytes() == manifest_bytes
    report = read_report(run)
    assert [p["prompt"] for p in report["prompts"] if p["kind"] == "holdout"] == manifest.holdout_prompts
    assert report["preservation"]["mode"] == "global"
    assert str(run_dir / "report" / "grid.png") in pipeline_output
