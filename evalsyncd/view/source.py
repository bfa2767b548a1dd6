"""What the view reads, and how often: the runs listing (cached, shared) and one run.

:class:`ViewSource` wraps one storage and a prefix (a local root, a host prefix
or a fleet prefix) and answers the pages' reads:

- :meth:`ViewSource.runs`: every run of every host through
  :meth:`Fleet.alist_runs <evalsyncd.fleet.Fleet.alist_runs>` (one listing of
  the fleet prefix, then per host one listing of ``runs/`` and one read of the
  run catalog: at most 3 requests per host, no per-run request when the daemon
  keeps a catalog). The answer is kept for ``refresh_s`` seconds and shared by
  every page and client; concurrent requests wait for the one listing in flight.
  The first listing of a fleet can be shown before it ends: the hosts listed so
  far, as a partial snapshot (``partial_after_s``), while it goes on.
- :meth:`ViewSource.run`: one run's metadata and per-benchmark results
  (``result.json``), read on demand.
- :meth:`ViewSource.host_storage`: the storage rooted at one host's store, for
  the sample reads (a cloud storage's child shares its SDK clients).

Everything here only reads; nothing is written to any storage.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from evalsyncd.errors import StorageError
from evalsyncd.fleet import Fleet, FleetRun, HostProblem
from evalsyncd.storage import LocalStorage, Storage, SupportsChild, storage_join
from evalsyncd.store import BenchmarkResult, RunMetadata
from evalsyncd.store.layout import recency_key

__all__ = [
    "DEFAULT_REFRESH_S",
    "RunDetails",
    "RunsSnapshot",
    "ViewSource",
    "metadata_row",
    "run_status",
    "score_of",
]

DEFAULT_REFRESH_S = 1.0
"""Default age, in seconds, after which the runs listing is read again."""

T = TypeVar("T")


def run_status(metadata: RunMetadata) -> str:
    """``"finalized"`` once ``finalize_run`` wrote scores into ``metadata.json``, else ``"running"``."""
    return "finalized" if metadata.scores else "running"


def score_of(value: object) -> float | None:
    """A score as a finite float, or ``None`` (absent, not a number, NaN or infinite)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


@dataclass(frozen=True)
class RunsSnapshot:
    """One reading of the runs listing.

    Attributes:
        runs: every readable run, newest first.
        hosts: every host found (``[""]`` for a single store).
        problems: hosts that failed or hold no runs (each message names the URL).
        error: set when the prefix itself could not be listed (``runs`` is then
            the previous snapshot's, possibly empty).
        read_at: when the listing finished (``time.time()``, seconds).
        took_s: how long the listing took, seconds.
        complete: every host was listed; ``False`` for a first screen shown while the
            first listing goes on (``runs`` and ``problems`` are then those of the
            ``hosts_listed`` hosts listed so far).
        hosts_listed: hosts whose listing is in ``runs`` (all of them when complete).
    """

    runs: list[FleetRun]
    hosts: list[str]
    problems: list[HostProblem]
    error: str | None
    read_at: float
    took_s: float
    complete: bool = True
    hosts_listed: int | None = None

    def benchmarks(self) -> list[str]:
        """Every benchmark named by a run (created for, or scored), sorted."""
        names: set[str] = set()
        for r in self.runs:
            names.update(str(b) for b in r.metadata.benchmarks or [])
            names.update(str(b) for b in r.metadata.scores or {})
        return sorted(names)


@dataclass
class RunDetails:
    """One run as the run page shows it.

    Attributes:
        run: the run and its host.
        benchmarks: names created for or holding a ``result.json``, sorted.
        results: per benchmark, its ``result.json`` (``None`` while running).
        problems: one line per read that failed (the page shows the rest).
    """

    run: FleetRun
    benchmarks: list[str]
    results: dict[str, BenchmarkResult | None]
    problems: list[str] = field(default_factory=list)


