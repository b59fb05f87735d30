"""The collector actor: one pipeline replica that samples preserved prompts and accumulates their keys.

For a batch of prompts it encodes them with the pipeline's own text encoder (adding every embedding row, and the
negative prompt's rows once per prompt when guidance is used, to the text-side sum), then runs the configured
diffusers sampler over the exact timestep plan with the real guidance branches while the hooks of
`stats/hooks.py` add `XᵀX` of every image-side protected layer's input to the current timestep's sum. Prompt i of
the preserved list is always sampled with `torch.Generator().manual_seed(sampling.seed + i)` and batches are fixed
slices of the list, so the sums do not depend on which actor absorbed which batch. Sampling stops at the latents
(`output_type="latent"`): the VAE plays no part in the keys.

Only sums leave the actor, as packed float64 numpy arrays; no raw activation is kept or written. The actors reduce
their sums among themselves (`partial`, `fold`: stats/reduce.py) and drop a key's sums once the driver `release`s it.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext
from typing import Any

import ray
import torch

from nullbooth import telemetry
from nullbooth.config import Config
from nullbooth.errors import NullBoothError
from nullbooth.models.backends import get_backend, model_fingerprint, torch_threads_for
from nullbooth.models.layers import find_protected_layers, layer_table
from nullbooth.stats.hooks import KeyStatistics
from nullbooth.stats.moments import State, total_rows
from nullbooth.stats.reduce import Partials


class Collector:
    """Created by the driver as a Ray actor (`ray.remote(Collector)`); `slot` is its place among the workers and
    `incarnation` counts replacements of that slot (the fault-injection test aids fire in incarnation 0 only);
    `released` lists the keys ("text", timesteps) already reduced, which a replacement does not add again."""

    def __init__(self, config: Config, slot: int, incarnation: int = 0, released: tuple = ()):
        torch_threads_for(config.covariance.cpus_per_worker)
        self.config = config
        self.slot = slot
        self.incarnation = incarnation
        self.released = tuple(released)
        self.batches_absorbed = 0
        self.folds = 0
        self.partials = Partials(self.state)
        self._error: NullBoothError | None = None
        try:
            self._setup()
        except NullBoothError as err:
            # Raised from describe(): an error in __init__ reaches the driver only as an opaque "actor died".
            self._error = err

    def _setup(self) -> None:
        self.backend = get_backend(self.config)
        self.device = self.backend.device(has_gpu=bool(ray.get_gpu_ids()) if ray.is_initialized() else None)
        self.pipe = self.backend.load_pipeline(self.device)
        self.layers = find_protected_layers(self.pipe.unet, self.config.covariance.layers)
        self.timesteps = self.backend.timestep_plan(self.backend.make_scheduler(dict(self.pipe.scheduler.config)))
        cov = self.config.covariance
        self.stats = KeyStatistics(self.pipe.unet, self.layers, self.timesteps, cov.product_dtype, self.device,
                                   cov.accumulate_on, self.released)
        tags = ("actor",)
        self._prompts_done = telemetry.counter("stats_prompts_done", "preserved prompts sampled", tags)
        self._rows = telemetry.counter("stats_rows", "key rows accumulated", ("actor", "side"))
        self._throughput = telemetry.gauge("stats_actor_prompts_per_second", "collector throughput", tags)

    def describe(self) -> dict[str, Any]:
        """What the driver checks and records: model fingerprint, layers, timestep plan, sampler."""
        if self._error is not None:
            raise self._error
        scheduler = self.pipe.scheduler
        return {"fingerprint": model_fingerprint(self.pipe.unet), "layers": layer_table(self.layers),
                "timesteps": list(self.timesteps), "uses_guidance": self.backend.uses_guidance,
                "device": str(self.device),
                "scheduler": {"name": self.config.sampling.scheduler, "class": type(scheduler).__name__,
                              "config": json.loads(json.dumps(dict(scheduler.config), default=str))}}

    def absorb(self, batch_id: int, first_index: int, prompts: list[str], collect: bool = True) -> dict[str, Any]:
        """Sample `prompts` (global indices first_index, first_index + 1, ...) and add their keys.

        `collect=False` samples the same way with no hooks and adds nothing (the benchmark's baseline).
        """
        if self._error is not None:
            raise self._error
        start = time.perf_counter()
        seed = self.config.sampling.seed
        text_rows = 0
        image_before = total_rows(self.stats.image_rows)
        with torch.no_grad():
            cond, uncond = self.backend.encode(self.pipe, prompts)
            if collect:
                text_rows += self.stats.add_text(cond)
                if uncond is not None:  # the empty/negative prompt is a key of the guidance branch, once per prompt
                    text_rows += self.stats.add_text(uncond)
            generators = [torch.Generator().manual_seed(seed + first_index + i) for i in range(len(prompts))]
            with self.stats.attached() if collect else nullcontext():
                self.backend.sample(self.pipe, cond, uncond, generators, output_type="latent")
        image_rows = total_rows(self.stats.image_rows) - image_before
        seconds = time.perf_counter() - start
        if collect:
            self.batches_absorbed += 1
            tags = {"actor": str(self.slot)}
            self._prompts_done.inc(len(prompts), tags=tags)
            for side, rows in (("text", text_rows), ("image", image_rows)):
                if rows:  # none for a key already reduced (a replacement redoing a lost actor's batches)
                    self._rows.inc(rows, tags={**tags, "side": side})
            self._throughput.set(len(prompts) / max(seconds, 1e-9), tags=tags)
            self._maybe_fail()
        return {"batch": batch_id, "slot": self.slot, "prompts": len(prompts), "text_rows": text_rows,
                "image_rows": image_rows, "seconds": seconds}

    def _maybe_fail(self) -> None:
        """TEST AID `covariance.fail_after_batches`: slot 0's first incarnation dies like a lost node would."""
        limit = self.config.covariance.fail_after_batches
        if limit is not None and self.slot == 0 and self.incarnation == 0 and self.batches_absorbed >= limit:
            os._exit(1)

    def state(self, which: str | int) -> State:
        """The own sums so far: "text", or an int timestep of the plan."""
        return self.stats.text_state() if which == "text" else self.stats.image_state(which)

    # -- the reduction (stats/reduce.py) -----------------------------------------------------------------------------
    def partial(self, which: str | int) -> State:
        return self.partials.partial(which)

    def fold(self, which: str | int, peer: State) -> int:
        rows = self.partials.fold(which, peer)
        self.folds += 1
        limit = self.config.covariance.fail_in_reduction
        if limit is not None and self.slot == 0 and self.incarnation == 0 and self.folds >= limit:
            os._exit(1)  # TEST AID: lost with a peer's sums in its buffer, before it could answer
        return rows

    def discard(self, which: str | int) -> None:
        self.partials.discard(which)

    def release(self, which: str | int) -> None:
        """The driver has the total of `which`: drop its sums and buffer, and add nothing to it any more."""
        self.partials.discard(which)
        self.stats.release(which)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def nbytes(self) -> int:
        """Bytes of the actor's own sums (the reduction buffer of the key being reduced not included)."""
        return self.stats.nbytes()

    def ping(self) -> bool:
        return True
