"""Parallel against serial eigendecomposition of SD1.5-sized covariances.

The statistics stage eigendecomposes one float64 covariance per (image-side layer, timestep): for SD1.5 that is 32
layers per timestep (the 16 cross-attention blocks' `to_q` and `to_out.0`, inputs of 320, 640 or 1280 features).
This script times the project's own code both ways on the same covariances, two timesteps' worth (64) in the order
and grouping (`covariance.eigh_group_size`) the statistics stage uses:

- serial: `nullbooth.stats.spectrum.decompose` over all of them in this one process (the driver doing it alone),
  once with torch's default thread count and once single-threaded; the faster of the two is the baseline;
- parallel: `nullbooth.stats.spectrum.submit_groups` — Ray remote tasks of `eigh_group_size` covariances each, one
  CPU (or one GPU with --device cuda) per task — including the transfer of the covariances through the object store.

    python benchmarks/bench_eigh.py [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, median_time, row  # noqa: E402
from nullbooth.config import CovarianceConfig  # noqa: E402
from nullbooth.stats.spectrum import decompose, submit_groups  # noqa: E402

THRESHOLD = ("relative", 1e-3)


def sd15_image_widths() -> list[int]:
    """Input widths of SD1.5's image-side protected layers, in the order the statistics stage queues them (module
    order: to_q and to_out.0 of the 16 cross-attention blocks; 10 at 320, 10 at 640, 12 at 1280)."""
    from benchmarks.common import build_sd15_unet
    from nullbooth.config import DEFAULT_PROTECTED_LAYERS
    from nullbooth.models.layers import find_protected_layers, key_side

    layers = find_protected_layers(build_sd15_unet(device="meta"), DEFAULT_PROTECTED_LAYERS)
    return [layer.in_features for name, layer in layers.items() if key_side(name) == "image"]


def covariances(widths: list[int], seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """Covariance-like matrices (uncentred second moments of random keys with a decaying spectrum and a null space)."""
    rng = np.random.default_rng(seed)
    items = []
    for i, d in enumerate(widths):
        rank = d * 3 // 4  # a quarter of the directions are never excited: a real null space to find
        x = rng.standard_normal((2 * d, rank)) @ (rng.standard_normal((rank, d)) * np.geomspace(1, 1e-2, rank)[:, None])
        items.append((f"layer{i}.d{d}", x.T @ x / x.shape[0]))
    return items


def _ensure_ray(device: str) -> bool:
    """Start a local Ray for a standalone run; returns whether this call started it."""
    if ray.is_initialized():
        return False
    ray.init(num_cpus=os.cpu_count(), num_gpus=torch.cuda.device_count() if device == "cuda" else 0,
             include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    return True


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    # Two timesteps' worth (64 covariances) in a full run: the real build queues 32 per timestep back to back.
    widths = [320] * 4 + [640] * 4 if quick else sd15_image_widths() * 2
    items = covariances(widths)
    use_gpu = device == "cuda"
    group_size = 2 if quick else CovarianceConfig().eigh_group_size  # the project's default grouping
    repeats = 1 if quick else 3
    started = _ensure_ray(device)
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        kind, value = THRESHOLD

        def parallel():
            return [s for ref in submit_groups(items, group_size, kind, value, use_gpu) for s in ray.get(ref)]

        def serial():
            return decompose(items, kind, value)

        serial_dims: dict = {}

        # Same answers both ways (null-space dimension of every covariance), before timing anything; the default
        # thread count is timed once (oversubscribed BLAS threads on a busy machine can take minutes).
        threads = torch.get_num_threads()
        t_default = median_time(lambda: serial_dims.update((k, s.null_dim) for k, s in serial()), repeats=1,
                                warmup=0)
        assert {k: s.null_dim for k, s in parallel()} == serial_dims
        t_parallel = median_time(parallel, repeats=repeats, warmup=1)
        torch.set_num_threads(1)
        try:
            t_single = median_time(serial, repeats=repeats, warmup=0)
        finally:
            torch.set_num_threads(threads)
        t_serial = min(t_default, t_single)
        tasks = -(-len(items) // group_size)
        workers = 1 if use_gpu else min(tasks, cpus)
        counts = ", ".join(f"{widths.count(d)}×{d}" for d in sorted(set(widths)))
        note = (f"{len(items)} float64 covariances ({counts}); {tasks} tasks of {group_size}, {cpus} CPUs; serial "
                f"{t_default:.2f} s with {threads} torch threads (once), {t_single:.2f} s with 1; parallel "
                f"{t_parallel:.2f} s (medians of {repeats}); load average {os.getloadavg()[0]:.1f} at the end")
        target = f"≥ {0.75 * workers:.1f} (0.75 × {workers} workers)" if workers > 1 else "≥ 0.8"
        rows = [row("eigh, Ray tasks vs one process: seconds in tasks (SD1.5 widths)", t_parallel,
                    t_serial / t_parallel, target, note)]
        if use_gpu:
            rows.append(row("eigh on GPU in Ray tasks: covariances/s (SD1.5 widths)", len(items) / t_parallel,
                            None, None, note))
        return rows
    finally:
        if started:
            ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(f"machine: {machine(args.device)}")
    for r in run(args.device, args.quick):
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
        print(f"{r['figure']}: {r['value']:.3f}  ratio {ratio}  target {r['target']}  ({r['note']})")


if __name__ == "__main__":
    main()
