"""Dealing prompt batches to collector actors, dynamically and exactly once despite lost actors.

Each actor has at most `covariance.batches_in_flight` batches queued, dealt one per actor per round so that every
actor starts with work; whenever one finishes (`ray.wait`), the actor that finished gets the next batch, so a slow
actor never holds up the others. The driver remembers which batches every actor has absorbed. If an actor dies (node
lost, out of memory), its sums die with it: all the batches it had absorbed or had queued are dealt again, and a
replacement actor takes its slot. The final sums are read only from live actors, so every batch is counted exactly
once.

The reduction (`reduce`, one key at a time: "text", then every distinct timestep) runs among the live actors
(stats/reduce.py), which never modify their own sums while doing it. An actor lost during a key's reduction is
handled like one lost while sampling — replaced, its batches dealt again — after which the key's partial buffers are
dropped and its reduction redone from the actors' own sums: exactly once again. A reduced key is released: the
actors drop its sums, and replacements started later (`released`) add nothing to it.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ObjectLostError, RayActorError, RayTaskError

from nullbooth import telemetry
from nullbooth.config import Config
from nullbooth.errors import NullBoothError
from nullbooth.stats.collector import Collector
from nullbooth.stats.moments import State
from nullbooth.stats.reduce import reduce_state

logger = logging.getLogger(__name__)
Batch = tuple[int, list[str]]  # (index of its first prompt in the preserved list, prompts)


def make_batches(prompts: list[str], batch_size: int) -> list[Batch]:
    """Fixed slices of the prompt list: a batch's content never depends on who absorbs it."""
    return [(i, prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)]


@dataclass
class Slot:
    index: int
    incarnation: int
    actor: Any
    absorbed: list[int] = field(default_factory=list)
    in_flight: dict[ray.ObjectRef, int] = field(default_factory=dict)
    node: str | None = None  # the Ray node it runs on, asked for when the reduction first needs it