class ViewSource:
    """The reads behind the view's pages, over one storage and prefix.

    Args:
        storage: an open storage (the caller closes it).
        prefix: the fleet or host prefix inside it (``""``: its root).
        refresh_s: the runs listing is read again when older than this, seconds.
        cache_dir: where the sample readers keep their per-file index (default:
            :func:`evalsyncd.samples.default_cache_dir`, on local disk).

    Raises:
        ValueError: ``refresh_s`` is not positive.
    """

    def __init__(
        self,
        storage: Storage,
        prefix: str = "",
        *,
        refresh_s: float = DEFAULT_REFRESH_S,
        cache_dir: Path | None = None,
    ):
        if not refresh_s > 0:
            raise ValueError(f"refresh_s must be > 0, not {refresh_s}")
        self.storage = storage
        self.prefix = prefix.strip("/")
        self.refresh_s = refresh_s
        self.cache_dir = cache_dir
        self._hosts_seen: set[str] = set()
        self.fleet = _ReportingFleet(storage, self.prefix, self._on_host, self._hosts_seen)
        self._snapshot: RunsSnapshot | None = None
        self._listing: asyncio.Future[RunsSnapshot] | None = None
        self._progress: dict[str, tuple[list[FleetRun], list[HostProblem]]] = {}
        self._progressed = asyncio.Event()
        self._started = time.monotonic()
        self._hosts: dict[str, Storage] = {}
        self.listings = 0
        """How many times the runs listing was read (for tests and benchmarks)."""

    async def aclose(self) -> None:
        """Stop a listing in flight; close the storage's clients of the running event loop
        (children share them)."""
        if self._listing is not None and not self._listing.done():
            self._listing.cancel()
            await asyncio.gather(self._listing, return_exceptions=True)
        closer = getattr(self.storage, "aclose", None)
        if closer is not None:
            await closer()

    def url(self) -> str:
        """The URL the view reads (``file://``, ``s3://`` or ``gs://``)."""
        return self.fleet.url()

    async def runs(
        self, *, max_age_s: float | None = None, partial_after_s: float | None = None
    ) -> RunsSnapshot:
        """The runs listing, read again when older than ``max_age_s``.

        The default age is ``refresh_s``, or the time the last listing took if that
        is longer: open pages never keep the view listing more than half the time.

        One listing at a time, shared by every caller; a caller that goes away
        (a closed browser tab) does not stop it.

        Args:
            max_age_s: the oldest snapshot to answer with, seconds (as given).
            partial_after_s: before the first listing ended, wait this long for
                it, then answer with the hosts listed so far (at least one host
                with runs, or the end of the listing) as a partial snapshot
                (:attr:`RunsSnapshot.complete` false). ``None``: wait for the end.

        Never raises for a storage failure: a failed listing keeps the previous
        runs and sets :attr:`RunsSnapshot.error`.
        """
        snap = self._snapshot
        max_age = self.refresh_s if max_age_s is None else max_age_s
        if max_age_s is None and snap is not None:
            max_age = max(max_age, snap.took_s)  # a slow listing: at most half the time
        if snap is not None and time.time() - snap.read_at < max_age:
            return snap
        task = self._listing
        if task is None or task.done():
            task = self._listing = asyncio.ensure_future(self._list())
            # a caller answered with a partial snapshot may be gone when it fails
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        if partial_after_s is None or self._snapshot is not None:
            return await asyncio.shield(task)
        await asyncio.wait({task}, timeout=partial_after_s)
        while not task.done() and not any(runs for runs, _ in self._progress.values()):
            self._progressed.clear()
            waiter: asyncio.Future[Any] = asyncio.ensure_future(self._progressed.wait())
            both: list[asyncio.Future[Any]] = [task, waiter]
            await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
        if task.done():
            return task.result()
        return self._partial()

    def _partial(self) -> RunsSnapshot:
        """The hosts listed so far by the listing in flight, as a partial snapshot."""
        runs: list[FleetRun] = []
        problems: list[HostProblem] = []
        for host in sorted(self._progress):
            host_runs, host_problems = self._progress[host]
            runs += host_runs
            problems += host_problems
        runs.sort(key=lambda r: (recency_key(r.metadata), r.host), reverse=True)
        return RunsSnapshot(
            runs=runs,
            hosts=sorted(self._hosts_seen),
            problems=problems,
            error=None,
            read_at=time.time(),
            took_s=time.monotonic() - self._started,
            complete=False,
            hosts_listed=len(self._progress),
        )

    def _on_host(self, host: str, result: object) -> None:
        """One host's part of the listing in flight is in (the fleet's per-host hook)."""
        if (
            isinstance(result, tuple)
            and len(result) == 2
            and isinstance(result[0], list)
            and isinstance(result[1], list)
        ):
            self._progress[host] = (result[0], result[1])
            self._progressed.set()

    async def _list(self) -> RunsSnapshot:
        self._started = start = time.monotonic()
        self._progress.clear()
        self._hosts_seen.clear()
        self.listings += 1
        self.fleet.listening = True
        self.fleet.first_host_first = self._snapshot is None
        try:
            listing = await self.fleet.alist_runs()
        except (StorageError, OSError, ValueError) as exc:
            prev = self._snapshot
            snap = RunsSnapshot(
                runs=prev.runs if prev else [],
                hosts=prev.hosts if prev else [],
                problems=prev.problems if prev else [],
                error=f"{self.url()}: {type(exc).__name__}: {exc}",
                read_at=time.time(),
                took_s=time.monotonic() - start,
            )
        else:
            snap = RunsSnapshot(
                runs=listing.runs,
                hosts=listing.hosts,
                problems=listing.problems,
                error=None,
                read_at=time.time(),
                took_s=time.monotonic() - start,
                hosts_listed=len(listing.hosts),
            )
        finally:
            self.fleet.listening = False
        self._snapshot = snap
        return snap

    async def run(self, host: str, run_id: str) -> RunDetails:
        """One run's metadata and results.

        Raises:
            FileNotFoundError: no such host or run.
            ValueError: an invalid host name or run id.
            StorageError: the metadata could not be read.
        """
        self.check_host(host)
        store = self.fleet.store(host)
        metadata = await store.aread_run(run_id)
        run = FleetRun(host, metadata, store.url(f"runs/{run_id}"))
        problems: list[str] = []
        try:
            present = await store.alist_benchmarks(run_id)
        except (StorageError, OSError) as exc:
            problems.append(f"{store.url(f'runs/{run_id}')}: {type(exc).__name__}: {exc}")
            present = []
        names = sorted({str(b) for b in metadata.benchmarks or []} | set(present))
        results: dict[str, BenchmarkResult | None] = {}

        async def one(name: str) -> None:
            try:
                results[name] = await store.aread_result(run_id, name)
            except (StorageError, OSError, ValueError) as exc:
                results[name] = None
                problems.append(f"{name}: {type(exc).__name__}: {exc}")

        await asyncio.gather(*(one(n) for n in names))
        return RunDetails(run, names, {n: results.get(n) for n in names}, problems)

    def check_host(self, host: str) -> None:
        """Refuse a host name that cannot be a child of the prefix.

        Raises:
            ValueError: ``host`` holds ``/``, is ``.``/``..`` or starts with ``.``.
        """
        if "/" in host or host.startswith(".") or "\x00" in host:
            raise ValueError(f"invalid host name {host!r}")

    def host_storage(self, host: str) -> Storage:
        """The storage rooted at ``host``'s store (cached; children share clients).

        Raises:
            ValueError: an invalid host name.
        """
        self.check_host(host)
        found = self._hosts.get(host)
        if found is not None:
            return found
        sub = storage_join(self.prefix, host) if host or self.prefix else ""
        storage: Storage
        if not sub:
            storage = self.storage
        elif isinstance(self.storage, SupportsChild):
            storage = self.storage.child(sub)
        elif isinstance(self.storage, LocalStorage):
            storage = LocalStorage(Path(self.storage.root) / sub, mkdir=False)
        else:
            raise ValueError(f"{self.storage!r} cannot open a store below its root")
        self._hosts[host] = storage
        return storage


