"""The jobs on a Ray head, end to end (slow): a private Ray head on free loopback ports and a temporary folder; the
statistics job submitted with `ray job submit --working-dir`, then the whole pipeline and a job with a bad config
through the Jobs API (`JobSubmissionClient`, what the dashboard uses: submit, follow the log, read status and log);
the run checked; the head's Prometheus endpoint (`--metrics-export-port`) scraped and parsed with prometheus_client;
then that head — and only that head — stopped.

The head (tests/ray_heads.py) runs as `ray start --head --block`, a process this test owns, on loopback, with
token authentication on and a private token.
"""

import asyncio
import json
import os
import secrets
import shlex
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from ray.job_submission import JobStatus, JobSubmissionClient
from ray_heads import private_head, processes_mentioning, submit_job, wait_until

from nullbooth.report.schema import read_report
from nullbooth.stats import manifest as manifest_module
from nullbooth.stats import store
from nullbooth.storage import RunDir

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parent.parent


TRAIN_STEPS = 4
JOB_ENV = {"NULLBOOTH_CACHE": os.environ["NULLBOOTH_CACHE"], "HF_HUB_OFFLINE": "1",
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}
SMALL = ["preserve.max_prompts=8", "preserve.holdout=2", "sampling.num_inference_steps=2",
         "covariance.num_workers=2", "covariance.batch_size=3"]


def run_job(head: dict, script: str, run_dir: Path, overrides: list[str]) -> str:
    """`ray job submit` `python <script>` with --working-dir, wait for it, check it SUCCEEDED; returns its output."""
    submission = f"nullbooth-{Path(script).stem}-{secrets.token_hex(4)}"
    runtime_env = {"env_vars": JOB_ENV}
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


def submit_and_follow(client: JobSubmissionClient, script: str, run_dir: Path, overrides: list[str]) -> dict:
    """Submit `python <script>` through the Jobs API (as the dashboard does), follow its log to the end; returns its
    final status, the followed log and the stored log."""
    args = ["python", script, "--config", "configs/tiny.yaml", "--set", f"run_dir={run_dir}",
            *[arg for override in overrides for arg in ("--set", override)]]
    job = submit_job(client, entrypoint=shlex.join(args),
                     runtime_env={"working_dir": str(ROOT), "excludes": [".git", "runs"], "env_vars": JOB_ENV})

    async def follow() -> str:
        return "".join([lines async for lines in client.tail_job_logs(job)])

    followed = asyncio.run(follow())
    status = wait_until(lambda: (s := client.get_job_status(job)).is_terminal() and s, "the job's final status", 60)
    return {"status": status, "followed": followed, "logs": client.get_job_logs(job)}


def nullbooth_metrics(port: int) -> dict[str, list]:
    """The nullbooth_* series of a Prometheus endpoint, parsed by prometheus_client: family name -> samples."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)
            if family.name.startswith("ray_nullbooth_")}


def total(samples: list, **labels: str) -> float:
    """The sum of a counter's `_total` samples whose labels include `labels` (one sample per process and tags)."""
    return sum(s.value for s in samples if s.name.endswith("_total") and labels.items() <= s.labels.items())


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """On one private head: the statistics job (Jobs API), the whole pipeline on the same run (`ray job submit`) and a
    job with a bad config (Jobs API), then the head's Prometheus endpoint scraped; then the head stopped."""
    run_dir = tmp_path_factory.mktemp("jobs") / "run"
    with private_head() as head:
        assert processes_mentioning(head["temp"])  # the head's processes are recognisable by our folder
        client = JobSubmissionClient(head["address"], headers={"Authorization": f"Bearer {head['token']}"})
        stats = submit_and_follow(client, "jobs/build_cov.py", run_dir, SMALL)
        manifest_bytes = (run_dir / "covariance" / "manifest.json").read_bytes()
        pipeline_output = run_job(head, "jobs/pipeline.py", run_dir,
                                  [*SMALL, f"train.max_train_steps={TRAIN_STEPS}", "train.checkpoint_every=2",
                                   "generate.batch_size=8"])
        bad = submit_and_follow(client, "jobs/train.py", run_dir, [*SMALL, "train.max_train_steps=0"])
        port = head["ports"]["metrics-export-port"]
        # Exported every few seconds: wait for the last job's series to arrive, then read them all.
        wait_until(lambda: total(nullbooth_metrics(port).get("ray_nullbooth_train_steps", [])) >= TRAIN_STEPS,
                   "the training steps to reach the metrics endpoint", 120)
        metrics = nullbooth_metrics(port)
    with socket.socket() as s:
        gcs_open = s.connect_ex(("127.0.0.1", head["gcs_port"])) == 0
    return {"run_dir": run_dir, "stats": stats, "manifest_bytes": manifest_bytes, "pipeline_output": pipeline_output,
            "bad": bad, "metrics": metrics, "left": processes_mentioning(head["temp"]), "gcs_open": gcs_open}