class Dealer:
    """The collector actors of one statistics run and the bookkeeping that makes their sums exact."""

    def __init__(self, config: Config, batches: list[Batch], max_failures: int | None = None):
        self.config = config
        self.batches = batches
        self.max_failures = max_failures if max_failures is not None else 2 * config.covariance.num_workers + 2
        self.failures = 0
        self.done: set[int] = set()
        self.pending: deque[int] = deque(range(len(batches)))
        self.released: list[str | int] = []  # keys reduced and released, in order
        self._remote = ray.remote(Collector)
        self.slots: list[Slot] = []
        self._failure_counter = telemetry.counter("stats_actor_failures", "collector actors lost and replaced")

    def start(self, count: int | None = None) -> dict[str, Any]:
        """Start actors up to `count` (default: covariance.num_workers) and return their common description."""
        count = self.config.covariance.num_workers if count is None else count
        self.slots += [self._start(i, 0) for i in range(len(self.slots), count)]
        return self.describe()

    def _start(self, index: int, incarnation: int) -> Slot:
        cov = self.config.covariance
        actor = self._remote.options(num_cpus=cov.cpus_per_worker, num_gpus=cov.gpus_per_worker, max_restarts=0,
                                     name=None).remote(self.config, index, incarnation, tuple(self.released))
        return Slot(index, incarnation, actor)

    def describe(self) -> dict[str, Any]:
        """Every actor's description; they must agree (same model, layers and plan on every replica)."""
        infos = ray.get([slot.actor.describe.remote() for slot in self.slots])
        for info in infos[1:]:
            if info["fingerprint"] != infos[0]["fingerprint"] or info["timesteps"] != infos[0]["timesteps"]:
                raise NullBoothError("model.path: collector actors loaded different models or samplers "
                                     f"({infos[0]['fingerprint']} vs {info['fingerprint']}); every node must see "
                                     "the same model files")
        return infos[0]

    # -- dealing -----------------------------------------------------------------------------------------------------
    def run(self, on_batch: Callable[[dict], None] = lambda info: None,
            on_lost: Callable[[int], None] = lambda prompts: None) -> None:
        """Deal until every batch is absorbed by a live actor. `on_lost(n)` reports prompts to be redone."""
        per_actor = self.config.covariance.batches_in_flight
        while len(self.done) < len(self.batches):
            # One batch per actor per round: with fewer batches than actors × batches_in_flight, every actor still
            # gets one (filling the first actor's queue before the next would leave the others idle).
            for depth in range(1, per_actor + 1):
                for slot in self.slots:
                    if self.pending and len(slot.in_flight) < depth:
                        batch = self.pending.popleft()
                        first, prompts = self.batches[batch]
                        slot.in_flight[slot.actor.absorb.remote(batch, first, prompts)] = batch
            owners = {ref: slot for slot in self.slots for ref in slot.in_flight}
            [ref], _ = ray.wait(list(owners), num_returns=1)
            slot = owners[ref]
            try:
                info = ray.get(ref)
            except RayActorError as err:
                on_lost(self.replace(slot, err))
                continue
            batch = slot.in_flight.pop(ref)
            slot.absorbed.append(batch)
            self.done.add(batch)
            on_batch(info)

    def replace(self, slot: Slot, err: BaseException) -> int:
        """Re-deal every batch of a dead actor and start its replacement; returns the prompts to redo."""
        self.failures += 1
        self._failure_counter.inc(1)
        if self.failures > self.max_failures:
            raise NullBoothError(f"covariance: {self.failures} collector actors died (more than {self.max_failures}); "
                                 f"giving up. Last error: {str(err).strip().splitlines()[0]}")
        lost = slot.absorbed + list(slot.in_flight.values())
        self.done.difference_update(slot.absorbed)
        self.pending.extendleft(sorted(lost, reverse=True))  # back at the front, in order
        logger.warning("nullbooth: collector actor %d (incarnation %d) died after absorbing %d batches; re-dealing %d "
                       "batches to a replacement", slot.index, slot.incarnation, len(slot.absorbed), len(lost))
        ray.kill(slot.actor, no_restart=True)
        fresh = self._start(slot.index, slot.incarnation + 1)
        self.slots[self.slots.index(slot)] = fresh
        return sum(len(self.batches[b][1]) for b in slot.absorbed)

    def recover(self, err: BaseException, on_lost: Callable[[int], None] = lambda prompts: None) -> bool:
        """After an actor error outside dealing: replace every dead actor. False if all are alive (a real error)."""
        dead = []
        for slot in self.slots:
            try:
                ray.get(slot.actor.ping.remote())
            except RayActorError:
                dead.append(slot)
        for slot in dead:
            on_lost(self.replace(slot, err))
        return bool(dead)

    # -- the reduction -------------------------------------------------------------------------------------------------
    def reduce(self, which: str | int, on_batch: Callable[[dict], None] = lambda info: None,
               on_lost: Callable[[int], None] = lambda prompts: None) -> State:
        """The total of "text" or a timestep over every batch, exactly once, then released on the actors. An actor
        lost during the reduction is replaced, its batches are dealt again, and the key is reduced anew.

        With a whole node lost, a partial sum or the total may also be gone from that node's object store before
        anyone read it: Ray cannot rebuild an actor call's result, so reading it raises ObjectLostError (or a
        RayTaskError caused by it, for an addition that needed it). That is the same loss — an actor whose sums
        are gone — and gets the same retry; an error with every actor still alive is a real one and is raised."""
        retry = False
        while True:
            try:
                if retry:
                    ray.get([slot.actor.discard.remote(which) for slot in self.slots])
                    self.run(on_batch, on_lost)
                total = reduce_state([[slot.actor for slot in group] for group in self._by_node()], which)
                break
            except (RayActorError, RayTaskError, ObjectLostError) as err:
                if not self.recover(err, on_lost):
                    raise
                logger.warning("nullbooth: a collector actor was lost while reducing %r; its batches are redone "
                               "and that reduction starts again", which)
                retry = True
        self._release(which)
        return total

    def _by_node(self) -> list[list[Slot]]:
        """The live slots grouped by node (slot order within a node, nodes in order of their first slot): the
        reduction adds within a node before it crosses the network."""
        unknown = [slot for slot in self.slots if slot.node is None]
        for slot, node in zip(unknown, ray.get([slot.actor.node_id.remote() for slot in unknown])):
            slot.node = node
        groups: dict[str, list[Slot]] = {}
        for slot in sorted(self.slots, key=lambda slot: slot.index):
            groups.setdefault(slot.node, []).append(slot)
        return list(groups.values())

    def _release(self, which: str | int) -> None:
        """Every actor drops the sums of `which`; one found dead here is dealt with by the next key's reduction."""
        self.released.append(which)
        for ref in [slot.actor.release.remote(which) for slot in self.slots]:
            try:
                ray.get(ref)
            except RayActorError:
                pass

    def shutdown(self) -> None:
        for slot in self.slots:
            ray.kill(slot.actor, no_restart=True)
