"""`nullbooth run` end to end on the tiny LCM (the tiny SD pipeline runs as a Ray job in test_stats_job.py):
all three stages, a valid report, and a second run that reuses every completed stage."""

import hashlib
import os
from pathlib import Path

import pytest
from PIL import Image

from nullbooth.cli import main as cli_main
from nullbooth.config import load_config
from nullbooth.pipeline import run_pipeline
from nullbooth.report.schema import read_report
from nullbooth.stats import manifest as manifest_module
from nullbooth.storage import RunDir

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["preserve.max_prompts=16", "preserve.holdout=3", "sampling.num_inference_steps=2",
         "covariance.num_workers=1", "covariance.batch_size=8", "train.max_train_steps=6",
         "train.checkpoint_every=3", "train.metrics_every=3", "generate.batch_size=8"]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def lcm_run(tmp_path_factory, ray_local):
    """One pipeline run with a RELATIVE run_dir, as a user types it: Ray actors and Train workers do not share
    the driver's working directory, so this shows the stages hand them a path that still points at the run."""
    workdir = tmp_path_factory.mktemp("lcm")
    previous = os.getcwd()
    os.chdir(workdir)
    try:
        result = run_pipeline(load_config(ROOT / "configs" / "tiny-lcm.yaml", [*SMALL, "run_dir=runs/lcm"]))
    finally:
        os.chdir(previous)
    run_dir = workdir / "runs" / "lcm"
    return run_dir, [*SMALL, f"run_dir={run_dir}"], result


def test_run_writes_every_stage_of_the_lcm_pipeline(lcm_run):
    run_dir, _, result = lcm_run
    run = RunDir(str(run_dir))
    manifest = manifest_module.read_manifest(run)
    assert manifest.backend == "lcm"
    assert manifest.guidance_scale == 8.5 and manifest.timesteps == [999, 499]
    assert len(manifest.prompts) == 13 and len(manifest.holdout_prompts) == 3
    # LCM has no unconditional branch: text rows are exactly prompts x model_max_length.
    assert manifest.text_rows == 13 * 32

    assert (run_dir / "lora" / "pytorch_lora_weights.safetensors").is_file()
    report = read_report(run)  # validated against the report schema
    assert report["model"] == {"backend": "lcm", "path": "tiny-lcm"}
    assert report["sampling"]["scheduler"] == "lcm" and report["projection_mode"] == "global"
    holdout = [p for p in report["prompts"] if p["kind"] == "holdout"]
    assert [p["prompt"] for p in holdout] == manifest.holdout_prompts
    assert report["drift"]["holdout"]["prompts"] == 3
    # The training stage's preservation errors are carried into the report unchanged.
    trained = result["training"]
    assert report["preservation"]["overall"] == pytest.approx(trained["preservation_error"])
    grid = Image.open(result["generation"]["grid"])
    assert grid.size[0] > 0 and grid.size[1] > 0
    assert not result["statistics"]["reused"] and not result["training"]["already_finished"]


def test_second_run_reuses_every_completed_stage(lcm_run, capsys):
    run_dir, overrides, _ = lcm_run
    lora = run_dir / "lora" / "pytorch_lora_weights.safetensors"
    before = {"manifest": digest(run_dir / "covariance" / "manifest.json"),
              "global": digest(run_dir / "projection" / "global.safetensors"), "lora": digest(lora)}
    assert cli_main(["run", str(ROOT / "configs" / "tiny-lcm.yaml"), *sum((["--set", o] for o in overrides), [])]) == 0
    captured = capsys.readouterr()
    out = captured.out + captured.err  # the training summary goes to stderr, beside Ray Train's own output
    assert "reused complete run" in out and "already finished" in out
    assert "grid" in out and str(run_dir / "report") in out
    after = {"manifest": digest(run_dir / "covariance" / "manifest.json"),
             "global": digest(run_dir / "projection" / "global.safetensors"), "lora": digest(lora)}
    assert after == before


def test_run_with_a_config_for_another_model_is_refused_without_touching_the_run(lcm_run, capsys):
    run_dir, overrides, _ = lcm_run
    before = digest(run_dir / "covariance" / "manifest.json")
    code = cli_main(["run", str(ROOT / "configs" / "tiny.yaml"), *sum((["--set", o] for o in overrides), [])])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("nullbooth: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "pass --force" in err and "backend" in err
    assert digest(run_dir / "covariance" / "manifest.json") == before


def test_forced_run_on_other_prompts_retrains_and_the_next_run_reuses_it(lcm_run, capsys):
    """After `run --force` rebuilt the statistics (other prompts), the training of the old statistics is neither
    republished nor refused forever: the forced run trains afresh, and a plain run then reuses everything."""
    run_dir, overrides, _ = lcm_run
    lora = run_dir / "lora" / "pytorch_lora_weights.safetensors"
    before = digest(lora)
    args = ["run", str(ROOT / "configs" / "tiny-lcm.yaml"),
            *sum((["--set", o] for o in [*overrides, "preserve.max_prompts=14"]), [])]
    assert cli_main([*args, "--force"]) == 0
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert "reused complete run" not in out and "already finished" not in out
    assert len(manifest_module.read_manifest(RunDir(str(run_dir))).prompts) == 11
    assert digest(lora) != before
    after = digest(lora)
    assert cli_main(args) == 0
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert "reused complete run" in out and "already finished" in out
    assert digest(lora) == after
