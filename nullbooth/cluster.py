"""Connecting to Ray: the cluster when there is one, otherwise a private local Ray bound to loopback."""

from __future__ import annotations

import logging
import os
import re
import socket

import ray

from nullbooth.config import RayConfig
from nullbooth.errors import NullBoothError


def connect(ray_config: RayConfig) -> None:
    """Join the enclosing Ray job, the configured address or RAY_ADDRESS; otherwise start a local Ray.

    `ray job submit` sets RAY_ADDRESS for the entrypoint, so a submitted job lands on its cluster unchanged. A local
    Ray binds its dashboard to 127.0.0.1: a laptop's dashboard is never opened to the network.
    """
    if ray.is_initialized():
        return
    address = ray_config.address or os.environ.get("RAY_ADDRESS")
    if address:
        key = "ray.address" if ray_config.address else "RAY_ADDRESS"  # name what the user set, config or environment
        _probe(address, key)
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise NullBoothError(f"{key}: cannot reach the Ray cluster at {address!r}: {reason}") from None
        return
    ray.init(num_cpus=ray_config.num_cpus, include_dashboard=None, dashboard_host=ray_config.dashboard_host,
             logging_level=logging.WARNING)


def cluster_has_gpu() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def _probe(address: str, key: str, timeout_s: float = 5.0) -> None:
    """Fail fast on a `host:port` / `ray://host:port` nobody listens on: ray.init would retry for many minutes."""
    match = re.fullmatch(r"(?:ray://)?\[?([^\]/]+?)\]?:(\d+)", address.strip())
    if match is None:
        return  # "auto", "local" and other forms are Ray's to resolve
    host, port = match.group(1), int(match.group(2))
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as err:
        raise NullBoothError(f"{key}: cannot reach the Ray cluster at {address!r} ({err}); start it with "
                             "`ray start --head` or correct the address") from None
