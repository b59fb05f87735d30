"""Run every ratio benchmark of the project and write the table at the top of benchmarks/RESULTS.md.

    python benchmarks/run_all.py                  # all benchmarks, CPU: tiny model and SD1.5-shaped UNet ratios
    python benchmarks/run_all.py --device cuda    # on a GPU machine: adds absolute SD1.5-shaped figures
    python benchmarks/run_all.py --quick          # smoke run: smallest sizes, prints, writes nothing
    python benchmarks/run_all.py --only eigh      # one benchmark (bench_eigh.py); its rows are replaced

Every `benchmarks/bench_*.py` is found by name and run in its own process (its own Ray; one crash doesn't stop the
others). The contract (benchmarks/common.py): `run(device: str = "cpu", quick: bool = False) -> list[dict]` with
keys figure, value, ratio, target, note. A script with another interface gets a thin adapter in ADAPTERS below.

RESULTS.md keeps the rows of other devices and benchmarks: a run replaces only the rows of the (benchmark, device)
pairs it ran. Sections below the table belong to the benchmarks' authors and are kept as they are.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "RESULTS.md"
START, END = "<!-- results-table:start -->", "<!-- results-table:end -->"
DATA = re.compile(r"<!-- results-data: (.*?) -->", re.S)


def _train(module, device: str, quick: bool) -> list[dict]:
    """bench_train.py's rows (per-step seconds and projected/plain ratios), plus on a GPU the absolute figure the
    operations guide plans with: SD1.5-shaped training steps per second on one GPU."""
    rows = module.run(device=device, quick=quick)
    if device == "cuda":
        for r in [r for r in rows if "SD1.5" in r["figure"] and r["value"]]:
            rows.append({"figure": f"training steps/s per GPU, {r['figure'].split(', ', 1)[1].split(' ÷')[0]} "
                                   "(SD1.5-shaped)", "value": 1.0 / r["value"], "ratio": None, "target": None,
                         "note": r["note"]})
    return rows


def _peak_gpu_bytes(collector) -> int | None:
    """Run inside a collector actor (`__ray_call__`): its peak GPU memory so far (model, activations, sums)."""
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def collector_throughput(model_path: str, resolution: int, steps: int, batch: int, gpus: int, pairs: int,
                         dtype: str = "float16", accumulate_on: str = "device") -> dict:
    """One collector actor (the statistics stage's own `Collector`) sampling `batch` prompts over `steps` steps, with
    and without the key hooks, alternately; wall times seen by the driver (so queued GPU work is counted), and the
    actor's peak GPU memory at the end (None on a CPU)."""
    import ray

    from nullbooth.config import load_config
    from nullbooth.prompts import preserved_prompts
    from nullbooth.stats.collector import Collector

    config = load_config(ROOT / "configs" / "sd15.yaml", [
        f"model.path={model_path}", f"model.dtype={dtype}", "run_dir=/tmp/nullbooth-bench-gpu",
        f"sampling.height={resolution}", f"sampling.width={resolution}", f"sampling.num_inference_steps={steps}",
        f"preserve.max_prompts={batch}", "preserve.holdout=0", f"covariance.batch_size={batch}",
        f"covariance.accumulate_on={accumulate_on}"])
    prompts = preserved_prompts(config)[0][:batch]
    actor = ray.remote(Collector).options(num_cpus=1, num_gpus=gpus).remote(config, 0)
    device = ray.get(actor.describe.remote())["device"]

    def seconds(collect: bool) -> float:
        start = time.perf_counter()
        ray.get(actor.absorb.remote(0, 0, prompts, collect))
        return time.perf_counter() - start

    seconds(False), seconds(True)  # warm-up: allocation, kernels, accumulators
    hooked, plain = [], []
    for i in range(pairs):
        for collect in ((True, False) if i % 2 else (False, True)):
            (hooked if collect else plain).append(seconds(collect))
    peak = ray.get(actor.__ray_call__.remote(_peak_gpu_bytes))
    ray.kill(actor)
    ratio = statistics.median(h / p for h, p in zip(hooked, plain))
    return {"device": device, "hooked": statistics.median(hooked), "plain": statistics.median(plain), "ratio": ratio,
            "peak_bytes": peak}


def _stats(module, device: str, quick: bool) -> list[dict]:
    """bench_stats.py measures on CPU; on a GPU (--device cuda) this adds what the operations guide plans with:
    prompts/s per GPU of one SD1.5-shaped collector at 512×512 in float16, the hooks' overhead there, and the
    actor's peak GPU memory at 30 and 50 steps with the sums on the device and in host memory."""
    if device != "cuda":
        return module.run(device=device, quick=quick)
    import ray

    batch, pairs = (2, 1) if quick else (8, 3)
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        from benchmarks.common import sd15_model_dir

        runs = {(steps, on): collector_throughput(str(sd15_model_dir()), 512, steps, batch, gpus=1, pairs=pairs,
                                                  accumulate_on=on)
                for steps in ((4,) if quick else (30, 50)) for on in ("device", "host")}
    finally:
        ray.shutdown()
    rows = []
    for (steps, on), r in runs.items():
        note = (f"one Collector actor on {r['device']}, SD1.5-shaped UNet (random weights) in float16, 512×512, "
                f"{steps} steps of the sd15.yaml sampler with guidance, batches of {batch}, covariance.accumulate_on="
                f"{on}; medians of {pairs} alternating pairs: hooked {r['hooked']:.2f} s, plain {r['plain']:.2f} s "
                f"per batch; peak GPU memory of the actor {r['peak_bytes'] / 1e9:.2f} GB")
        rows += [
            {"figure": f"stats: prompts/s per GPU, SD1.5-shaped collector (512×512, {steps} steps, hooks on, sums on "
                       f"{on})", "value": batch / r["hooked"], "ratio": None, "target": None, "note": note},
            {"figure": f"stats: collection overhead on GPU, hooks ÷ plain sampling (SD1.5-shaped, {steps} steps, "
                       f"sums on {on})", "value": r["hooked"], "ratio": r["ratio"], "target": "≤ 1.10", "note": note},
            {"figure": f"stats: peak GPU memory per collector actor, GB (SD1.5-shaped, {steps} steps, sums on {on})",
             "value": r["peak_bytes"] / 1e9, "ratio": None, "target": None, "note": note},
        ]
    return rows


# Benchmark name -> function(module, device, quick) returning contract rows, for scripts whose `run` differs or
# whose rows need a derived figure.
ADAPTERS: dict[str, Callable] = {"stats": _stats, "train": _train}


def discover() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))


