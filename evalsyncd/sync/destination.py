"""One destination: its dirty set, its upload passes, its state and its retries.

Lifecycle (an explicit state machine; every transition is logged)::

    HEALTHY --transient error--> BACKOFF --pass succeeded--> HEALTHY
    HEALTHY/BACKOFF --permanent error--> PARKED --retry after parked_retry_s succeeded--> HEALTHY

A destination keeps a *dirty set* of relative paths (bounded by the number of
files, never by bytes: the backlog is the journal lagging behind the files).
Its loop runs *passes*: at most one per ``flush_interval_s`` (at once when a run
is finalized), each syncing the dirty files phase by phase (see
:func:`~evalsyncd.sync.files.phase_of`) with at most ``max_concurrency`` files
in flight. A phase that fails stops the pass, so later phases never overtake
earlier ones.

Syncing one file (``sync_file``) compares the local file with its journal row:

- append-only files: identity (dev, inode), size and the fingerprint (CRC32C of
  the 4 KiB before the acknowledged offset) decide between "append the new
  complete lines" and "rewrite from offset 0" (truncated or replaced file).
  Deltas are cut at line ends, at most ``chunk_bytes`` each unless one line is
  longer. A conflict (someone else changed the object, or a write applied
  before a crash was never journaled) is reconciled by reading the remote size
  and comparing bytes: never a blind append.
- replace-on-write files: uploaded whole when their stat changed and their
  CRC32C differs from what was uploaded; ``*.json`` only once it parses (an
  unparseable one is reported after ``invalid_json_grace_s`` and retried only
  when it changes); other files once unchanged for ``flush_interval_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import os
import random
import stat
import time
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import crc32c
import structlog
from aiolimiter import AsyncLimiter

from evalsyncd.catalog import CATALOG_PATH, build_catalog
from evalsyncd.config import DestinationSettings, RetrySettings
from evalsyncd.errors import (
    ConflictError,
    InvalidKeyError,
    ObjectNotFoundError,
    PermanentStorageError,
    StorageError,
    TransientStorageError,
)
from evalsyncd.storage import AnyStorage, check_key
from evalsyncd.sync.files import FileKind, classify, is_run_metadata, phase_of
from evalsyncd.sync.journal import Entry, Journal
from evalsyncd.sync.lines import (
    RemoteAhead,
    RemoteDiverged,
    blocking,
    divergence,
    fingerprint_at,
    new_entry,
    read_lines,
    read_stable,
)
from evalsyncd.sync.tailmode import TailMode

__all__ = ["Destination", "DestinationState", "backoff_delay"]

log = structlog.get_logger("evalsyncd.sync")
CATALOG_NAME = CATALOG_PATH.split("/", 1)[1]
T = TypeVar("T")

CHUNK_BYTES = 8 * 1024 * 1024
"""Largest delta sent in one append, bytes (unless a single line is longer)."""
INFLIGHT_BYTES = 64 * 1024 * 1024
"""File bytes one destination holds in memory for uploads at once (a single line or
replace-on-write file larger than this is sent alone): memory does not grow with
the backlog."""


class DestinationState(enum.Enum):
    """Where a destination is in its lifecycle."""

    HEALTHY = "healthy"
    BACKOFF = "backoff"
    PARKED = "parked"


def backoff_delay(failures: int, retry: RetrySettings, rng: random.Random) -> float:
    """Seconds to wait after ``failures`` consecutive transient failures (>= 1).

    Exponential with "equal jitter": the cap ``min(max_backoff_s,
    initial_backoff_s * 2**(failures-1))`` is halved, and a uniform random part
    of the other half is added, so waits never collapse to zero and never
    exceed ``max_backoff_s``.
    """
    exponent = min(max(failures - 1, 0), 60)
    cap = min(retry.max_backoff_s, retry.initial_backoff_s * (2.0**exponent))
    return cap / 2 + rng.uniform(0, cap / 2)


class NotReady(Exception):
    """Internal: the file is not ready (partial JSON, still changing); try again later."""

    def __init__(self, after_s: float) -> None:
        super().__init__(after_s)
        self.after_s = after_s


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
        clock: monotonic clock (injected for tests).
        rng: randomness for the backoff jitter (injected for tests).
    """

    def __init__(
        self,
        settings: DestinationSettings,
        storage: AnyStorage,
        journal: Journal,
        root: Path,
        *,
        flush_interval_s: float,
        mirror_deletes: bool = False,
        invalid_json_grace_s: float = 30.0,
        chunk_bytes: int = CHUNK_BYTES,
        inflight_bytes: int = INFLIGHT_BYTES,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.name = settings.name
        self.settings = settings
        self.storage = storage
        self.journal = journal
        self.root = root
        self.flush_interval_s = flush_interval_s
        self.mirror_deletes = mirror_deletes
        self.invalid_json_grace_s = invalid_json_grace_s
        self.chunk_bytes = chunk_bytes
        self.state = DestinationState.HEALTHY
        self.stats = Stats()
        self.last_error: str | None = None
        self.on_upload: Callable[[str, str, int, float], None] | None = None
        """Called after each acknowledged write: ``(destination, op, bytes, duration_s)``."""
        self._clock = clock
        self._rng = rng or random.Random()
        self._dirty: dict[str, _Dirty] = {}
        self._seq = 0
        self._wake = asyncio.Event()
        self._urgent = False
        self._failures = 0
        self._last_pass = -1e18
        self._appended_since_flush = False
        self._last_append = 0.0
        self._sem = asyncio.Semaphore(settings.max_concurrency)
        self._budget = _ByteBudget(inflight_bytes)
        self._reported_invalid: set[str] = set()
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
    def caught_up(self) -> bool:
        """Nothing dirty and no main object behind the tail log."""
        return not self._dirty and (self.tail is None or not self.tail.behind)

    # -- the loop ------------------------------------------------------------------------

    def _transition(self, new: DestinationState, reason: str | None = None) -> None:
        if new is self.state:
            return
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
        while not self._stopping.is_set():
            timeout = self._next_deferred_in()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            if self._stopping.is_set():
                break
            if not self._urgent:
                await self._sleep(self._last_pass + self.flush_interval_s - self._clock())
            self._wake.clear()
            self._urgent = False
            self._last_pass = self._clock()
            try:
                await self.run_pass()
                await self._maybe_compact()
            except Exception as exc:  # the loop must outlive any bug or local I/O error
                log.exception(
                    "pass_crashed", destination=self.name, error=f"{type(exc).__name__}: {exc}"
                )
                await self._on_failure(exc, permanent=False)
        if self.tail is not None and self.tail.behind:
            # a clean stop leaves every main object exact (within the stop timeout)
            self.tail.drain_all()
            with contextlib.suppress(Exception):
                await self.run_pass()

    def _next_deferred_in(self) -> float | None:
        now = self._clock()
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

        Returns:
            True when the pass met no storage error (files may still wait: a
            partial line, an unparseable JSON), False after a failure (the
            destination is then in BACKOFF or PARKED and has slept accordingly).
        """
        now = self._clock()
        batch = {p: d.seq for p, d in self._dirty.items() if d.not_before <= now}
        uploads, sent = self.stats.objects_uploaded, self.stats.bytes_uploaded
        try:
            if self.tail is not None:
                await self.tail.run_pass(batch)
            else:
                await self.sync_paths(list(batch), batch)
        except TransientStorageError as exc:
            await self._on_failure(exc, permanent=False)
            return False
        except PermanentStorageError as exc:
            await self._on_failure(exc, permanent=True)
            return False
        except StorageError as exc:  # conflicts that survived reconciliation, and the like
            await self._on_failure(exc, permanent=False)
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
                duration_s=round(self._clock() - now, 4),
            )
        if batch and self._clock() - self._last_success_recorded > 1.0:
            self._last_success_recorded = self._clock()
            self.journal.set_destination_state(self.name, self.state.value, success=True)
        return True

    async def sync_paths(self, paths: list[str], batch: dict[str, int]) -> None:
        """Sync ``paths`` one request (or a few) per file, phase by phase.

        Raises:
            StorageError: the first failure of a phase (permanent ones first);
                later phases are not started.
        """
        phases: dict[int, list[str]] = {}
        for path in paths:
            phases.setdefault(phase_of(path), []).append(path)
        for phase in sorted(phases):
            results = await asyncio.gather(
                *(self._sync_guarded(p) for p in phases[phase]), return_exceptions=True
            )
            self.journal.commit()
            error: BaseException | None = None
            for path, result in zip(phases[phase], results, strict=True):
                if isinstance(result, StorageError):
                    if error is None or isinstance(result, PermanentStorageError):
                        error = result
                elif result is None:
                    self._done(path, batch[path])
                else:
                    self.settle(path, batch[path], result)
            for result in results:
                if isinstance(result, BaseException) and result is not error:
                    _release_frames(result)
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
                item.not_before = self._clock() + exc.after_s
        elif isinstance(exc, InvalidKeyError):
            self._report_once(path, "file_not_mirrorable", error=str(exc))
            self._done(path, seq)
        elif isinstance(exc, Exception):
            log.error(
                "file_sync_failed",
                destination=self.name,
                key=path,
                error=f"{type(exc).__name__}: {exc}",
                exc_info=exc,
            )
            self._done(path, seq)
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
            if not is_run_metadata(path) or row.status != "ok":
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

    async def _on_failure(self, exc: BaseException, *, permanent: bool) -> None:
        _release_frames(exc)
        kind = type(exc).__name__
        self.stats.failures[kind] = self.stats.failures.get(kind, 0) + 1
        self.last_error = f"{kind}: {exc}"
        self._failures += 1
        retry = self.settings.retry
        if permanent:
            self._transition(DestinationState.PARKED, self.last_error)
            delay = retry.parked_retry_s
        else:
            self._transition(DestinationState.BACKOFF, self.last_error)
            self.journal.set_destination_state(self.name, self.state.value, error=self.last_error)
            delay = backoff_delay(self._failures, retry, self._rng)
        log.warning(
            "pass_failed",
            destination=self.name,
            error=self.last_error,
            failures=self._failures,
            retry_in_s=round(delay, 3),
        )
        await self._sleep(delay)
        self._wake.set()
        self._urgent = True

    async def _maybe_compact(self) -> None:
        if not self._appended_since_flush:
            return
        if self._clock() - self._last_append < self.settings.compact_idle_s:
            return
        self._appended_since_flush = False
        try:
            await self.storage.aflush()
        except StorageError as exc:
            self._appended_since_flush = True
            log.warning("flush_failed", destination=self.name, error=f"{type(exc).__name__}: {exc}")

    def _done(self, path: str, seq: int) -> None:
        """Drop ``path`` from the dirty set, unless it was marked again since ``seq``."""
        item = self._dirty.get(path)
        if item is not None and item.seq == seq:
            del self._dirty[path]

    def _report_once(self, path: str, event: str, **fields: object) -> None:
        """Log an error about a file once, until it syncs again."""
        if path not in self._reported_invalid:
            self._reported_invalid.add(path)
            log.error(event, destination=self.name, key=path, **fields)

    async def _sync_guarded(self, path: str) -> None:
        async with self._sem:
            await self.sync_file(path)

    # -- one file ---------------------------------------------------------------------------

    async def sync_file(self, path: str) -> None:
        """Bring the remote object of ``path`` up to date with the local file.

        Raises:
            StorageError: the destination failed (the journal is unchanged for
                the failed write).
            NotReady: the file is not ready yet.
            InvalidKeyError: the path cannot be an object key (not valid UTF-8).
        """
        kind = classify(path)
        if kind is FileKind.IGNORED:
            return
        check_key(path)  # InvalidKeyError for names that cannot be keys (not UTF-8)
        full = self.root / path
        try:
            st = os.stat(full, follow_symlinks=False)
        except FileNotFoundError:
            await self.handle_deleted(path)
            return
        except OSError as exc:
            log.warning("file_unreadable", destination=self.name, key=path, error=str(exc))
            return
        if not stat.S_ISREG(st.st_mode):  # symlinks (never followed), sockets, FIFOs
            return
        entry = self.journal.get(self.name, path)
        if entry is not None and entry.unchanged(st):
            return
        if kind is FileKind.APPEND:
            await self._sync_append(path, full, entry)
        else:
            async with self._budget.hold(st.st_size):
                await self._sync_replace(path, full, st, entry)

    async def handle_deleted(self, path: str) -> None:
        entry = self.journal.get(self.name, path)
        if entry is None or entry.status == "deleted":
            return
        if self.mirror_deletes:
            await self.storage.aremove(path)
            self.journal.forget(self.name, path)
            log.info("delete_mirrored", destination=self.name, key=path)
        else:
            self.journal.ack(replace(entry, status="deleted"))
            log.info("local_file_deleted", destination=self.name, key=path, remote="kept")

    # -- append-only -------------------------------------------------------------------------

    async def _sync_append(self, path: str, full: Path, entry: Entry | None) -> None:
        try:
            fd = os.open(full, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            await self.handle_deleted(path)
            return
        try:
            st = os.fstat(fd)
            rewrite = self.must_rewrite(path, fd, st, entry)
            offset = 0 if rewrite or entry is None else entry.tail_offset
            version = entry.remote_version if entry is not None and not rewrite else None
            while True:
                async with self._budget.hold(min(st.st_size - offset, self.chunk_bytes)):
                    data = await blocking(
                        st.st_size - offset, read_lines, fd, offset, st.st_size, self.chunk_bytes
                    )
                    if not data:
                        break
                    end = offset + len(data)
                    try:
                        if rewrite and offset == 0:
                            version = await self._timed_write(path, data, offset, "write")
                        else:
                            version = await self._append(path, data, offset)
                    except RemoteDiverged:
                        log.warning(
                            "remote_diverged_rewriting",
                            destination=self.name,
                            key=path,
                            offset=offset,
                        )
                        rewrite, offset = True, 0
                        continue
                    except RemoteAhead as adv:
                        end, version = adv.remote_size, adv.version
                    finally:
                        data = b""  # the budget covers the bytes only while held
                self._appended_since_flush = True
                self._last_append = self._clock()
                fingerprint = fingerprint_at(fd, end)  # one read of at most 4 KiB
                self.journal.ack(
                    new_entry(
                        self.name,
                        path,
                        st,
                        acked_offset=end,
                        fingerprint=fingerprint,
                        remote_version=version,
                    )
                )
                offset = end
                rewrite = False
            current = self.journal.get(self.name, path)
            if current is None or (current.seen_size, current.seen_mtime_ns) != (
                st.st_size,
                st.st_mtime_ns,
            ):
                # Nothing complete to send (an empty file or a partial line): remember the stat
                # so scans do not mark it again until it changes.
                if current is None and st.st_size == 0:
                    version = await self._timed_write(path, b"", 0, "write")
                    current = new_entry(self.name, path, st, remote_version=version)
                if current is not None:
                    self.journal.ack(
                        replace(current, seen_size=st.st_size, seen_mtime_ns=st.st_mtime_ns)
                    )
        finally:
            os.close(fd)

    def must_rewrite(self, path: str, fd: int, st: os.stat_result, entry: Entry | None) -> bool:
        """Whether an append-only file must be sent again from offset 0: new, deleted
        before, truncated, replaced or rewritten (logged ``file_changed_rewriting``)."""
        if entry is None or entry.status == "deleted":
            return True
        reason = divergence(fd, st, entry)  # at most one 4 KiB read
        if reason is None:
            return False
        log.warning(
            "file_changed_rewriting",
            destination=self.name,
            key=path,
            reason=reason,
            acked_offset=entry.tail_offset,
            size=st.st_size,
        )
        return True

    async def _append(self, path: str, data: bytes, offset: int) -> str | None:
        """Conditional append with reconciliation on conflict.

        Raises:
            RemoteAhead: the remote already holds more of this file (a write applied
                before a crash): the journal jumps to the remote size.
            RemoteDiverged: the remote holds bytes that are not a prefix of the file.
        """
        try:
            return await self._timed_write(path, data, offset, "append")
        except (ConflictError, ObjectNotFoundError) as exc:
            log.warning(
                "append_conflict", destination=self.name, key=path, offset=offset, error=str(exc)
            )
        remote = await self.storage.astat(path)
        remote_size = remote.size if remote is not None else 0
        if remote_size <= offset:
            raise RemoteDiverged
        local_end = offset + len(data)
        if remote_size > local_end:
            # The remote is ahead of this delta; only a byte comparison against the
            # local file could confirm it, and this chunk does not cover it.
            raise RemoteDiverged
        remote_bytes = await self.storage.aread_range(path, offset, remote_size - offset)
        if remote_bytes != data[: remote_size - offset]:
            raise RemoteDiverged
        log.info("append_reconciled", destination=self.name, key=path, remote_size=remote_size)
        if remote_size == local_end:
            raise RemoteAhead(remote_size, remote.version if remote else None)
        rest = data[remote_size - offset :]
        return await self._timed_write(path, rest, remote_size, "append")

    async def _timed_write(self, path: str, data: bytes, offset: int, op: str) -> str | None:
        await self.throttle(len(data))
        started = self._clock()
        if op == "write":
            version = await self.storage.awrite(path, data)
        else:
            version = await self.storage.aappend(path, data, offset=offset)
        duration_s = self._clock() - started
        self.stats.bytes_uploaded += len(data)
        self.stats.objects_uploaded += 1
        if self.on_upload is not None:
            self.on_upload(self.name, op, len(data), duration_s)
        log.debug(
            "upload_succeeded",
            destination=self.name,
            key=path,
            op=op,
            start=offset,
            end=offset + len(data),
            bytes=len(data),
            duration_s=round(duration_s, 4),
        )
        return version

    # -- replace-on-write -----------------------------------------------------------------------

    async def _sync_replace(
        self, path: str, full: Path, st: os.stat_result, entry: Entry | None
    ) -> None:
        data = await self.replace_content(path, full, st, entry)
        if data is None:
            return
        crc = crc32c.crc32c(data)
        version = entry.remote_version if entry else None
        if entry is None or entry.status != "ok" or entry.content_crc != crc:
            version = await self._timed_write(path, data, 0, "write")
        self.journal.ack(
            new_entry(
                self.name, path, st, acked_offset=len(data), content_crc=crc, remote_version=version
            )
        )

    async def replace_content(
        self, path: str, full: Path, st: os.stat_result, entry: Entry | None
    ) -> bytes | None:
        """The content of a replace-on-write file once it is ready to upload.

        Returns:
            The bytes, or ``None`` when there is nothing to upload (deleted: handled;
            unparseable JSON past its grace period: reported and journaled).

        Raises:
            NotReady: not ready yet (changing, unparseable within the grace period, or
                not quiet for a flush interval).
        """
        try:
            data = await blocking(st.st_size, read_stable, full, st)
        except FileNotFoundError:
            await self.handle_deleted(path)
            return None
        if data is None:  # changed while reading
            raise NotReady(self.flush_interval_s)
        age_s = time.time() - st.st_mtime
        if path.endswith(".json") and data.strip():
            try:
                json.loads(data)
            except ValueError as exc:
                if age_s < self.invalid_json_grace_s:
                    raise NotReady(self.flush_interval_s) from None
                self._report_once(
                    path,
                    "invalid_json_not_uploaded",
                    file=str(full),
                    error=str(exc),
                    size=st.st_size,
                )
                base = entry or new_entry(self.name, path, st)
                self.journal.ack(
                    replace(
                        base,
                        status="invalid",
                        seen_size=st.st_size,
                        seen_mtime_ns=st.st_mtime_ns,
                        dev=st.st_dev,
                        ino=st.st_ino,
                    )
                )
                return None
        else:
            # Not JSON: upload once it has been quiet for a flush interval. An empty
            # .json is what a non-atomic writer leaves between truncating and writing
            # (open(path, "w")): upload it only once it stayed empty for the grace period.
            quiet_s = self.flush_interval_s
            if path.endswith(".json"):
                quiet_s = max(quiet_s, self.invalid_json_grace_s)
            if age_s < quiet_s:
                raise NotReady(quiet_s - age_s + 0.05)
        self._reported_invalid.discard(path)
        return data


def _release_frames(exc: BaseException) -> None:
    """Clear the locals of the frames an exception (and its causes) holds.

    A failed upload's traceback references its request body through the frames
    of the SDK, and exceptions with tracebacks form reference cycles that only
    the cyclic garbage collector frees, late. During a long outage that let
    megabytes of request bodies pile up per failure; clearing the frames frees
    them at once, so memory stays flat however long the outage.
    """
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen or len(seen) > 32:
            continue
        seen.add(id(e))
        if e.__traceback__ is not None:
            traceback.clear_frames(e.__traceback__)
        stack += [e.__cause__, e.__context__]


class _ByteBudget:
    """At most ``limit`` bytes held at once; a request above the limit takes all of it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.free = limit
        self._cond = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, n: int) -> AsyncIterator[None]:
        """Hold ``n`` bytes of the budget (at least 1, at most ``limit``) while inside."""
        n = min(max(n, 1), self.limit)
        async with self._cond:
            await self._cond.wait_for(lambda: self.free >= n)
            self.free -= n
        try:
            yield
        finally:
            async with self._cond:
                self.free += n
                self._cond.notify_all()
