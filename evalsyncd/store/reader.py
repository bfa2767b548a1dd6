"""The reads of an evaluation store: written once, async, with sync twins through the bridge.

Each read is one coroutine (``alist_runs``, ``aread_run``, ...) over the
storage's awaited reads (:mod:`evalsyncd.store.aio`). Its sync twin is one
line, ``return self._reads.sync(self.aread_run(run_id))``, through the storage bridge
(:mod:`evalsyncd.storage._bridge`): the coroutine runs on the bridge's
background loop thread. So a sync read may be called from any thread that is
not running an event loop; called from inside a running loop it raises
``RuntimeError`` (await the ``a*`` twin there). Trajectories are the exception
to "one call, one bridge trip": :meth:`EvalStoreReader.iter_trajectories` and
``read_trajectories`` make one trip per chunk of the file, and parse the
chunks in the caller's thread (parsing a large file on the bridge loop would
hold up every other thread's requests).

Runs evicted from a local store by the daemon's retention (a
``runs/{run_id}/.evicted.json`` marker, :mod:`evalsyncd.evicted`) keep their
``metadata.json`` and ``summary.json`` on disk; every other read of such a run
goes to the ``fallback`` storage (the mirror), with the same answers as before
the eviction. Without a ``fallback`` those reads raise ``FileNotFoundError``
naming the mirrors. ``list_runs`` of a local store marks evicted runs
(``RunMetadata.evicted``), one local ``stat`` per run, no remote request.

Reading is strict about outages: only "not found" means missing; every other
storage error, transient or permanent, propagates, so an outage is never
reported as "no runs". What counts as bad input, and how it is skipped, is in
:mod:`evalsyncd.store.layout`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import aclosing
from pathlib import Path
from typing import Any, TypedDict, Unpack

from evalsyncd.catalog import Catalog, CatalogError, parse_catalog
from evalsyncd.errors import CorruptObjectError
from evalsyncd.evicted import MARKER_NAME, EvictionMarker, parse_marker
from evalsyncd.storage import LocalStorage, Storage, SupportsChild, parse_url, storage_from_uri
from evalsyncd.storage.tail import TailIndex, own_tail_index
from evalsyncd.store import layout
from evalsyncd.store.aio import MISSING, Reads, both, bounded_map, reads_of
from evalsyncd.store.layout import (
    MAX_JSON_BYTES,
    FilterOptions,
    Skipped,
    StoreLayout,
    TrajectoryFilter,
    check_json_size,
)
from evalsyncd.store.models import BenchmarkResult, RunMetadata, StoredTrajectory

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_MAX_CONCURRENCY",
    "EvalStoreReader",
    "StoreOptions",
    "local_or_storage",
]

logger = logging.getLogger("evalsyncd.store")

DEFAULT_MAX_CONCURRENCY = 32
"""Default bound on concurrent storage requests of one ``list_runs`` call."""

DEFAULT_CHUNK_SIZE = 1 << 20
"""Default size in bytes of each ranged read when streaming a JSONL file (1 MiB)."""


class StoreOptions(TypedDict, total=False):
    """The keyword settings of :class:`EvalStoreReader` (for those that pass them on)."""

    max_concurrency: int
    chunk_size: int
    use_catalog: bool


class _TrajectoryStream:
    """One pass over a ``trajectories.jsonl``: a ranged read of ``chunk_size`` bytes per step.

    Only :meth:`next_chunk` does I/O; each chunk is parsed lazily, where it is
    consumed (a sync consumer parses in its own thread, and a search stops
    parsing at its match). Memory stays at about one chunk plus the longest
    line, whatever the file size. A missing file is an empty stream; a file
    that disappears after the first chunk raises ``FileNotFoundError``.
    """

    def __init__(
        self, reads: Reads, path: str, where: str, chunk_size: int, which: TrajectoryFilter
    ) -> None:
        self._reads, self._path, self._chunk_size = reads, path, chunk_size
        self._parser = layout.TrajectoryParser(where, which)
        self._offset = 0
        self._done = False

    async def next_chunk(self) -> bytes | None:
        """The next ``chunk_size`` bytes (fewer at the end), or ``None`` after the end.

        Raises:
            StorageError: the storage failed.
        """
        if self._done:
            return None
        try:
            chunk = await self._reads.read_range(self._path, self._offset, self._chunk_size)
        except MISSING:
            if self._offset == 0:
                self._done = True
                return None
            raise
        self._offset += len(chunk)
        self._done = len(chunk) < self._chunk_size
        return chunk

    def _parse(self, chunk: bytes) -> Iterator[StoredTrajectory]:
        yield from self._parser.feed(chunk)
        if self._done:
            self._parser.close()

    def __iter__(self) -> Iterator[StoredTrajectory]:
        while (chunk := self._reads.sync(self.next_chunk())) is not None:
            yield from self._parse(chunk)

    async def __aiter__(self) -> AsyncGenerator[StoredTrajectory, None]:
        while (chunk := await self.next_chunk()) is not None:
            for t in self._parse(chunk):
                yield t


def local_or_storage(storage_or_path: Storage | str | Path, *, mkdir: bool = True) -> Storage:
    """``storage_or_path`` itself, or the :class:`~evalsyncd.storage.LocalStorage` a path
    (or ``file://`` URL) names.

    Raises:
        ValueError: a string naming a cloud URL (``s3://``, ``gs://``): open it with
            :func:`evalsyncd.storage.storage_from_uri` (in a ``with`` block) and pass
            the storage, so that its connections are closed.
    """
    if isinstance(storage_or_path, Path):
        return LocalStorage(storage_or_path.expanduser(), mkdir=mkdir)
    if isinstance(storage_or_path, str):
        if "://" in storage_or_path:
            where = parse_url(storage_or_path)
            if where.scheme != "file":
                raise ValueError(
                    f"{storage_or_path!r} is a {where.scheme}:// URL, not a local path: pass "
                    f"a storage, e.g. `with storage_from_uri({storage_or_path!r}) as s: "
                    "EvalStore(s)`"
                )
            return LocalStorage(Path(where.path), mkdir=mkdir)
        return LocalStorage(Path(storage_or_path).expanduser(), mkdir=mkdir)
    return storage_or_path


class EvalStoreReader:
    """The reads of an :class:`~evalsyncd.store.EvalStore` (which adds the writes).

    Args:
        storage_or_path: a storage backend, or a ``str``/``Path`` naming a local
            directory (a :class:`~evalsyncd.storage.LocalStorage` rooted there,
            created if missing).
        prefix: path of the store inside the storage (``""`` for its root).
        max_concurrency: bound on concurrent requests of ``list_runs`` and
            ``list_benchmarks`` (and their async twins).
        chunk_size: bytes per ranged read when streaming ``trajectories.jsonl``.
        use_catalog: let ``list_runs`` read the run catalog the daemon keeps at
            ``.evalsyncd/catalog.json`` (see :mod:`evalsyncd.catalog`); the
            answer is the same either way, only the number of reads differs.
        fallback: where reads of runs evicted from this (local) store go: the
            daemon's mirror of it, holding the same tree at ``prefix``: a storage
            (e.g. ``storage_from_uri("s3://b/evals/host-1")``, opened by the caller)
            or its URL (``s3://``, ``gs://``, a path), opened here with default
            client settings (:func:`evalsyncd.storage.storage_from_uri`).

    Raises:
        ValueError: ``max_concurrency`` or ``chunk_size`` is below 1.

    Instances hold configuration only and pickle when the storage does. Sync
    reads may be called from any thread without a running event loop; inside
    a coroutine, await the ``a*`` twins (see the module docstring).
    """

    def __init__(
        self,
        storage_or_path: Storage | str | Path,
        prefix: str = "",
        *,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        use_catalog: bool = True,
        fallback: Storage | str | Path | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, not {max_concurrency}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, not {chunk_size}")
        self.storage: Storage = local_or_storage(storage_or_path)
        if prefix.strip("/") and isinstance(self.storage, SupportsChild):
            # a bucket's store reads its own tail log, under its own prefix
            self.storage, prefix = self.storage.child(prefix), ""
        self._layout = StoreLayout(prefix)
        self._reads = reads_of(self.storage)
        self.max_concurrency = max_concurrency
        self.chunk_size = chunk_size
        self.use_catalog = use_catalog
        self.fallback: Storage | None = (
            storage_from_uri(fallback) if isinstance(fallback, str | Path) else fallback
        )
        self._fallback_reader: EvalStoreReader | None = None
        # a local store's evicted runs (never probed on other storages: no request)
        storage = self.storage
        self._local_root = storage.local_root if isinstance(storage, LocalStorage) else None

    @property
    def prefix(self) -> str:
        """The store's path inside :attr:`storage` (``""`` for its root)."""
        return self._layout.prefix

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url()!r})"

    def url(self, path: str = "") -> str:
        """A human-readable URI of ``path`` inside the store (``file://``, ``s3://``, ``gs://``)."""
        return self.storage.url(self._layout.path(path))

    # -- runs ------------------------------------------------------------------------

    def list_runs(self) -> list[RunMetadata]:
        """All runs with a parseable ``metadata.json``, most recent first; see :meth:`alist_runs`."""
        return self._reads.sync(self.alist_runs())

    async def alist_runs(self) -> list[RunMetadata]:
        """All runs with a parseable ``metadata.json``, most recent first.

        Ordered by ``timestamp`` (then run id), newest first; the reference
        sorts by run id, which is creation order only for runs sharing a
        checkpoint label. Runs whose ``metadata.json`` is missing or does not
        parse are left out (with a warning for the latter).

        Cost: one read of the run catalog (``.evalsyncd/catalog.json``, kept by
        the daemon; see :mod:`evalsyncd.catalog`) and, at the same time, of the
        tail log's index (one LIST and one GET, cached; none for a store that is
        not at its storage's root or a storage without a tail log); then one
        listing of ``runs/`` unless the tail log vouches for the catalog (rule 6
        of :mod:`evalsyncd.catalog`: the catalog's runs plus those pending in the
        tail stand in for it); then one read per run the catalog does not
        cover, at most ``max_concurrency`` at a time. The listing is the truth:
        a run the catalog holds but the listing lacks (deleted) is never
        returned. A missing or corrupt catalog is ignored (with a
        warning naming its key) and every run is read individually: the
        answer is the same with or without a catalog.

        Raises:
            StorageError: the storage failed (never reported as "no runs").
        """
        runs, _skipped = await self.aruns_checked()
        return runs

    def runs_checked(self) -> tuple[list[RunMetadata], list[Skipped]]:
        """:meth:`list_runs`, and the runs it left out; see :meth:`aruns_checked`."""
        return self._reads.sync(self.aruns_checked())

    async def aruns_checked(self) -> tuple[list[RunMetadata], list[Skipped]]:
        """:meth:`alist_runs`, and what it refused, by name and why.

        Returns:
            ``(runs, skipped)``: the runs, newest first, and one
            :class:`~evalsyncd.store.layout.Skipped` per name under ``runs/``
            that is not a valid run id, and per ``metadata.json`` that does not
            parse, is not a run's metadata, or is larger than
            :data:`~evalsyncd.store.layout.MAX_JSON_BYTES`. A run directory
            without ``metadata.json`` (a run being mirrored) is neither.

        Raises:
            StorageError: the storage failed (never reported as "no runs").
        """
        catalog: Catalog | None = None
        index: TailIndex | None = None
        listed: list[str] | None = None
        if self.use_catalog:
            catalog, index = await both(self._aread_catalog(), self._aown_tail())
            listed = _vouched_runs(catalog, index)
        if listed is None:
            listed = await self._alist_runs_dir(catalog, index)
        valid = StoreLayout.runs_in(listed)
        skipped = [
            Skipped(self.storage.url(self._layout.path("runs", name)), "not a valid run id")
            for name in listed
            if name not in valid
        ]

        await self._aprefetch(
            [self._layout.metadata(r) for r in valid if catalog is None or r not in catalog.entries]
        )

        async def one(run_id: str) -> RunMetadata | Skipped | None:
            path = self._layout.metadata(run_id)
            where = self.storage.url(path)
            data = self._from_catalog(catalog, run_id)
            try:
                if data is None:
                    data = await self._aread_bounded(path)
                else:
                    check_json_size(data, where)
            except CorruptObjectError as exc:
                logger.warning("ignoring %s", exc)
                return Skipped(where, str(exc).removeprefix(f"{where}: "))
            if data is None:
                return None
            run = layout.parse_model(RunMetadata, layout.parse_json_object(data, where), where)
            if run is None:
                why = layout.model_problem(RunMetadata, data) or "not a run's metadata"
                return Skipped(where, why)
            if self._local_root is not None:
                run.evicted = (self._local_root / self._layout.run(run_id, MARKER_NAME)).exists()
            return run

        runs: list[RunMetadata] = []
        for r in await bounded_map(one, valid, self.max_concurrency):
            if isinstance(r, Skipped):
                skipped.append(r)
            elif r is not None:
                runs.append(r)
        return sorted(runs, key=layout.recency_key, reverse=True), skipped

    async def _alist_runs_dir(self, catalog: Catalog | None, index: TailIndex | None) -> list[str]:
        """The names under ``runs/`` (one listing). The ``metadata.json`` pieces of the
        runs pending in the tail log (``index``) that ``catalog`` lacks are fetched
        meanwhile (:meth:`_aprefetch`), so the reads of those runs that follow find them
        cached instead of waiting for the listing first."""
        listing = self._reads.list_dir(self._layout.runs_dir())
        if index is None:
            return await listing
        known = catalog.entries if catalog is not None else {}
        pending = [
            path
            for path in index.files
            if (run := _run_of_metadata(path)) is not None and run not in known
        ]
        names, _ = await both(listing, self._aprefetch(pending))
        return names

    def read_run(self, run_id: str) -> RunMetadata:
        """The metadata of one run; see :meth:`aread_run`."""
        return self._reads.sync(self.aread_run(run_id))

    async def aread_run(self, run_id: str) -> RunMetadata:
        """The metadata of one run (one read).

        Raises:
            FileNotFoundError: no (parseable) ``metadata.json``.
            ValueError: invalid run id.
            CorruptObjectError: ``metadata.json`` is larger than
                :data:`~evalsyncd.store.layout.MAX_JSON_BYTES` (a ``StorageError``).
            StorageError: the storage failed.
        """
        path = self._layout.metadata(run_id)
        run = layout.parse_model(RunMetadata, await self._aread_json(path), self.storage.url(path))
        if run is None:
            raise FileNotFoundError(f"run {run_id} not found at {self.storage.url(path)}")
        if self._local_root is not None:
            run.evicted = (self._local_root / self._layout.run(run_id, MARKER_NAME)).exists()
        return run

    def read_summary(self, run_id: str) -> dict[str, Any] | None:
        """The run's ``summary.json``; see :meth:`aread_summary`."""
        return self._reads.sync(self.aread_summary(run_id))

    async def aread_summary(self, run_id: str) -> dict[str, Any] | None:
        """The run's ``summary.json``, or ``None`` if missing or unparseable (one read).

        Raises:
            ValueError: invalid run id.
            CorruptObjectError: larger than :data:`~evalsyncd.store.layout.MAX_JSON_BYTES`.
            StorageError: the storage failed.
        """
        return await self._aread_json(self._layout.summary(run_id))

    # -- benchmarks ------------------------------------------------------------------

    def list_benchmarks(self, run_id: str) -> list[str]:
        """Sorted names of the run's benchmarks that have a ``result.json``; see :meth:`alist_benchmarks`."""
        return self._reads.sync(self.alist_benchmarks(run_id))

    async def alist_benchmarks(self, run_id: str) -> list[str]:
        """Sorted names of the run's benchmarks that have a ``result.json``.

        Cost: one listing of the run directory, then one existence check per
        entry, at most ``max_concurrency`` at a time.

        Raises:
            ValueError: invalid run id.
            StorageError: the storage failed.
        """
        remote = self._evicted_source(run_id)
        if remote is not None:
            return await remote.alist_benchmarks(run_id)
        names = StoreLayout.benchmarks_in(await self._reads.list_dir(self._layout.run(run_id)))

        async def has_result(name: str) -> bool:
            return await self._reads.exists(self._layout.result(run_id, name))

        present = await bounded_map(has_result, names, self.max_concurrency)
        return sorted(n for n, ok in zip(names, present, strict=True) if ok)

    def read_result(self, run_id: str, benchmark: str) -> BenchmarkResult | None:
        """A benchmark's result; see :meth:`aread_result`."""
        return self._reads.sync(self.aread_result(run_id, benchmark))

    async def aread_result(self, run_id: str, benchmark: str) -> BenchmarkResult | None:
        """A benchmark's result, or ``None`` if missing or unparseable (with a warning).

        Raises:
            ValueError: invalid run id or benchmark name.
            CorruptObjectError: larger than :data:`~evalsyncd.store.layout.MAX_JSON_BYTES`.
            StorageError: the storage failed.
        """
        path = self._layout.result(run_id, benchmark)
        remote = self._evicted_source(run_id)
        if remote is not None:
            return await remote.aread_result(run_id, benchmark)
        return layout.parse_model(
            BenchmarkResult, await self._aread_json(path), self.storage.url(path)
        )

    # -- trajectories ----------------------------------------------------------------

    def iter_trajectories(
        self, run_id: str, benchmark: str, **which: Unpack[FilterOptions]
    ) -> Iterator[StoredTrajectory]:
        """Stream a benchmark's trajectories (``for``); see :meth:`aiter_trajectories`.

        Each chunk is one trip through the bridge, made when the consumer gets
        there. An invalid name raises ``ValueError`` from the call itself; a
        storage failure raises its ``StorageError`` while iterating.
        """
        return iter(self._stream(run_id, benchmark, which))

    def aiter_trajectories(
        self, run_id: str, benchmark: str, **which: Unpack[FilterOptions]
    ) -> AsyncIterator[StoredTrajectory]:
        """Stream a benchmark's trajectories in file order (``async for``), with optional filters.

        Reads ``trajectories.jsonl`` in ranges of ``chunk_size`` bytes, so memory
        stays at about one chunk plus the longest line, whatever the file size.
        A missing file yields nothing. Each chunk is fetched when the consumer
        gets there; a file appended to meanwhile is read as far as it has grown.

        Args:
            run_id: the run.
            benchmark: the benchmark.
            **which: the filters, keywords of :class:`~evalsyncd.store.layout.FilterOptions`:
                ``correct_only`` (only ``reward > 0``), ``incorrect_only`` (only
                ``reward <= 0`` without error), ``errors_only`` (only those with
                an ``error``); all ``False`` by default.

        Raises:
            ValueError: invalid run id or benchmark name (raised by the call itself).
            StorageError: the storage failed (raised while iterating).
        """
        return aiter(self._stream(run_id, benchmark, which))

    def read_trajectories(
        self, run_id: str, benchmark: str, **which: Unpack[FilterOptions]
    ) -> list[StoredTrajectory]:
        """All of a benchmark's trajectories (``[]`` if none); see :meth:`aiter_trajectories`.

        The chunks come through the bridge one by one (as :meth:`iter_trajectories`)
        and are parsed in this thread, which leaves the bridge loop free for
        other threads' requests meanwhile.
        """
        return list(self.iter_trajectories(run_id, benchmark, **which))

    async def aread_trajectories(
        self, run_id: str, benchmark: str, **which: Unpack[FilterOptions]
    ) -> list[StoredTrajectory]:
        """All of a benchmark's trajectories (``[]`` if none); see :meth:`aiter_trajectories`."""
        return [t async for t in self._stream(run_id, benchmark, which)]

    def read_single_trajectory(
        self, run_id: str, benchmark: str, idx: int
    ) -> StoredTrajectory | None:
        """The first trajectory with ``idx``, or ``None``; see :meth:`aread_single_trajectory`."""
        return self._reads.sync(self.aread_single_trajectory(run_id, benchmark, idx))

    async def aread_single_trajectory(
        self, run_id: str, benchmark: str, idx: int
    ) -> StoredTrajectory | None:
        """The first trajectory with ``idx``, or ``None``.

        Streams the file and stops at the match: O(position) I/O, O(chunk) memory.

        Raises:
            ValueError: invalid run id or benchmark name.
            StorageError: the storage failed.
        """
        stream = self._stream(run_id, benchmark, {})
        async with aclosing(aiter(stream)) as trajectories:
            async for t in trajectories:
                if t.idx == idx:
                    return t
        return None

    def _stream(self, run_id: str, benchmark: str, which: FilterOptions) -> _TrajectoryStream:
        path = self._layout.trajectories(run_id, benchmark)
        remote = self._evicted_source(run_id)
        if remote is not None:
            return remote._stream(run_id, benchmark, which)
        where, keep = self.storage.url(path), TrajectoryFilter(**which)
        return _TrajectoryStream(self._reads, path, where, self.chunk_size, keep)

    # -- runs evicted from a local store ----------------------------------------------

    def eviction_marker(self, run_id: str) -> EvictionMarker | None:
        """The eviction marker of ``run_id`` in a local store (``None``: not evicted, or
        the store is not local). One local ``open``, no remote request.

        Raises:
            ValueError: invalid run id, or a marker that does not parse (names the file).
        """
        if self._local_root is None:
            return None
        path = self._local_root / self._layout.run(run_id, MARKER_NAME)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return parse_marker(data, str(path))

    def _evicted_source(self, run_id: str) -> EvalStoreReader | None:
        """The reader of the mirror for an evicted run, or ``None`` to read locally.

        Raises:
            FileNotFoundError: the run is evicted and no ``fallback`` was given (the
                message names the mirrors and the two ways out).
        """
        marker = self.eviction_marker(run_id)
        if marker is None:
            return None
        if self.fallback is None:
            raise FileNotFoundError(
                f"run {run_id} was evicted from {self.url()} and is read from its mirror "
                f"({', '.join(marker.mirrors) or 'unknown'}): pass "
                "EvalStore(root, fallback=storage_from_uri(MIRROR)), or bring it back with "
                f"`evalsyncd restore MIRROR {run_id} --root ROOT`"
            )
        if self._fallback_reader is None:
            self._fallback_reader = EvalStoreReader(
                self.fallback,
                self.prefix,
                max_concurrency=self.max_concurrency,
                chunk_size=self.chunk_size,
                use_catalog=self.use_catalog,
            )
        return self._fallback_reader

    # -- JSON files and the run catalog ----------------------------------------------

    async def _aread_bounded(self, path: str, limit: int = MAX_JSON_BYTES) -> bytes | None:
        """The file's bytes, or ``None`` if missing: one ranged read of ``limit + 1`` bytes.

        Raises:
            CorruptObjectError: the file is larger than ``limit`` bytes.
            StorageError: the storage failed.
        """
        try:
            data = await self._reads.read_range(path, 0, limit + 1)
        except MISSING:
            return None
        return check_json_size(data, self.storage.url(path), limit)

    async def _aread_json(self, path: str) -> dict[str, Any] | None:
        where = self.storage.url(path)
        return layout.parse_json_object(await self._aread_bounded(path), where)

    async def _aprefetch(self, paths: list[str]) -> None:
        """Before reading ``paths`` one by one: their tail pieces in as few requests as
        cover them, where the storage can (``aprefetch_tail`` of evalsyncd's cloud
        backends: a listing without a run catalog, whose ``metadata.json`` files sit side
        by side in one tail object, then costs a request or two instead of one per run)."""
        prefetch = getattr(self.storage, "aprefetch_tail", None)
        if len(paths) > 1 and prefetch is not None:
            await prefetch(paths)

    async def _aown_tail(self) -> TailIndex | None:
        """The tail index of the store's own prefix (``None``: none, or not this storage's
        root; no request then), read with the catalog: see :func:`_vouched_runs`."""
        if self.prefix:
            return None
        return await own_tail_index(self.storage)

    async def _aread_catalog(self) -> Catalog | None:
        try:
            data = await self._reads.read_catalog(self.prefix)
        except CorruptObjectError as exc:  # past its size limit
            logger.warning("ignoring the run catalog, reading each run instead: %s", exc)
            return None
        if data is None:
            return None
        try:
            return parse_catalog(data, self.storage.url(self._layout.catalog()))
        except CatalogError as exc:
            logger.warning("ignoring the run catalog, reading each run instead: %s", exc)
            return None

    def _from_catalog(self, catalog: Catalog | None, run_id: str) -> bytes | None:
        """The catalog's bytes of the run's metadata.json, or ``None`` to read it instead."""
        entry = catalog.get(run_id) if catalog is not None else None
        if entry is None:
            return None
        if not entry.intact:
            logger.warning(
                "%s: catalog entry %r does not match its size/CRC32C; reading the run",
                self.storage.url(self._layout.catalog()),
                run_id,
            )
            return None
        return entry.data


def _vouched_runs(catalog: Catalog | None, index: TailIndex | None) -> list[str] | None:
    """The names a listing of ``runs/`` would show, from a run catalog that the tail log
    vouches for (rule 6 of :mod:`evalsyncd.catalog`): the catalog's runs plus those whose
    ``metadata.json`` is pending in the tail; ``None`` (list ``runs/``) otherwise."""
    if catalog is None or index is None or index.damage is not None:
        return None
    if not catalog.vouched_by(index.writer, index.seq, index.marks):
        return None
    names = set(catalog.entries)
    names.update(run for run in map(_run_of_metadata, index.files) if run is not None)
    return sorted(names)


def _run_of_metadata(path: str) -> str | None:
    """The run of ``runs/{run}/metadata.json``; ``None`` for any other ``path``."""
    parts = path.split("/")
    if len(parts) == 3 and parts[0] == "runs" and parts[2] == "metadata.json":
        return parts[1]
    return None