def test_only_our_head_stops(jobs):
    assert jobs["left"] == [] and not jobs["gcs_open"]  # no process of our head left, its GCS port closed


def test_the_statistics_job_builds_the_run_and_the_pipeline_job_reuses_it(jobs):
    """The statistics job, then the whole pipeline as a second job on the same run: it reuses the statistics,
    trains and writes the report."""
    run_dir = jobs["run_dir"]
    assert jobs["stats"]["status"] == JobStatus.SUCCEEDED, jobs["stats"]["logs"][-3000:]
    assert "statistics written at" in jobs["stats"]["logs"]  # the job's own summary table
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
    pipeline_output = jobs["pipeline_output"]  # streamed back by `ray job submit`, which checked SUCCEEDED
    assert "reused complete run" in pipeline_output
    assert (run_dir / "covariance" / "manifest.json").read_bytes() == jobs["manifest_bytes"]
    report = read_report(run)
    assert [p["prompt"] for p in report["prompts"] if p["kind"] == "holdout"] == manifest.holdout_prompts
    assert report["preservation"]["mode"] == "global"
    assert json.loads((run_dir / "lora" / "report.json").read_text())["step"] == TRAIN_STEPS
    assert str(run_dir / "report" / "grid.png") in pipeline_output


def test_the_jobs_api_follows_a_job_and_a_bad_config_fails_with_its_one_line_error(jobs):
    stats, bad = jobs["stats"], jobs["bad"]
    # Following the log live gave what the job server stored, up to the last line.
    assert "statistics written at" in stats["followed"] and stats["logs"].endswith(stats["followed"][-2000:])
    assert bad["status"] == JobStatus.FAILED
    assert bad["logs"].rstrip().splitlines()[-1] == (
        "nullbooth: error: train.max_train_steps: expected a value ≥ 1, got 0")
    assert "Traceback" not in bad["logs"]
    assert bad["followed"].rstrip().endswith("got 0")


def test_nullbooth_metrics_reach_prometheus_with_the_runs_values(jobs):
    """What the dashboard's Metrics tab and a Prometheus scrape see, parsed by prometheus_client: prompts sampled
    = the prompts, rows = the manifest's rows, training steps = max_train_steps."""
    metrics = jobs["metrics"]
    manifest = manifest_module.read_manifest(RunDir(str(jobs["run_dir"])))
    prompts = metrics["ray_nullbooth_stats_prompts_done"]
    assert total(prompts) == len(manifest.prompts) == 6
    # Two batches for two collectors: each absorbed one (3 prompts), none idled.
    assert {a: total(prompts, actor=a) for a in ("0", "1")} == {"0": 3, "1": 3}
    rows = metrics["ray_nullbooth_stats_rows"]
    assert total(rows, side="text") == manifest.text_rows
    assert total(rows, side="image") == sum(n for layers in manifest.image_rows.values() for n in layers.values())
    assert total(metrics["ray_nullbooth_train_steps"]) == TRAIN_STEPS
