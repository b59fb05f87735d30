"""All three stages in one go: statistics -> projected LoRA training -> generation and report.

Each stage reuses what a previous run completed: build-cov keeps a complete run made with the same config, Ray
Train returns at once for a finished run name (or resumes an interrupted one from its last checkpoint), and the
generation redraws the report, which is cheap.

`force` goes to both the statistics and the training: statistics made with another config are rebuilt, and a
train.name whose checkpoint was made with another configuration is deleted and trained afresh. The training
signature holds a digest of the statistics, so after a rebuild that changed them a checkpoint of the old ones is
never resumed nor republished: without `force` training refuses it (naming `statistics` among the differences),
with `force` it starts over. A rebuild that reproduces the same statistics keeps the finished training. Each stage's
summary goes to `announce` as soon as the stage is done (the CLI passes `print`; a library caller gets them in the
log).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from nullbooth.cluster import connect
from nullbooth.config import Config

logger = logging.getLogger(__name__)


def run_pipeline(config: Config, force: bool = False, announce: Callable[[str], None] = logger.info) -> dict:
    from nullbooth.report.generate import format_summary as format_generation
    from nullbooth.report.generate import generate
    from nullbooth.stats.build import build_covariance
    from nullbooth.stats.summary import format_summary as format_statistics
    from nullbooth.train.data import open_instance_images
    from nullbooth.train.run import format_summary as format_training
    from nullbooth.train.run import train_all

    # The subject's images belong to training, but a bad one is refused now, not after the whole statistics stage.
    open_instance_images(config.train.instance_data_dir, config.model.path)
    connect(config.ray)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    statistics = build_covariance(config, force=force)
    timings["statistics_s"] = time.perf_counter() - started
    announce(format_statistics(statistics))

    started = time.perf_counter()
    training = train_all(config, force=force)
    timings["training_s"] = time.perf_counter() - started
    for summary in training:
        announce(format_training(summary))

    started = time.perf_counter()
    report = generate(config)
    timings["generation_s"] = time.perf_counter() - started
    announce(format_generation(report))

    lines = [f"\nNullBooth run finished in {sum(timings.values()):.0f} s (statistics {timings['statistics_s']:.0f} s, "
             f"training {timings['training_s']:.0f} s, generation {timings['generation_s']:.0f} s)"]
    for label, key in (("grid", "grid"), ("report", "report_md"), ("report.json", "report")):
        if report.get(key):
            lines.append(f"  {label:12s} {report[key]}")
    if report.get("attention"):
        lines.append(f"  {'attention':12s} {report['attention'][0]} (and {len(report['attention']) - 1} more)")
    announce("\n".join(lines))
    return {"statistics": statistics, "training": training[0], "baseline_training": training[1:] or None,
            "generation": report, "timings": timings}
