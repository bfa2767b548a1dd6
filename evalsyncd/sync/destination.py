"""One destination: its dirty set, its upload passes, its state and its retries.

::

    mark(path) --> dirty set --pass (at most one per flush_interval_s; at once when urgent)-->
        tail log in use: TailMode.run_pass    (one tail object, then due main objects)
        else:            sync_paths           (PerFile.sync_file per file, phase by phase)
    pass failed --> states.after_failure --> BACKOFF or PARKED until retry_at

The lifecycle and the retry policy are pure (:mod:`evalsyncd.sync.states`);
what to do with one file is decided by :func:`evalsyncd.sync.plan.plan` and
done by :class:`~evalsyncd.sync.perfile.PerFile`. The dirty set is bounded by
the number of files, never by bytes (the backlog is the journal lagging behind
the files); at most ``max_concurrency`` files are in flight and at most
``inflight_bytes`` of file content is held for uploads. A phase that fails
stops the pass, so later phases never overtake earlier ones (see
:func:`~evalsyncd.sync.files.phase_of`).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import crc32c
import structlog
from aiolimiter import AsyncLimiter

from evalsyncd.catalog import CATALOG_PATH, build_catalog
from evalsyncd.config import DestinationSettings
from evalsyncd.errors import (
    InvalidKeyError,
    PermanentStorageError,
    ServerBehaviourError,
    StorageError,
)
from evalsyncd.storage import Backend
from evalsyncd.storage.tail import TailConflictError
from evalsyncd.sync.files import is_run_metadata
from evalsyncd.sync.journal import EntryStatus, Journal
from evalsyncd.sync.owner import Owner
from evalsyncd.sync.passes import ByteBudget, by_phase, log_failure, release_frames, worst_error
from evalsyncd.sync.perfile import NotReady, PerFile
from evalsyncd.sync.plan import Policy
from evalsyncd.sync.states import DestinationState, after_failure, backoff_delay, check_transition
from evalsyncd.sync.tailmode import TailMode

__all__ = ["Destination", "DestinationState", "Stats", "backoff_delay"]

log = structlog.get_logger("evalsyncd.sync")
CATALOG_NAME = CATALOG_PATH.split("/", 1)[1]

CHUNK_BYTES = 8 * 1024 * 1024
"""Largest delta sent in one append, and largest tail object body, bytes (unless a
single line is longer)."""
RETRY_CHUNK_BYTES = 1024 * 1024
"""The same bound while the destination is failing (BACKOFF, PARKED), bytes: a pass
that retries during an outage stages this much, not the backlog, so its memory
(the pieces, the object built of them, the SDK's copy of it) stays the same however
long the outage; the first pass that succeeds restores :data:`CHUNK_BYTES`."""
PROMOTE_MIN_BYTES = 1024 * 1024
"""Pending bytes of one file from which its main object is due in the tail mode (at
least the backend's in-place append size, so that later deltas can go straight to it)."""
INFLIGHT_BYTES = 64 * 1024 * 1024
"""File bytes one destination holds in memory for uploads at once (a single line or
replace-on-write file larger than this is sent alone): memory does not grow with
the backlog."""


@dataclass
class _Dirty:
    since: float  # Unix time the path first became dirty
    seq: int  # bumped whenever the path is marked again
    not_before: float = 0.0  # monotonic time before which it is not retried


@dataclass
class Stats:
    """Counters of one destination since the daemon started."""

    bytes_uploaded: int = 0
    objects_uploaded: int = 0
    failures: dict[str, int] = field(default_factory=dict)


_PROBE_TIMEOUT_S = 30.0
"""Bound on the server probe at start, seconds (then the daemon goes on without it)."""


class Destination:
    """A mirror target and its upload loop.

    Args:
        settings: the destination's configuration.
        storage: the opened backend (its clients are managed by the caller).
        journal: the shared journal.
        root: the watched root.
        flush_interval_s: minimum time between two passes, seconds.
        mirror_deletes: delete remote objects of files deleted locally.
        invalid_json_grace_s: how long a ``.json`` may stay unparseable before it
            is reported, seconds.
        chunk_bytes: see :data:`CHUNK_BYTES`, bytes.
        retry_chunk_bytes: see :data:`RETRY_CHUNK_BYTES`, bytes.
        inflight_bytes: see :data:`INFLIGHT_BYTES`, bytes.
        clock: monotonic clock (injected for tests).
        rng: randomness for the backoff jitter (injected for tests).
        owner: the prefix's claim, checked before every pass writes (see
            :mod:`evalsyncd.sync.owner`); ``None``: not checked (unit tests).
    """

    def __init__(
        self,
        settings: DestinationSettings,
        storage: Backend,
        journal: Journal,
        root: Path,
        *,
        flush_interval_s: float,
        mirror_deletes: bool = False,
        invalid_json_grace_s: float = 30.0,
        chunk_bytes: int = CHUNK_BYTES,
        retry_chunk_bytes: int = RETRY_CHUNK_BYTES,
        inflight_bytes: int = INFLIGHT_BYTES,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        owner: Owner | None = None,
    ) -> None:
        self.name = settings.name
        self.settings = settings
        self.storage = storage
        self.journal = journal
        self.root = root
        self.flush_interval_s = flush_interval_s
        self._chunk_bytes = chunk_bytes
        self._retry_chunk_bytes = min(retry_chunk_bytes, chunk_bytes)
        self.state = DestinationState.HEALTHY
        self.stats = Stats()
        self.last_error: str | None = None
        self.on_upload: Callable[[str, str, int, float], None] | None = None
        """Called after each acknowledged write: ``(destination, op, bytes, duration_s)``."""
        self.clock = clock
        """The monotonic clock, seconds."""
        self.budget = ByteBudget(inflight_bytes)
        """File bytes held for uploads (see :data:`INFLIGHT_BYTES`)."""
        in_place = storage.append_in_place_min_bytes
        policy = Policy(
            flush_interval_s,
            invalid_json_grace_s,
            mirror_deletes,
            max_main_lag_s=settings.max_main_lag_s,
            compact_idle_s=settings.compact_idle_s,
            tail_max_pieces=settings.tail_max_pieces,
            promote_bytes=max(PROMOTE_MIN_BYTES, in_place),
            in_place_min_bytes=in_place,
        )
        self.files = PerFile(self, policy)
        """The per-file path: one file straight to its main object."""
        self.retry_at = 0.0
        """Monotonic time before which no pass starts (after a failure), seconds."""
        self._rng = rng or random.Random()
        self._dirty: dict[str, _Dirty] = {}
        self._seq = 0
        self._wake = asyncio.Event()
        self._urgent = False
        self._failures = 0
        self._last_pass = -1e18
        self._appended_since_flush = False
        self._last_append = 0.0
        self.sem = asyncio.Semaphore(settings.max_concurrency)
        """At most ``max_concurrency`` files in flight."""
        self._last_success_recorded = 0.0
        self._stopping = asyncio.Event()
        self._limiter = (
            AsyncLimiter(settings.max_upload_bytes_per_s, 1.0)
            if settings.max_upload_bytes_per_s
            else None
        )
        self._catalog_sent: bytes | None = None
        self.tail: TailMode | None = None
        """The tail-log half of this destination (``None``: every file on its own)."""
        if storage.supports_tail and settings.max_main_lag_s > 0:
            storage.read_tail = False  # the daemon reconciles against main objects
            self.tail = TailMode(self, storage.tail_writer(journal.writer_id()))
        self.owner = owner
        """This daemon's claim on the prefix (``None``: not checked)."""
        self.journal.set_destination_state(self.name, self.state.value)

    def stop(self) -> None:
        """Ask the loop to exit after the pass in progress (sleeps end at once)."""
        self._stopping.set()
        self._wake.set()

    async def _sleep(self, delay_s: float) -> None:
        """Sleep ``delay_s`` seconds, or less if the destination is stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), max(0.0, delay_s))

    # -- intake ------------------------------------------------------------------------

    def mark(self, path: str, *, urgent: bool = False) -> None:
        """Mark ``path`` (relative to the root) as possibly behind; wake the loop."""
        self._seq += 1
        item = self._dirty.get(path)
        if item is None:
            self._dirty[path] = _Dirty(since=time.time(), seq=self._seq)
        else:
            item.seq = self._seq
            item.not_before = 0.0
        if urgent:
            self._urgent = True
        self._wake.set()

    @property
    def pending_files(self) -> int:
        """How many files are marked dirty."""
        return len(self._dirty)

    @property
    def oldest_pending_s(self) -> float:
        """Age of the oldest dirty mark, seconds (0 when nothing is pending)."""
        if not self._dirty:
            return 0.0
        return max(0.0, time.time() - min(d.since for d in self._dirty.values()))

    def pending_paths(self) -> list[str]:
        """The dirty paths, in no particular order."""
        return list(self._dirty)

    def is_idle(self) -> bool:
        """Nothing dirty (a file waiting for a newline does not count as dirty)."""
        return not self._dirty

    @property
    def chunk_bytes(self) -> int:
        """Most file bytes one request carries now, bytes (unless a single line is longer):
        :data:`CHUNK_BYTES` when healthy, :data:`RETRY_CHUNK_BYTES` after a failed pass
        (retrying during an outage costs the same memory however large the backlog)."""
        if self.state is DestinationState.HEALTHY:
            return self._chunk_bytes
        return self._retry_chunk_bytes

    @property
    def caught_up(self) -> bool:
        """Nothing dirty and no main object behind the tail log."""
        return not self._dirty and (self.tail is None or not self.tail.behind)

    # -- the loop ------------------------------------------------------------------------

    def _transition(self, new: DestinationState, reason: str | None = None) -> None:
        """Move to ``new`` along an edge of :data:`~evalsyncd.sync.states.EDGES`; logged.

        Raises:
            TransitionError: not an edge (a bug).
        """
        if new is self.state:
            return
        check_transition(self.state, new)
        old, self.state = self.state, new
        level = log.warning if new is not DestinationState.HEALTHY else log.info
        if new is DestinationState.PARKED:
            level = log.error
        level(
            "destination_state", destination=self.name, old=old.value, new=new.value, reason=reason
        )
        self.journal.set_destination_state(
            self.name, new.value, success=new is DestinationState.HEALTHY, error=reason
        )

    async def run(self) -> None:
        """Run passes until :meth:`stop` (the pass in progress completes first)."""
        await self._know_server()
        while not self._stopping.is_set():
            timeout = self._next_deferred_in()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            if self._stopping.is_set():
                break
            if not self._urgent:
                await self._sleep(self._last_pass + self.flush_interval_s - self.clock())
            self._wake.clear()
            self._urgent = False
            self._last_pass = self.clock()
            try:
                await self.run_pass()
                await self._maybe_compact()
            except Exception as exc:  # the loop must outlive any bug or local I/O error
                log.exception(
                    "pass_crashed", destination=self.name, error=f"{type(exc).__name__}: {exc}"
                )
                self._on_failure(exc, permanent=False)
        if self.tail is not None and self.tail.behind:
            # a clean stop leaves every main object exact (within the stop timeout)
            self.tail.drain_all()
            with contextlib.suppress(Exception):
                await self.run_pass()

    async def _know_server(self) -> None:
        """Probe the server once (:func:`evalsyncd.storage.probe.aadapt`): fallbacks are set
        and logged; a server without a required feature parks the destination; a probe
        that fails otherwise (an outage, a permission the probe needs) is logged and the
        daemon goes on (every append still checks its post-condition). Then remove old
        leftovers of failed cleanups (:func:`evalsyncd.storage.reap.areap`), best effort.
        Only on a prefix this daemon owns: the probe writes under ``.evalsyncd/probe/``."""
        from evalsyncd.storage.probe import aadapt
        from evalsyncd.storage.reap import areap

        if self.owner is not None:
            try:
                await self.owner.ensure()
            except StorageError:
                return  # another daemon's prefix, or no answer: the first pass reports it
        try:
            async with asyncio.timeout(_PROBE_TIMEOUT_S):  # an unreachable server: go on
                await aadapt(self.storage)
        except ServerBehaviourError as exc:
            self._on_failure(exc, permanent=True)
            return
        except (StorageError, TimeoutError) as exc:
            log.warning("server_probe_failed", destination=self.name, error=repr(exc))
            return
        try:
            async with asyncio.timeout(_PROBE_TIMEOUT_S):
                await areap(self.storage)
        except (StorageError, TimeoutError) as exc:
            log.warning("leftovers_not_removed", destination=self.name, error=repr(exc))

    def _next_deferred_in(self) -> float | None:
        now = self.clock()
        deferred = [d.not_before for d in self._dirty.values() if d.not_before > now]
        ready = any(d.not_before <= now for d in self._dirty.values())
        if ready:
            return 0.0
        waits = [t - now for t in deferred]
        if self._appended_since_flush:
            waits.append(self._last_append + self.settings.compact_idle_s - now)
        if self.tail is not None and self.tail.behind:
            waits.append(self.tail.next_due_in())
        return max(0.0, min(waits)) if waits else None

    async def run_pass(self) -> bool:
        """Sync every dirty file that is due: through the tail log when it is in use
        (see :mod:`evalsyncd.sync.tailmode`), else file by file, phase by phase.

        A pass after a failure first waits until :attr:`retry_at` (a stop ends
        the wait at once).

        Returns:
            True when the pass met no storage error (files may still wait: a
            partial line, an unparseable JSON), False after a failure (the
            destination is then in BACKOFF or PARKED until :attr:`retry_at`).
        """
        await self._sleep(self.retry_at - self.clock())
        now = self.clock()
        batch = {p: d.seq for p, d in self._dirty.items() if d.not_before <= now}
        uploads, sent = self.stats.objects_uploaded, self.stats.bytes_uploaded
        try:
            if self.owner is not None:
                await self.owner.ensure()  # another daemon's prefix: write nothing, park
            if self.tail is not None:
                await self.tail.run_pass(batch)
            else:
                await self.sync_paths(list(batch), batch)
        except StorageError as exc:  # transient, permanent, conflicts that survived reconciliation
            if self.tail is not None and isinstance(exc, TailConflictError):
                self.tail.reopen()  # another writer's tail object: read the log again
            if self.owner is not None:
                exc = await self.owner.explain(exc)  # a conflict because another daemon owns it?
            self._on_failure(exc, permanent=isinstance(exc, PermanentStorageError))
            return False
        if any(is_run_metadata(p) for p in batch):
            await self._update_catalog()
        self._failures = 0
        self._transition(DestinationState.HEALTHY)
        if self.stats.objects_uploaded > uploads:
            # the canonical line of a pass (per-upload events are debug)
            log.info(
                "pass_finished",
                destination=self.name,
                files=len(batch),
                uploads=self.stats.objects_uploaded - uploads,
                bytes=self.stats.bytes_uploaded - sent,
                main_behind=self.tail.behind if self.tail is not None else 0,
                duration_s=round(self.clock() - now, 4),
            )
        if batch and self.clock() - self._last_success_recorded > 1.0:
            self._last_success_recorded = self.clock()
            self.journal.set_destination_state(self.name, self.state.value, success=True)
        return True

    async def sync_paths(self, paths: list[str], batch: dict[str, int]) -> None:
        """Sync ``paths`` one request (or a few) per file, phase by phase.

        Raises:
            StorageError: the first failure of a phase (permanent ones first);
                later phases are not started.
        """
        async with contextlib.aclosing(by_phase(paths, str, self._sync_guarded)) as phases:
            async for results in phases:
                self.journal.commit()
                error = worst_error(results)
                for path, result in results:
                    if result is None:
                        self.done(path, batch[path])
                    elif not isinstance(result, StorageError):
                        self.settle(path, batch[path], result)
                    if result is not None and result is not error:
                        release_frames(result)
                del results
                if error is not None:
                    raise error

    def settle(self, path: str, seq: int, exc: BaseException) -> None:
        """Deal with a file whose sync raised ``exc`` (anything but a storage error).

        Not ready (a partial JSON, a file still changing): retried later. Not a
        valid key: reported once. Anything else (a bug, a local I/O error): logged
        and retried at the next rescan; never kills the loop.
        """
        if isinstance(exc, NotReady):
            item = self._dirty.get(path)
            if item is not None and item.seq == seq:
                item.not_before = self.clock() + exc.after_s
        elif isinstance(exc, InvalidKeyError):
            self.files.report_once(path, "file_not_mirrorable", error=str(exc))
            self.done(path, seq)
        elif isinstance(exc, Exception):
            log_failure("file_sync_failed", self.name, path, exc)
            self.done(path, seq)
        else:
            raise exc

    async def _update_catalog(self) -> None:
        """Upload the run catalog (``.evalsyncd/catalog.json``) if it changed: one PUT.

        It holds every ``runs/*/metadata.json`` whose journal row says this
        destination has its current content (see :mod:`evalsyncd.catalog`).

        Raises:
            StorageError: the upload failed (retried with the next pass).
        """
        entries: dict[str, bytes] = {}
        rows = self.journal.entries(self.name)
        for path, row in rows.items():
            if not is_run_metadata(path) or row.status is not EntryStatus.OK:
                continue
            try:
                data = (self.root / path).read_bytes()
            except OSError:
                continue
            if crc32c.crc32c(data) == row.content_crc:
                entries[path.split("/")[1]] = data
        catalog = build_catalog(entries)
        if catalog == self._catalog_sent:
            return
        await self.throttle(len(catalog))
        await self.storage.awrite_internal(CATALOG_NAME, catalog)
        self._catalog_sent = catalog
        self.stats.objects_uploaded += 1
        self.stats.bytes_uploaded += len(catalog)
        log.debug("catalog_written", destination=self.name, runs=len(entries), bytes=len(catalog))

    async def throttle(self, nbytes: int) -> None:
        """Wait until ``nbytes`` may be sent under ``max_upload_bytes_per_s`` (no limit: at once)."""
        if self._limiter is None:
            return
        rate = int(self._limiter.max_rate)
        while nbytes > 0:
            step = min(nbytes, rate)
            await self._limiter.acquire(step)
            nbytes -= step

    def _on_failure(self, exc: BaseException, *, permanent: bool) -> None:
        """Record a failed pass: BACKOFF or PARKED until :attr:`retry_at` (no sleep here)."""
        release_frames(exc)
        kind = type(exc).__name__
        self.stats.failures[kind] = self.stats.failures.get(kind, 0) + 1
        self.last_error = f"{kind}: {exc}"
        self._failures += 1
        retry = after_failure(
            self._failures, permanent, self.clock(), self.settings.retry, self._rng
        )
        self._transition(retry.state, self.last_error)
        if retry.state is DestinationState.BACKOFF:
            self.journal.set_destination_state(self.name, self.state.value, error=self.last_error)
        self.retry_at = retry.at
        log.warning(
            "pass_failed",
            destination=self.name,
            error=self.last_error,
            failures=self._failures,
            retry_in_s=round(retry.delay_s, 3),
        )
        self._wake.set()
        self._urgent = True

    async def _maybe_compact(self) -> None:
        if not self._appended_since_flush:
            return
        if self.clock() - self._last_append < self.settings.compact_idle_s:
            return
        self._appended_since_flush = False
        try:
            await self.storage.aflush()
        except StorageError as exc:
            self._appended_since_flush = True
            log.warning("flush_failed", destination=self.name, error=f"{type(exc).__name__}: {exc}")

    def done(self, path: str, seq: int) -> None:
        """Drop ``path`` from the dirty set, unless it was marked again since ``seq``."""
        item = self._dirty.get(path)
        if item is not None and item.seq == seq:
            del self._dirty[path]

    def appended(self) -> None:
        """Note an append (the library flush of :meth:`_maybe_compact` follows a quiet spell)."""
        self._appended_since_flush = True
        self._last_append = self.clock()

    def count_upload(self, op: str, nbytes: int, duration_s: float) -> None:
        """Count one acknowledged upload and report it to :attr:`on_upload`."""
        self.stats.bytes_uploaded += nbytes
        self.stats.objects_uploaded += 1
        if self.on_upload is not None:
            self.on_upload(self.name, op, nbytes, duration_s)

    async def _sync_guarded(self, path: str) -> None:
        async with self.sem:
            await self.files.sync_file(path)
