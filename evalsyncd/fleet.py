"""``Fleet``: the runs of every host of a fleet prefix, read as one store.

Every host's daemon mirrors into its own prefix, so a bucket holds a *fleet*::

    {fleet prefix}/                 # e.g. s3://bucket/evals
      {host}/                       # a host prefix: an EvalStore layout
        runs.jsonl
        runs/{run_id}/metadata.json ...
        .evalsyncd/catalog.json     # the run catalog (evalsyncd.catalog)
      {host}/ ...

A prefix that itself holds ``runs/`` or ``runs.jsonl`` is a single store, read
as one host named ``""``. Other children whose names start with ``.`` are
ignored. Listing a fleet costs one listing of the fleet prefix, then per host
what :meth:`EvalStore.alist_runs <evalsyncd.store.EvalStore.alist_runs>` costs
(3 requests for a host the daemon keeps a catalog for: the tail log's LIST and
newest header and the catalog, or the listing of ``runs/`` when there is no tail
log to vouch for the catalog), hosts read concurrently.

Failures are per host: a host whose reads fail (unreachable, access denied)
or that holds no runs is reported in :attr:`FleetListing.problems`, naming its
URL, and the other hosts are still listed. Only a failure to list the fleet
prefix itself raises. An outage is never reported as "no runs".

What another host wrote is not trusted (see docs/guarantees.md, "A hostile
or damaged bucket"): a host whose newest tail object is damaged is read from
its plain objects and reported (``kind="damaged"``, naming the tail object's
URL); a key a reader refuses (a name under ``runs/`` that is not a run id, a
``metadata.json`` that does not parse or is past its size limit) is reported
by name (``kind="skipped"``). Both are in :attr:`FleetListing.problems` next
to the host's runs, so every reader built on ``Fleet`` reports them alike.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, Unpack

from evalsyncd.errors import StorageError
from evalsyncd.storage import Storage, storage_join
from evalsyncd.storage._bridge import run_sync
from evalsyncd.storage.tail import tail_damage
from evalsyncd.store import EvalStore, RunMetadata
from evalsyncd.store.aio import bounded_map, reads_of
from evalsyncd.store.layout import recency_key
from evalsyncd.store.reader import StoreOptions, local_or_storage

__all__ = [
    "DEFAULT_MAX_HOSTS",
    "PROBLEM_KINDS",
    "AmbiguousRunError",
    "Fleet",
    "FleetListing",
    "FleetRun",
    "HostProblem",
]

DEFAULT_MAX_HOSTS = 16
"""Default bound on hosts read at the same time."""

T = TypeVar("T")

_STORE_MARKERS = frozenset({"runs", "runs.jsonl"})


class AmbiguousRunError(LookupError):
    """Several hosts hold a run with the same id.

    Attributes:
        run_id: the id asked for.
        hosts: the hosts holding it, sorted.
    """

    def __init__(self, run_id: str, hosts: list[str], url: str) -> None:
        super().__init__(
            f"run {run_id} is on {len(hosts)} hosts of {url}: {', '.join(hosts)} "
            "(give the host prefix to choose one)"
        )
        self.run_id = run_id
        self.hosts = hosts


@dataclass(frozen=True)
class FleetRun:
    """One run and the host that holds it.

    Attributes:
        host: the host prefix's name (``""`` for a single store).
        metadata: the run's ``metadata.json``.
        url: the run directory's URL.
    """

    host: str
    metadata: RunMetadata
    url: str

    @property
    def run_id(self) -> str:
        """The run's id."""
        return self.metadata.run_id

    def to_dict(self) -> dict[str, Any]:
        """``{"host": ..., **metadata}``: the JSON shape of ``evalsyncd runs ls --json``."""
        return {"host": self.host, **self.metadata.to_dict()}


PROBLEM_KINDS = ("unreadable", "empty", "damaged", "skipped")
"""The kinds of :class:`HostProblem`, see :attr:`HostProblem.kind`."""


@dataclass(frozen=True)
class HostProblem:
    """Why a host's runs are missing from a listing, or incomplete.

    Attributes:
        host: the host prefix's name.
        url: the host prefix's URL, or the object concerned (the damaged tail
            object, the skipped key).
        message: one line naming the URL and what went wrong.
        error: the exception, or ``None`` (an empty host, a refused name).
        kind: ``"unreadable"`` (the host's reads failed: its runs are missing),
            ``"empty"`` (no runs), ``"damaged"`` (a tail object is damaged: the
            host was read from its plain objects, which may lack the newest
            lines), ``"skipped"`` (one key was refused; the others were read).
            Defaults to ``"unreadable"`` with an ``error``, else ``"empty"``.
    """

    host: str
    url: str
    message: str
    error: BaseException | None = None
    kind: str = ""

    def __post_init__(self) -> None:
        if not self.kind:
            object.__setattr__(self, "kind", "unreadable" if self.error is not None else "empty")
        if self.kind not in PROBLEM_KINDS:
            raise ValueError(f"unknown problem kind {self.kind!r}")


