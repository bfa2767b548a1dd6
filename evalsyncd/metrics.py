"""Prometheus metrics of a running daemon (``metrics_address``; off by default).

The sync engine knows nothing of Prometheus: at each scrape, :class:`Metrics`
asks the event loop for a snapshot of the :class:`~evalsyncd.sync.service.Service`
(its destinations' counters and states, backlogs, scans) and renders it; only
the upload latency histogram is fed as uploads happen, through the service's
``on_upload`` callback. Only the CLI starts the HTTP server. Exposed::

    evalsyncd_uploaded_bytes_total{destination}            counter, bytes acknowledged
    evalsyncd_uploaded_objects_total{destination}          counter, writes acknowledged
    evalsyncd_upload_failures_total{destination,error}     counter, by error class
    evalsyncd_upload_duration_seconds{destination,op}      histogram, op = write | append
    evalsyncd_backlog_files{destination}                   gauge, files behind
    evalsyncd_backlog_bytes{destination}                   gauge, bytes not acknowledged
    evalsyncd_backlog_oldest_seconds{destination}          gauge, age of the oldest pending change
    evalsyncd_last_success_timestamp_seconds{destination}  gauge, Unix time (absent before the first)
    evalsyncd_destination_state{destination,state}         gauge, 1 for the current state
    evalsyncd_rescans_total                                counter, full scans
    evalsyncd_inotify_overflows_total                      counter, kernel queue overflows
    evalsyncd_retention_local_bytes                        gauge, bytes of run files on disk
    evalsyncd_retention_evictable_bytes                    gauge, bytes of runs safe to evict
    evalsyncd_retention_evicted_bytes                      gauge, bytes evicted (held remotely only)
    evalsyncd_retention_evicted_runs                       gauge, runs evicted
    evalsyncd_retention_oldest_kept_seconds                gauge, quiet time of the oldest
                                                           finalized run still on disk

The retention gauges are those of the last retention round (absent before the first).

Counters restart from zero with the daemon (and for a destination changed by a
reload), which Prometheus' ``rate()`` handles.
"""

from __future__ import annotations

import asyncio
import ipaddress
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import structlog
from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from evalsyncd.sync.destination import DestinationState
from evalsyncd.sync.retention import RoundReport
from evalsyncd.sync.service import Service

__all__ = ["Metrics", "MetricsServer", "parse_address"]

log = structlog.get_logger("evalsyncd.metrics")

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Upper bounds of the upload latency histogram, seconds."""

SNAPSHOT_TIMEOUT_S = 5.0
"""How long a scrape waits for the event loop before it serves the last snapshot, seconds."""


@dataclass(frozen=True)
class _DestinationSnapshot:
    name: str
    state: str
    bytes_uploaded: int
    objects_uploaded: int
    failures: dict[str, int]
    backlog_files: int
    backlog_bytes: int
    backlog_oldest_s: float
    last_success: float | None


@dataclass(frozen=True)
class _Snapshot:
    rescans: int = 0
    overflows: int = 0
    destinations: list[_DestinationSnapshot] = field(default_factory=list)
    retention: RoundReport | None = None


def _take_snapshot(service: Service) -> _Snapshot:
    """Read the service's state; runs on the event loop thread."""
    records = service.journal.destinations() if service.journal is not None else {}
    dests = []
    for name, d in list(service.destinations.items()):
        backlog = service.backlog(name)
        record = records.get(name)
        dests.append(
            _DestinationSnapshot(
                name=name,
                state=d.state.value,
                bytes_uploaded=d.stats.bytes_uploaded,
                objects_uploaded=d.stats.objects_uploaded,
                failures=dict(d.stats.failures),
                backlog_files=backlog.files,
                backlog_bytes=backlog.bytes,
                backlog_oldest_s=backlog.oldest_s,
                last_success=record.last_success if record else None,
            )
        )
    last = service.retention.last if service.retention is not None else None
    return _Snapshot(service.rescans, service.overflows, dests, last)


