"""Step time of projected LoRA against plain LoRA (the cost of the null-space constraint during training).

One `nullbooth.train.worker.Worker` (the training stage's own replica: frozen pipeline, PEFT LoRA on the protected
cross-attention linears, AdamW, the real `train_step`) is timed in alternating rounds:

- plain: projection.mode none — the LoRA as PEFT trains it;
- global: the same LoRA with every down-projection parametrized as A·U·Uᵀ (nullbooth.train.projection.attach_global);
- timestep (tiny model only): the update of A projected after each optimizer step with the step's bucket basis.

The bases are random orthonormal d×k with k = d/2 (the parametrization's cost grows with k; a real null space is
usually smaller). Medians of per-step times, rounds interleaved so machine load drifts hit both sides alike.

Models: the embedded tiny model (32×32 images, 16×16 latents) and an SD1.5-shaped UNet with random weights
(benchmarks/common.py: SD1.5's block config, 860M parameters; 256×256 images = 32×32 latents, CPU-friendly).

    python benchmarks/bench_train.py [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn.utils import parametrize

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, row, sd15_model_dir
from nullbooth.config import load_config
from nullbooth.train.projection import (
    TimestepBuckets,
    TimestepProjector,
    attach_global,
    plan_projection,
)

TARGET = "≤ 1.05"


def build_worker(model_path: str, resolution: int, device: str):
    """A plain-LoRA Worker on `model_path` (no statistics run needed in mode none)."""
    from diffusers import UNet2DConditionModel

    from nullbooth.models.layers import find_protected_layers
    from nullbooth.models.registry import resolve_model_location
    from nullbooth.models.subject import draw_subject_image
    from nullbooth.train.data import stack_images
    from nullbooth.train.worker import Worker

    config = load_config(None, [f"model.path={model_path}", "projection.mode=none", f"train.resolution={resolution}",
                                "train.train_batch_size=1", "train.rank=4", "train.alpha=4", "train.learning_rate=1e-4"])
    location = resolve_model_location(model_path)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(location, subfolder="unet"))
    targets = {n: lin.in_features for n, lin in find_protected_layers(unet, config.covariance.layers).items()}
    plan = plan_projection(config, None, targets)
    images = stack_images([draw_subject_image(i, resolution) for i in range(2)], resolution)
    return Worker(config, plan, images, None, device=device, measure=False)


def random_bases(worker, fraction: float = 0.5, seed: int = 0) -> dict[str, torch.Tensor]:
    """Orthonormal d×k bases, k = fraction·d; text-side layers share one (as with real statistics)."""
    gen = torch.Generator().manual_seed(seed)
    by_width: dict[tuple[str, int], torch.Tensor] = {}
    bases = {}
    for name, pair in worker.pairs.items():
        d = pair.down.weight.shape[1]
        key = ("text" if name.endswith(("attn2.to_k", "attn2.to_v")) else name, d)
        if key not in by_width:
            q = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
            by_width[key] = q[:, : max(1, int(fraction * d))].contiguous()
        bases[name] = by_width[key]
    return bases


class Modes:
    """Switches one Worker between plain, global and timestep projection without touching its parameters."""

    def __init__(self, worker, bases):
        self.worker, self.bases = worker, bases
        self.params = [id(p) for p in worker.optimizer.param_groups[0]["params"]]

    def set(self, mode: str) -> None:
        w = self.worker
        for pair in w.pairs.values():
            if parametrize.is_parametrized(pair.down, "weight"):
                parametrize.remove_parametrizations(pair.down, "weight", leave_parametrized=False)
        w.projector = w.buckets = None
        if mode == "global":
            attach_global(w.pairs, self.bases)
        elif mode == "timestep":
            collected = [801, 401, 1]
            w.buckets = TimestepBuckets(collected, w.num_train_timesteps)
            w.projector = TimestepProjector({n: p.down.weight for n, p in w.pairs.items()},
                                          {t: self.bases for t in collected})
        # The optimizer must keep training the very same tensors whatever the mode.
        current = {id(p) for n, p in w.unet.named_parameters() if p.requires_grad}
        assert current == set(self.params), "toggling the projection replaced the trained parameters"


def step_times(worker, modes: Modes, mode: str, steps: int) -> list[float]:
    """Seconds of each of `steps` optimizer steps in `mode`."""
    modes.set(mode)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        worker.train_step()
        if worker.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def compare(worker, kinds: list[str], rounds: int) -> dict[str, list[float]]:
    """Per-step times of 'none' and each kind: every round times one step of each mode back to back (order
    reversed every other round), so load that drifts over seconds hits all modes alike."""
    modes = Modes(worker, random_bases(worker))
    order = ["none", *kinds]
    for mode in order:  # warm-up: first steps allocate
        step_times(worker, modes, mode, 1)
    times: dict[str, list[float]] = {m: [] for m in order}
    for r in range(rounds):
        for mode in (order if r % 2 == 0 else order[::-1]):
            times[mode] += step_times(worker, modes, mode, 1)
    return times


def isolated_cost(worker, bases: dict[str, torch.Tensor], repeats: int = 20) -> float:
    """Median seconds of the work global mode adds to a step, alone: A·U·Uᵀ for every protected layer, forward and
    backward (the rest of the step is the same computation in both modes)."""
    basis = {name: b.to(device=worker.device, dtype=torch.float32) for name, b in bases.items()}
    downs = {name: pair.down.weight.detach().clone().requires_grad_(True) for name, pair in worker.pairs.items()}

    def once() -> None:
        total = sum(((a @ basis[n]) @ basis[n].T).square().sum() for n, a in downs.items())
        total.backward()

    once()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        if worker.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rows_for(label: str, model_path: str, resolution: int, kinds: list[str], rounds: int, device: str) -> list[dict]:
    worker = build_worker(model_path, resolution, device)
    times = compare(worker, kinds, rounds)
    plain = statistics.median(times["none"])
    extra = isolated_cost(worker, random_bases(worker))
    out = []
    for kind in kinds:
        projected = statistics.median(times[kind])
        # The ratio is the median of the paired per-round ratios: robust to load changing between rounds.
        ratio = statistics.median(p / q for p, q in zip(times[kind], times["none"]))
        latents = resolution // worker.pipe.vae_scale_factor
        note = (f"{label}: median step {projected * 1e3:.1f} ms {kind} vs {plain * 1e3:.1f} ms plain (ratio of "
                f"medians {projected / plain:.3f}), {rounds} interleaved rounds (ratio: median of the paired "
                f"per-round ratios), batch 1, {latents}×{latents} latents, "
                f"LoRA rank 4 on {len(worker.pairs)} layers, k = d/2, {torch.get_num_threads()} torch threads; "
                f"load average {os.getloadavg()[0]:.1f}")
        if kind == "global":
            note += (f"; the projections alone (A·U·Uᵀ of all {len(worker.pairs)} layers, forward + backward) take "
                     f"{extra * 1e3:.2f} ms = {100 * extra / plain:.2f}% of a plain step")
        out.append(row(f"training step, {kind} projection ÷ plain LoRA ({label})", projected, ratio, TARGET, note))
        print(out[-1]["figure"], f"{ratio:.3f}", "|", note, flush=True)
    del worker
    return out


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    if device == "cpu":
        torch.set_num_threads(1)  # one thread per training worker, as Ray Train runs it (cpus_per_worker: 1)
    rows = rows_for("tiny", "tiny", 32, ["global", "timestep"], rounds=8 if quick else 60, device=device)
    if not quick:
        resolution = 512 if device == "cuda" else 256
        rows += rows_for("SD1.5-shaped", str(sd15_model_dir()), resolution, ["global"], rounds=20, device=device)
    for r in rows:
        r["note"] += f"; {machine(device)}"
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    for r in run(args.device, args.quick):
        print(f"{r['figure']}: ratio {r['ratio']:.3f} (target {r['target']}) — {r['note']}")