@dataclass
class FleetListing:
    """The result of :meth:`Fleet.list_runs`.

    Attributes:
        url: the fleet prefix's URL.
        hosts: every host found, sorted.
        runs: runs of every readable host, newest first (then by host).
        problems: hosts that failed or hold no runs, damaged tail logs and
            skipped keys (see :attr:`HostProblem.kind`), in host order.
    """

    url: str
    hosts: list[str]
    runs: list[FleetRun] = field(default_factory=list)
    problems: list[HostProblem] = field(default_factory=list)

    @property
    def failed(self) -> list[HostProblem]:
        """The hosts that could not be read (``kind="unreadable"``)."""
        return [p for p in self.problems if p.kind == "unreadable"]

    @property
    def skipped(self) -> list[HostProblem]:
        """What was read around: damaged tail logs and refused keys."""
        return [p for p in self.problems if p.kind in ("damaged", "skipped")]

    @property
    def ok(self) -> bool:
        """Whether every host was read (empty hosts and :attr:`skipped` do not count)."""
        return not self.failed


class Fleet:
    """Runs across every host prefix under one fleet prefix.

    Args:
        storage_or_path: the storage (one client serves every host), or a local
            directory (not created if missing).
        prefix: the fleet prefix inside the storage (``""`` for its root).
        max_hosts: bound on hosts read concurrently.
        **store_options: each host store's settings (keywords of
            :class:`~evalsyncd.store.reader.StoreOptions`): ``max_concurrency``,
            its bound on concurrent reads (so at most ``max_hosts *
            max_concurrency`` requests are in flight), ``use_catalog``, whether
            its listing reads its run catalog, and ``chunk_size``.

    Raises:
        ValueError: ``max_hosts`` is below 1.

    Sync methods may be called from any thread without a running event loop
    (they run the async implementation on the storage bridge); inside a
    coroutine, use the ``a*`` methods. The storage must be open (entered).
    """

    def __init__(
        self,
        storage_or_path: Storage | str | Path,
        prefix: str = "",
        *,
        max_hosts: int = DEFAULT_MAX_HOSTS,
        **store_options: Unpack[StoreOptions],
    ) -> None:
        if max_hosts < 1:
            raise ValueError(f"max_hosts must be >= 1, not {max_hosts}")
        self.storage: Storage = local_or_storage(storage_or_path, mkdir=False)
        self.prefix = prefix
        self.max_hosts = max_hosts
        self.store_options = store_options

    def __repr__(self) -> str:
        return f"Fleet({self.url()!r})"

    def url(self, path: str = "") -> str:
        """The URL of ``path`` under the fleet prefix."""
        return self.storage.url(storage_join(self.prefix, path))

    def store(self, host: str) -> EvalStore:
        """The :class:`EvalStore` of one host (``""``: the fleet prefix itself)."""
        return EvalStore(self.storage, storage_join(self.prefix, host), **self.store_options)

    # -- hosts ---------------------------------------------------------------------

    def hosts(self) -> list[str]:
        """Sorted host names; ``[""]`` when the prefix is itself a store; ``[]`` when empty.

        Raises:
            StorageError: the fleet prefix could not be listed.
        """
        return run_sync(self.ahosts())

    async def ahosts(self) -> list[str]:
        """Async :meth:`hosts` (one listing of the fleet prefix)."""
        names = await reads_of(self.storage).list_dir(self.prefix)
        if _STORE_MARKERS & set(names):
            return [""]
        return sorted(n for n in names if not n.startswith("."))

    async def _per_host(self, hosts: list[str], fn: Callable[[str], Awaitable[T]]) -> list[T]:
        return await bounded_map(fn, hosts, self.max_hosts)

    # -- listing -------------------------------------------------------------------

    def list_runs(self) -> FleetListing:
        """Every run of every host, tagged by host; see :meth:`alist_runs`."""
        return run_sync(self.alist_runs())

    async def alist_runs(self) -> FleetListing:
        """Every run of every host, tagged by host, newest first.

        Returns:
            The listing; hosts that failed or hold no runs are in its
            ``problems`` (each naming the URL), the others' runs in ``runs``.

        Raises:
            StorageError: the fleet prefix itself could not be listed.
        """
        hosts = await self.ahosts()
        listing = FleetListing(url=self.url(), hosts=hosts)
        if not hosts:
            listing.problems.append(
                HostProblem("", self.url(), f"{self.url()}: no EvalStore and no host prefixes here")
            )
            return listing

        async def one(host: str) -> tuple[list[FleetRun], list[HostProblem]]:
            try:
                store = self.store(host)
            except ValueError as exc:  # a listed name that is no valid prefix (a//b)
                url = self.url(host)
                return [], [HostProblem(host, url, f"skipped {url}: {exc}", kind="skipped")]
            try:
                runs, skipped = await store.aruns_checked()
                problems = await _damage(host, store)
            except (StorageError, OSError) as exc:
                return [], [
                    HostProblem(
                        host, store.url(), f"{store.url()}: {type(exc).__name__}: {exc}", exc
                    )
                ]
            problems += [HostProblem(host, s.url, f"skipped {s}", kind="skipped") for s in skipped]
            if not runs:
                problems.append(HostProblem(host, store.url(), f"{store.url('runs')}/: no runs"))
            return [FleetRun(host, m, store.url(f"runs/{m.run_id}")) for m in runs], problems

        for runs, problems in await self._per_host(hosts, one):
            listing.problems.extend(problems)
            listing.runs.extend(runs)
        listing.runs.sort(key=lambda r: (recency_key(r.metadata), r.host), reverse=True)
        return listing

    # -- one run -------------------------------------------------------------------

    def find_run(self, run_id: str) -> tuple[list[FleetRun], list[HostProblem]]:
        """Every host's copy of ``run_id``; see :meth:`afind_run`."""
        return run_sync(self.afind_run(run_id))

    async def afind_run(self, run_id: str) -> tuple[list[FleetRun], list[HostProblem]]:
        """Every host's copy of ``run_id`` (one read per host, concurrently).

        Returns:
            ``(found, problems)``: the hosts holding the run, sorted by host, and
            the hosts that could not be read (``kind="unreadable"``) or whose
            tail log is damaged (``kind="damaged"``: read from the plain objects).

        Raises:
            ValueError: invalid run id.
            StorageError: the fleet prefix could not be listed.
        """
        hosts = await self.ahosts()

        async def one(host: str) -> tuple[FleetRun | None, list[HostProblem]]:
            try:
                store = self.store(host)
            except ValueError:  # not a valid prefix name: listed as skipped by alist_runs
                return None, []
            try:
                try:
                    m: RunMetadata | None = await store.aread_run(run_id)
                except FileNotFoundError:
                    m = None
                damaged = await _damage(host, store)
            except (StorageError, OSError) as exc:
                return None, [
                    HostProblem(
                        host, store.url(), f"{store.url()}: {type(exc).__name__}: {exc}", exc
                    )
                ]
            run = None if m is None else FleetRun(host, m, store.url(f"runs/{run_id}"))
            return run, damaged

        found: list[FleetRun] = []
        problems: list[HostProblem] = []
        for run, host_problems in await self._per_host(hosts, one):
            if run is not None:
                found.append(run)
            problems.extend(host_problems)
        return found, problems

    def read_run(self, run_id: str) -> FleetRun:
        """The one copy of ``run_id`` in the fleet; see :meth:`aread_run`."""
        return run_sync(self.aread_run(run_id))

    async def aread_run(self, run_id: str) -> FleetRun:
        """The one copy of ``run_id`` in the fleet.

        Raises:
            AmbiguousRunError: several hosts hold it (names them).
            FileNotFoundError: no host holds it and every host was read.
            StorageError: no host holds it among those read, and some could
                not be read (the first such error, re-raised: not "missing").
            ValueError: invalid run id.
        """
        found, problems = await self.afind_run(run_id)
        if len(found) > 1:
            raise AmbiguousRunError(run_id, [r.host for r in found], self.url())
        if found:
            return found[0]
        for p in problems:
            if p.kind == "unreadable" and p.error is not None:
                raise p.error
        raise FileNotFoundError(f"run {run_id} not found on any host of {self.url()}")


async def _damage(host: str, store: EvalStore) -> list[HostProblem]:
    """The host's damaged tail object, as a problem (none when sound; no request)."""
    exc = await tail_damage(store.storage)
    if exc is None:
        return []
    return [
        HostProblem(
            host,
            exc.url or store.url(),
            f"{store.url()}: read from the plain objects (they may lack the newest lines), "
            f"the tail log is damaged: {exc}",
            exc,
            kind="damaged",
        )
    ]