def run_one(name: str, device: str, quick: bool) -> list[dict]:
    """Import benchmarks/bench_<name>.py in this process and return its rows (the child side of `run_isolated`)."""
    sys.path[:0] = [str(ROOT), str(HERE)]
    module = importlib.import_module(f"benchmarks.bench_{name}")
    if name in ADAPTERS:
        return ADAPTERS[name](module, device, quick)
    if not hasattr(module, "run"):
        raise RuntimeError(f"benchmarks/bench_{name}.py has no run(device, quick) and no adapter in run_all.py")
    return module.run(device=device, quick=quick)


def run_isolated(name: str, device: str, quick: bool, timeout: float) -> tuple[list[dict], float]:
    """Run one benchmark in a child process; a failure becomes one row saying so."""
    start = time.time()
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, __file__, "--child", name, "--device", device, "--json-out", out.name]
        if quick:
            cmd.append("--quick")
        try:
            proc = subprocess.run(cmd, cwd=ROOT, timeout=timeout, capture_output=True, text=True, check=False)
            if proc.returncode == 0:
                return json.loads(Path(out.name).read_text()), time.time() - start
            reason = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        except subprocess.TimeoutExpired:
            reason = f"timed out after {timeout:.0f} s"
    return [{"figure": f"bench_{name}", "value": None, "ratio": None, "target": None,
             "note": f"FAILED: {reason}"}], time.time() - start


