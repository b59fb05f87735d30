"""Progress a person can watch: tqdm bars that Ray forwards to the driver, and metrics for the dashboard.

`progress(...)` is a `ray.experimental.tqdm_ray.tqdm` when Ray is up (inside a worker it forwards its state to the
driver, which draws one real tqdm per bar with rate and ETA), and a plain tqdm otherwise.

`counter(...)` / `gauge(...)` return `ray.util.metrics` objects, created once per process and name, which Ray exports
to its dashboard and Prometheus endpoint; outside Ray (or if metrics are unavailable) they return a no-op stand-in,
so components can report unconditionally. Metric names are prefixed with `nullbooth_`.
"""

from __future__ import annotations

from typing import Any

_METRICS: dict[str, Any] = {}


class _NoMetric:
    """Stands in for a Ray metric where none can be created (no Ray connection)."""

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        pass

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        pass


def _metric(kind: str, name: str, description: str, tag_keys: tuple[str, ...]) -> Any:
    full = f"nullbooth_{name}"
    if full in _METRICS:
        return _METRICS[full]
    try:
        import ray
        from ray.util import metrics

        if not ray.is_initialized():
            return _NoMetric()  # not cached: a later call, once Ray is up, gets the real metric
        cls = metrics.Counter if kind == "counter" else metrics.Gauge
        metric = cls(full, description=description, tag_keys=tag_keys)
    except Exception:  # noqa: BLE001 - telemetry must never break a computation
        metric = _NoMetric()
    _METRICS[full] = metric
    return metric


def counter(name: str, description: str, tag_keys: tuple[str, ...] = ()) -> Any:
    """A monotonically increasing Ray metric (`.inc(value, tags=...)`)."""
    return _metric("counter", name, description, tag_keys)


def gauge(name: str, description: str, tag_keys: tuple[str, ...] = ()) -> Any:
    """A Ray metric holding the latest value (`.set(value, tags=...)`)."""
    return _metric("gauge", name, description, tag_keys)


def progress(total: int | None, desc: str, unit: str = "it") -> Any:
    """A progress bar with `update(n)` and `close()`; Ray's when Ray is up, so workers' bars reach the driver."""
    try:
        import ray

        if ray.is_initialized():
            from ray.experimental.tqdm_ray import tqdm

            return tqdm(total=total, desc=desc, unit=unit)
    except ImportError:
        pass
    from tqdm import tqdm as plain_tqdm

    return plain_tqdm(total=total, desc=desc, unit=unit)
