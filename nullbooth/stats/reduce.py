"""The tree reduction of the collector actors' sums, done by the actors themselves.

A state is `{"sums": {key: packed float64 array}, "rows": {key: n}}` (stats/moments.py). For one key of the run
("text", or a timestep) the N live actors reduce among themselves, level by level: at the level of stride s
(1, 2, 4, ...) actor i, for every i that is a multiple of 2s, adds the partial sum of actor i + s into a buffer of
its own (`Partials.fold`). The peer's partial goes through the object store: the peer copies it there once
(`Partials.partial`), the adding actor reads it where it lies (numpy, zero-copy on its node) and adds it into its
buffer in place. So the whole reduction copies N states into the store, as gathering them would, and allocates one
state per adding actor (its buffer, made by its first addition and reused from key to key); no task starts, no
pairwise sum is allocated and copied back. After ⌈log2 N⌉ levels actor 0's buffer holds the total, and the driver
fetches that one state: its memory is one state whatever N. The driver orders the actors by node
(stats/dealer.py), so the first levels add within a node and only ⌈log2 nodes⌉ levels cross the network. It
submits every level at once: an actor runs one caller's calls in the order they were submitted, so a partial is
read only after the additions of earlier levels.

Why a buffer, and not the actor's own sums: the own sums stay exactly as collected until the driver has the key's
total and releases it (stats/hooks.py). That makes a loss during the reduction simple to survive with exactly-once
sums (the decision, implemented in stats/dealer.py `Dealer.reduce`): when an actor dies while a key is being
reduced, its buffer dies with whatever peers had been added into it, but those peers still hold their own sums.
So the driver drops the key's buffers on every live actor, replaces the dead actor and re-deals the batches it
had absorbed (exactly as when an actor dies while sampling: the replacement adds only the keys not yet released),
and redoes the reduction of that key from the actors' own sums. Keys already reduced are written and released
and are never touched again; nothing of the failed attempt reaches the driver, because the driver waits for every
addition to succeed before it takes the total (`reduce_state`). The price is one extra state per adding actor
(1/T of its sums at T timesteps, in host memory); a released key frees its sums, so an actor's memory shrinks as
the reduction proceeds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray import ObjectRef

from nullbooth.stats.moments import State, add_state_into, add_states

Key = str | int  # "text" or a timestep


def tree_levels(n: int) -> int:
    """Levels of pairwise additions for n partial states: ⌈log2 n⌉."""
    return math.ceil(math.log2(n)) if n > 1 else 0


def tree_reduce(actors: Sequence[Any], which: Key) -> tuple[ObjectRef, list[ObjectRef], int]:
    """Submit the whole tree over `actors` (handles with `partial` and `fold`): (ref of the total, refs of the
    additions' acknowledgements, number of levels). The total is only complete once every addition succeeded."""
    if not actors:
        raise ValueError("tree_reduce needs at least one actor")
    folds: list[ObjectRef] = []
    stride = 1
    while stride < len(actors):
        for i in range(0, len(actors) - stride, 2 * stride):
            folds.append(actors[i].fold.remote(which, actors[i + stride].partial.remote(which)))
        stride *= 2
    return actors[0].partial.remote(which), folds, tree_levels(len(actors))


def reduce_state(actors: Sequence[Any], which: Key) -> State:
    """The total of `which` over `actors`, in the driver. Raises (RayActorError, RayTaskError) if any addition
    failed — an actor lost half-way — rather than return a total that misses some sums."""
    total, folds, _ = tree_reduce(actors, which)
    ray.get(folds)
    return ray.get(total)


class Partials:
    """An actor's side of the reduction: `own(which)` gives its own sums of a key, which the reduction never
    modifies; peers' sums are added into a separate buffer per key, made by the first addition."""

    def __init__(self, own: Callable[[Key], State]):
        self._own = own
        self._buffers: dict[Key, State] = {}
        # The arrays of the last discarded buffer, reused by the next key's first addition: every timestep has the
        # same shapes, and writing into fresh memory (page faults) cost 5-10× an in-place addition when measured.
        self._spare: dict = {}

    def partial(self, which: Key) -> State:
        """What this actor contributes at the next level: its buffer if peers were added, else its own sums."""
        return self._buffers[which] if which in self._buffers else self._own(which)

    def fold(self, which: Key, peer: State) -> int:
        """Add a peer's partial into this actor's buffer (in place after the first); returns the rows added."""
        if which in self._buffers:
            add_state_into(self._buffers[which], peer)
        else:  # own + peer into a buffer: the own sums stay as they are
            self._buffers[which] = add_states(self._own(which), peer, out=self._spare)
            self._spare = {}
        return sum(peer["rows"].values())

    def discard(self, which: Key) -> None:
        """Done with the buffer of `which` (a failed attempt, or the key is reduced); its memory is kept for the
        next key's buffer."""
        buffer = self._buffers.pop(which, None)
        if buffer is not None:
            self._spare = buffer["sums"]
