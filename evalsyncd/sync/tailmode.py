"""A destination's passes through the tail log: one request per flush, main objects on a schedule.

Used when the backend keeps a tail log (``storage.supports_tail``) and
``max_main_lag_s`` > 0. One pass::

    dirty files --plan()--> staged pieces (new complete lines; small JSON whole)
                          | one tail object: TailWriter.commit()        (1 request)
                          v on success only
                  journal: tail_offset, tail_since          readers now see the bytes
    files that are due --promote--> main object up to date  (a request or a few per file)
                          | journal: acked_offset; index drops the pieces
                          v
                  index-only tail object if pieces were dropped; old tail objects deleted

A file goes *straight to its main object* instead (the per-file path of
:class:`~evalsyncd.sync.perfile.PerFile`) when its new bytes in one
flush reach ``direct_append_bytes`` and the backend appends them in place
(GCS compose at any size, S3 multipart from 5 MiB), or when it is new and
empty; never while the tail holds pieces of it (a stale entry would otherwise
be stitched with a rewritten main object).

What a file needs is decided by :func:`evalsyncd.sync.plan.plan`, as on the
per-file path; when its main object is *due* by :func:`evalsyncd.sync.plan.main_due`:
when it fell behind the tail ``max_main_lag_s`` ago, when the file was quiet
for ``compact_idle_s``, when it has ``tail_max_pieces`` pieces in the tail or
``promote_bytes`` pending bytes, when its run is finalized (its
``summary.json`` was flushed), and at shutdown and the end of ``sync --once``.

Recovery (:meth:`TailMode.open`): the newest index is read and compared with
the journal. An entry that agrees with its journal row is kept; any
disagreement (a crash between a tail write and its journal commit, between a
main-object update and the next index) resets the row to its main object's
offset and marks the file dirty, so its pending bytes are staged again from
the local file: never trusted blindly, never lost. Entries of files that no
longer exist locally are written to their main objects from the tail's bytes.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Final

import crc32c
import structlog

from evalsyncd.errors import ObjectNotFoundError, StorageError
from evalsyncd.storage import check_key
from evalsyncd.storage.tail import FileTail, TailWriter, read_pieces
from evalsyncd.sync import lines
from evalsyncd.sync.files import FileKind, classify, phase_of
from evalsyncd.sync.journal import Entry, EntryStatus
from evalsyncd.sync.passes import by_phase, log_failure, worst_error
from evalsyncd.sync.plan import Do, MainFacts, main_due, observe

if TYPE_CHECKING:
    from evalsyncd.storage import Backend
    from evalsyncd.sync.destination import Destination


__all__ = ["DIRECT", "Staged", "TailMode"]

log = structlog.get_logger("evalsyncd.sync")

DIRECT: Final = object()
"""Plan outcome: sync this file on its own (straight to its main object)."""


@dataclass
class Staged:
    """A file whose pieces are staged in the next tail object, and its journal row after it."""

    path: str
    seq: int
    entry: Entry
    remove: bool = False
    """A mirrored delete: the main object is removed once the index forgets the file."""


class TailMode:
    """The tail-log half of one destination; see the module docstring.

    Args:
        dest: the destination (its journal, storage, settings and per-file path).
        writer: the tail log's writer on the destination's storage.
    """

    def __init__(self, dest: Destination, writer: TailWriter) -> None:
        self.d = dest
        self.writer = writer
        self._last_change: dict[str, float] = {}  # path -> monotonic time of its last tail piece
        self._finalized: set[str] = set()  # run directories whose summary.json was flushed
        self._since: dict[str, float] = {}  # path -> Unix time its main object fell behind
        self._drain_all = False
        self._opened = False

    # -- recovery ------------------------------------------------------------------------

    async def open(self) -> None:
        """Read the newest index and reconcile it with the journal (see the module docstring)."""
        d = self.d
        index = await self.writer.open()
        rows = d.journal.entries(d.name)
        reset: list[str] = []
        for path, ft in index.files.items():
            row = rows.get(path)
            if row is None or row.status is EntryStatus.DELETED:
                if not (d.root / path).exists():
                    await self._promote_orphan(path, ft)
                else:
                    self.writer.forget(path)
                continue
            if not _agrees(row, ft):
                reset.append(path)
        for path, row in rows.items():
            if row.main_behind and path not in index.files:
                reset.append(path)
        for path in reset:
            row = rows[path]
            self.writer.forget(path)
            d.journal.ack(replace(row, tail_offset=row.acked_offset, tail_since=None, seen_size=-1))
            d.mark(path)
            log.warning(
                "tail_reconciled",
                destination=d.name,
                key=path,
                journal_offset=row.tail_offset,
                main_offset=row.acked_offset,
                action="restage from the main object's offset",
            )
        d.journal.commit()
        for path, row in rows.items():
            if row.main_behind and path not in reset and row.tail_since is not None:
                self._last_change[path] = time.monotonic()
                self._since[path] = row.tail_since
        if self.writer.dirty:
            await self.commit_index()
        self._opened = True  # only now: a failed reconciliation is redone at the next pass
        log.info(
            "tail_opened",
            destination=d.name,
            seq=index.seq,
            writer=index.writer or None,
            pending_files=len(index.files),
            reset=len(reset),
        )

    def reopen(self) -> None:
        """Read the index and reconcile again at the next pass (another writer wrote the log)."""
        self._opened = False

    async def _promote_orphan(self, path: str, ft: FileTail) -> None:
        """Write a file that exists only in the tail (deleted locally) to its main object."""
        data = await _remote_bytes(self.d.storage, self.writer, path, ft, ft.size)
        if data is None:
            self.writer.forget(path)
            return
        version = await self.d.files.timed_write(path, data, 0, "write")
        self.writer.promoted(path, len(data), version)
        log.info("tail_orphan_promoted", destination=self.d.name, key=path, bytes=len(data))

    # -- one pass ------------------------------------------------------------------------

    def drain_all(self) -> None:
        """Make every pending main object due (shutdown, ``sync --once``)."""
        self._drain_all = True

    @property
    def behind(self) -> int:
        """How many files have a main object behind the tail."""
        return len(self.writer.index.files)

    async def run_pass(self, batch: dict[str, int]) -> None:
        """Stage every due dirty file, write one tail object, then update due main objects.

        Args:
            batch: dirty path -> its mark's sequence number (see ``Destination._done``).

        Raises:
            StorageError: the tail write or a main-object update failed; nothing
                unacknowledged was journaled.
        """
        d = self.d
        if not self._opened:
            await self.open()
        staged: list[Staged] = []
        direct: list[str] = []
        for path in sorted(batch, key=phase_of):
            if self.writer.staged_bytes >= d.chunk_bytes:
                d.mark(path, urgent=True)  # one tail object per chunk: the rest comes next
                continue
            try:
                outcome = await self.plan(path, batch[path])
            except Exception as exc:
                d.settle(path, batch[path], exc)
                continue
            if outcome is DIRECT:
                direct.append(path)
            elif isinstance(outcome, Staged):
                staged.append(outcome)
            else:
                d.done(path, batch[path])
        if staged or self.writer.dirty:
            await self.commit(staged)
            for s in staged:
                if s.remove:
                    # the index no longer names it: now its main object may go
                    await d.storage.aremove(s.path)
                    d.journal.forget(d.name, s.path)
                    log.info("delete_mirrored", destination=d.name, key=s.path)
                d.done(s.path, s.seq)
                if s.entry.seen_size < 0:
                    d.mark(s.path, urgent=True)  # more complete lines than one chunk
        if direct:
            await d.sync_paths(direct, batch)
        await self.promote_due()

    async def plan(self, path: str, seq: int) -> Staged | object | None:
        """Stage what ``path`` needs in the next tail object (see :func:`~evalsyncd.sync.plan.plan`).

        Returns:
            A :class:`Staged` (pieces staged), :data:`DIRECT` (sync it on its own),
            or ``None`` (nothing to send; the journal may have been updated).

        Raises:
            NotReady: the file is not ready yet. InvalidKeyError: not a valid key.
        """
        d = self.d
        kind = classify(path)
        if kind is FileKind.IGNORED:
            return None
        check_key(path)
        row = d.journal.get(d.name, path)
        if kind is FileKind.REPLACE and self.writer.current(path) is None:
            with contextlib.suppress(OSError):
                big = os.stat(d.root / path, follow_symlinks=False)
                if big.st_size >= d.settings.direct_append_bytes and not (
                    row and row.unchanged(big)
                ):
                    return DIRECT  # a large file is sent whole to its main object, not staged
        async with observe(d.root, path, row, d.budget.hold) as seen:
            action = d.files.decide(seen, row)
            st = seen.facts.st
            if action.do in (Do.DELETED, Do.REMOVE):
                assert row is not None
                return self._plan_deleted(path, seq, row, remove=action.do is Do.REMOVE)
            if action.do is Do.INVALID:
                d.files.record_invalid(seen, row, action)
            elif action.do is Do.RECORD:
                assert row is not None and st is not None
                d.journal.ack(replace(row, seen_size=st.st_size, seen_mtime_ns=st.st_mtime_ns))
            elif action.do is Do.UPLOAD:
                assert seen.data is not None and st is not None
                return self._stage_replace(path, seq, seen.data, st, row, seen.facts.crc)
            elif action.do in (Do.APPEND, Do.REWRITE):
                assert seen.fd is not None and st is not None
                return await self._stage_lines(path, seq, seen.fd, st, row, action.do is Do.REWRITE)
            return None

    def _plan_deleted(self, path: str, seq: int, entry: Entry, *, remove: bool) -> Staged | object:
        d = self.d
        if self.writer.current(path) is None:
            return DIRECT  # nothing in the tail: the per-file path handles it
        if remove:
            self.writer.forget(path)  # the index forgets it first, then the main object goes
            return Staged(path, seq, entry, remove=True)
        log.info("local_file_deleted", destination=d.name, key=path, remote="kept")
        # its pending bytes still reach the main object, from the tail
        return Staged(path, seq, replace(entry, status=EntryStatus.DELETED))

    async def _stage_lines(
        self, path: str, seq: int, fd: int, st: os.stat_result, entry: Entry | None, rewrite: bool
    ) -> Staged | object | None:
        """Stage the next complete lines of an append-only file (or route it DIRECT)."""
        d = self.d
        ft = self.writer.current(path)
        if rewrite or entry is None:
            base, version, start = 0, None, 0
        else:
            base, version, start = entry.acked_offset, entry.remote_version, entry.tail_offset
            if entry.main_behind and (
                ft is None or ft.kind != "a" or ft.base != base or ft.size != start
            ):
                start = base  # the tail does not continue where the journal says: restage
        in_place = start == 0 or start >= d.storage.append_in_place_min_bytes
        pending = entry is not None and entry.main_behind and not rewrite
        direct_ok = in_place and ft is None and not pending
        # One chunk per tail object, all files together. A file whose new bytes may go
        # straight to its main object reads a whole chunk: it is staged only when fewer
        # than direct_append_bytes of them are complete lines.
        if direct_ok and st.st_size - start >= d.settings.direct_append_bytes:
            room = d.chunk_bytes
        else:
            room = max(1, d.chunk_bytes - self.writer.staged_bytes)
        async with d.budget.hold(min(st.st_size - start, room)):
            data = await lines.blocking(
                st.st_size - start, lines.read_lines, fd, start, st.st_size, room
            )
            if not data:
                if entry is None and st.st_size == 0:
                    return DIRECT  # a new empty file: its main object, now
                if entry is not None and not rewrite:
                    d.journal.ack(
                        replace(entry, seen_size=st.st_size, seen_mtime_ns=st.st_mtime_ns)
                    )
                return None
            if direct_ok and len(data) >= d.settings.direct_append_bytes:
                return DIRECT
            self.writer.stage_append(
                path, start, data, base=base, main_version=version, mtime=st.st_mtime
            )
        end = start + len(data)
        since = entry.tail_since if pending and entry is not None else None
        new = lines.new_entry(
            d.name,
            path,
            st,
            acked_offset=base,
            fingerprint=lines.fingerprint_at(fd, end),
            remote_version=version,
            tail_offset=end,
            tail_since=since if since is not None else time.time(),
        )
        if st.st_size - start > room:
            new = replace(new, seen_size=-1)  # more complete lines than fitted in this object
        return Staged(path, seq, new)

    def _stage_replace(
        self,
        path: str,
        seq: int,
        data: bytes,
        st: os.stat_result,
        entry: Entry | None,
        crc: int | None,
    ) -> Staged:
        """Stage the whole content of a replace-on-write file."""
        d = self.d
        self.writer.stage_replace(path, data, mtime=st.st_mtime)
        pending = entry is not None and entry.main_behind and entry.tail_since is not None
        new = lines.new_entry(
            d.name,
            path,
            st,
            acked_offset=entry.acked_offset if entry is not None else 0,
            content_crc=crc,
            remote_version=entry.remote_version if entry is not None else None,
            tail_offset=len(data),
            tail_since=entry.tail_since if pending and entry is not None else time.time(),
        )
        return Staged(path, seq, new)

    def next_due_in(self) -> float:
        """Seconds until the next main object is due (0: now)."""
        s = self.d.settings
        if self._drain_all:
            return 0.0
        now = time.monotonic()
        waits = [t + s.compact_idle_s - now for t in self._last_change.values()]
        now_wall = time.time()
        waits += [t + s.max_main_lag_s - now_wall for t in self._since.values()]
        return max(0.0, min(waits)) if waits else s.max_main_lag_s

    async def commit(self, staged: list[Staged]) -> None:
        """Write the staged pieces as one tail object, then journal them.

        Raises:
            StorageError: the write failed; nothing was journaled.
        """
        d = self.d
        size = self.writer.staged_bytes
        await d.throttle(size)
        started = d.clock()
        index = await self.writer.commit()
        duration_s = d.clock() - started
        now = time.monotonic()
        for s in staged:
            if s.remove:
                continue
            d.journal.ack(s.entry)
            self._last_change[s.path] = now
            if s.entry.tail_since is not None:
                self._since.setdefault(s.path, s.entry.tail_since)
            if s.path.endswith("/summary.json"):
                self._finalized.add(s.path.rsplit("/", 1)[0] + "/")
        d.journal.commit()
        d.count_upload("tail", size, duration_s)
        log.debug(
            "tail_written",
            destination=d.name,
            seq=index.seq,
            files=len(staged),
            bytes=size,
            duration_s=round(duration_s, 4),
        )

    async def commit_index(self) -> None:
        """Write an index-only tail object (pieces were dropped), then delete dead objects."""
        before = self.writer.index.live_seqs()
        await self.writer.commit()
        if before - self.writer.index.live_seqs():
            deleted = await self.writer.collect()
            log.debug("tail_collected", destination=self.d.name, deleted=deleted)

    def due(self, path: str, entry: Entry, now_wall: float, now: float) -> str | None:
        """Why the main object of ``path`` should be brought up to date now (see
        :func:`~evalsyncd.sync.plan.main_due`), or ``None``."""
        facts = MainFacts(
            idle_s=now - self._last_change.get(path, 0.0),
            pieces=self.writer.pieces_of(path),
            finalized=any(path.startswith(run) for run in self._finalized),
            drain=self._drain_all,
        )
        return main_due(entry, facts, now_wall, self.d.files.policy)

    async def promote_due(self) -> None:
        """Bring every due main object up to date, phase by phase, then drop their pieces.

        Raises:
            StorageError: a main-object update failed (the others of its phase
                completed; later phases wait for the next pass).
        """
        d = self.d
        now_wall, now = time.time(), time.monotonic()
        due: list[tuple[str, Entry]] = []
        for path in list(self.writer.index.files):
            entry = d.journal.get(d.name, path)
            if entry is None or entry.tail_since is None:
                continue
            reason = self.due(path, entry, now_wall, now)
            if reason is not None:
                log.debug("main_due", destination=d.name, key=path, reason=reason)
                due.append((path, entry))
        error: StorageError | None = None
        try:
            phases = by_phase(due, lambda item: item[0], self._promote_guarded)
            async with contextlib.aclosing(phases):
                async for results in phases:
                    d.journal.commit()
                    error = worst_error(results)
                    for (path, _e), result in results:
                        if result is None or isinstance(result, StorageError):
                            continue
                        if not isinstance(result, Exception):
                            raise result
                        log_failure("promote_failed", d.name, path, result)
                    if error is not None:
                        break
        finally:
            if self.writer.dirty:
                await self.commit_index()
        if error is not None:
            raise error
        if not self.writer.index.files:
            self._drain_all = False
            self._finalized.clear()

    async def _promote_guarded(self, item: tuple[str, Entry]) -> None:
        async with self.d.sem:
            await self.promote(*item)

    async def promote(self, path: str, entry: Entry) -> None:
        """Bring the main object of ``path`` to the journal's ``tail_offset``.

        The bytes come from the local file when it is still the file the journal
        describes, else from the tail (a file deleted or rewritten since).
        """
        d = self.d
        ft = self.writer.current(path)
        end = entry.tail_offset
        full = d.root / path
        if (
            classify(path) is FileKind.APPEND
            and entry.acked_offset > 0
            and (entry.acked_offset >= d.storage.append_in_place_min_bytes)
        ):
            start = entry.acked_offset
        else:
            start = 0
        async with d.budget.hold(end - start):
            data = _local_bytes(full, entry, start, end)
            if data is None and ft is not None and ft.size >= end:
                data = await _remote_bytes(self.d.storage, self.writer, path, ft, end, start)
            if data is None or len(data) != end - start:
                # neither source holds the bytes any more: the next change re-sends the file
                d.journal.ack(replace(entry, tail_offset=entry.acked_offset, tail_since=None))
                self.writer.forget(path)
                self._last_change.pop(path, None)
                self._since.pop(path, None)
                return
            if start == 0:
                version = await d.files.timed_write(path, data, 0, "write")
            else:
                try:
                    version = await d.files.append(path, data, start)
                except lines.RemoteDiverged:
                    whole = _local_bytes(full, entry, 0, end)
                    if whole is None and ft is not None:
                        whole = await _remote_bytes(self.d.storage, self.writer, path, ft, end)
                    if whole is None:
                        raise
                    version = await d.files.timed_write(path, whole, 0, "write")
                except lines.RemoteAhead as adv:
                    version = adv.version
            del data
        d.journal.ack(
            replace(
                entry,
                acked_offset=end,
                remote_version=version,
                tail_since=None,
                acked_at=time.time(),
            )
        )
        self.writer.promoted(path, end, version)
        self._last_change.pop(path, None)
        self._since.pop(path, None)


async def _remote_bytes(
    storage: Backend, writer: TailWriter, path: str, ft: FileTail, end: int, start: int = 0
) -> bytes | None:
    """Bytes ``[start, end)`` of ``path`` as the tail (and main object) hold them, by the
    writer's own index; ``None`` when an object they were in is gone."""
    try:
        parts = []
        if ft.kind == "a" and start < ft.base:
            parts.append(await storage.aread_range(path, start, ft.base - start))
            start = ft.base
        parts.append(await read_pieces(writer.backend, writer.index, ft, start, end))
    except ObjectNotFoundError:
        return None
    return b"".join(parts)


def _agrees(row: Entry, ft: FileTail) -> bool:
    """Whether a journal row and a recovered index entry describe the same pending bytes."""
    if not row.main_behind or row.tail_offset != ft.size:
        return False
    if ft.kind == "r":
        return classify(row.path) is FileKind.REPLACE
    return ft.base == row.acked_offset and classify(row.path) is FileKind.APPEND


def _local_bytes(full: Path, entry: Entry, start: int, end: int) -> bytes | None:
    """Bytes ``[start, end)`` of the local file, if it is still the file ``entry`` describes
    (same inode, long enough, same fingerprint or, replace-on-write, same CRC32C)."""
    try:
        fd = os.open(full, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (entry.dev, entry.ino) or st.st_size < entry.tail_offset:
            return None
        if classify(entry.path) is FileKind.REPLACE:
            data = os.pread(fd, st.st_size + 1, 0)
            ok = len(data) == entry.tail_offset and crc32c.crc32c(data) == entry.content_crc
            return data[start:end] if ok else None
        if entry.tail_offset and lines.fingerprint_at(fd, entry.tail_offset) != entry.fingerprint:
            return None
        return os.pread(fd, end - start, start)
    except OSError:
        return None
    finally:
        os.close(fd)
