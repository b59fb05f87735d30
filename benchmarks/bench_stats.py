"""The statistics stage's costs, each measured side by side in one run (medians):

1. Collection overhead: the same collector actor samples the same prompts over the same steps with the key hooks
   (float32 products added in float64, the default) and without them (`Collector.absorb(..., collect=False)`),
   alternately; ratio = median over back-to-back pairs of hooked ÷ plain sampling seconds (measured inside the
   actor; pairs cancel the drift of a shared machine's load). Target ≤ 1.10. On the tiny
   model and on an SD1.5-shaped UNet with random weights (benchmarks/common.py) at 64×64 pixels (8×8 latents).
2. Scaling: prompts/s of the dealing loop (`Dealer.run`, tiny model) with 2 actors against 1, one CPU each.
3. Reduction: N synthetic SD1.5-sized per-timestep states (the 32 image-side layers, float64: 198 MB each) already
   in the object store, summed by the tree (`tree_reduce`, remote additions) or gathered and summed in the driver;
   the driver's peak resident memory (VmHWM, reset before each) and wall time, N = 2 to 16. On one machine the
   gather moves nothing over a network, which is where a cluster's gather would spend its time.

    python benchmarks/bench_stats.py [--quick] [--skip-sd15]
    python benchmarks/run_all.py --only stats          # the same rows into benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import ray

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import CPU_RESOLUTION, machine, row, sd15_model_dir  # noqa: E402
from nullbooth.config import load_config  # noqa: E402
from nullbooth.prompts import preserved_prompts  # noqa: E402
from nullbooth.stats.collector import Collector  # noqa: E402
from nullbooth.stats.dealer import Dealer, make_batches  # noqa: E402
from nullbooth.stats.reduce import add_states, tree_reduce  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MB = 1024 * 1024


def _config(*overrides: str):
    return load_config(ROOT / "configs" / "tiny.yaml", ["run_dir=/tmp/nullbooth-bench-stats", *overrides])


# -- 1. collection overhead ------------------------------------------------------------------------------------------
def overhead(config, batch: int, repeats: int) -> dict:
    """Median hooked and plain sampling seconds of one batch on one actor, alternating the two."""
    prompts, _ = preserved_prompts(config)
    actor = ray.remote(Collector).options(num_cpus=1).remote(config, 0)
    ray.get(actor.describe.remote())
    run = lambda collect: ray.get(actor.absorb.remote(0, 0, prompts[:batch], collect))["seconds"]  # noqa: E731
    run(False), run(True)  # warm-up: first calls allocate
    hooked, plain = [], []
    for i in range(repeats):
        for collect in ((True, False) if i % 2 else (False, True)):  # alternate which goes first
            (hooked if collect else plain).append(run(collect))
    ray.kill(actor)
    return {"hooked": statistics.median(hooked), "plain": statistics.median(plain),
            "pairwise": statistics.median(h / p for h, p in zip(hooked, plain))}


# -- 2. scaling ------------------------------------------------------------------------------------------------------
def dealing_seconds(config, workers: int, repeats: int) -> float:
    """Median seconds of Dealer.run over the config's prompts with `workers` warm actors."""
    prompts, _ = preserved_prompts(config)
    batches = make_batches(prompts, config.covariance.batch_size)
    config.covariance.num_workers = workers
    dealer = Dealer(config, batches)
    dealer.start()
    ray.get([slot.actor.absorb.remote(0, 0, batches[0][1], False) for slot in dealer.slots])  # warm-up
    times = []
    for _ in range(repeats):
        # A fresh round over the same batches (the sums keep growing; only the time matters here).
        dealer.done.clear()
        dealer.pending.extend(range(len(batches)))
        for slot in dealer.slots:
            slot.absorbed.clear()
        start = time.perf_counter()
        dealer.run()
        times.append(time.perf_counter() - start)
    dealer.shutdown()
    return statistics.median(times)


# -- 3. reduction ----------------------------------------------------------------------------------------------------
def sd15_image_widths() -> list[int]:
    from benchmarks.common import build_sd15_unet
    from nullbooth.config import DEFAULT_PROTECTED_LAYERS
    from nullbooth.models.layers import find_protected_layers, key_side

    layers = find_protected_layers(build_sd15_unet(device="meta"), DEFAULT_PROTECTED_LAYERS)
    return [layer.in_features for name, layer in layers.items() if key_side(name) == "image"]


@ray.remote(num_cpus=0)
def _make_state(seed: int, widths: list[int]) -> dict:
    # Constant fills: the memory is as real as random data's, and the expected sum is known exactly.
    return {"sums": {f"layer{i}": np.full((d, d), float(seed + 1)) for i, d in enumerate(widths)},
            "rows": {f"layer{i}": 1 for i in range(len(widths))}}


def _peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _measure(fn) -> tuple[float, float]:
    """(driver peak memory above the resident baseline in MB, seconds) of fn()."""
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = _rss_mb()
    start = time.perf_counter()
    fn()
    return _peak_mb() - base, time.perf_counter() - start


