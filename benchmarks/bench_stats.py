"""The statistics stage's costs, each measured side by side in one run (medians):

1. Collection overhead: the same collector actor samples the same prompts over the same steps with the key hooks
   (float32 products added in float64, the default) and without them (`Collector.absorb(..., collect=False)`),
   alternately; ratio = median over back-to-back pairs of hooked ÷ plain sampling seconds (measured inside the
   actor; pairs cancel the drift of a shared machine's load). Target ≤ 1.10. On the tiny
   model and on an SD1.5-shaped UNet with random weights (benchmarks/common.py) at 64×64 pixels (8×8 latents).
2. Scaling: prompts/s of the dealing loop (`Dealer.run`, tiny model) with 2 actors against 1, one CPU each.
3. Accumulator memory per actor at SD1.5 shapes and 30 timesteps: the hooks' own code (`KeyStatistics`, packed
   sums) fed every protected layer of the SD1.5-shaped UNet at every timestep, against the full d×d float64 sums
   the hooks kept before (`moments.gram`, then in-place additions), each held alone: bytes of the tensors and the
   process's resident memory; and the covariances of the two, key by key (target ≤ 0.5× the bytes, equal to 1e-12).
4. Reduction: N actors (`Partials`, the collectors' own reduction code, here holding synthetic SD1.5-sized packed
   per-timestep states: the 32 image-side layers, 99 MB) reduce among themselves (`reduce_state`), against the
   driver gathering their N states and adding them in place (one allocation), and at N = 16 the design it replaced
   (pairwise remote add tasks). Wall time in this long-lived driver, the ways alternating, ratio = median of the
   rounds' tree ÷ gather, after one untimed round of each (as for every key but the first of a run: object-store
   pages mapped, the actors' buffers allocated); driver memory once per way in a fresh process running the driver's side (a Ray task in a worker
   of its own), whose peak resident memory (VmHWM above its baseline) counts every object-store page it maps.
   N = 2 to 16. Targets at N = 16: time ≤ 1.0× the gather's, driver memory ≤ 1.5 states.

    python benchmarks/bench_stats.py [--quick] [--skip-sd15]
    python benchmarks/run_all.py --only stats          # the same rows into benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import CPU_RESOLUTION, machine, row, sd15_model_dir  # noqa: E402
from nullbooth.config import load_config  # noqa: E402
from nullbooth.prompts import preserved_prompts  # noqa: E402
from nullbooth.stats.collector import Collector  # noqa: E402
from nullbooth.stats.dealer import Dealer, make_batches  # noqa: E402
from nullbooth.stats.moments import (  # noqa: E402
    add_state_into,
    add_states,
    empty_state,
    gram,
    packed_size,
    unpack,
)
from nullbooth.stats.reduce import Partials, reduce_state, tree_levels  # noqa: E402

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


# -- 3. accumulator memory --------------------------------------------------------------------------------------------
def sd15_layers() -> dict:
    """The protected linears of the SD1.5-shaped UNet, on the meta device (shapes only)."""
    from benchmarks.common import build_sd15_unet
    from nullbooth.config import DEFAULT_PROTECTED_LAYERS
    from nullbooth.models.layers import find_protected_layers

    return find_protected_layers(build_sd15_unet(device="meta"), DEFAULT_PROTECTED_LAYERS)


def sd15_image_widths() -> list[int]:
    from nullbooth.models.layers import key_side

    return [layer.in_features for name, layer in sd15_layers().items() if key_side(name) == "image"]


def _inputs(t: int, i: int, d: int, calls: int = 2) -> list[torch.Tensor]:
    """The same float32 rows for both layouts: `calls` UNet calls of 4 rows each at (timestep t, layer i)."""
    gen = torch.Generator().manual_seed(t * 1000 + i)
    return [torch.randn(4, d, generator=gen) for _ in range(calls)]


def _full_sum(xs: list[torch.Tensor]) -> torch.Tensor:
    """The hooks' sum before packing: the first product converted to float64, every later one added in place."""
    acc = gram(xs[0], torch.float32)
    for x in xs[1:]:
        acc.add_(x.T @ x)
    return acc


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the OS, so the next layout's resident memory is its own, not reused pages."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def accumulators(steps: int) -> dict:
    """Bytes and resident memory of one actor's sums at SD1.5 shapes: packed (KeyStatistics, the real hooks) and
    full (as before), each held alone; the largest relative difference of their covariances over every key."""
    from nullbooth.models.layers import key_side
    from nullbooth.stats.hooks import KeyStatistics

    layers = sd15_layers()
    image = [(name, layer.in_features) for name, layer in layers.items() if key_side(name) == "image"]
    text = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1))
    _release_freed_memory()
    base = _rss_mb()
    full = {(t, name): _full_sum(_inputs(t, i, d)) for t in range(steps) for i, (name, d) in enumerate(image)}
    full["text"] = _full_sum([text.reshape(-1, 768)])
    full_bytes, full_rss = sum(s.numel() * s.element_size() for s in full.values()), _rss_mb() - base
    del full
    _release_freed_memory()
    base = _rss_mb()
    stats = KeyStatistics(None, layers, list(range(steps)), "float32", "cpu")
    for t in range(steps):
        stats._current = t  # what the UNet pre-hook sets; the layer hooks below are the ones sampling runs
        for i, (name, d) in enumerate(image):
            for x in _inputs(t, i, d):
                stats._layer_hook(name)(None, (x,))
    stats.add_text(text)
    packed_bytes, packed_rss = stats.nbytes(), _rss_mb() - base
    worst = 0.0
    for t in range(steps):  # the covariances, key by key: the full sum recomputed alone against the packed one
        for i, (name, d) in enumerate(image):
            reference = _full_sum(_inputs(t, i, d)).numpy()
            diff = unpack(stats.image_sums[t][name].numpy()) - reference
            worst = max(worst, float(np.linalg.norm(diff) / np.linalg.norm(reference)))
    reference = _full_sum([text.reshape(-1, 768)]).numpy()
    worst = max(worst, float(np.linalg.norm(unpack(stats.text_sums["text"].numpy()) - reference)
                             / np.linalg.norm(reference)))
    return {"full_bytes": full_bytes, "packed_bytes": packed_bytes, "full_rss_mb": full_rss,
            "packed_rss_mb": packed_rss, "worst": worst, "keys": len(image) * steps + 1}


