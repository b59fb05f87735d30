"""End to end on the tiny model: on the held-out preserved prompts with the same seeds, a LoRA trained in global
mode drifts less from the base model than a plain (none) LoRA trained the same way.

Real stages only: build_covariance, Ray Train `train`, then `generate` and `compare_runs`.
"""

import json
import shutil

import pytest

from nullbooth.config import load_config
from nullbooth.report.compare import compare_runs
from nullbooth.report.generate import generate
from nullbooth.report.schema import check_report
from nullbooth.stats.build import build_covariance
from nullbooth.train.run import train

COMMON = ["sampling.num_inference_steps=2", "preserve.max_prompts=32", "preserve.holdout=6",
          "covariance.num_workers=1", "covariance.batch_size=16", "train.max_train_steps=12",
          "train.checkpoint_every=12", "train.metrics_every=12", "train.train_batch_size=2",
          "train.learning_rate=1e-2", "generate.num_workers=1", "generate.batch_size=16"]


def configure(run_dir, *extra):
    return load_config(None, [f"run_dir={run_dir}", *COMMON, *extra])


@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("drift")
    build_covariance(configure(root / "stats"))
    out = {}
    for mode in ("none", "global"):
        run_dir = root / mode
        for part in ("covariance", "projection"):
            shutil.copytree(root / "stats" / part, run_dir / part)
        extra = [f"projection.mode={mode}"]
        if mode == "global":
            extra.append(f"generate.baseline_run={root / 'none'}")
        config = configure(run_dir, *extra)
        train(config)
        generate(config)
        out[mode] = run_dir, json.loads((run_dir / "report" / "report.json").read_text())
    return out


def test_global_drifts_less_than_none_on_held_out_prompts(runs):
    (_, none), (_, glob) = runs["none"], runs["global"]
    for report in (none, glob):
        check_report(report)
    held = lambda r: [(p["prompt"], p["seeds"]) for p in r["prompts"] if p["kind"] == "holdout"]
    assert held(glob) == held(none) and len(held(glob)) == 6  # same prompts, same seeds
    print(f"held-out drift: global {glob['drift']['holdout']}, none {none['drift']['holdout']}")
    assert 0 < glob["drift"]["holdout"]["latent_mse"] < none["drift"]["holdout"]["latent_mse"]
    # The layer-level preservation error from training tells the same story.
    assert glob["preservation"]["overall"] < none["preservation"]["overall"]
    assert glob["baseline"]["mode"] == "none"
    assert "preservation" in glob["files"]["plots"]


def test_compare_global_against_none(runs, tmp_path):
    out = compare_runs(str(runs["global"][0]), str(runs["none"][0]), out_dir=str(tmp_path))
    glob, none = out["rows"]
    assert (glob["mode"], none["mode"]) == ("global", "none")
    assert glob["drift_latent_mse"] == pytest.approx(runs["global"][1]["drift"]["holdout"]["latent_mse"])
    assert glob["drift_latent_mse"] < none["drift_latent_mse"]
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"
