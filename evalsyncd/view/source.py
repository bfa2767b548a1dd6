"""What the view reads, and how often: the runs listing (cached, shared) and one run.

:class:`ViewSource` wraps one storage and a prefix (a local root, a host prefix
or a fleet prefix) and answers the pages' reads:

- :meth:`ViewSource.runs`: every run of every host through
  :meth:`Fleet.alist_runs <evalsyncd.fleet.Fleet.alist_runs>` (one listing of
  the fleet prefix, then per host one listing of ``runs/`` and one read of the
  run catalog: at most 3 requests per host, no per-run request when the daemon
  keeps a catalog). The answer is kept for ``refresh_s`` seconds and shared by
  every page and client; concurrent requests wait for the one listing in flight.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evalsyncd.errors import StorageError
from evalsyncd.fleet import Fleet, FleetRun, HostProblem
from evalsyncd.storage import LocalStorage, Storage, SupportsChild, storage_join
from evalsyncd.store import BenchmarkResult, RunMetadata

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
    """

    runs: list[FleetRun]
    hosts: list[str]
    problems: list[HostProblem]
    error: str | None
    read_at: float
    took_s: float

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
        self.fleet = Fleet(storage, self.prefix)
        self._snapshot: RunsSnapshot | None = None
        self._lock: asyncio.Lock | None = None
        self._hosts: dict[str, Storage] = {}
        self.listings = 0
        """How many times the runs listing was read (for tests and benchmarks)."""

    async def aclose(self) -> None:
        """Close the storage's clients of the running event loop (children share them)."""
        closer = getattr(self.storage, "aclose", None)
        if closer is not None:
            await closer()

    def url(self) -> str:
        """The URL the view reads (``file://``, ``s3://`` or ``gs://``)."""
        return self.fleet.url()

    async def runs(self, *, max_age_s: float | None = None) -> RunsSnapshot:
        """The runs listing, read again when older than ``max_age_s`` (default ``refresh_s``).

        Never raises for a storage failure: a failed listing keeps the previous
        runs and sets :attr:`RunsSnapshot.error`.
        """
        max_age = self.refresh_s if max_age_s is None else max_age_s
        if self._lock is None:
            self._lock = asyncio.Lock()
        snap = self._snapshot
        if snap is not None and time.time() - snap.read_at < max_age:
            return snap
        async with self._lock:
            snap = self._snapshot
            if snap is not None and time.time() - snap.read_at < max_age:
                return snap  # another request refreshed it meanwhile
            self._snapshot = await self._list()
            return self._snapshot

    async def _list(self) -> RunsSnapshot:
        start = time.monotonic()
        self.listings += 1
        try:
            listing = await self.fleet.alist_runs()
        except (StorageError, OSError, ValueError) as exc:
            prev = self._snapshot
            return RunsSnapshot(
                runs=prev.runs if prev else [],
                hosts=prev.hosts if prev else [],
                problems=prev.problems if prev else [],
                error=f"{self.url()}: {type(exc).__name__}: {exc}",
                read_at=time.time(),
                took_s=time.monotonic() - start,
            )
        return RunsSnapshot(
            runs=listing.runs,
            hosts=listing.hosts,
            problems=listing.problems,
            error=None,
            read_at=time.time(),
            took_s=time.monotonic() - start,
        )

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


def metadata_row(run: FleetRun) -> dict[str, Any]:
    """The JSON row of one run: ``runs ls --json``'s fields plus ``status``."""
    return {**run.to_dict(), "status": run_status(run.metadata)}