class _ReportingFleet(Fleet):
    """A :class:`Fleet` that reports each host's part of a runs listing as it arrives.

    Same reads, same answers: only :meth:`Fleet._per_host` (which runs a listing's
    per-host reads) is wrapped, so that :class:`ViewSource` can show the first hosts'
    runs while the others are still being read. With :attr:`first_host_first` (the
    first listing of a fresh view), the first host is read alone before the others:
    its runs are ready after its own few requests and their parsing, not after
    everyone's.
    """

    def __init__(
        self,
        storage: Storage,
        prefix: str,
        on_host: Callable[[str, object], None],
        hosts_seen: set[str],
    ) -> None:
        super().__init__(storage, prefix)
        self._on_host = on_host
        self._hosts_seen = hosts_seen
        self.listening = False
        self.first_host_first = False

    async def _per_host(self, hosts: list[str], fn: Callable[[str], Awaitable[T]]) -> list[T]:
        if not self.listening:
            return await super()._per_host(hosts, fn)
        self._hosts_seen.update(hosts)

        async def reported(host: str) -> T:
            result = await fn(host)
            self._on_host(host, result)
            return result

        if not self.first_host_first or len(hosts) < 2:
            return await super()._per_host(hosts, reported)
        # A first screen: one host alone (its reads are not queued behind every other
        # host's), then the others, concurrently.
        first = await reported(hosts[0])
        return [first, *await super()._per_host(hosts[1:], reported)]


def metadata_row(run: FleetRun) -> dict[str, Any]:
    """The JSON row of one run: ``runs ls --json``'s fields plus ``status``."""
    return {**run.to_dict(), "status": run_status(run.metadata)}
