"""The tree reduction of the collector actors' sums, done by the actors themselves.

A state is `{"sums": {key: packed float64 array}, "rows": {key: n}}` (stats/moments.py). For one key of the run
("text", or a timestep) the live actors reduce among themselves, level by level. An adding actor adds a peer's
partial sum into a buffer of its own (`Partials.fold`); the peer's partial goes through the object store: the peer
copies it there once (`Partials.partial`), the adding actor reads it where it lies (numpy, zero-copy on its node)
and adds it in place. So the whole reduction copies N states into the store, as gathering them would, and
allocates one state per adding actor (its buffer, made by its first addition and reused from key to key); no task
starts, no pairwise sum is allocated and copied back. At the end the first actor's buffer holds the total, and the
driver fetches that one state: its memory is one state whatever N.

The shape of the tree (`tree_reduce`): the driver groups the actors by node (stats/dealer.py). Within a node the
levels are fewer and larger — an adding actor takes FAN_IN − 1 peers per level, ⌈log4 n⌉ levels for n actors —
because there a level costs a copy into the store and a wait on the level below, while additions are cheap (16
actors with SD1.5-sized states on the shared 2-core machine of benchmarks/RESULTS.md, load average 11.6, medians of
6 alternating runs: fan-in 4 0.92 s, pairs 1.01 s, all into one actor 1.06 s, gathering in the driver 1.10 s).
Across nodes, where a
peer's partial is a network transfer into the adding node, the node totals are added in pairs: ⌈log2 nodes⌉
levels, each node receiving one state per level. The driver submits every level at once: an actor runs one
caller's calls in the order they were submitted, so a partial is read only after the additions of earlier levels.

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

A whole node lost takes more than its actors: the partials and the total its object store held, possibly before
anyone read them. Ray cannot rebuild the result of an actor call, so reading one raises ObjectLostError (an
addition that needed it fails with a RayTaskError caused by it). Every such object was made by an actor of that
node, now dead, so it is the same loss with the same retry; the driver never sees a total it could not read whole.
tests/test_multinode.py removes nodes at both points of a cross-node tree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray import ObjectRef

from nullbooth.stats.moments import State, add_state_into, add_states

Key = str | int  # "text" or a timestep


FAN_IN = 4  # peers per adding actor and level within a node (pairs across nodes)


def levels_for(n: int, fan_in: int) -> int:
    """Levels of a tree over n partial states where each adding actor takes fan_in − 1 peers: ⌈log_fan_in n⌉."""
    levels, span = 0, 1
    while span < n:
        span *= fan_in
        levels += 1
    return levels


def tree_levels(node_sizes: Sequence[int], fan_in: int = FAN_IN) -> tuple[int, int]:
    """(levels within a node, the largest; levels across nodes) for nodes holding `node_sizes` actors."""
    return max((levels_for(n, fan_in) for n in node_sizes), default=0), levels_for(len(node_sizes), 2)


def _submit(actors: Sequence[Any], which: Key, fan_in: int, folds: list[ObjectRef]) -> None:
    """Every level of a tree over `actors` whose first one ends with the total."""
    stride = 1
    while stride < len(actors):
        for i in range(0, len(actors), fan_in * stride):
            for j in range(i + stride, min(i + fan_in * stride, len(actors)), stride):
                folds.append(actors[i].fold.remote(which, actors[j].partial.remote(which)))
        stride *= fan_in


def tree_reduce(nodes: Sequence[Sequence[Any]], which: Key,
                fan_in: int = FAN_IN) -> tuple[ObjectRef, list[ObjectRef], tuple[int, int]]:
    """Submit the whole tree over actors grouped by node (handles with `partial` and `fold`): (ref of the total,
    refs of the additions' acknowledgements, `tree_levels`). The total is complete only once every addition
    succeeded."""
    nodes = [list(group) for group in nodes if group]
    if not nodes:
        raise ValueError("tree_reduce needs at least one actor")
    folds: list[ObjectRef] = []
    for group in nodes:
        _submit(group, which, fan_in, folds)
    _submit([group[0] for group in nodes], which, 2, folds)
    return nodes[0][0].partial.remote(which), folds, tree_levels([len(g) for g in nodes], fan_in)


def reduce_state(nodes: Sequence[Sequence[Any]], which: Key) -> State:
    """The total of `which` over the actors (grouped by node), in the driver. Raises (RayActorError, RayTaskError,
    ObjectLostError) if any addition failed or the total was lost — an actor or its node lost half-way — rather than
    return a total that misses some sums."""
    total, folds, _ = tree_reduce(nodes, which)
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
