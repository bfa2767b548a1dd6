"""Syncing one file straight to its main object: what :func:`~evalsyncd.sync.plan.plan` decided, done.

::

    observe --> plan --> APPEND/REWRITE  complete lines, at most chunk_bytes a request,
                                         each a conditional append (or a write at 0)
                         UPLOAD          the whole content, one write
                         RECORD/INVALID  journal only
                         DELETED/REMOVE  journal (and the remote object, mirror_deletes)
                         WAIT            NotReady(after_s): the destination retries later

Every acknowledgement goes to the journal after the storage confirmed the
write, with the version it returned. A conflict (someone else changed the
object, or a write applied before a crash was never journaled) is reconciled
by reading the remote size and comparing bytes: never a blind append
(:meth:`PerFile.append`).
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from typing import TYPE_CHECKING

import structlog

from evalsyncd.errors import ConflictError, ObjectNotFoundError
from evalsyncd.storage import check_key
from evalsyncd.sync.files import FileKind, classify
from evalsyncd.sync.journal import Entry, EntryStatus
from evalsyncd.sync.lines import (
    RemoteAhead,
    RemoteDiverged,
    blocking,
    fingerprint_at,
    new_entry,
    read_lines,
)
from evalsyncd.sync.plan import NEW_FILE, Action, Do, Observed, Policy, observe, plan

if TYPE_CHECKING:
    from evalsyncd.sync.destination import Destination

__all__ = ["NotReady", "PerFile"]

log = structlog.get_logger("evalsyncd.sync")


class NotReady(Exception):
    """The file is not ready (partial JSON, still changing); try again in ``after_s`` seconds."""

    def __init__(self, after_s: float) -> None:
        super().__init__(after_s)
        self.after_s = after_s


class PerFile:
    """The per-file path of one destination; see the module docstring.

    Args:
        dest: the destination (its journal, storage, byte budget and counters).
        policy: the settings :func:`~evalsyncd.sync.plan.plan` follows.
    """

    def __init__(self, dest: Destination, policy: Policy) -> None:
        self.d = dest
        self.policy = policy
        self._reported: set[str] = set()

    def report_once(self, path: str, event: str, **fields: object) -> None:
        """Log an error about a file once, until it syncs again."""
        if path not in self._reported:
            self._reported.add(path)
            log.error(event, destination=self.d.name, key=path, **fields)

    async def sync_file(self, path: str) -> None:
        """Bring the main object of ``path`` up to date with the local file.

        Raises:
            StorageError: the destination failed (the journal is unchanged for
                the failed write).
            NotReady: the file is not ready yet.
            InvalidKeyError: the path cannot be an object key (not valid UTF-8).
        """
        if classify(path) is FileKind.IGNORED:
            return
        check_key(path)  # InvalidKeyError for names that cannot be keys (not UTF-8)
        d = self.d
        row = d.journal.get(d.name, path)
        async with observe(d.root, path, row, d.budget.hold) as seen:
            await self.execute(seen, row, self.decide(seen, row))

    def decide(self, seen: Observed, row: Entry | None) -> Action:
        """:func:`~evalsyncd.sync.plan.plan` at the current time, logging a rewrite's reason.

        Raises:
            NotReady: the plan is WAIT.
        """
        action = plan(seen.facts, row, time.time(), self.policy)
        if action.do is Do.WAIT:
            raise NotReady(action.after_s)
        if action.do in (Do.UPLOAD, Do.RECORD):
            self._reported.discard(seen.facts.path)  # valid again: report it if it breaks again
        if action.do is Do.UNREADABLE:
            log.warning(
                "file_unreadable", destination=self.d.name, key=seen.facts.path, error=action.reason
            )
        if action.do is Do.REWRITE and action.reason != NEW_FILE and row is not None:
            st = seen.facts.st
            log.warning(
                "file_changed_rewriting",
                destination=self.d.name,
                key=seen.facts.path,
                reason=action.reason,
                acked_offset=row.tail_offset,
                size=st.st_size if st is not None else 0,
            )
        return action

    async def execute(self, seen: Observed, row: Entry | None, action: Action) -> None:
        """Carry out ``action`` for the file ``seen`` describes (see :meth:`sync_file`)."""
        path, st = seen.facts.path, seen.facts.st
        if action.do in (Do.DELETED, Do.REMOVE):
            assert row is not None
            await self.deleted(path, row, remove=action.do is Do.REMOVE)
        elif action.do is Do.INVALID:
            assert st is not None
            self.record_invalid(seen, row, action)
        elif action.do in (Do.APPEND, Do.REWRITE):
            assert seen.fd is not None and st is not None
            await self._send_lines(path, seen.fd, st, row, action)
        elif action.do in (Do.UPLOAD, Do.RECORD):
            assert seen.data is not None and st is not None
            version = row.remote_version if row is not None else None
            if action.do is Do.UPLOAD:
                version = await self.timed_write(path, seen.data, 0, "write")
            self.d.journal.ack(
                new_entry(
                    self.d.name,
                    path,
                    st,
                    acked_offset=len(seen.data),
                    content_crc=seen.facts.crc,
                    remote_version=version,
                )
            )

    def record_invalid(self, seen: Observed, row: Entry | None, action: Action) -> None:
        """Report an unparseable ``*.json`` once and journal it as invalid (not uploaded)."""
        d, path, st = self.d, seen.facts.path, seen.facts.st
        assert st is not None
        self.report_once(
            path,
            "invalid_json_not_uploaded",
            file=str(d.root / path),
            error=action.reason,
            size=st.st_size,
        )
        base = row or new_entry(d.name, path, st)
        d.journal.ack(
            replace(
                base,
                status=EntryStatus.INVALID,
                seen_size=st.st_size,
                seen_mtime_ns=st.st_mtime_ns,
                dev=st.st_dev,
                ino=st.st_ino,
            )
        )

    async def deleted(self, path: str, row: Entry, *, remove: bool) -> None:
        """A file deleted locally: remove its main object (``remove``) or mark its row."""
        d = self.d
        if remove:
            await d.storage.aremove(path)
            d.journal.forget(d.name, path)
            log.info("delete_mirrored", destination=d.name, key=path)
        else:
            d.journal.ack(replace(row, status=EntryStatus.DELETED))
            log.info("local_file_deleted", destination=d.name, key=path, remote="kept")

    async def _send_lines(
        self, path: str, fd: int, st: os.stat_result, row: Entry | None, action: Action
    ) -> None:
        d = self.d
        rewrite = action.do is Do.REWRITE
        offset = action.offset
        version = row.remote_version if row is not None and not rewrite else None
        while True:
            async with d.budget.hold(min(st.st_size - offset, d.chunk_bytes)):
                data = await blocking(
                    st.st_size - offset, read_lines, fd, offset, st.st_size, d.chunk_bytes
                )
                if not data:
                    break
                end = offset + len(data)
                try:
                    if rewrite and offset == 0:
                        version = await self.timed_write(path, data, offset, "write")
                    else:
                        version = await self.append(path, data, offset)
                except RemoteDiverged:
                    log.warning(
                        "remote_diverged_rewriting", destination=d.name, key=path, offset=offset
                    )
                    rewrite, offset = True, 0
                    continue
                except RemoteAhead as adv:
                    end, version = adv.remote_size, adv.version
                finally:
                    data = b""  # the budget covers the bytes only while held
            d.appended()
            d.journal.ack(
                new_entry(
                    d.name,
                    path,
                    st,
                    acked_offset=end,
                    fingerprint=fingerprint_at(fd, end),  # one read of at most 4 KiB
                    remote_version=version,
                )
            )
            offset = end
            rewrite = False
        current = d.journal.get(d.name, path)
        if current is None or (current.seen_size, current.seen_mtime_ns) != (
            st.st_size,
            st.st_mtime_ns,
        ):
            # Nothing complete to send (an empty file or a partial line): remember the stat
            # so scans do not mark it again until it changes.
            if current is None and st.st_size == 0:
                version = await self.timed_write(path, b"", 0, "write")
                current = new_entry(d.name, path, st, remote_version=version)
            if current is not None:
                d.journal.ack(replace(current, seen_size=st.st_size, seen_mtime_ns=st.st_mtime_ns))

    async def append(self, path: str, data: bytes, offset: int) -> str | None:
        """Conditional append at ``offset``, with reconciliation on conflict.

        Returns:
            The main object's new version token.

        Raises:
            RemoteAhead: the remote already holds more of this file (a write applied
                before a crash): the journal jumps to the remote size.
            RemoteDiverged: the remote holds bytes that are not a prefix of the file.
            StorageError: the storage failed.
        """
        d = self.d
        try:
            return await self.timed_write(path, data, offset, "append")
        except (ConflictError, ObjectNotFoundError) as exc:
            log.warning(
                "append_conflict", destination=d.name, key=path, offset=offset, error=str(exc)
            )
        if d.owner is not None:
            await d.owner.confirm()  # a taken-over prefix: park, never rewrite the owner's object
        remote = await d.storage.astat(path)
        remote_size = remote.size if remote is not None else 0
        if remote_size <= offset:
            raise RemoteDiverged
        local_end = offset + len(data)
        if remote_size > local_end:
            # The remote is ahead of this delta; only a byte comparison against the
            # local file could confirm it, and this chunk does not cover it.
            raise RemoteDiverged
        remote_bytes = await d.storage.aread_range(path, offset, remote_size - offset)
        if remote_bytes != data[: remote_size - offset]:
            raise RemoteDiverged
        log.info("append_reconciled", destination=d.name, key=path, remote_size=remote_size)
        if remote_size == local_end:
            raise RemoteAhead(remote_size, remote.version if remote else None)
        rest = data[remote_size - offset :]
        return await self.timed_write(path, rest, remote_size, "append")

    async def timed_write(self, path: str, data: bytes, offset: int, op: str) -> str | None:
        """One write (``op="write"``, at offset 0) or append (``"append"``) of ``data``,
        paced, counted and reported to ``on_upload``.

        Returns:
            The object's new version token.

        Raises:
            StorageError: the storage failed.
        """
        d = self.d
        await d.throttle(len(data))
        started = d.clock()
        if op == "write":
            version = await d.storage.awrite(path, data)
        else:
            version = await d.storage.aappend(path, data, offset=offset)
        duration_s = d.clock() - started
        d.count_upload(op, len(data), duration_s)
        log.debug(
            "upload_succeeded",
            destination=d.name,
            key=path,
            op=op,
            start=offset,
            end=offset + len(data),
            bytes=len(data),
            duration_s=round(duration_s, 4),
        )
        return version