def reduction(n: int, widths: list[int]) -> dict:
    refs = [_make_state.remote(seed, widths) for seed in range(n)]
    ray.wait(refs, num_returns=n)
    # Warm-up with the same N on tiny states: the n/2 concurrent additions each need a worker process, which Ray
    # starts once and reuses for every later timestep of a run; their start-up is not the reduction's cost.
    ray.get(tree_reduce([_make_state.remote(seed, [4]) for seed in range(n)])[0])
    expected = n * (n + 1) / 2

    def tree():
        total = ray.get(tree_reduce(refs)[0])
        assert all(float(s[0, 0]) == expected for s in total["sums"].values())
        return sum(float(s.sum()) for s in total["sums"].values())  # touch it all, as writing it would

    def gather():
        total = functools.reduce(add_states, ray.get(refs))
        assert all(float(s[0, 0]) == expected for s in total["sums"].values())
        return sum(float(s.sum()) for s in total["sums"].values())

    tree_mb, tree_s = _measure(tree)
    gather_mb, gather_s = _measure(gather)
    return {"tree_mb": tree_mb, "tree_s": tree_s, "gather_mb": gather_mb, "gather_s": gather_s}


# -- the rows --------------------------------------------------------------------------------------------------------
def run(device: str = "cpu", quick: bool = False, skip_sd15: bool = False) -> list[dict]:
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                 object_store_memory=(2 if quick else 8) * 1024 * MB)
    rows = []
    load = lambda: f"load average {os.getloadavg()[0]:.1f}"  # noqa: E731
    try:
        repeats = 2 if quick else 15
        tiny = _config("sampling.num_inference_steps=4", "preserve.max_prompts=40", "preserve.holdout=0")
        o = overhead(tiny, batch=8, repeats=repeats)
        rows.append(row("stats: collection overhead, hooks ÷ plain sampling (tiny)", o["hooked"], o["pairwise"],
                        "≤ 1.10",
                        f"s per batch of 8 prompts, 4 DDIM steps with guidance, 28 protected layers; ratio = median "
                        f"of {repeats} back-to-back pairs (alternating order; 1 actor, 1 CPU); medians plain "
                        f"{o['plain']:.3f} s, hooked {o['hooked']:.3f} s; {load()}"))
        if not (quick or skip_sd15):
            sd15 = _config(f"model.path={sd15_model_dir()}", f"sampling.height={CPU_RESOLUTION}",
                           f"sampling.width={CPU_RESOLUTION}", "sampling.num_inference_steps=4",
                           "preserve.max_prompts=8", "preserve.holdout=0")
            o = overhead(sd15, batch=4, repeats=5)
            rows.append(row("stats: collection overhead, hooks ÷ plain sampling (SD1.5-shaped UNet)", o["hooked"],
                            o["pairwise"], "≤ 1.10",
                            f"s per batch of 4 prompts at {CPU_RESOLUTION}×{CPU_RESOLUTION} px, 4 DDIM steps with "
                            f"guidance, 64 protected layers; ratio = median of 5 back-to-back pairs (alternating "
                            f"order; 1 actor, 1 CPU); medians plain {o['plain']:.2f} s, hooked {o['hooked']:.2f} s; "
                            f"{load()}"))
        scale = _config("sampling.num_inference_steps=4", f"preserve.max_prompts={16 if quick else 48}",
                        "preserve.holdout=0", "covariance.batch_size=4")
        one = dealing_seconds(scale, 1, repeats=1 if quick else 3)
        two = dealing_seconds(scale, 2, repeats=1 if quick else 3)
        n_prompts = len(preserved_prompts(scale)[0])
        rows.append(row("stats: 2 actors vs 1, prompts/s (tiny)", n_prompts / two, one / two, "≥ 1.5 (0.75 × 2)",
                        f"prompts/s with 2 actors; {n_prompts} prompts in batches of 4, 1 actor {one:.2f} s, 2 actors "
                        f"{two:.2f} s (medians of {1 if quick else 3}); scaling efficiency {one / two / 2:.2f}; "
                        f"{os.cpu_count()} CPUs; {load()}"))
        widths = [320, 640] if quick else sd15_image_widths()
        state_mb = sum(8 * d * d for d in widths) / MB
        results = {n: reduction(n, widths) for n in ((2, 4) if quick else (2, 4, 8, 16))}
        table = "; ".join(f"N={n}: tree {r['tree_mb']:.0f} MB {r['tree_s']:.2f} s, gather {r['gather_mb']:.0f} MB "
                          f"{r['gather_s']:.2f} s" for n, r in results.items())
        n_max = max(results)
        r = results[n_max]
        rows.append(row(f"stats: reduction, driver peak memory, tree vs gather (N={n_max}, MB)", r["tree_mb"],
                        r["gather_mb"] / r["tree_mb"], f"≥ {n_max / 2:.0f} (N/2)",
                        f"driver peak RSS above baseline, MB (tree); state {state_mb:.0f} MB float64 "
                        f"({len(widths)} layers); {table}; {load()}"))
        rows.append(row(f"stats: reduction wall time, gather ÷ tree (N={n_max})", r["tree_s"],
                        r["gather_s"] / r["tree_s"], None,
                        f"s (tree); remote additions run beside the driver, {os.cpu_count()} CPUs; {load()}"))
        return rows
    finally:
        if started:
            ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu",))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-sd15", action="store_true", help="skip the SD1.5-shaped overhead (3.4 GB model)")
    args = parser.parse_args()
    print(f"machine: {machine(args.device)}")
    for r in run(args.device, args.quick, args.skip_sd15):
        ratio = f"{r['ratio']:.3f}" if r["ratio"] is not None else "-"
        print(f"{r['figure']}: value {r['value']:.4g}, ratio {ratio} (target {r['target']})\n    {r['note']}")


if __name__ == "__main__":
    main()