# -- 4. reduction ----------------------------------------------------------------------------------------------------
@ray.remote(num_cpus=0)
class Holder:
    """One actor's side of the reduction, as a collector has it (`Partials`), over a synthetic packed state."""

    def __init__(self, seed: int, widths: list[int]):
        # Constant fills: the memory is as real as random data's, and the expected sum is known exactly.
        self.own = {"sums": {f"layer{i}": np.full(packed_size(d), float(seed + 1)) for i, d in enumerate(widths)},
                    "rows": {f"layer{i}": 1 for i in range(len(widths))}}
        self.partials = Partials(lambda which: self.own)

    def partial(self, which):
        return self.partials.partial(which)

    def fold(self, which, peer) -> int:
        return self.partials.fold(which, peer)

    def discard(self, which) -> None:
        self.partials.discard(which)


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
    """(peak resident memory above the baseline in MB, seconds) of fn() in this process."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = _rss_mb()
    start = time.perf_counter()
    fn()
    return _peak_mb() - base, time.perf_counter() - start


@ray.remote(num_cpus=0)
def _add_task(a: dict, b: dict) -> dict:
    return add_states(a, b)


def _previous_tree(refs: list) -> ray.ObjectRef:
    """The design this replaced, for comparison: pairwise remote tasks, each allocating its sum and copying it into
    the object store."""
    level = list(refs)
    while len(level) > 1:
        level = [_add_task.remote(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)] + (
            [level[-1]] if len(level) % 2 else [])
    return level[0]


def _check(total: dict, expected: float) -> float:
    assert all(float(s[0]) == expected for s in total["sums"].values())
    return sum(float(s.sum()) for s in total["sums"].values())  # touch it all, as writing it would


def _gather(holders: list) -> dict:
    states = ray.get([h.partial.remote("t") for h in holders])
    total = add_states(states[0], states[1] if len(states) > 1 else empty_state())
    for state in states[2:]:
        add_state_into(total, state)
    return total


WAYS = {"tree": lambda holders: reduce_state([holders], "t"), "gather": _gather,
        "before": lambda holders: ray.get(_previous_tree([h.partial.remote("t") for h in holders]))}


@ray.remote(num_cpus=0, max_calls=1)
def _as_driver(way: str, holders: list, expected: float) -> tuple[float, float]:
    """The driver's side of one reduction, run in a fresh process: every object-store page it maps shows in its
    resident memory, which a process that had mapped those pages before would not show again."""
    return _measure(lambda: _check(WAYS[way](holders), expected))


def _fresh_driver(way: str, holders: list, expected: float) -> tuple[float, float]:
    """`_as_driver` in a process of its own: a runtime environment no other worker has (one more environment
    variable) makes Ray start a new worker rather than reuse one that mapped store pages before."""
    fresh = {"env_vars": {"NULLBOOTH_BENCH_FRESH": f"{way}-{len(holders)}-{time.monotonic_ns()}"}}
    return ray.get(_as_driver.options(runtime_env=fresh).remote(way, holders, expected))


def reduction(n: int, widths: list[int], repeats: int, previous: bool = False) -> dict:
    """Seconds in this (long-lived) driver, after one untimed round of each way, as every key after the first of a
    real run (object-store pages mapped, the actors' buffers allocated); driver memory in fresh processes."""
    holders = [Holder.remote(seed, widths) for seed in range(n)]
    ray.get([h.discard.remote("t") for h in holders])  # every actor is up: starting them is not the reduction
    expected = n * (n + 1) / 2
    ways = ["tree", "gather", *(["before"] if previous else [])]
    runs: dict[str, list[float]] = {way: [] for way in ways}
    for i in range(repeats + 1):
        for way in (ways if i % 2 == 0 else list(reversed(ways))):
            _, seconds = _measure(lambda: _check(WAYS[way](holders), expected))
            if i:
                runs[way].append(seconds)
            ray.get([h.discard.remote("t") for h in holders])  # the next reduction starts from the own sums
    memory = {}
    for way in ways:
        memory[way], _ = _fresh_driver(way, holders, expected)
        ray.get([h.discard.remote("t") for h in holders])
    for h in holders:
        ray.kill(h)
    out = {f"{way}_s": statistics.median(runs[way]) for way in ways}
    # Rounds ran back to back, so each round's tree ÷ gather cancels the drift of a shared machine's load.
    out["paired"] = statistics.median(t / g for t, g in zip(runs["tree"], runs["gather"]))
    return {**out, **{f"{way}_mb": memory[way] for way in ways}, "levels": tree_levels([n])[0]}


# -- the rows --------------------------------------------------------------------------------------------------------
def run(device: str = "cpu", quick: bool = False, skip_sd15: bool = False) -> list[dict]:
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR", object_store_memory=(2 if quick else 8) * 1024 * MB)
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
        rows += _memory_rows(quick, load)
        rows += _reduction_rows(quick, load)
        return rows
    finally:
        if started:
            ray.shutdown()


def _memory_rows(quick: bool, load) -> list[dict]:
    steps = 2 if quick else 30
    m = accumulators(steps)
    gb = 1e9
    return [row(f"stats: accumulator bytes per actor, packed ÷ full (SD1.5 shapes, {steps} steps, GB)",
                m["packed_bytes"] / gb, m["packed_bytes"] / m["full_bytes"], "≤ 0.5",
                f"GB of float64 sums per collector actor: packed {m['packed_bytes'] / gb:.3f} GB, full (before) "
                f"{m['full_bytes'] / gb:.3f} GB ({m['keys']} sums: 32 image-side layers × {steps} timesteps + text); "
                f"resident memory of each held alone {m['packed_rss_mb'] / 1024:.2f} vs {m['full_rss_mb'] / 1024:.2f} "
                f"GiB; the packed layout is d(d+1)/2 per d×d sum, 0.5 + 1/(2d) of it; covariances packed vs full: "
                f"largest relative Frobenius difference over every key {m['worst']:.1e} (target ≤ 1e-12); "
                f"{load()}")]


def _reduction_rows(quick: bool, load) -> list[dict]:
    widths = [320, 640] if quick else sd15_image_widths()
    state_mb = sum(8 * packed_size(d) for d in widths) / MB
    repeats = 1 if quick else 9
    sizes = (2, 4) if quick else (2, 4, 8, 16)
    results = {n: reduction(n, widths, repeats, previous=n == max(sizes)) for n in sizes}
    table = "; ".join(f"N={n}: tree {r['tree_mb']:.0f} MB {r['tree_s']:.2f} s, gather {r['gather_mb']:.0f} MB "
                      f"{r['gather_s']:.2f} s, paired ratio {r['paired']:.2f}" for n, r in results.items())
    n_max = max(results)
    r = results[n_max]
    return [
        row(f"stats: reduction wall time, actors' tree ÷ driver gather (N={n_max}, s)", r["tree_s"],
            r["paired"], "≤ 1.0",
            f"s (tree); {n_max} actors on one node each holding one SD1.5-sized packed state ({state_mb:.0f} MB, "
            f"{len(widths)} layers), {r['levels']} levels of fan-in 4; ratio = median of {repeats} back-to-back "
            f"rounds' tree ÷ gather (alternating order, after one untimed round); medians tree {r['tree_s']:.2f} s, "
            f"gather {r['gather_s']:.2f} s; the previous design (pairwise remote add tasks) on the same states "
            f"{r['before_s']:.2f} s, driver {r['before_mb']:.0f} MB; {os.cpu_count()} CPUs; {load()}"),
        row(f"stats: reduction, driver peak memory in states (N={n_max})", r["tree_mb"] / state_mb,
            r["tree_mb"] / state_mb, "≤ 1.5",
            f"driver peak resident memory above its baseline ÷ one packed state ({state_mb:.0f} MB; a full state "
            f"was {state_mb * 2:.0f} MB), the driver's side run in a fresh process (a task in a worker of its own) so "
            f"every object-store page it maps counts; gather at N={n_max}: {r['gather_mb'] / state_mb:.1f} states; "
            f"{table}; {load()}"),
    ]


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