def command(name: str, device: str) -> str:
    return f"python benchmarks/run_all.py --only {name}" + (" --device cuda" if device == "cuda" else "")


def met(ratio: float | None, target: str | None) -> str:
    """'yes'/'no' when the target is a bound like '≥ 1.5' or '≤ 1.3', else ''."""
    match = re.match(r"\s*([≥≤])\s*([0-9.]+)", target or "")
    if ratio is None or not match:
        return ""
    bound = float(match.group(2))
    return "yes" if (ratio >= bound if match.group(1) == "≥" else ratio <= bound) else "no"


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "–"
    return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"


def render(rows: list[dict]) -> str:
    lines = ["| figure | value | ratio | target | met | machine | command |", "|---|---|---|---|---|---|---|"]
    notes = []
    for i, r in enumerate(rows, 1):
        ratio = f"{r['ratio']:.2f}×" if r["ratio"] is not None else "–"
        lines.append(f"| {r['figure']} [{i}] | {_fmt(r['value'])} | {ratio} | {r['target'] or '–'} | "
                     f"{met(r['ratio'], r['target'])} | {r['machine']} | `{r['command']}` |")
        notes.append(f"{i}. {r['note']} ({r['date']})")
    data = json.dumps(rows, ensure_ascii=False)
    return "\n".join([START, "", *lines, "", *notes, "", f"<!-- results-data: {data} -->", END])


def write_results(new_rows: list[dict], ran: set[tuple[str, str]]) -> None:
    """Replace the rows of the (benchmark, device) pairs that ran; keep everything else in RESULTS.md."""
    text = RESULTS.read_text() if RESULTS.exists() else ""
    old_rows = json.loads(DATA.search(text).group(1)) if DATA.search(text) else []
    kept = [r for r in old_rows if (r["bench"], r["device"]) not in ran]
    rows = sorted(kept + new_rows, key=lambda r: (r["bench"], r["device"] != "cpu"))
    table = render(rows)
    if START in text and END in text:
        before, rest = text.split(START, 1)
        text = before + table + rest.split(END, 1)[1]
    else:
        header = ("# Benchmark results\n\nWritten by `python benchmarks/run_all.py` (see its docstring); ratios are "
                  "medians measured side by side in one run. Sections below the table are the benchmarks' own.\n\n")
        text = header + table + "\n" + text
    RESULTS.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--quick", action="store_true", help="smoke run: smallest sizes; prints, writes nothing")
    parser.add_argument("--only", action="append", default=None, help="benchmark name (bench_<name>.py); repeatable")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per benchmark")
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        rows = run_one(args.child, args.device, args.quick)
        Path(args.json_out).write_text(json.dumps(rows))
        return 0

    sys.path[:0] = [str(ROOT)]
    from benchmarks.common import machine

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: this machine has no visible GPU")
    names = args.only or discover()
    unknown = sorted(set(names) - set(discover()))
    if unknown:
        parser.error(f"no benchmarks/bench_{unknown[0]}.py (have: {', '.join(discover())})")
    where = machine(args.device)
    date = time.strftime("%Y-%m-%d")
    all_rows = []
    for name in names:
        rows, seconds = run_isolated(name, args.device, args.quick, args.timeout)
        print(f"bench_{name} ({seconds:.0f} s):")
        for r in rows:
            r.update(bench=name, device=args.device, machine=where, command=command(name, args.device), date=date)
            ratio = f"{r['ratio']:.2f}×" if r["ratio"] is not None else "–"
            print(f"  {r['figure']}: value {_fmt(r['value'])}, ratio {ratio}, target {r['target'] or '–'}"
                  f"{'  [' + met(r['ratio'], r['target']) + ']' if met(r['ratio'], r['target']) else ''}")
            print(f"    {r['note']}")
        all_rows.extend(rows)
    if not (args.quick or args.no_write):
        write_results(all_rows, {(n, args.device) for n in names})
        print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 1 if any(str(r["note"]).startswith("FAILED") for r in all_rows) else 0


if __name__ == "__main__":
    sys.exit(main())
