"""Prometheus metrics of the puller, on a registry of our own.

:class:`PullMetrics` holds every metric the puller records; the
:class:`~puller.pull.Puller` of a process uses the shared :func:`default_metrics`
unless given its own (tests pass a fresh one, so their figures start at zero).
:func:`start_metrics_server` serves a registry on ``/metrics``.

:class:`PullProgress` counts the bytes of a running pull (fed by the engine's worker
threads) and logs a progress line every few seconds from the event loop.

Metric names (``backend`` is the storage type, e.g. ``s3``; ``reason`` the class name
of one of our errors, e.g. ``StorageNotFound``)::

    modelmesh_puller_pull_duration_seconds{backend}   histogram, successful pulls
    modelmesh_puller_pulled_bytes_total{backend}      bytes fetched from the store
    modelmesh_puller_pull_failures_total{backend,reason}
    modelmesh_puller_cache_hits_total                 blobs served from the cache
    modelmesh_puller_cache_hit_bytes_total            bytes served from the cache
    modelmesh_puller_cache_bytes                      bytes held in the cache
    modelmesh_puller_cache_entries                    blobs held in the cache
    modelmesh_puller_cache_evictions_total            blobs evicted from the cache
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any
from wsgiref.simple_server import WSGIServer

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = structlog.get_logger(__name__)

#: the backend label of a pull whose storage config could not be resolved
UNKNOWN_BACKEND = "unknown"

#: pull durations: from a cached reload (well under a second) to a large model
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class PullMetrics:
    """The puller's metrics, registered on ``registry`` (a new one when omitted).

    Every method is thread-safe (prometheus_client's metrics are)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.pull_duration = Histogram(
            "modelmesh_puller_pull_duration_seconds",
            "Seconds one successful pull took, listing to placement",
            ["backend"],
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.pulled_bytes = Counter(
            "modelmesh_puller_pulled_bytes",
            "Bytes fetched from storage (not counting bytes served from the cache)",
            ["backend"],
            registry=self.registry,
        )
        self.pull_failures = Counter(
            "modelmesh_puller_pull_failures",
            "Pulls that failed, by backend and error class",
            ["backend", "reason"],
            registry=self.registry,
        )
        self.cache_hits = Counter(
            "modelmesh_puller_cache_hits",
            "Blobs served from the content cache instead of the store",
            registry=self.registry,
        )
        self.cache_hit_bytes = Counter(
            "modelmesh_puller_cache_hit_bytes",
            "Bytes served from the content cache instead of the store",
            registry=self.registry,
        )
        self.cache_bytes = Gauge(
            "modelmesh_puller_cache_bytes",
            "Bytes held in the content cache",
            registry=self.registry,
        )
        self.cache_entries = Gauge(
            "modelmesh_puller_cache_entries",
            "Blobs held in the content cache",
            registry=self.registry,
        )
        self.cache_evictions = Counter(
            "modelmesh_puller_cache_evictions",
            "Blobs evicted from the content cache (least recently used first)",
            registry=self.registry,
        )

    def pull_succeeded(self, backend: str, seconds: float, fetched_bytes: int) -> None:
        """Record one successful pull: its duration and the bytes the store sent."""
        self.pull_duration.labels(backend=backend).observe(seconds)
        self.pulled_bytes.labels(backend=backend).inc(fetched_bytes)

    def pull_failed(self, backend: str, error: BaseException) -> None:
        """Record one failed pull; ``reason`` is the error's class name."""
        self.pull_failures.labels(backend=backend, reason=type(error).__name__).inc()

    def cache_served(self, blobs: int, served_bytes: int) -> None:
        """Record ``blobs`` blobs (``served_bytes`` bytes) served from the cache."""
        if blobs:
            self.cache_hits.inc(blobs)
            self.cache_hit_bytes.inc(served_bytes)

    def cache_state(self, total_bytes: int, entries: int) -> None:
        """Set the cache's current size."""
        self.cache_bytes.set(total_bytes)
        self.cache_entries.set(entries)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """The current value of one sample (``0.0`` when absent), e.g.
        ``value("modelmesh_puller_pulled_bytes_total", {"backend": "s3"})``."""
        found = self.registry.get_sample_value(name, labels or {})
        return found if found is not None else 0.0


_default: PullMetrics | None = None
_default_lock = threading.Lock()


def default_metrics() -> PullMetrics:
    """The process-wide :class:`PullMetrics` (created on first use), the one
    :func:`start_metrics_server` serves by default."""
    global _default  # noqa: PLW0603 - one registry per process, created lazily
    with _default_lock:
        if _default is None:
            _default = PullMetrics()
        return _default


class MetricsServer:
    """An HTTP server answering ``GET /metrics`` with one registry, on a daemon thread.

    ``port`` 0 binds a free port; :attr:`port` is the bound one after :meth:`start`."""

    def __init__(self, port: int, host: str, registry: CollectorRegistry | None = None) -> None:
        self.host = host
        self.port = port
        self.registry = registry if registry is not None else default_metrics().registry
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        """Bind and start serving; return the bound port. Raises ``OSError`` when the
        address cannot be bound."""
        server, thread = start_http_server(self.port, addr=self.host, registry=self.registry)
        self._server, self._thread = server, thread
        self.port = int(server.server_address[1])
        return self.port

    def stop(self) -> None:
        """Stop serving and wait for the server thread; safe to call twice."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


def start_metrics_server(port: int, host: str, registry: CollectorRegistry | None = None) -> int:
    """Serve ``/metrics`` (the process-wide registry unless ``registry`` is given) on
    ``host:port`` from a daemon thread for the rest of the process; return the bound
    port (``port`` 0 picks a free one). Raises ``OSError`` when the port is taken."""
    return MetricsServer(port, host, registry).start()


class PullProgress:
    """Bytes written so far by one running fetch of ``total_bytes`` bytes.

    :meth:`add` is the engine's progress callback: called from worker threads with the
    bytes of each chunk written, it only adds under a lock (no logging per chunk).
    :meth:`report_every` logs a ``pull progress`` line at most once per interval."""

    def __init__(self, total_bytes: int | None) -> None:
        #: ``None`` while the model is still being listed: no line is logged then
        self.total_bytes = total_bytes
        self.started = time.monotonic()
        self._done = 0
        self._lock = threading.Lock()

    def add(self, count: int) -> None:
        """Count ``count`` more bytes written."""
        with self._lock:
            self._done += count

    @property
    def done(self) -> int:
        with self._lock:
            return self._done

    def fields(self) -> dict[str, Any]:
        """What a progress line says: bytes done and total, percent, seconds, MB/s."""
        done = self.done
        total = self.total_bytes or 0
        seconds = time.monotonic() - self.started
        return {
            "bytes_done": done,
            "bytes_total": total,
            # a blob fetched again after a checksum mismatch counts twice: cap at 100
            "percent": min(100.0, round(100.0 * done / total, 1)) if total else 100.0,
            "seconds": round(seconds, 1),
            "mb_per_s": round(done / 1e6 / seconds, 1) if seconds > 0 else 0.0,
        }

    @contextlib.contextmanager
    def reporting(self, interval: float) -> Iterator[None]:
        """:meth:`report_every` in a task of the running event loop while the block
        runs."""
        reporter = asyncio.create_task(self.report_every(interval))
        try:
            yield
        finally:
            reporter.cancel()

    async def report_every(self, interval: float) -> None:
        """Log ``pull progress`` every ``interval`` seconds until cancelled (the first
        line after one interval, so a short pull logs none)."""
        while True:
            await asyncio.sleep(interval)
            if self.total_bytes is not None:
                log.info("pull progress", **self.fields())
