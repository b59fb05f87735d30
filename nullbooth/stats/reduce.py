"""Tree reduction of the actors' partial sums over Ray ObjectRefs.

A state is `{"sums": {key: float64 array}, "rows": {key: n}}` and `add_states` adds two (see stats/moments.py).
N partial states are added pairwise by remote tasks, level by level: ⌈log2 N⌉ levels and N − 1 additions, none of
them in the driver, which only ever holds ObjectRefs. The caller streams timestep by timestep, so the object store
holds the O(N) partial sums of one timestep at a time. States travel as numpy arrays, which Ray reads from its
object store without a copy.
"""

from __future__ import annotations

import math

import ray
from ray import ObjectRef

from nullbooth.stats.moments import State, add_states


# No CPU reservation: the collector actors keep their CPUs (and their sums) until the reduction is over, and these
# short, memory-bound additions must run beside them, on the nodes that hold their arguments.
@ray.remote(num_cpus=0)
def add_task(a: State, b: State) -> State:
    return add_states(a, b)


def tree_levels(n: int) -> int:
    """Levels of pairwise additions for n partial states: ⌈log2 n⌉."""
    return math.ceil(math.log2(n)) if n > 1 else 0


def tree_reduce(refs: list[ObjectRef], add=add_task) -> tuple[ObjectRef, int]:
    """(ref of the total, number of levels): pairwise remote additions, an odd one out carried to the next level."""
    if not refs:
        raise ValueError("tree_reduce needs at least one state")
    level = list(refs)
    levels = 0
    while len(level) > 1:
        pairs = [add.remote(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        level = pairs + ([level[-1]] if len(level) % 2 else [])
        levels += 1
    return level[0], levels
