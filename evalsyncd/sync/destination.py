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
from evalsyncd.sync.files import FileKind, classify, phase_of
from evalsyncd.sync.journal import Entry, Journal

__all__ = ["Destination", "DestinationState", "backoff_delay"]

log = structlog.get_logger("evalsyncd.sync")
T = TypeVar("T")

FINGERPRINT_BYTES = 4096
CHUNK_BYTES = 8 * 1024 * 1024
"""Largest delta sent in one append, bytes (unless a single line is longer)."""
INFLIGHT_BYTES = 64 * 1024 * 1024
"""File bytes one destination holds in memory for uploads at once (a single line or
replace-on-write file larger than this is sent alone): memory does not grow with
the backlog."""
_READ_BLOCK = 1024 * 1024


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


class _Retry(Exception):
    """Internal: the file is not ready (partial JSON, still changing); try again later."""

    def __init__(self, after_s: float) -> None:
        super().__init__(after_s)
        self.after_s = after_s


class _Reset(Exception):
    """Internal: the remote object cannot be reconciled; rewrite it from offset 0."""


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

    def _next_deferred_in(self) -> float | None:
        now = self._clock()
        deferred = [d.not_before for d in self._dirty.values() if d.not_before > now]
        ready = any(d.not_before <= now for d in self._dirty.values())
        if ready:
            return 0.0
        waits = [t - now for t in deferred]
        if self._appended_since_flush:
            waits.append(self._last_append + self.settings.compact_idle_s - now)
        return max(0.0, min(waits)) if waits else None

    async def run_pass(self) -> bool:
        """Sync every dirty file that is due, phase by phase.

        Returns:
            True when the pass met no storage error (files may still wait: a
            partial line, an unparseable JSON), False after a failure (the
            destination is then in BACKOFF or PARKED and has slept accordingly).
        """
        now = self._clock()
        batch = {p: d.seq for p, d in self._dirty.items() if d.not_before <= now}
        phases: dict[int, list[str]] = {}
        for path in batch:
            phases.setdefault(phase_of(path), []).append(path)
        try:
            for phase in sorted(phases):
                results = await asyncio.gather(
                    *(self._sync_guarded(p) for p in phases[phase]), return_exceptions=True
                )
                self.journal.commit()
                error: BaseException | None = None
                for path, result in zip(phases[phase], results, strict=True):
                    if isinstance(result, _Retry):
                        item = self._dirty.get(path)
                        if item is not None and item.seq == batch[path]:
                            item.not_before = self._clock() + result.after_s
                    elif isinstance(result, StorageError):
                        if error is None or isinstance(result, PermanentStorageError):
                            error = result
                    elif isinstance(result, InvalidKeyError):
                        self._report_once(path, "file_not_mirrorable", error=str(result))
                        self._done(path, batch[path])
                    elif isinstance(result, Exception):
                        # A bug or a local I/O error: report it and retry at the next rescan,
                        # never kill the loop.
                        log.error(
                            "file_sync_failed",
                            destination=self.name,
                            key=path,
                            error=f"{type(result).__name__}: {result}",
                            exc_info=result,
                        )
                        self._done(path, batch[path])
                    elif isinstance(result, BaseException):
                        raise result
                    else:
                        self._done(path, batch[path])
                for result in results:
                    if isinstance(result, BaseException) and result is not error:
                        _release_frames(result)
                del results
                if error is not None:
                    raise error
        except TransientStorageError as exc:
            await self._on_failure(exc, permanent=False)
            return False
        except PermanentStorageError as exc:
            await self._on_failure(exc, permanent=True)
            return False
        except StorageError as exc:  # conflicts that survived reconciliation, and the like
            await self._on_failure(exc, permanent=False)
            return False
        self._failures = 0
        self._transition(DestinationState.HEALTHY)
        if batch and self._clock() - self._last_success_recorded > 1.0:
            self._last_success_recorded = self._clock()
            self.journal.set_destination_state(self.name, self.state.value, success=True)
        return True

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
            _Retry: the file is not ready yet.
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
            await self._handle_deleted(path)
            return
        except OSError as exc:
            log.warning("file_unreadable", destination=self.name, key=path, error=str(exc))
            return
        if not stat.S_ISREG(st.st_mode):  # symlinks (never followed), sockets, FIFOs
            return
        entry = self.journal.get(self.name, path)
        if (
            entry is not None
            and entry.status != "deleted"
            and (entry.dev, entry.ino, entry.seen_size, entry.seen_mtime_ns)
            == (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        ):
            return
        if kind is FileKind.APPEND:
            await self._sync_append(path, full, entry)
        else:
            async with self._budget.hold(st.st_size):
                await self._sync_replace(path, full, st, entry)

    async def _handle_deleted(self, path: str) -> None:
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
            await self._handle_deleted(path)
            return
        try:
            st = os.fstat(fd)
            offset = 0
            rewrite = entry is None or entry.status == "deleted"
            if entry is not None and not rewrite:
                reason = _divergence(fd, st, entry)  # at most one 4 KiB read
                if reason is None:
                    offset = entry.acked_offset
                else:
                    rewrite = True
                    log.warning(
                        "file_changed_rewriting",
                        destination=self.name,
                        key=path,
                        reason=reason,
                        acked_offset=entry.acked_offset,
                        size=st.st_size,
                    )
            version = entry.remote_version if entry is not None and not rewrite else None
            while True:
                async with self._budget.hold(min(st.st_size - offset, self.chunk_bytes)):
                    data = await _blocking(
                        st.st_size - offset, _read_lines, fd, offset, st.st_size, self.chunk_bytes
                    )
                    if not data:
                        break
                    end = offset + len(data)
                    try:
                        if rewrite and offset == 0:
                            version = await self._timed_write(path, data, offset, "write")
                        else:
                            version = await self._append(path, data, offset)
                    except _Reset:
                        log.warning(
                            "remote_diverged_rewriting",
                            destination=self.name,
                            key=path,
                            offset=offset,
                        )
                        rewrite, offset = True, 0
                        continue
                    except _Advance as adv:
                        end, version = adv.remote_size, adv.version
                    finally:
                        data = b""  # the budget covers the bytes only while held
                self._appended_since_flush = True
                self._last_append = self._clock()
                fingerprint = _fingerprint(fd, end)  # one read of at most 4 KiB
                self.journal.ack(
                    _new_entry(
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
                    current = _new_entry(self.name, path, st, remote_version=version)
                if current is not None:
                    self.journal.ack(
                        replace(current, seen_size=st.st_size, seen_mtime_ns=st.st_mtime_ns)
                    )
        finally:
            os.close(fd)

    async def _append(self, path: str, data: bytes, offset: int) -> str | None:
        """Conditional append with reconciliation on conflict.

        Raises:
            _Advance: the remote already holds more of this file (a write applied
                before a crash): the journal jumps to the remote size.
            _Reset: the remote holds bytes that are not a prefix of the file.
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
            raise _Reset
        local_end = offset + len(data)
        if remote_size > local_end:
            # The remote is ahead of this delta; only a byte comparison against the
            # local file could confirm it, and this chunk does not cover it.
            raise _Reset
        remote_bytes = await self.storage.aread_range(path, offset, remote_size - offset)
        if remote_bytes != data[: remote_size - offset]:
            raise _Reset
        log.info("append_reconciled", destination=self.name, key=path, remote_size=remote_size)
        if remote_size == local_end:
            raise _Advance(remote_size, remote.version if remote else None)
        rest = data[remote_size - offset :]
        return await self._timed_write(path, rest, remote_size, "append")

    async def _timed_write(self, path: str, data: bytes, offset: int, op: str) -> str | None:
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
        log.info(
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
        try:
            data = await _blocking(st.st_size, _read_stable, full, st)
        except FileNotFoundError:
            await self._handle_deleted(path)
            return
        if data is None:  # changed while reading
            raise _Retry(self.flush_interval_s)
        age_s = time.time() - st.st_mtime
        if path.endswith(".json") and data.strip():
            try:
                json.loads(data)
            except ValueError as exc:
                if age_s < self.invalid_json_grace_s:
                    raise _Retry(self.flush_interval_s) from None
                self._report_once(
                    path,
                    "invalid_json_not_uploaded",
                    file=str(full),
                    error=str(exc),
                    size=st.st_size,
                )
                base = entry or _new_entry(self.name, path, st)
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
                return
        else:
            # Not JSON: upload once it has been quiet for a flush interval. An empty
            # .json is what a non-atomic writer leaves between truncating and writing
            # (open(path, "w")): upload it only once it stayed empty for the grace period.
            quiet_s = self.flush_interval_s
            if path.endswith(".json"):
                quiet_s = max(quiet_s, self.invalid_json_grace_s)
            if age_s < quiet_s:
                raise _Retry(quiet_s - age_s + 0.05)
        self._reported_invalid.discard(path)
        crc = crc32c.crc32c(data)
        version = entry.remote_version if entry else None
        if entry is None or entry.status != "ok" or entry.content_crc != crc:
            version = await self._timed_write(path, data, 0, "write")
        self.journal.ack(
            _new_entry(
                self.name, path, st, acked_offset=len(data), content_crc=crc, remote_version=version
            )
        )


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


class _Advance(Exception):
    def __init__(self, remote_size: int, version: str | None) -> None:
        super().__init__(remote_size)
        self.remote_size = remote_size
        self.version = version


INLINE_READ_BYTES = 256 * 1024
"""Reads up to this size run on the event loop; larger ones in a worker thread."""


async def _blocking(size: int, fn: Callable[..., T], *args: object) -> T:
    """Run a file read of about ``size`` bytes: inline when small (a thread hop costs
    more than the read), in a worker thread when large (the loop stays responsive)."""
    if size <= INLINE_READ_BYTES:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


def _new_entry(
    destination: str,
    path: str,
    st: os.stat_result,
    *,
    acked_offset: int = 0,
    fingerprint: int | None = None,
    content_crc: int | None = None,
    remote_version: str | None = None,
    status: str = "ok",
) -> Entry:
    """A journal row for ``path`` as seen in ``st``, acknowledged now."""
    return Entry(
        destination=destination,
        path=path,
        dev=st.st_dev,
        ino=st.st_ino,
        acked_offset=acked_offset,
        fingerprint=fingerprint,
        content_crc=content_crc,
        remote_version=remote_version,
        seen_size=st.st_size,
        seen_mtime_ns=st.st_mtime_ns,
        status=status,
        acked_at=time.time(),
    )


def _divergence(fd: int, st: os.stat_result, entry: Entry) -> str | None:
    """Why the file can no longer be appended to from ``entry.acked_offset``, or None."""
    if (st.st_dev, st.st_ino) != (entry.dev, entry.ino):
        return "replaced (new inode)"
    if st.st_size < entry.acked_offset:
        return "truncated"
    if entry.acked_offset > 0 and _fingerprint(fd, entry.acked_offset) != entry.fingerprint:
        return "rewritten (fingerprint mismatch)"
    return None


def _fingerprint(fd: int, end: int) -> int:
    """CRC32C of the (at most) 4 KiB of the file before ``end``."""
    start = max(0, end - FINGERPRINT_BYTES)
    return int(crc32c.crc32c(os.pread(fd, end - start, start)))


def _read_lines(fd: int, offset: int, size: int, chunk_bytes: int) -> bytes:
    """Bytes from ``offset`` up to the last newline within ``chunk_bytes`` (or up to the
    first newline after it, when one line is longer); ``b""`` when no complete line
    lies in ``[offset, size)``. Memory: about ``2 * chunk_bytes``, or the longest line
    plus one block when a line is longer (its end is found first, then it is read once)."""
    want = min(chunk_bytes, size - offset)
    if want <= 0:
        return b""
    data = os.pread(fd, want, offset)
    cut = data.rfind(b"\n")
    if cut >= 0:
        return data[: cut + 1]
    pos = offset + len(data)
    del data
    while pos < size:
        block = os.pread(fd, min(_READ_BLOCK, size - pos), pos)
        if not block:
            break
        nl = block.find(b"\n")
        if nl >= 0:
            line = os.pread(fd, pos + nl + 1 - offset, offset)
            # The file may have been truncated meanwhile: only a whole line counts.
            return line if line.endswith(b"\n") and len(line) == pos + nl + 1 - offset else b""
        pos += len(block)
    return b""


def _read_stable(full: Path, st: os.stat_result) -> bytes | None:
    """The whole file, or None if it changed (size, mtime or inode) while being read."""
    with open(full, "rb") as f:
        data = f.read()
        after = os.fstat(f.fileno())
    if (after.st_size, after.st_mtime_ns, after.st_ino) != (st.st_size, st.st_mtime_ns, st.st_ino):
        return None
    if len(data) != st.st_size:
        return None
    return data
