"""Connecting to Ray: the cluster when there is one, otherwise a private local Ray bound to loopback.

A laptop's Ray must not be reachable from the network: Ray's gRPC servers (GCS, raylet and object manager, every
worker, the dashboard agent and its Prometheus /metrics endpoint, the runtime-env agent) listen on all interfaces
unless the node's IP address is exactly 127.0.0.1. `ray.init(_node_ip_address="127.0.0.1")` does not get there (Ray
rewrites a loopback address to the machine's LAN address); only Ray's single-machine mode does, the one Ray uses on
macOS and Windows (`ray_constants.ENABLE_RAY_CLUSTER`, which RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 sets when Ray is
imported). `connect` turns it on for the `ray.init` of a new local Ray only: a driver that joins a cluster must
advertise its real address. Ray's token file (~/.ray/auth_token, written by the first local `ray.init` with the
umask's 0644) is created by `connect` itself with mode 0600, or tightened to 0600 when it is ours and wider.
tests/test_security.py checks both on a live local Ray.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import ray

from nullbooth.config import RayConfig
from nullbooth.errors import NullBoothError


def connect(ray_config: RayConfig) -> None:
    """Join the enclosing Ray job, the configured address or RAY_ADDRESS; otherwise start a local Ray.

    `ray job submit` sets RAY_ADDRESS for the entrypoint, so a submitted job lands on its cluster unchanged. A local
    Ray listens on 127.0.0.1 only, its dashboard included, and its token file is readable by its owner only.
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
    secure_token_file()
    with loopback_only():
        # address="local": a plain ray.init() would join whatever cluster `ray start` left running on this machine
        # (it did, in a test: a half-torn-down cluster killed the run's actors); without an address we promise a
        # Ray of our own.
        ray.init(address="local", num_cpus=ray_config.num_cpus, include_dashboard=None,
                 dashboard_host=ray_config.dashboard_host, logging_level=logging.WARNING)


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """Within this block, a new local Ray takes 127.0.0.1 as its node address, so every server it starts listens on
    loopback only (see the module's docstring for why this is the one switch that works)."""
    from ray._private import ray_constants

    previous = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    if previous is None:  # another Ray version: tests/test_security.py would show the ports it opens
        yield
        return
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous


def token_file() -> Path:
    """Where Ray's token authentication reads its token: RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token."""
    configured = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(configured).expanduser() if configured else Path.home() / ".ray" / "auth_token"


def secure_token_file() -> Path | None:
    """The token file a new local Ray will use, created with mode 0600 when missing (a new local `ray.init` turns
    token authentication on and would write it with mode 0644), or narrowed to 0600 when it is ours and readable by
    others. None when no token file is involved (RAY_AUTH_MODE other than token, or the token in RAY_AUTH_TOKEN)."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if (mode is not None and mode.lower() != "token") or os.environ.get("RAY_AUTH_TOKEN"):
        return None
    path = token_file()
    if not path.exists() and "RAY_AUTH_TOKEN_PATH" not in os.environ:
        _create_token_file(path)
    if path.is_file() and path.stat().st_uid == os.getuid() and path.stat().st_mode & 0o077:
        path.chmod(0o600)
    return path


def _create_token_file(path: Path) -> None:
    """A new token in Ray's own form (256 random bits as hex), written to a 0600 temporary file and linked into
    place, so the file never exists with a wider mode and a token another process wrote meanwhile is kept."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=".auth_token.tmp-", dir=path.parent)  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        with contextlib.suppress(FileExistsError):
            os.link(temp, path)
    finally:
        os.unlink(temp)


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
