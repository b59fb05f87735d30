"""Where the packed float64 sums live (`covariance.accumulate_on`), and how a batch's packed product gets there.

`device` (the default): the sums live on the actor's device, next to the model, and each product's triangle is
added where it was formed. `host`: the sums live in host memory, for GPU actors short of memory (SD1.5 at 30 steps:
2.98 GB of packed sums per actor; docs/operations.md, section 6, has the arithmetic). The product and its triangle
are still formed on the device, so the host receives d(d+1)/2 float32 entries once per UNet call and layer: an
asynchronous copy into pinned memory (`non_blocking`), followed by an event the host waits on before it adds. The
additions run on one worker thread, in the order the hooks saw the calls, so the host sums are the same float
operations in the same order as the device's (on a CPU actor the two are bit for bit equal, which the tests check),
while the main thread goes on launching the UNet's next kernels (torch releases the GIL inside the addition).
At most `max_pending` triangles wait at a time (about one UNet call's worth), which bounds the pinned memory.
"""

from __future__ import annotations

import functools
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from nullbooth.stats.moments import add_packed

ACCUMULATE_ON = ("device", "host")


class DeviceAccumulation:
    """The sums on the device the products are formed on: each triangle is added at once, in the same stream."""

    def add(self, sums: dict, key, tri: torch.Tensor) -> None:
        sums[key] = add_packed(sums.get(key), tri)

    def wait(self) -> None:
        """Nothing is ever pending."""

    def close(self) -> None:
        """Nothing to release."""


def _add_when_copied(acc: torch.Tensor, staging: torch.Tensor, copied: torch.cuda.Event) -> None:
    copied.synchronize()  # the non_blocking copy into `staging` has landed
    acc.add_(staging)


class HostAccumulation:
    """The sums in host memory; triangles formed on a GPU are copied over asynchronously and added by one thread."""

    def __init__(self, max_pending: int = 64):
        self.max_pending = max_pending
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nullbooth-host-sums")
        self._pending: deque[Future] = deque()

    def add(self, sums: dict, key, tri: torch.Tensor) -> None:
        acc = sums.get(key)
        if acc is None:
            acc = sums[key] = torch.zeros(tri.shape[0], dtype=torch.float64)
        if tri.device.type == "cuda":
            staging = torch.empty(tri.shape, dtype=tri.dtype, pin_memory=True)
            staging.copy_(tri, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(torch.cuda.current_stream(tri.device))
            job = functools.partial(_add_when_copied, acc, staging, copied)
        else:
            job = functools.partial(acc.add_, tri)  # already on the host: the same addition, on the same thread
        self._pending.append(self._worker.submit(job))
        while len(self._pending) > self.max_pending:
            self._pending.popleft().result()

    def wait(self) -> None:
        """Block until every queued triangle is in its sum (re-raises an addition's error)."""
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        self.wait()
        self._worker.shutdown()


def accumulation(on: str, max_pending: int = 64) -> DeviceAccumulation | HostAccumulation:
    if on not in ACCUMULATE_ON:
        raise ValueError(f"accumulate_on must be one of {ACCUMULATE_ON}, got {on!r}")
    return DeviceAccumulation() if on == "device" else HostAccumulation(max_pending)
