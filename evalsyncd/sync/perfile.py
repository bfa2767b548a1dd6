"""The per-file shipper: each file straight to its main object.

::

    Batch --by phase--> observe --> plan --> dispatch (sync/shipper.py)
                        APPEND/REWRITE  complete lines, at most chunk_bytes a request,
                                        each a conditional append (or a write at 0)
                        UPLOAD          the whole content, one write
                        DELETED/REMOVE  journal (and the remote object, mirror_deletes)
                        RECORD/INVALID  journal only (done by the dispatch)
                        WAIT            deferred in the outcome: the scheduler retries later

Every acknowledgement goes to the journal after the storage confirmed the
write, with the version it returned. A conflict (someone else changed the
object, or a write applied before a crash was never journaled) is reconciled
by reading the remote size and comparing bytes: never a blind append
(:meth:`PerFileShipper.append`). Used alone (local destinations,
``max_main_lag_s = 0``) and by the tail shipper for big deltas.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import structlog

from evalsyncd.errors import ConflictError, ObjectNotFoundError, StorageError
from evalsyncd.storage import check_key
from evalsyncd.sync.files import FileKind, classify
from evalsyncd.sync.journal import Entry, EntryStatus
from evalsyncd.sync.lines import RemoteAhead, RemoteDiverged, fingerprint_at, new_entry
from evalsyncd.sync.passes import by_phase, release_frames, worst_error
from evalsyncd.sync.plan import Action, Do, Observed, observe
from evalsyncd.sync.shipper import (
    Batch,
    Context,
    NotReady,
    Outcome,
    Reporter,
    dispatch,
    settle,
)

__all__ = ["NotReady", "PerFileShipper"]

log = structlog.get_logger("evalsyncd.sync")


class PerFileShipper:
    """The per-file path of one destination; see the module docstring.

    Args:
        ctx: the destination's shipping context.
        reporter: who logs a file's error once (shared with the tail shipper).
    """

    def __init__(self, ctx: Context, reporter: Reporter | None = None) -> None:
        self.ctx = ctx
        self.reporter = reporter or Reporter(ctx.name)
        self.chunk_bytes = 8 * 1024 * 1024
        """Most file bytes one request carries (set from each :class:`Batch`), bytes."""

    # -- the Shipper protocol --------------------------------------------------------------

    @property
    def behind(self) -> int:
        """Always 0: every acknowledged byte is in its main object."""
        return 0

    def next_due_in(self) -> float | None:
        """Always ``None``: nothing is due but dirty files."""
        return None

    def drain_all(self) -> None:
        """Nothing to drain: main objects are exact after each pass."""

    async def ship(self, batch: Batch) -> Outcome:
        """Sync every path of ``batch``, phase by phase; see :class:`Outcome`."""
        outcome = Outcome()
        self.chunk_bytes = batch.chunk_bytes
        try:
            await self.ctx.ensure_owner()  # another daemon's prefix: write nothing
        except StorageError as exc:
            outcome.error = exc
            return outcome
        await self.ship_paths(list(batch.paths), outcome)
        if outcome.error is not None:
            outcome.error = await self.ctx.explain(outcome.error)
        return outcome

    async def ship_paths(self, paths: list[str], outcome: Outcome) -> None:
        """Sync ``paths`` one request (or a few) per file, phase by phase, into ``outcome``.

        The first failed phase sets ``outcome.error`` (a permanent error first);
        later phases are not started.
        """
        async with contextlib.aclosing(by_phase(paths, str, self._guarded)) as phases:
            async for results in phases:
                self.ctx.journal.commit()
                error = worst_error(results)
                for path, result in results:
                    if result is None:
                        outcome.done.append(path)
                    elif not isinstance(result, StorageError):
                        settle(self.ctx.name, self.reporter, outcome, path, result)
                    if result is not None and result is not error:
                        release_frames(result)
                del results
                if error is not None:
                    outcome.error = error
                    break

    async def _guarded(self, path: str) -> None:
        async with self.ctx.sem:
            await self.sync_file(path)

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
        ctx = self.ctx
        row = ctx.journal.get(ctx.name, path)
        async with observe(ctx.root, path, row, ctx.budget.hold) as seen:
            await dispatch(ctx, self.reporter, seen, row, self)

    # -- the Sender protocol ---------------------------------------------------------------

    async def send_whole(self, seen: Observed, row: Entry | None) -> None:
        """UPLOAD: the whole content in one write, then its row."""
        st = seen.facts.st
        assert seen.data is not None and st is not None
        if row is not None and row.content_crc is not None:
            # The write may land and its acknowledgement be lost (a crash before the
            # journal commits): forget the CRC of the content sent before, or the file
            # going back to that content would be taken as sent (RECORD) while the
            # object holds this one. Only for a file sent before: a backfill pays nothing.
            self.ctx.journal.ack(replace(row, content_crc=None))
            self.ctx.journal.commit()
        version = await self.ctx.timed_write(seen.facts.path, seen.data, 0, "write")
        self.ctx.journal.ack(
            new_entry(
                self.ctx.name,
                seen.facts.path,
                st,
                acked_offset=len(seen.data),
                content_crc=seen.facts.crc,
                remote_version=version,
            )
        )

    async def send_deleted(self, path: str, row: Entry, *, remove: bool) -> None:
        """A file deleted locally: remove its main object (``remove``) or mark its row."""
        ctx = self.ctx
        if remove:
            await ctx.storage.aremove(path)
            ctx.journal.forget(ctx.name, path)
            log.info("delete_mirrored", destination=ctx.name, key=path)
        else:
            ctx.journal.ack(replace(row, status=EntryStatus.DELETED))
            log.info("local_file_deleted", destination=ctx.name, key=path, remote="kept")

    async def send_lines(self, seen: Observed, row: Entry | None, action: Action) -> None:
        """APPEND/REWRITE: the complete lines from the action's offset, a chunk a request."""
        ctx, path, fd, st = self.ctx, seen.facts.path, seen.fd, seen.facts.st
        assert fd is not None and st is not None
        rewrite = action.do is Do.REWRITE
        offset = action.offset
        version = row.remote_version if row is not None and not rewrite else None
        while True:
            async with ctx.read_delta(fd, offset, st.st_size, self.chunk_bytes) as data:
                if not data:
                    break
                end = offset + len(data)
                try:
                    if rewrite and offset == 0:
                        version = await ctx.timed_write(path, data, offset, "write")
                    else:
                        version = await self.append(path, data, offset)
                except RemoteDiverged:
                    log.warning(
                        "remote_diverged_rewriting", destination=ctx.name, key=path, offset=offset
                    )
                    rewrite, offset = True, 0
                    continue
                except RemoteAhead as adv:
                    end, version = adv.remote_size, adv.version
                finally:
                    data = b""  # the budget covers the bytes only while held
            row = new_entry(
                ctx.name,
                path,
                st,
                acked_offset=end,
                fingerprint=fingerprint_at(fd, end),  # one read of at most 4 KiB
                remote_version=version,
            )
            # Not the file's stat yet: until its last chunk is acknowledged (below), a scan
            # must find it changed, or a failure after this chunk would leave it behind
            # until the file changes again.
            ctx.journal.ack(replace(row, seen_size=-1))
            offset = end
            rewrite = False
        current = ctx.journal.get(ctx.name, path)
        if rewrite and offset == 0 and current is not None:
            # Replaced or truncated with no complete line: the remote holds an older
            # file. Empty it (the first complete line follows as an append).
            version = await ctx.timed_write(path, b"", 0, "write")
            current = new_entry(ctx.name, path, st, remote_version=version)
            ctx.journal.ack(current)
        elif current is None or (current.seen_size, current.seen_mtime_ns) != (
            st.st_size,
            st.st_mtime_ns,
        ):
            # Nothing complete to send (an empty file or a partial line): remember the stat
            # so scans do not mark it again until it changes.
            if current is None and st.st_size == 0:
                version = await ctx.timed_write(path, b"", 0, "write")
                current = new_entry(ctx.name, path, st, remote_version=version)
            if current is not None:
                ctx.journal.ack(
                    replace(current, seen_size=st.st_size, seen_mtime_ns=st.st_mtime_ns)
                )

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
        ctx = self.ctx
        try:
            return await ctx.timed_write(path, data, offset, "append")
        except (ConflictError, ObjectNotFoundError) as exc:
            log.warning(
                "append_conflict", destination=ctx.name, key=path, offset=offset, error=str(exc)
            )
        remote = await ctx.storage.astat(path)
        if ctx.owner is not None:
            # A taken-over prefix: park, never rewrite the new owner's object. The claim
            # is read after the stat: a new owner claims before its first write, so a
            # remote changed by it is always explained by the claim read here.
            await ctx.owner.confirm()
        remote_size = remote.size if remote is not None else 0
        if remote_size <= offset:
            raise RemoteDiverged
        local_end = offset + len(data)
        if remote_size > local_end:
            # The remote is ahead of this delta; only a byte comparison against the
            # local file could confirm it, and this chunk does not cover it.
            raise RemoteDiverged
        remote_bytes = await ctx.storage.aread_range(path, offset, remote_size - offset)
        if remote_bytes != data[: remote_size - offset]:
            raise RemoteDiverged
        log.info("append_reconciled", destination=ctx.name, key=path, remote_size=remote_size)
        if remote_size == local_end:
            raise RemoteAhead(remote_size, remote.version if remote else None)
        rest = data[remote_size - offset :]
        return await ctx.timed_write(path, rest, remote_size, "append")