class Metrics:
    """The metrics of one daemon, in a private registry.

    Use :meth:`on_upload` as the service's ``on_upload`` callback and
    :meth:`bind` it to the service and its loop once they exist.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.upload_duration = Histogram(
            "evalsyncd_upload_duration_seconds",
            "Duration of acknowledged writes (whole-object writes and appends), seconds.",
            ["destination", "op"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self._service: Service | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last = _Snapshot()
        self._lock = threading.Lock()
        self.registry.register(self)

    def bind(self, service: Service, loop: asyncio.AbstractEventLoop) -> None:
        """Read this service's state (on ``loop``) at each scrape."""
        self._service, self._loop = service, loop

    def on_upload(self, destination: str, op: str, nbytes: int, duration_s: float) -> None:
        """The service's ``on_upload`` callback: record one acknowledged write."""
        self.upload_duration.labels(destination, op).observe(duration_s)

    def _snapshot(self) -> _Snapshot:
        service, loop = self._service, self._loop
        if service is None or loop is None or loop.is_closed():
            return self._last

        async def take() -> _Snapshot:
            return _take_snapshot(service)

        try:
            future = asyncio.run_coroutine_threadsafe(take(), loop)
        except RuntimeError:  # the loop is shutting down
            return self._last
        try:
            snap = future.result(SNAPSHOT_TIMEOUT_S)
        except Exception as exc:  # a stuck loop (timeout), a closing journal
            future.cancel()
            log.warning("metrics_snapshot_failed", error=f"{type(exc).__name__}: {exc}")
            return self._last
        with self._lock:
            self._last = snap
        return snap

    def describe(self) -> list[Metric]:
        """No fixed descriptions: the families depend on the destinations."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Render a fresh snapshot (called by ``prometheus_client`` on each scrape)."""
        snap = self._snapshot()
        families = {
            key: family(name, doc, labels=list(labels))
            for key, (family, name, doc, labels) in _FAMILIES.items()
        }
        for d in snap.destinations:
            families["bytes"].add_metric([d.name], d.bytes_uploaded)
            families["objects"].add_metric([d.name], d.objects_uploaded)
            for error, count in sorted(d.failures.items()):
                families["failures"].add_metric([d.name, error], count)
            families["files"].add_metric([d.name], d.backlog_files)
            families["backlog"].add_metric([d.name], d.backlog_bytes)
            families["oldest"].add_metric([d.name], d.backlog_oldest_s)
            if d.last_success is not None:
                families["success"].add_metric([d.name], d.last_success)
            for state in DestinationState:
                families["state"].add_metric([d.name, state.value], float(state.value == d.state))
        families["rescans"].add_metric([], snap.rescans)
        families["overflows"].add_metric([], snap.overflows)
        yield from families.values()
        yield from _retention_families(snap.retention)


def _retention_families(report: RoundReport | None) -> Iterator[Metric]:
    """The retention gauges of the last round (none before the first)."""
    if report is None:
        return
    oldest = report.oldest_kept.quiet_s if report.oldest_kept is not None else 0.0
    for name, doc, value in (
        ("local_bytes", "Bytes of run files on the local disk.", report.local_bytes),
        ("evictable_bytes", "Bytes of runs safe to evict now.", report.evictable_bytes),
        (
            "evicted_bytes",
            "Bytes of runs evicted, held by the destinations only.",
            report.evicted_bytes,
        ),
        ("evicted_runs", "Runs evicted from the local disk.", report.evicted_runs),
        (
            "oldest_kept_seconds",
            "Quiet time of the oldest finalized run still on disk, seconds.",
            max(0.0, oldest),
        ),
    ):
        yield GaugeMetricFamily(f"evalsyncd_retention_{name}", doc, value=value)


_D = ("destination",)
_FAMILIES: dict[
    str, tuple[type[CounterMetricFamily | GaugeMetricFamily], str, str, tuple[str, ...]]
] = {
    # key: (family, name, help, labels); the name of a counter gets "_total" when rendered
    "bytes": (
        CounterMetricFamily,
        "evalsyncd_uploaded_bytes",
        "Bytes acknowledged by the destination.",
        _D,
    ),
    "objects": (
        CounterMetricFamily,
        "evalsyncd_uploaded_objects",
        "Writes (objects, appends) acknowledged by the destination.",
        _D,
    ),
    "failures": (
        CounterMetricFamily,
        "evalsyncd_upload_failures",
        "Failed upload passes, by error class.",
        ("destination", "error"),
    ),
    "files": (
        GaugeMetricFamily,
        "evalsyncd_backlog_files",
        "Files the destination is behind on.",
        _D,
    ),
    "backlog": (
        GaugeMetricFamily,
        "evalsyncd_backlog_bytes",
        "Bytes not yet acknowledged by the destination.",
        _D,
    ),
    "oldest": (
        GaugeMetricFamily,
        "evalsyncd_backlog_oldest_seconds",
        "Age of the oldest change not yet mirrored, seconds.",
        _D,
    ),
    "success": (
        GaugeMetricFamily,
        "evalsyncd_last_success_timestamp_seconds",
        "Unix time of the destination's last successful upload pass.",
        _D,
    ),
    "state": (
        GaugeMetricFamily,
        "evalsyncd_destination_state",
        "1 for the destination's current state (healthy, backoff, parked).",
        ("destination", "state"),
    ),
    "rescans": (CounterMetricFamily, "evalsyncd_rescans", "Full scans of the watched root.", ()),
    "overflows": (
        CounterMetricFamily,
        "evalsyncd_inotify_overflows",
        "Kernel event queue overflows (each forces a rescan).",
        (),
    ),
}
"""The families :meth:`Metrics.collect` renders, in order."""


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) as ``(host, port)``."""
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


class MetricsServer:
    """The HTTP endpoint (``/metrics``) on a background thread; stop with :meth:`close`.

    Args:
        metrics: what to serve.
        address: ``host:port``; port 0 picks a free port (see :attr:`port`).
    """

    def __init__(self, metrics: Metrics, address: str) -> None:
        host, port = parse_address(address)
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback:
            log.warning("metrics_not_on_loopback", address=address)
        self._server, self._thread = start_http_server(port, addr=host, registry=metrics.registry)
        self.host = host
        self.port: int = self._server.server_address[1]
        log.info(
            "metrics_listening", url=f"http://{address.rpartition(':')[0]}:{self.port}/metrics"
        )

    def close(self) -> None:
        """Stop serving and join the server thread."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)
