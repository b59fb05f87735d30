"""Shared test setup: a private model cache, quiet single-machine Ray settings, one local Ray per test module."""

import os
import shutil
import tempfile

import pytest

# Set before anything starts Ray: actors and Train workers inherit the driver's environment.
_OWN_CACHE = None if "NULLBOOTH_CACHE" in os.environ else tempfile.mkdtemp(prefix="nullbooth-test-cache-")
if _OWN_CACHE:
    os.environ["NULLBOOTH_CACHE"] = _OWN_CACHE
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.1"  # each ray.train.report otherwise waits ~2 s
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_unconfigure(config):
    """The private model cache goes when the session ends (it holds a few MB of built models)."""
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray with 2 CPUs for the whole test module (starting Ray costs seconds; never per test)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    yield ray
    ray.shutdown()
